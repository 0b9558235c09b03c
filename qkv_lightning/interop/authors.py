"""The paper authors' own checkpoints as checkpoints of our tasks, exactly.

The authors' repository (Brainchip-Inc/Do-Transformers-Need-3-Projections) saves three kinds of ``torch.save`` dicts,
all with the weights under ``model_state_dict`` (``module.`` / ``_orig_mod.`` prefixes of DDP and ``torch.compile``
are removed):

- ``authors-lm``: their language models (``transformer_*_300_M.py`` / ``*_1_2B.py``), saved as ``{step, epoch,
  tokens_seen, model_state_dict, model_config, train_config}`` (+ ``val_metrics`` in the final file, + the optimizer
  state in intermediate ones, not read). A GPT-2-shaped decoder: ``wte``, ``wpe``, blocks ``h.i`` with ``ln_1``,
  ``attn``, ``ln_2``, ``mlp.c_fc`` / ``mlp.c_proj`` (exact GELU), ``ln_f``, a head tied to ``wte`` (or
  ``lm_head``). The attention's projections name the layout; concatenated in the order listed they are exactly the
  rows of our fused projection (:class:`~qkv_lightning.nn.sharing.ProjectionLayout`), their K/V heads repeated
  ``repeat_interleave``-wise as ours are:

  ========= ====================== ===================================
  script    projections            our variant
  ========= ====================== ===================================
  KQV       ``c_attn`` [q|k|v]     QKV
  KV_1      ``c_q``, ``c_k``       Q-K=V
  QK        ``c_kv`` [q=k | v]     Q=K-V
  K         ``c_k``                Q=K=V
  GQA / MQA ``c_q``, ``c_kv`` [k|v] QKV, n_kv_heads = n_kv_groups (1)
  QGQA      ``c_q``, ``c_k``       Q-K=V, n_kv_heads = n_kv_groups
  QMQA      ``c_q``, ``c_kv`` (hd) Q-K=V, n_kv_heads = 1
  ========= ====================== ===================================

- ``authors-synthetic``: their synthetic-task encoder (``synthetic_tasks.py``, released by ``export_checkpoints.py``
  as ``{task, variant, model: "Encoder", config, test_accuracy, model_state_dict}``): a one-hot input through a
  Linear with bias (our token embedding holds its columns plus the bias, the same sums), learned positions, pre-norm
  blocks, a final norm and a 10-way head per position. Projections ``c_q, c_k, c_v`` (QKV), ``c_qk, c_v`` (Q=K-V),
  ``c_q, c_kv`` (Q-K=V), ``c_qkv`` (Q=K=V); the "+" variants' ``pos_w`` / ``pos_b`` are our paper score encoding's
  weight and bias (``pos_dim`` channels; their ``pos2d`` buffer is checked against ours).
- ``authors-vit``: their ViT (``vision_tasks.py``, same dict with ``model: "ViT"``): a patch convolution over the
  image zero-padded to the grid, a class token, learned positions over class token + patches, the same blocks (MLP
  ``mlp.0`` / ``mlp.3``) and a head on the class token; "+" with ``pos_dim`` (50) channels indexed by the place in
  the sequence.

Sizes come from the saved config and are checked against every tensor's shape; a missing, misshapen or unexpected
tensor is a :class:`CheckpointError` naming it. The source's metadata (``val_metrics``, ``test_accuracy``, ``step``,
``tokens_seen``, the configs) is recorded in the written checkpoint under ``qkv_import``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv_lightning.errors import CheckpointError, ConfigError

LM_FORMAT, SYNTHETIC_FORMAT, VIT_FORMAT = "authors-lm", "authors-synthetic", "authors-vit"
FORMATS = (LM_FORMAT, SYNTHETIC_FORMAT, VIT_FORMAT)
"""The authors' three checkpoint kinds (recorded as the import's format; ``import --format authors`` reads any)."""

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes that DistributedDataParallel and torch.compile add to a saved state dict."""

ENCODER_VARIANTS: dict[str, tuple[str, bool]] = {
    "QKV": ("QKV", False),
    "Q=K!=V": ("Q=K-V", False),
    "(Q=K!=V)+": ("Q=K-V", True),
    "Q!=K=V": ("Q-K=V", False),
    "Q=K=V": ("Q=K=V", False),
    "(Q=K=V)+": ("Q=K=V", True),
}
"""The authors' encoder variant names (synthetic tasks and ViT): our sharing, and whether the "+" score encoding."""

