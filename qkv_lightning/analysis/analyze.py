"""``python cli.py analyze --ckpt_path RUN/checkpoints/last.ckpt [--batches N] [--out DIR]``: for each layer and head
of a trained model, on real data from the run's own data config, the cosine similarities of the Q, K and V outputs,
the effective ranks of each projection's weights and outputs, the principal angles between the projections' row
spaces, the attention entropy and its distance from uniform, and the asymmetry of the logits (definitions in
:mod:`qkv_lightning.analysis.metrics`). Writes ``analysis.md``, ``analysis.json``, ``heatmaps.png`` (layer x head)
and TensorBoard events into ``--out``.

Pairs of roles that share a projection are reported as tied (their cosine is 1 and their angles 0 by construction),
and the logits of a variant with Q=K and no score encoding as symmetric by construction, not as findings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch

from qkv_lightning.analysis.capture import LayerCapture, head_index, role_weights, run_batches
from qkv_lightning.analysis.metrics import (
    distribution,
    effective_rank,
    principal_angles,
    random_subspace_angle,
    token_cosines,
)
from qkv_lightning.command_line import command_parser, parse_with_overrides, torch_device
from qkv_lightning.errors import CheckpointError, ConfigError

PAIRS = (("Q", "K"), ("Q", "V"), ("K", "V"))
PAPER_COSINES = {"Q-K": 0.42, "Q-V": 0.31, "K-V": 0.73}
"""The paper's mean cosine similarities of the Q, K and V outputs of a trained standard (QKV) model."""
OUTPUT_FILES = ("analysis.md", "analysis.json", "heatmaps.png")
HEATMAPS = (
    ("cos Q-K", "cosine", "Q-K"),
    ("cos Q-V", "cosine", "Q-V"),
    ("cos K-V", "cosine", "K-V"),
    ("angle Q-K (deg)", "angle_deg", "Q-K"),
    ("angle K-V (deg)", "angle_deg", "K-V"),
    ("entropy (nats)", "entropy", None),
    ("KL to uniform (nats)", "kl_uniform", None),
    ("logit asymmetry / mean |A|", "asymmetry_rel", None),
)


def _tied(layer: LayerCapture, a: str, b: str) -> bool:
    """Whether roles ``a`` and ``b`` of this layer come from one projection (of the layer that projects them)."""
    owner = layer.owner(a)
    return owner is layer.owner(b) and owner.module.sharing.group_of(a) == owner.module.sharing.group_of(b)


def symmetric_by_construction(layer: LayerCapture) -> bool:
    """Q and K share one projection and no score encoding is added: the logits are symmetric (also with RoPE)."""
    return _tied(layer, "Q", "K") and layer.module.score_encoding is None and layer.module.plain_qk


