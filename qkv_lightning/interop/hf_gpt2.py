"""Hugging Face GPT-2 (the ``transformers`` layout) to our GPT and back, exactly.

A GPT-2 folder holds ``config.json`` (a ``GPT2Config``) and ``model.safetensors``. What our GPT needs to be GPT-2:
learned absolute positions (``position: learned``, ``max_seq_len = n_positions``), LayerNorm with biases and
``norm_eps = layer_norm_epsilon``, biases in every linear layer, the tanh GELU (``activation_function: gelu_new``),
an MLP of width ``n_inner`` (4 ``n_embd`` by default), a head without bias tied to the token embedding
(``tie_word_embeddings``), and QKV attention scaled by 1/sqrt(head size). GPT-2's linear layers are ``Conv1D``
modules whose weights are stored (in, out), the transpose of ``nn.Linear``'s; its ``c_attn`` output is [q | k | v],
each split into heads in order, which is our fused projection's layout for QKV.

Settings we cannot express are errors naming the ``config.json`` field (``scale_attn_by_inverse_layer_idx``,
``scale_attn_weights: false``, ``add_cross_attention``, other activations). Dropout rates are kept as our dropout
settings (they do not change the logits in evaluation).
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv_lightning.errors import CheckpointError, ConfigError
from qkv_lightning.files import read_json
from qkv_lightning.interop.common import (
    CONFIG_FILE,
    GENERATION_FILE,
    WEIGHTS_FILE,
    language_data_spec,
    read_safetensors,
    write_hf_folder,
)

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
"""GPT-2 activation names that are the tanh approximation of GELU (our MLP's default)."""

IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")
"""Causal-mask buffers that older ``transformers`` versions saved with the weights (not parameters)."""


def mlp_activation_field() -> str | None:
    """The GPT config field that chooses exact or tanh GELU, if this version of :mod:`qkv_lightning.nn` has one."""
    from qkv_lightning.nn.gpt import GPTConfig

    names = {f.name for f in fields(GPTConfig)}
    return next((name for name in ("gelu", "activation", "mlp_activation") if name in names), None)


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a GPT-2 folder, checked to be a GPT-2 config."""
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ConfigError(
            f"{folder} is not a folder; give a Hugging Face GPT-2 folder ({CONFIG_FILE} + {WEIGHTS_FILE})."
        )
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no {CONFIG_FILE}: a Hugging Face GPT-2 folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(as GPT2LMHeadModel.save_pretrained writes them)."
        )
    config = read_json(path, "the model's config.json")  # a damaged file or another JSON type: one paragraph
    model_type = config.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ConfigError(f"{path}: model_type={model_type!r}; only GPT-2 (model_type 'gpt2') can be imported.")
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if not _is_int(config.get(name)) or config[name] < 1:
            raise ConfigError(f"{path}: {name}={config.get(name)!r} must be a positive integer.")
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def our_settings(config: dict[str, Any], source: str = CONFIG_FILE) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``network`` and ``attention`` settings of our GPT equivalent to a GPT-2 ``config.json``.

    Raises:
        ConfigError: naming the GPT-2 field our GPT cannot express.
    """

    from qkv_lightning.nn.gpt import GPTConfig

    def refuse(field: str, why: str) -> None:
        raise ConfigError(f"{source}: {field}={config.get(field)!r} cannot be imported: {why}")

    def number(
        field: str, default: float, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
    ) -> float:
        value = config.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            refuse(field, "it must be a finite number.")
        if not (low < value if low_open else low <= value) or not (value < high if high_open else value <= high):
            closing = ")" if high_open or high == math.inf else "]"
            refuse(field, f"it must lie in {'(' if low_open else '['}{low}, {high}{closing}.")
        return float(value)

    if config.get("quantization_config") is not None:
        refuse("quantization_config", "quantized weights are not read; import the float weights (dequantize them "
               "first, e.g. save_pretrained of the model loaded without quantization).")
    if not isinstance(config.get("tie_word_embeddings", True), bool):
        refuse("tie_word_embeddings", "it must be true or false.")
    n_inner = config.get("n_inner")
    if n_inner is not None and (isinstance(n_inner, bool) or not isinstance(n_inner, int) or n_inner < 1):
        refuse("n_inner", "it must be a positive integer or null.")
    if config.get("scale_attn_weights", True) is not True:
        refuse("scale_attn_weights", "our attention always scales the scores by 1/sqrt(head size).")
    if config.get("scale_attn_by_inverse_layer_idx", False):
        refuse("scale_attn_by_inverse_layer_idx", "our attention has no per-layer 1/(layer index) score scaling.")
    if config.get("add_cross_attention", False):
        refuse("add_cross_attention", "our GPT is decoder-only, without cross-attention.")
    if config["n_embd"] % config["n_head"]:
        refuse("n_head", f"it must divide n_embd={config['n_embd']}.")
    network: dict[str, Any] = {
        "n_layer": config["n_layer"],
        "n_head": config["n_head"],
        "d_model": config["n_embd"],
        "d_mlp": config.get("n_inner") or None,
        "bias": True,
        "dropout": number("resid_pdrop", 0.1, 0.0, 1.0, high_open=True),
        "norm_eps": number("layer_norm_epsilon", 1e-5, 0.0, low_open=True),
        "init_std": number("initializer_range", 0.02, 0.0),
        "max_seq_len": config["n_positions"],
        "vocab_size": config["vocab_size"],
        "position": "learned",
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "output": "linear",
    }
    embd_pdrop = number("embd_pdrop", 0.1, 0.0, 1.0, high_open=True)
    if embd_pdrop != network["dropout"] and "embedding_dropout" in {f.name for f in fields(GPTConfig)}:
        network["embedding_dropout"] = embd_pdrop
    activation = config.get("activation_function", "gelu_new")
    field = mlp_activation_field()
    if activation in TANH_GELU:
        if field is not None:
            network[field] = "tanh"
    elif activation == "gelu" and field is not None:
        network[field] = "exact"
    else:
        refuse("activation_function", f"our MLP's activation is the GELU ({', '.join(TANH_GELU)}"
               f"{' or gelu' if field else ''}).")
    attention = {"sharing": "QKV", "n_kv_heads": None, "dropout": number("attn_pdrop", 0.1, 0.0, 1.0, high_open=True)}
    return network, attention


def to_our_state(weights: dict[str, Tensor], network: dict[str, Any], source: str) -> dict[str, Tensor]:
    """GPT-2 tensors (``transformer.*`` or bare ``GPT2Model`` names, ``lm_head.weight``) as our GPT's state dict
    (names without the task's ``network.`` prefix). Conv1D weights are transposed into ``nn.Linear``'s (out, in).

    Raises:
        CheckpointError: naming missing, unexpected or misshapen tensors.
    """
    prefix = "transformer." if any(k.startswith("transformer.") for k in weights) else ""
    remaining = {k: v for k, v in weights.items() if not k.endswith(IGNORED_BUFFERS)}

    def take(name: str, shape: tuple[int, ...]) -> Tensor:
        key = name if name == "lm_head.weight" else prefix + name
        if key not in remaining:
            raise CheckpointError(f"{source} lacks the tensor {key}; it is not a complete GPT-2 checkpoint.")
        tensor = remaining.pop(key)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, but config.json implies {shape}.")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: {key} holds {tensor.dtype} values; GPT-2 weights are floating-point.")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values; the weights are damaged.")
        return tensor

    d, v, t = network["d_model"], network["vocab_size"], network["max_seq_len"]
    m = network["d_mlp"] or 4 * d
    state = {"embed.weight": take("wte.weight", (v, d)), "position.weight": take("wpe.weight", (t, d))}
    for i in range(network["n_layer"]):
        h, ours = f"h.{i}.", f"trunk.blocks.{i}."
        for theirs, mine in (("ln_1", "norm_attn"), ("ln_2", "norm_mlp")):
            state[f"{ours}{mine}.weight"] = take(f"{h}{theirs}.weight", (d,))
            state[f"{ours}{mine}.bias"] = take(f"{h}{theirs}.bias", (d,))
        for theirs, mine, n_in, n_out in (
            ("attn.c_attn", "attn.qkv", d, 3 * d),  # [q | k | v]: our fused QKV projection's order
            ("attn.c_proj", "attn.proj", d, d),
            ("mlp.c_fc", "mlp.fc", d, m),
            ("mlp.c_proj", "mlp.proj", m, d),
        ):
            state[f"{ours}{mine}.weight"] = take(f"{h}{theirs}.weight", (n_in, n_out)).t().contiguous()  # Conv1D
            state[f"{ours}{mine}.bias"] = take(f"{h}{theirs}.bias", (n_out,))
    state["trunk.norm.weight"] = take("ln_f.weight", (d,))
    state["trunk.norm.bias"] = take("ln_f.bias", (d,))
    if network["tie_embeddings"]:
        remaining.pop("lm_head.weight", None)  # tied: the same tensor as wte (save_pretrained leaves it out)
        state["head.weight"] = state["embed.weight"]
    else:
        state["head.weight"] = take("lm_head.weight", (v, d))
    if remaining:
        names = sorted(remaining)
        raise CheckpointError(
            f"{source} holds tensors GPT-2's layout has no place for in our GPT: {', '.join(names[:6])}"
            f"{' ...' if len(names) > 6 else ''}; only GPT2LMHeadModel / GPT2Model weights can be imported."
        )
    return state