ENCODER_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "QKV": ("c_q", "c_k", "c_v"),
    "Q=K-V": ("c_qk", "c_v"),
    "Q-K=V": ("c_q", "c_kv"),
    "Q=K=V": ("c_qkv",),
}
"""The encoder attention's projection modules of each sharing, in the row order of our fused projection."""

METADATA = ("task", "variant", "model", "config", "test_accuracy", "step", "epoch", "tokens_seen", "val_metrics",
            "model_config", "train_config")
"""The source entries recorded in the written checkpoint (never the optimizer state)."""


# ------------------------------------------------------------------------------------------------- reading
def read(path: Path) -> dict[str, Any]:
    """The authors' saved dict (read with ``weights_only``: nothing in it runs), its ``model_state_dict`` unwrapped."""
    from qkv_lightning.checkpoints import load_checkpoint_file

    raw = load_checkpoint_file(path, weights_only=True, lightning=False)
    state = raw.get("model_state_dict") if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} has no model_state_dict (a mapping of names to tensors), so it is not one of the authors' "
            "checkpoints ({step, ..., model_state_dict, model_config} or {task, variant, model, config, "
            "test_accuracy, model_state_dict})."
        )
    unwrapped = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        unwrapped[key] = value
    return {**raw, "model_state_dict": unwrapped}


def format_of(raw: Any) -> str | None:
    """Which of the authors' formats a loaded dict is, from its contents, or None."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model_state_dict"), dict):
        return None
    if raw.get("model") == "Encoder":
        return SYNTHETIC_FORMAT
    if raw.get("model") == "ViT":
        return VIT_FORMAT
    if isinstance(raw.get("model_config"), dict):
        return LM_FORMAT
    return None


def detect(path: Path) -> str | None:
    """The authors' format of the file at ``path``, or None when it is not one (or not a readable torch file)."""
    if not path.is_file() or path.suffix == ".safetensors":
        return None
    from qkv_lightning.checkpoints import load_checkpoint_file

    try:
        return format_of(load_checkpoint_file(path, weights_only=True, lightning=False))
    except CheckpointError:
        return None


class Tensors:
    """The source tensors, taken one by one with their shape checked; what is left over is an error."""

    def __init__(self, state: dict[str, Tensor], source: str, kind: str) -> None:
        self.remaining = dict(state)
        self.source, self.kind = source, kind

    def has(self, key: str) -> bool:
        return key in self.remaining

    def take(self, key: str, shape: tuple[int, ...]) -> Tensor:
        """The tensor ``key`` of ``shape`` (removed from what is left)."""
        if key not in self.remaining:
            raise CheckpointError(
                f"{self.source} lacks the tensor {key} of model_state_dict, which the authors' {self.kind} holds "
                f"(shape {shape}); the file is incomplete or of another model."
            )
        tensor = self.remaining.pop(key)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.source}: model_state_dict's {key} has shape {tuple(tensor.shape)}, but the saved config "
                f"implies {shape}; the file's config and weights disagree, or it is another model."
            )
        return tensor.detach().float()

    def drop(self, key: str) -> Tensor | None:
        """A buffer that is not a parameter (e.g. a causal mask), if present."""
        return self.remaining.pop(key, None)

    def finish(self) -> None:
        if self.remaining:
            names = sorted(self.remaining)
            raise CheckpointError(
                f"{self.source}: model_state_dict holds tensors the authors' {self.kind} has no place for: "
                f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}; it is another model or layout."
            )


def setting(config: dict[str, Any], key: str, where: str, kind: type = int, default: Any = None) -> Any:
    """``config[key]`` of the type ``kind`` (a positive number for ``int``), or a ConfigError naming the key."""
    value = config.get(key, default)
    wrong = not isinstance(value, kind) or isinstance(value, bool) and kind is not bool
    if wrong or kind is int and value < 1:
        raise ConfigError(f"{where}: {key}={value!r} is missing or not a valid {kind.__name__}; the file's saved "
                          "config cannot rebuild the model.")
    return value