def analyze_layers(layers: list[LayerCapture]) -> list[dict[str, Any]]:
    """Per layer: its variant and, per query head, every measure (None where it holds by construction)."""
    out = []
    for index, layer in enumerate(layers):
        module = layer.module
        outputs = {role: layer.role_outputs(role) for role in ("Q", "K", "V")}  # (N, heads, D)
        heads = []
        for h in range(module.n_head):
            row: dict[str, Any] = {"head": h, "cosine": {}, "cosine_distribution": {}, "angle_deg": {}}
            vectors = {role: outputs[role][:, head_index(layer.owner(role).module, role, h)] for role in outputs}
            weights = {role: role_weights(layer.owner(role).module, role, h) for role in outputs}  # (D, C)
            for a, b in PAIRS:
                pair = f"{a}-{b}"
                if _tied(layer, a, b):
                    row["cosine"][pair] = row["angle_deg"][pair] = None
                    row["cosine_distribution"][pair] = None
                    continue
                stats = distribution(token_cosines(vectors[a], vectors[b]))
                row["cosine"][pair] = stats["mean"]
                row["cosine_distribution"][pair] = stats
                row["angle_deg"][pair] = math.degrees(float(principal_angles(weights[a], weights[b]).mean()))
            row["erank_weight"] = {role: effective_rank(weights[role]) for role in outputs}
            row["erank_output"] = {role: effective_rank(vectors[role]) for role in outputs}
            rows = max(layer.rows, 1)
            for key, sums in (("entropy", layer.entropy_sum), ("kl_uniform", layer.kl_sum),
                              ("uniform_entropy", layer.max_entropy_sum)):
                row[key] = None if sums is None else float(sums[h]) / rows
            samples = max(layer.samples, 1)
            if symmetric_by_construction(layer):
                row["asymmetry"] = row["asymmetry_rel"] = None
            else:
                row["asymmetry"] = float(layer.asym_sum[h]) / samples
                row["asymmetry_rel"] = float(layer.asym_sum[h] / layer.abs_sum[h].clamp_min(1e-300))
            heads.append(row)
        out.append(
            {
                "layer": index,
                "sharing": module.sharing.name,
                "n_head": module.n_head,
                "n_kv_heads": module.n_kv_heads,
                "head_dim": module.head_dim,
                "d_model": module.qkv.in_features,
                "tokens": layer.tokens,
                "symmetric_logits_by_construction": symmetric_by_construction(layer),
                "tied_pairs": [f"{a}-{b}" for a, b in PAIRS if _tied(layer, a, b)],
                "kv_from_layer": None if layer.source is None else layers.index(layer.source),
                "heads": heads,
            }
        )
    return out


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def summarize(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over every (layer, head), and the references to read them against."""
    heads = [h for layer in layers for h in layer["heads"]]
    summary: dict[str, Any] = {
        "cosine": {p: _mean([h["cosine"][p] for h in heads]) for p in PAPER_COSINES},
        "angle_deg": {p: _mean([h["angle_deg"][p] for h in heads]) for p in PAPER_COSINES},
        "erank_weight": {r: _mean([h["erank_weight"][r] for h in heads]) for r in "QKV"},
        "erank_output": {r: _mean([h["erank_output"][r] for h in heads]) for r in "QKV"},
        "entropy": _mean([h["entropy"] for h in heads]),
        "uniform_entropy": _mean([h["uniform_entropy"] for h in heads]),
        "kl_uniform": _mean([h["kl_uniform"] for h in heads]),
        "asymmetry": _mean([h["asymmetry"] for h in heads]),
        "asymmetry_rel": _mean([h["asymmetry_rel"] for h in heads]),
    }
    first = layers[0]
    summary["random_subspace_angle_deg"] = random_subspace_angle(first["head_dim"], first["d_model"])
    summary["paper_cosine"] = dict(PAPER_COSINES)
    return summary


def _f(value: float | None, digits: int = 2) -> str:
    return "tied" if value is None else f"{value:.{digits}f}"


def _triple(values: dict[str, float | None], keys: Sequence[str], digits: int = 2) -> str:
    return " / ".join(_f(values[k], digits) for k in keys)


def format_markdown(result: dict[str, Any]) -> str:
    """The tables of ``analysis.md``: one row per layer and head, then the means."""
    pairs = list(PAPER_COSINES)
    lines = [
        f"analyze {result['checkpoint']}: {result['tokens']} tokens of {result['split']} ({result['batches']} batches)",
        "",
        "| layer | head | variant | cos Q-K / Q-V / K-V | angle deg Q-K / Q-V / K-V | erank W Q / K / V "
        "| erank out Q / K / V | entropy (uniform) | KL to uniform | logit asym (rel) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer in result["layers"]:
        for h in layer["heads"]:
            asym = "0 (Q=K)" if h["asymmetry"] is None else f"{h['asymmetry']:.3f} ({h['asymmetry_rel']:.2f})"
            lines.append(
                f"| {layer['layer']} | {h['head']} | {layer['sharing']} | {_triple(h['cosine'], pairs)} "
                f"| {_triple(h['angle_deg'], pairs, 1)} | {_triple(h['erank_weight'], 'QKV', 1)} "
                f"| {_triple(h['erank_output'], 'QKV', 1)} | {_f(h['entropy'])} ({_f(h['uniform_entropy'])}) "
                f"| {_f(h['kl_uniform'])} | {asym} |"
            )
    s = result["summary"]
    d = result["layers"][0]["head_dim"]
    lines += [
        "",
        "| mean over layers and heads | Q-K | Q-V | K-V |",
        "|---|---|---|---|",
        f"| output cosine | {_f(s['cosine']['Q-K'])} | {_f(s['cosine']['Q-V'])} | {_f(s['cosine']['K-V'])} |",
        f"| paper (trained standard QKV model) | {PAPER_COSINES['Q-K']} | {PAPER_COSINES['Q-V']} "
        f"| {PAPER_COSINES['K-V']} |",
        f"| mean principal angle (deg) | {_f(s['angle_deg']['Q-K'], 1)} | {_f(s['angle_deg']['Q-V'], 1)} "
        f"| {_f(s['angle_deg']['K-V'], 1)} |",
        "",
        f"Effective rank (Roy & Vetterli 2007, exp of the entropy of the normalised singular values; at most D={d}): "
        f"weights Q {_f(s['erank_weight']['Q'], 1)}, K {_f(s['erank_weight']['K'], 1)}, "
        f"V {_f(s['erank_weight']['V'], 1)}; outputs Q {_f(s['erank_output']['Q'], 1)}, "
        f"K {_f(s['erank_output']['K'], 1)}, V {_f(s['erank_output']['V'], 1)}. Random {d}-dimensional subspaces of "
        f"R^{result['layers'][0]['d_model']} are {s['random_subspace_angle_deg']:.1f} deg apart on average. "
        f"Attention entropy {_f(s['entropy'])} nats (uniform attention: {_f(s['uniform_entropy'])}), "
        f"KL to uniform {_f(s['kl_uniform'])} nats. 'tied': the two roles share one projection (cosine 1, angle 0 by "
        "construction); '0 (Q=K)': the logits are symmetric by construction.",
    ]
    return "\n".join(lines) + "\n"


def heatmap_grid(result: dict[str, Any], key: str, pair: str | None) -> list[list[float]]:
    """A (layers x heads) grid of one measure (NaN where tied or symmetric by construction)."""
    grid = []
    for layer in result["layers"]:
        row = []
        for h in layer["heads"]:
            value = h[key][pair] if pair is not None else h[key]
            row.append(float("nan") if value is None else float(value))
        grid.append(row)
    return grid


def write_heatmaps(result: dict[str, Any], path: Path) -> Any:
    """One panel per measure of :data:`HEATMAPS`, layer (rows) x head (columns); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, n_heads = len(result["layers"]), max(len(layer["heads"]) for layer in result["layers"])
    cols = 4
    rows = math.ceil(len(HEATMAPS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.5 + rows * (1.0 + 0.35 * n_layers)), squeeze=False)
    for ax, (title, key, pair) in zip(axes.flat, HEATMAPS, strict=False):
        grid = heatmap_grid(result, key, pair)
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, "tied" if math.isnan(value) else f"{value:.2f}", ha="center", va="center",
                        fontsize=6, color="white")
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in list(axes.flat)[len(HEATMAPS):]:
        ax.axis("off")
    fig.suptitle(f"analyze: {result['variant']}", fontsize=10)
    fig.tight_layout()
    from qkv_lightning.files import atomic_open

    with atomic_open(path, "wb") as file:
        fig.savefig(file, format="png", dpi=110)
    return fig


