"""``convert``: a trained checkpoint of any task turned into another attention variant, written as a normal checkpoint.

``python cli.py convert SRC DST --sharing Q-K=V [--n_kv_heads N] [--method mean|keep|fit] [--keep K|V]
[--calibration_batches N] [--config FIT_CONFIG]``

The weights of every layer but the attention's fused projection are copied; the fused projection is rewritten by
:func:`qkv_lightning.uptrain.surgery.convert_attention` (formulas there). The destination holds the new weights and
the source's hyper-parameters with the new variant, so ``validate`` / ``test`` / ``predict --ckpt_path DST`` load it
as any checkpoint (the same safe-loading checks, :func:`qkv_lightning.resume.check_fits`; a tokenizer that ``import``
stored goes along, so ``--data.tokenizer_file DST`` reads it), and ``fit
--model.init_args.init_from DST`` fine-tunes it with a fresh optimiser (``fit --ckpt_path DST`` cannot: there is no
optimiser state to continue). An existing destination is never overwritten.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from qkv_lightning.errors import CheckpointError, ConfigError
from qkv_lightning.nn.attention import Attention
from qkv_lightning.tasks.base import TaskModule
from qkv_lightning.tasks.persist import build_task, load_task
from qkv_lightning.uptrain.surgery import METHODS, check_reachable, convert_attention
from qkv_lightning.variants import Variant


def attention_layers(task: Any) -> dict[str, Attention]:
    """The network's attention layers by module name."""
    return {name: module for name, module in task.network.named_modules() if isinstance(module, Attention)}