def block(tensors: Tensors, theirs: str, ours: str, d: int, m: int, names: dict[str, str]) -> dict[str, Tensor]:
    """One pre-norm block's norms, attention output projection and MLP (``names`` maps our layer names to theirs)."""
    state: dict[str, Tensor] = {}
    for mine, n_in, n_out in (("attn.proj", d, d), ("mlp.fc", d, m), ("mlp.proj", m, d)):
        state[f"{ours}{mine}.weight"] = tensors.take(f"{theirs}{names[mine]}.weight", (n_out, n_in))
        state[f"{ours}{mine}.bias"] = tensors.take(f"{theirs}{names[mine]}.bias", (n_out,))
    for mine in ("norm_attn", "norm_mlp"):
        state[f"{ours}{mine}.weight"] = tensors.take(f"{theirs}{names[mine]}.weight", (d,))
        state[f"{ours}{mine}.bias"] = tensors.take(f"{theirs}{names[mine]}.bias", (d,))
    return state


def fused(tensors: Tensors, prefix: str, parts: list[tuple[str, int]], d: int) -> dict[str, Tensor]:
    """Our fused projection's weight and bias: the named projections' rows stacked in order."""
    weights = [tensors.take(f"{prefix}{name}.weight", (rows, d)) for name, rows in parts]
    biases = [tensors.take(f"{prefix}{name}.bias", (rows,)) for name, rows in parts]
    return {"weight": torch.cat(weights), "bias": torch.cat(biases)}  # (sum of rows, d), (sum of rows,)


# ------------------------------------------------------------------------------------------------ language model
Layout = tuple[str, int | None, list[tuple[str, int]], str]
"""Our sharing, K/V heads (None: as many as Q), the source projections with their rows, the source script's name."""