def load_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """Read a GPT-2 folder: our network and attention settings, our GPT's state dict, and the raw config."""
    config = read_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ConfigError(
            f"{folder} has no {WEIGHTS_FILE}; save the model with save_pretrained(..., safe_serialization=True) (the "
            "default). pytorch_model.bin files are pickles and are not read."
        )
    network, attention = our_settings(config, str(folder / CONFIG_FILE))
    state = to_our_state(read_safetensors(weights_path), network, str(weights_path))
    return network, attention, state, config


def import_gpt2(folder: Path, bpe_file: Path | None = None, seq_len: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A :class:`~qkv_lightning.tasks.language_model.LanguageModel` holding the GPT-2 of ``folder`` (eval mode).

    Its ``data_spec`` is the vocabulary size, ``seq_len`` (default ``n_positions``) and, with ``bpe_file`` (a GPT-2
    ``.tiktoken`` ranks file), the BPE tokenizer's identity, so that the CLI checks that evaluation data is tokenized
    with the same BPE. Returns the task and a summary for the command's report.
    """
    from qkv_lightning.tasks.language_model import LanguageModel

    network, attention, state, config = load_folder(folder)
    data_spec = language_data_spec(network["vocab_size"], seq_len or network["max_seq_len"], bpe_file)
    task = LanguageModel(network=network, attention=attention, data_spec=data_spec)
    task.configure_model()
    task.network.load_state_dict(state, strict=True)
    return task.eval(), {"format": "hf-gpt2", "config": config}


# ---------------------------------------------------------------------------------------------------- export
def export_settings(hparams: dict[str, Any], network_config: Any) -> dict[str, Any]:
    """The GPT-2 ``config.json`` of a checkpoint's GPT.

    Raises:
        ConfigError: naming our setting that GPT-2's layout cannot express (a shared variant, GQA, RoPE, ...).
    """
    from qkv_lightning.nn.attention import AttentionConfig

    attention = AttentionConfig(**{**(hparams.get("attention") or {})})
    n = network_config

    def refuse(setting: str, value: Any, why: str) -> None:
        raise ConfigError(f"the checkpoint's {setting}={value!r} cannot be exported to GPT-2's layout: {why} "
                          "(--format hf writes a LayerNorm/GELU trunk as GPT-2, an RMSNorm or SwiGLU one as Llama.)")

    if attention.sharing != "QKV":
        refuse("attention.sharing", attention.sharing, "GPT-2 has three separate projections (QKV); a shared "
               "variant has fewer weights, which GPT-2 models cannot load.")
    if attention.n_kv_heads not in (None, n.n_head):
        refuse("attention.n_kv_heads", attention.n_kv_heads, f"GPT-2 has as many K/V heads as Q heads ({n.n_head}).")
    if attention.score_encoding != "none":
        refuse("attention.score_encoding", attention.score_encoding, "GPT-2 has no score encoding.")
    if attention.mask_self:
        refuse("attention.mask_self", True, "GPT-2 lets each token attend to itself.")
    if n.position != "learned":
        refuse("network.position", n.position, "GPT-2 has learned absolute positions.")
    if not n.bias:
        refuse("network.bias", False, "GPT-2 has biases in every linear layer and LayerNorm.")
    if n.output != "linear":
        refuse("network.output", n.output, "GPT-2 has a full linear softmax.")
    field = mlp_activation_field()
    activation = "gelu_new"
    if field is not None:
        value = str(getattr(n, field))
        if value not in ("tanh", "exact"):
            refuse(f"network.{field}", value, "GPT-2's activations here are the tanh (gelu_new) or exact (gelu) GELU.")
        activation = "gelu_new" if value == "tanh" else "gelu"
    vocab = n.vocab_size
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": activation,
        "vocab_size": vocab,
        "n_positions": n.max_seq_len,
        "n_embd": n.d_model,
        "n_layer": n.n_layer,
        "n_head": n.n_head,
        "n_inner": n.d_mlp if n.d_mlp and n.d_mlp != 4 * n.d_model else None,
        "layer_norm_epsilon": n.norm_eps,
        "initializer_range": n.init_std,
        "resid_pdrop": n.dropout,
        "embd_pdrop": float(n.dropout if getattr(n, "embedding_dropout", None) is None else n.embedding_dropout),
        "attn_pdrop": attention.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": bool(n.tie_embeddings),
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if vocab >= 50257:  # GPT-2's BPE: <|endoftext|> begins and ends documents
        config.update({"bos_token_id": 50256, "eos_token_id": 50256})
    return config


def from_our_state(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """Our GPT's state dict (without the ``network.`` prefix) as GPT-2's ``GPT2LMHeadModel`` tensors.

    Raises:
        ConfigError: if the network holds weights GPT-2 has no place for (e.g. per-role norms).
    """
    remaining = dict(state)
    out: dict[str, Tensor] = {}

    def put(theirs: str, ours: str, transpose: bool = False) -> None:
        tensor = remaining.pop(ours).float()
        out[theirs] = (tensor.t() if transpose else tensor).contiguous().clone()

    put("transformer.wte.weight", "embed.weight")
    put("transformer.wpe.weight", "position.weight")
    for i in range(config["n_layer"]):
        h, ours = f"transformer.h.{i}.", f"trunk.blocks.{i}."
        for theirs, mine in (("ln_1", "norm_attn"), ("ln_2", "norm_mlp")):
            put(f"{h}{theirs}.weight", f"{ours}{mine}.weight")
            put(f"{h}{theirs}.bias", f"{ours}{mine}.bias")
        for theirs, mine in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                             ("mlp.c_proj", "mlp.proj")):
            put(f"{h}{theirs}.weight", f"{ours}{mine}.weight", transpose=True)  # Linear (out, in) -> Conv1D (in, out)
            put(f"{h}{theirs}.bias", f"{ours}{mine}.bias")
    put("transformer.ln_f.weight", "trunk.norm.weight")
    put("transformer.ln_f.bias", "trunk.norm.bias")
    head = remaining.pop("head.weight")
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = head.float().contiguous().clone()
    if remaining:
        raise ConfigError(
            f"the checkpoint's GPT has weights GPT-2's layout has no place for: {', '.join(sorted(remaining)[:6])}; "
            "only plain QKV GPTs can be exported."
        )
    return out


def check_with_transformers(folder: Path, model: Any, n_tokens: int = 16, seed: int = 0) -> float | None:
    """Largest |logit difference| between ``transformers``' GPT2LMHeadModel loaded from ``folder`` and our ``model``
    (a GPT in eval mode) on random tokens, or None when ``transformers`` is not installed."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None
    reference = GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True).eval()
    generator = torch.Generator().manual_seed(seed)
    length = min(n_tokens, model.config.max_seq_len)
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=generator)
    with torch.no_grad():
        theirs = reference(ids).logits.float()
        ours = model(ids).float()
    return (theirs - ours).abs().max().item()


def main_export(model: Any, hparams: dict[str, Any], ckpt_path: str | Path, out: Path) -> int:
    """``export --format hf`` of a LayerNorm/GELU trunk: write ``model`` (a checkpoint's GPT, eval mode, with its
    ``hparams``) as a GPT-2 folder and, with ``transformers`` installed, compare its logits with ours."""
    config = export_settings(hparams, model.config)
    write_hf_folder(out, config, from_our_state({k: v.detach() for k, v in model.state_dict().items()}, config))
    print(f"exported {ckpt_path} as a Hugging Face GPT-2 folder {out} ({CONFIG_FILE} + {WEIGHTS_FILE} + "
          f"{GENERATION_FILE}): "
          f"{config['n_layer']} layers, width {config['n_embd']}, {config['n_head']} heads, vocabulary "
          f"{config['vocab_size']}, tied embeddings {config['tie_word_embeddings']}")
    difference = check_with_transformers(out, model)
    if difference is not None:
        print(f"largest |logit difference| of transformers' GPT2LMHeadModel loaded from {out} against the checkpoint's "
              f"GPT on random tokens: {difference:.3g}")
    return 0