def write_tensorboard(result: dict[str, Any], folder: Path, figure: Any, markdown: str) -> None:
    """Per-layer means as scalars over depth (step = layer), the heat maps as a figure, the table as text."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for layer in result["layers"]:
            step = layer["layer"]
            for _, key, pair in HEATMAPS:
                values = [h[key][pair] if pair is not None else h[key] for h in layer["heads"]]
                mean = _mean(values)
                if mean is not None:
                    tag = key if pair is None else f"{key}/{pair}"
                    writer.add_scalar(f"analyze/{tag}", mean, step)
        writer.add_figure("analyze/heatmaps", figure, 0)
        writer.add_text("analyze/table", markdown, 0)
    finally:
        writer.close()


# ------------------------------------------------------------------------------------------------------- loading
def _run_config(ckpt: Path) -> Path:
    candidate = ckpt.parent.parent / "config.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"no config.yaml next to the run of {ckpt} (looked for {candidate}); pass the run's task config with "
            "--config (the one it was trained with)."
        )
    return candidate


def load_trained(ckpt_path: str, configs: Sequence[str] | None, overrides: Sequence[str]) -> tuple[Any, Any]:
    """The task of the checkpoint (built from its run's config, the weights loaded) and its datamodule.

    Raises:
        CheckpointError: for a sharded folder (consolidate it first) or a checkpoint that does not fit the config.
    """
    from qkv_lightning.bench.common import load_task
    from qkv_lightning.checkpoints import load_checkpoint_file
    from qkv_lightning.config_files import run_config_text
    from qkv_lightning.resume import CheckpointInfo, check_fits

    path = Path(ckpt_path)
    if path.is_dir():
        raise CheckpointError(
            f"--ckpt_path {path} is a sharded checkpoint folder: turn it into one file with `python cli.py "
            f"consolidate {path} consolidated.ckpt` and analyze that."
        )
    checkpoint = load_checkpoint_file(path, weights_only=True)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    paths = [Path(c) for c in configs] if configs else [_run_config(path)]
    args = [text for p in paths for text in ("--config", run_config_text(p))]
    loaded = load_task(args[1::2], overrides, data_spec=hparams.get("data_spec"), prepare=True)
    task = loaded.task
    shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")}
    check_fits(task, CheckpointInfo(path, False, shapes, hparams))
    task.compile_blocks = False  # hooks on eager modules
    task.configure_model()
    task.load_state_dict(checkpoint["state_dict"])
    return task, loaded.datamodule


def data_batches(datamodule: Any, split: str, batches: int, device: torch.device) -> list[Any]:
    """The first ``batches`` batches of the datamodule's ``split`` loader, on ``device``."""
    from lightning.pytorch.utilities import move_data_to_device

    if datamodule is None:
        raise ConfigError("the run's config has no datamodule (data.class_path) to read batches from.")
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    datamodule.setup("validate" if split == "val" else "test")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    if isinstance(loader, list | tuple):
        loader = loader[0]
    out = [move_data_to_device(batch, device) for batch in islice(loader, batches)]
    if not out:
        raise ConfigError(f"the {split} split gave no batches; choose another with --split.")
    return out


def analyze(task: Any, batches: list[Any], max_tokens: int = 8192) -> dict[str, Any]:
    """Run the measures on ``batches`` (the task's own forward pass) and return the result (as ``analysis.json``)."""
    captured = run_batches(task, batches, max_tokens)
    if not captured:
        raise ConfigError(f"{type(task).__name__}'s network has no attention layer to analyze.")
    layers = analyze_layers(captured)
    return {
        "variant": ", ".join(dict.fromkeys(layer["sharing"] for layer in layers)),
        "tokens": captured[0].tokens,
        "layers": layers,
        "summary": summarize(layers),
        "definitions": {
            "cosine": "per token and head, cos of the raw (pre-RoPE) projection outputs; mean and quantiles",
            "erank": "Roy & Vetterli 2007: exp(entropy of singular values / their sum), uncentred; weights: the "
            "head's D rows of the fused projection (bias left out); outputs: (tokens x D)",
            "angle_deg": "mean principal angle between the row spaces of the two roles' head weights (D x C)",
            "entropy": "nats per query row that sees more than one key; kl_uniform = log(keys) - entropy",
            "asymmetry": "mean |A - A^T| of the logits before masks; asymmetry_rel divides by mean |A|",
        },
    }


@dataclass
class AnalyzeOptions:
    """The options of ``analyze``."""

    ckpt_path: str
    """a single-file checkpoint of a fit run"""
    batches: int = 4
    """batches of the split to run"""
    split: Literal["val", "test"] = "val"
    """data split"""
    max_tokens: int = 8192
    """token vectors kept per layer"""
    out: str | None = None
    """output folder; default: <run folder>/analysis"""
    overwrite: bool = False
    """replace the outputs of an earlier analyze"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda if available)"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``analyze``; ``--config`` (default: the run's config.yaml) and its ``--model...``/``--data...``
    options give the run's task config."""
    parser = command_parser("analyze", AnalyzeOptions, description=__doc__.split("\n\n")[0], task_config="optional")
    args, overrides = parse_with_overrides(parser, argv or [])
    if args.batches < 1 or args.max_tokens < 1:
        raise ConfigError("--batches and --max_tokens must be at least 1.")
    ckpt = Path(args.ckpt_path)
    out = Path(args.out) if args.out else ckpt.parent.parent / "analysis"
    existing = [name for name in (*OUTPUT_FILES, "tensorboard") if (out / name).exists()]
    if existing and not args.overwrite:
        raise ConfigError(
            f"{out} already holds the outputs of an analyze ({', '.join(existing)}); pass another --out, or "
            "--overwrite true to replace them."
        )
    device = torch_device(args.device)
    task, datamodule = load_trained(args.ckpt_path, args.config, overrides)
    task.to(device)
    batches = data_batches(datamodule, args.split, args.batches, device)
    result = analyze(task, batches, args.max_tokens)
    result.update(checkpoint=str(ckpt), split=args.split, batches=len(batches))
    markdown = format_markdown(result)
    from qkv_lightning.files import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "analysis.md", markdown)
    atomic_write_json(out / "analysis.json", result)
    figure = write_heatmaps(result, out / "heatmaps.png")
    write_tensorboard(result, out / "tensorboard", figure, markdown)
    print(markdown)
    print(f"wrote {out / 'analysis.md'}, analysis.json, heatmaps.png and TensorBoard events in {out / 'tensorboard'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(__import__("sys").argv[1:]))