def lm_layout(tensors: Tensors, d: int, n_head: int, kv_groups: int | None, source: str) -> Layout:
    """(our sharing, K/V heads, the projections with their rows, their script's name) from layer 0's tensors."""
    hd = d // n_head
    names = {key.split(".")[3] for key in tensors.remaining if key.startswith("h.0.attn.c_") and key.endswith("weight")}
    names.discard("c_proj")

    def rows(name: str) -> int:
        return int(tensors.remaining[f"h.0.attn.{name}.weight"].shape[0])

    def groups(k_rows: int, per_group: int, name: str) -> int:
        if k_rows % per_group or n_head % (k_rows // per_group):
            raise CheckpointError(f"{source}: h.0.attn.{name}.weight has {k_rows} rows, not a whole number of K/V "
                                  f"groups of {per_group} rows that divides n_head={n_head}.")
        return k_rows // per_group

    if names == {"c_attn"}:
        return "QKV", None, [("c_attn", 3 * d)], "KQV (c_attn)"
    if names == {"c_kv"}:
        return "Q=K-V", None, [("c_kv", 2 * d)], "QK (c_kv: q = k)"
    if names == {"c_k"}:
        return "Q=K=V", None, [("c_k", d)], "K (c_k: q = k = v)"
    if names == {"c_q", "c_k"}:
        g = groups(rows("c_k"), hd, "c_k")
        if g == n_head:
            return "Q-K=V", None, [("c_q", d), ("c_k", d)], "KV_1 (c_q, c_k: v = k)"
        return "Q-K=V", g, [("c_q", d), ("c_k", g * hd)], f"QGQA (c_q, c_k: v = k, {g} K groups)"
    if names == {"c_q", "c_kv"}:
        kv_rows = rows("c_kv")
        if kv_rows == hd and kv_groups in (None, 1):
            return "Q-K=V", 1, [("c_q", d), ("c_kv", hd)], "QMQA (c_q, c_kv: one head, k = v)"
        g = groups(kv_rows, 2 * hd, "c_kv")
        if kv_groups is not None and g != kv_groups:
            raise CheckpointError(f"{source}: h.0.attn.c_kv.weight has {kv_rows} rows, {g} K/V groups, but "
                                  f"model_config.n_kv_groups={kv_groups}.")
        return "QKV", g, [("c_q", d), ("c_kv", 2 * g * hd)], f"{'MQA' if g == 1 else 'GQA'} (c_q, c_kv, {g} groups)"
    raise CheckpointError(
        f"{source}: layer 0's attention has the projections {sorted(names) or 'none'} (h.0.attn.c_*.weight); the "
        "authors' layouts are c_attn, c_kv, c_k, c_q + c_k and c_q + c_kv."
    )


def lm_settings(config: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our ``network`` settings and the attention dropout from their ``model_config``."""
    if config.get("use_bias", True) is not True:
        raise ConfigError(f"{where}: use_bias={config.get('use_bias')!r} cannot be imported: their LayerNorms keep "
                          "biases without the linear ones, and our network.bias drops both.")
    d, n_head = setting(config, "n_embd", where), setting(config, "n_head", where)
    if d % n_head:
        raise ConfigError(f"{where}: n_head={n_head} must divide n_embd={d}.")
    network = {
        "n_layer": setting(config, "n_layer", where),
        "n_head": n_head,
        "d_model": d,
        "d_mlp": setting(config, "n_inner", where, default=4 * d),
        "bias": True,
        "dropout": float(config.get("resid_pdrop", 0.1)),
        "embedding_dropout": float(config.get("embd_pdrop", 0.0)),
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
        "init_std": float(config.get("initializer_range", 0.02)),
        "max_seq_len": setting(config, "n_positions", where),
        "vocab_size": setting(config, "vocab_size", where),
        "position": "learned",
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "output": "linear",
        "gelu": "exact",
        "residual_scaling": False,
    }
    return network, {"dropout": float(config.get("attn_pdrop", 0.0))}


def lm_state(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor], str]:
    """Our GPT's settings and state dict from their LM dict, and the name of their layout."""
    where = f"{source}: model_config"
    network, attention = lm_settings(raw["model_config"], where)
    kv_groups = raw["model_config"].get("n_kv_groups")
    tensors = Tensors(raw["model_state_dict"], source, "language model")
    d, v, t, m = network["d_model"], network["vocab_size"], network["max_seq_len"], network["d_mlp"]
    sharing, n_kv, parts, layout = lm_layout(tensors, d, network["n_head"], kv_groups, source)
    attention.update(sharing=sharing, n_kv_heads=n_kv)
    state = {"embed.weight": tensors.take("wte.weight", (v, d)), "position.weight": tensors.take("wpe.weight", (t, d))}
    names = {"attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj", "norm_attn": "ln_1",
             "norm_mlp": "ln_2"}
    for i in range(network["n_layer"]):
        ours = f"trunk.blocks.{i}."
        tensors.drop(f"h.{i}.attn.bias")  # the causal mask buffer
        state.update(block(tensors, f"h.{i}.", ours, d, m, names))
        for name, value in fused(tensors, f"h.{i}.attn.", parts, d).items():
            state[f"{ours}attn.qkv.{name}"] = value
    state["trunk.norm.weight"] = tensors.take("ln_f.weight", (d,))
    state["trunk.norm.bias"] = tensors.take("ln_f.bias", (d,))
    if network["tie_embeddings"]:
        tensors.drop("lm_head.weight")  # a tied head is the token embedding (their lambda saves nothing)
        state["head.weight"] = state["embed.weight"]
    else:
        state["head.weight"] = tensors.take("lm_head.weight", (v, d))
    tensors.finish()
    return network, attention, state, layout


def import_lm(raw: dict[str, Any], source: str, bpe_file: Path | None, seq_len: int | None) -> Any:
    """A :class:`~qkv_lightning.tasks.language_model.LanguageModel` holding their language model."""
    from qkv_lightning.interop.common import language_data_spec
    from qkv_lightning.tasks.language_model import LanguageModel

    network, attention, state, layout = lm_state(raw, source)
    data_spec = language_data_spec(network["vocab_size"], seq_len or network["max_seq_len"], bpe_file)
    task = LanguageModel(network=network, attention=attention, data_spec=data_spec)
    return load(task, state, source), layout


# ------------------------------------------------------------------------------------------------ encoders
def encoder_attention(tensors: Tensors, config: dict[str, Any], prefix: str, where: str) -> tuple[str, bool]:
    """Our sharing and whether "+" from layer 0's projections, checked against the saved ``variant``."""
    found = [s for s, names in ENCODER_PROJECTIONS.items()
             if {k.split(".")[-2] for k in tensors.remaining if k.startswith(prefix) and k.endswith(".weight")}
             == {*names, "c_proj"}]
    if not found:
        raise CheckpointError(f"{where}: {prefix}c_*.weight are not one of the authors' projection layouts "
                              f"({'; '.join(' + '.join(n) for n in ENCODER_PROJECTIONS.values())}).")
    plus = tensors.has(f"{prefix}pos_w")
    variant = config.get("variant")
    if variant is not None and ENCODER_VARIANTS.get(variant) != (found[0], plus):
        raise CheckpointError(f"{where}: config variant={variant!r}, but the weights are those of "
                              f"{found[0]}{' +' if plus else ''} ({prefix}c_*, {prefix}pos_w).")
    return found[0], plus


def encoder_blocks(tensors: Tensors, network: dict[str, Any], sharing: str, plus: bool, channels: int,
                   mlp_out: int, length: int, source: str) -> dict[str, Tensor]:
    """The blocks, final norm and score encodings of their encoder/ViT as our trunk's state (``trunk.`` names)."""
    from qkv_lightning.nn.positional import paper_pair_tensor

    d, m = network["d_model"], network["d_mlp"]
    names = {"attn.proj": "attn.c_proj", "mlp.fc": "mlp.0", "mlp.proj": f"mlp.{mlp_out}", "norm_attn": "ln1",
             "norm_mlp": "ln2"}
    parts = [(name, d) for name in ENCODER_PROJECTIONS[sharing]]
    state: dict[str, Tensor] = {}
    for i in range(network["n_layer"]):
        theirs, ours = f"blocks.{i}.", f"trunk.blocks.{i}."
        state.update(block(tensors, theirs, ours, d, m, names))
        for name, value in fused(tensors, f"{theirs}attn.", parts, d).items():
            state[f"{ours}attn.qkv.{name}"] = value
        if plus:
            state[f"{ours}attn.score_encoding.weight"] = tensors.take(f"{theirs}attn.pos_w", (channels,))
            state[f"{ours}attn.score_encoding.bias"] = tensors.take(f"{theirs}attn.pos_b", (1,))
            table = tensors.drop(f"{theirs}attn.pos2d")
            if table is not None:
                n = table.shape[0]
                ours_p = paper_pair_tensor(torch.arange(n), torch.arange(n), channels)  # (n, n, channels)
                if table.shape != ours_p.shape or n < length or (table.float() - ours_p).abs().max() > 1e-5:
                    raise CheckpointError(
                        f"{source}: {theirs}attn.pos2d (shape {tuple(table.shape)}) is not the fixed 2-D sinusoidal "
                        f"table over {length} positions with {channels} channels that our score encoding computes."
                    )
    state["trunk.norm.weight"] = tensors.take("ln_f.weight", (d,))
    state["trunk.norm.bias"] = tensors.take("ln_f.bias", (d,))
    return state


def encoder_network(raw: dict[str, Any], source: str, kind: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Their encoder's saved ``config``, where it is (for messages), and the trunk settings both encoders share."""
    config = raw.get("config")
    where = f"{source}: config"
    if not isinstance(config, dict):
        raise ConfigError(f"{source} has no config (the dict of {kind} that rebuilds the model).")
    d, n_head = setting(config, "n_embd", where), setting(config, "n_head", where)
    if d % n_head:
        raise ConfigError(f"{where}: n_head={n_head} must divide n_embd={d}.")
    network = {"n_layer": setting(config, "n_layer", where), "n_head": n_head, "d_model": d,
               "d_mlp": setting(config, "n_inner_mult", where, default=4) * d, "bias": True, "norm_eps": 1e-5,
               "gelu": "exact", "init": "torch"}
    return config, where, network


def import_synthetic(raw: dict[str, Any], source: str) -> tuple[Any, str]:
    """A :class:`~qkv_lightning.tasks.sequence_tasks.SequenceTask` holding their synthetic-task encoder."""
    from qkv_lightning.data.synthetic import NUM_DIGITS, TASKS
    from qkv_lightning.tasks.sequence_tasks import SequenceTask

    config, where, network = encoder_network(raw, source, "ModelCfg")
    length, seq_len = setting(config, "max_len", where, default=128), setting(config, "seq_len", where)
    channels = setting(config, "pos_dim", where, default=10)
    network.update(max_seq_len=length, position="learned", dropout=0.0)
    tensors = Tensors(raw["model_state_dict"], source, "synthetic-task encoder")
    sharing, plus = encoder_attention(tensors, config, "blocks.0.attn.", source)
    d = network["d_model"]
    weight, bias = tensors.take("embed.weight", (d, NUM_DIGITS)), tensors.take("embed.bias", (d,))
    state = {"embed.weight": weight.T + bias, "position.weight": tensors.take("pos_emb.weight", (length, d))}
    state.update(encoder_blocks(tensors, network, sharing, plus, channels, 2, length, source))
    state["head.weight"] = tensors.take("head.weight", (NUM_DIGITS, d))
    state["head.bias"] = tensors.take("head.bias", (NUM_DIGITS,))
    tensors.finish()
    task_name = str(raw.get("task", "")).removeprefix("synthetic-").lower()
    spec: dict[str, Any] = {"vocab_size": NUM_DIGITS, "num_classes": NUM_DIGITS, "seq_len": seq_len}
    if task_name in TASKS:
        spec["task"] = task_name
    attention = {"sharing": sharing, **plus_settings(plus, channels)}
    task = SequenceTask(network=network, attention=attention, data_spec=spec)
    return load(task, state, source), f"{config.get('variant', sharing)} encoder"


def import_vit(raw: dict[str, Any], source: str) -> tuple[Any, str]:
    """An :class:`~qkv_lightning.tasks.image_classifier.ImageClassifier` holding their ViT."""
    import math

    from qkv_lightning.tasks.image_classifier import ImageClassifier

    config, where, network = encoder_network(raw, source, "ViTConfig")
    size, patch = setting(config, "image_size", where), setting(config, "patch", where)
    channels_in, classes = setting(config, "channels", where), setting(config, "n_classes", where)
    channels = setting(config, "pos_dim", where, default=50)
    dropout = float(config.get("dropout", 0.1))
    network.update(patch_size=patch, image_size=size, in_channels=channels_in, num_classes=classes, pool="cls",
                   position="learned", drop_path=0.0, pad_images=True, score_grid=False, dropout=dropout,
                   **vit_dropout_settings())
    grid = math.ceil(size / patch)
    n = grid * grid + 1
    tensors = Tensors(raw["model_state_dict"], source, "ViT")
    sharing, plus = encoder_attention(tensors, config, "blocks.0.attn.", source)
    d = network["d_model"]
    state = {
        "patch_embed.proj.weight": tensors.take("patch_embed.proj.weight", (d, channels_in, patch, patch)),
        "patch_embed.proj.bias": tensors.take("patch_embed.proj.bias", (d,)),
        "cls_token": tensors.take("cls", (1, 1, d)),
        "pos_embed": tensors.take("pos_emb", (1, n, d)),
    }
    state.update(encoder_blocks(tensors, network, sharing, plus, channels, 3, n, source))
    state["head.weight"] = tensors.take("head.weight", (classes, d))
    state["head.bias"] = tensors.take("head.bias", (classes,))
    tensors.finish()
    spec = {"num_classes": classes, "image_size": size, "in_channels": channels_in}
    attention = {"sharing": sharing, **plus_settings(plus, channels)}
    task = ImageClassifier(network=network, attention=attention, data_spec=spec)
    return load(task, state, source), f"{config.get('variant', sharing)} ViT"


def plus_settings(plus: bool, channels: int) -> dict[str, Any]:
    """The attention settings of their "+" variants (the paper score encoding with ``channels`` channels)."""
    return {"score_encoding": "paper", "score_encoding_channels": channels} if plus else {}


def vit_dropout_settings() -> dict[str, Any]:
    """Their ViT's dropout placement, where our ViT config can say it (embeddings, after the MLP's GELU and output)."""
    from dataclasses import fields

    from qkv_lightning.nn.vit import ViTConfig

    return {"dropout_at": "mlp"} if "dropout_at" in {f.name for f in fields(ViTConfig)} else {}


def load(task: Any, state: dict[str, Tensor], source: str) -> Any:
    """Build ``task``'s network and load ``state`` into it strictly (eval mode)."""
    task.configure_model()
    try:
        task.network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source} does not fit the network its config describes: {error}") from None
    return task.eval()


def import_authors(path: Path, bpe_file: Path | None = None, seq_len: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Read one of the authors' checkpoints, its kind (:data:`FORMATS`) told from its contents; returns our task (eval
    mode) and the source's record (format, layout and metadata)."""
    source = str(path)
    raw = read(path)
    found = format_of(raw)
    if found is None:
        raise CheckpointError(
            f"{path} holds a model_state_dict but neither model_config (the authors' language models) nor model "
            "'Encoder' / 'ViT' with its config (their synthetic encoders and ViTs), so it is not one of the "
            "authors' checkpoints."
        )
    if found == LM_FORMAT:
        task, layout = import_lm(raw, source, bpe_file, seq_len)
    elif found == SYNTHETIC_FORMAT:
        task, layout = import_synthetic(raw, source)
    else:
        task, layout = import_vit(raw, source)
    record = {key: raw[key] for key in METADATA if key in raw}
    return task, {"format": found, "layout": layout, **record}