def calibration_grams(task: Any, batches: list[Any]) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` of each attention layer's augmented input ``[x; 1]`` (the fused projection's input), over the
    tokens of ``batches`` run through the task's training loss in eval mode (no dropout, no gradients)."""
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def record(module: Any, args: tuple, output: Any) -> None:
            x = args[0].detach().flatten(0, -2).double()  # (N, C)
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)  # (N, C + 1)
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    for name, attn in attention_layers(task).items():
        hooks.append(attn.qkv.register_forward_hook(hook(name)))
    was_training = task.training
    task.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                task.training_loss(batch)
    finally:
        for handle in hooks:
            handle.remove()
        task.train(was_training)
    return {name: gram / counts[name] for name, gram in grams.items()}


def calibration_batches(args: list[str], count: int) -> list[Any]:
    """The first ``count`` training batches of the data that the fit config of ``args`` (``--config FILE ...``)
    describes."""
    from qkv_lightning.lightning_cli import QKVLightningCLI

    _, datamodule, _ = QKVLightningCLI.instantiate_without_trainer(list(args))
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) >= count:
            break
    return batches


def run_config_of(source: Path) -> Path | None:
    """The ``config.yaml`` that LightningCLI saved beside the checkpoint's run (``<run>/checkpoints/x.ckpt``)."""
    for folder in (source.parent, source.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def convert_task(
    source: Any,
    variant: Variant,
    method: str = "mean",
    keep: str | None = None,
    grams: dict[str, torch.Tensor] | None = None,
) -> Any:
    """A task of ``variant`` built from the trained task ``source`` (see the module docstring); ``variant``'s
    breakers are ignored (the source's symmetry breakers are kept)."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not a conversion method; use one of {', '.join(METHODS)}.")
    if method == "keep" and keep not in ("Q", "K", "V"):
        raise ConfigError(f"--method keep needs --keep Q, K or V (the role whose projection is kept), got {keep!r}.")
    settings = dataclasses.asdict(source.attention_config)  # the fields (not what the config parsed from them)
    attention = {**settings, "sharing": variant.sharing, "n_kv_heads": variant.n_kv_heads}
    if "layers" in attention:
        attention["layers"] = None  # the target is one variant in every layer (a per-layer schedule is converted away)
    try:
        target = build_task(
            dict(source.hparams), "the source checkpoint", expected=type(source), replace={"attention": attention},
            drop=("init_from",),  # the converted model starts from these weights, not from its source's source
        )
    except (ConfigError, CheckpointError) as error:
        raise ConfigError(f"--sharing {variant.sharing} --n_kv_heads {variant.n_kv_heads}: {error}") from None
    src_layers, tgt_layers = attention_layers(source), attention_layers(target)
    for name in src_layers:
        check_reachable(src_layers[name].layout, tgt_layers[name].layout)
    fused = {f"network.{name}.qkv.{part}" for name in tgt_layers for part in ("weight", "bias")}
    state = {k: v for k, v in source.state_dict().items() if k not in fused}
    missing, unexpected = target.load_state_dict(state, strict=False)
    if [k for k in missing if k not in fused] or unexpected:
        raise CheckpointError(f"convert: the target's weights differ from the source's ({missing}; {unexpected}).")
    rope = getattr(source.network_config, "position", None) == "rope"
    for name, attn in tgt_layers.items():
        gram = None if grams is None else grams[name]
        convert_attention(src_layers[name], attn, method, keep, gram, rope)  # type: ignore[arg-type]
    return target


def convert(
    source: str | Path,
    destination: str | Path,
    sharing: str,
    n_kv_heads: int | None = None,
    method: str = "mean",
    keep: str | None = None,
    calibration_batches_count: int = 8,
    config: str | Path | None = None,
    calibration_args: list[str] | None = None,
) -> dict[str, Any]:
    """Convert the checkpoint ``source`` into ``destination`` (see :func:`main`); returns the written checkpoint.
    ``fit`` reads its calibration data from the fit config ``config`` (default: the run's saved config.yaml), or
    from the command-line arguments ``calibration_args`` (``--config FILE --data.x y``)."""
    from qkv_lightning.checkpoints import atomic_save, start_checkpoint
    from qkv_lightning.config_files import run_config_text

    source, destination = Path(source), Path(destination)
    if destination.exists():
        raise ConfigError(f"the destination {destination} exists already; convert never overwrites: name a new file.")
    if not destination.parent.is_dir():
        raise ConfigError(f"the destination's folder {destination.parent} does not exist; create it first.")
    variant = Variant(sharing, n_kv_heads)
    task, checkpoint = load_task(source, expected=TaskModule, drop=("init_from",))
    grams = None
    if method == "fit":
        if calibration_batches_count < 1:
            raise ConfigError("--method fit needs --calibration_batches N >= 1 (batches of the run's training data).")
        if calibration_args is None:
            config = Path(config) if config else run_config_of(source)
            if config is None or not Path(config).is_file():
                raise ConfigError(
                    f"--method fit reads calibration batches of the run's training data, but no config.yaml was found "
                    f"beside {source}; pass the run's fit config with --config FILE."
                )
            calibration_args = ["--config", run_config_text(config)]
        grams = calibration_grams(task, calibration_batches(calibration_args, calibration_batches_count))
    target = convert_task(task, variant, method, keep, grams)
    provenance = {
        "source": str(source),
        "source_variant": Variant.of(task.attention_config, task.network_config.n_head).label,
        "variant": Variant.of(target.attention_config, target.network_config.n_head).label,
        "method": method,
        "keep": keep,
        "calibration_batches": calibration_batches_count if method == "fit" else 0,
    }
    from qkv_lightning.data.hf_tokenizer import CHECKPOINT_ENTRY

    kept = {CHECKPOINT_ENTRY: checkpoint[CHECKPOINT_ENTRY]} if CHECKPOINT_ENTRY in checkpoint else {}  # its tokenizer
    result = start_checkpoint(target, converted_from=provenance, **kept)
    atomic_save(result, destination)
    return result


def main(argv: list[str]) -> int:
    """``convert SRC DST --sharing ...``: see :func:`run`."""
    from qkv_lightning.command_line import run_function

    def run(
        source: str,
        destination: str,
        sharing: str | None = None,
        n_kv_heads: int | None = None,
        method: str = "mean",
        keep: str | None = None,
        calibration_batches: int = 8,
        config: str | None = None,
    ) -> None:
        """Turn a trained checkpoint of any task into another attention variant, written as a normal checkpoint
        (fine-tune it with fit --model.init_args.init_from DESTINATION; validate/test --ckpt_path DESTINATION).

        Methods, per group of roles that the target shares (A_r = [W_r | b_r], each role's projection):
        mean: A = mean_r A_r, weights and biases; fewer K/V heads mean-pool the heads of each group (GQA).
        keep: A = A_keep (--keep Q, K or V; the other roles of the group are dropped).
        fit: least squares on the layer's inputs x over --calibration_batches batches of the run's training data:
        for K=V, min over S and per-head maps M_r of sum_r E||M_r S x - A_r x||^2, the maps folded into the query
        rows (M_K, not under RoPE) and the output projection (M_V), so it is never worse than mean on the
        calibration data and exact when V is a per-head linear map of K; for Q=K, S^T S is the best rank-D
        positive semi-definite match of the scores' bilinear form sym(A_Q^T A_K) in the inputs' metric.

        Args:
            source: the trained checkpoint (a single .ckpt file; consolidate sharded folders first).
            destination: the file to write; it must not exist.
            sharing: the target's projection sharing (QKV, Q=K-V, Q-K=V, Q=V-K, Q=K=V); its groups must be unions of
                the source's (no projection is invented).
            n_kv_heads: the target's K/V heads (null: the source's count for separate K/V groups is kept if it is
                the query heads' count, i.e. null means as many as query heads).
            method: mean, keep or fit.
            keep: the role kept by --method keep: Q, K or V.
            calibration_batches: training batches whose attention inputs --method fit is solved on.
            config: the run's fit config (for --method fit's data); default: the config.yaml saved beside the run.
        """
        if not sharing:
            raise ConfigError("convert needs --sharing: the target's projection sharing, e.g. --sharing Q-K=V.")
        written = convert(source, destination, sharing, n_kv_heads, method, keep, calibration_batches, config)
        info = written["converted_from"]
        print(
            f"wrote {destination}: {info['source_variant']} -> {info['variant']} by {method}"
            f"{f' (keep {keep})' if method == 'keep' else ''}; fine-tune with fit --model.init_args.init_from "
            f"{destination}, evaluate with validate --ckpt_path {destination}"
        )

    run_function("convert", run, argv)
    return 0
