"""Hugging Face Llama, Mistral and Qwen2 folders, and GGUF files of them, as QKV/GQA checkpoints of our GPT, exactly.

A folder holds ``config.json`` and ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``), as
``save_pretrained`` writes them. What our GPT needs to be one of these decoders: ``norm: rms`` (``norm_eps =
rms_norm_eps``), ``mlp: swiglu`` of width ``intermediate_size`` (``gate_proj`` -> ``mlp.gate``, ``up_proj`` ->
``mlp.fc``, ``down_proj`` -> ``mlp.proj``), ``position: rope`` with ``rope_base = rope_theta``, no biases
(``bias: false``; Qwen2: ``qkv_bias: true``, its q/k/v projections have biases and its output projection none),
``n_kv_heads = num_key_value_heads`` and an untied or tied head (``tie_word_embeddings``). Both use the rotate-half
RoPE layout (the first and second half of each head form the rotated pairs), so q and k rows are copied as they are;
grouped K/V heads are read by query heads in the same order (query head h reads K/V head h // (H / H_kv)).

A ``.gguf`` file (llama.cpp's format, quantised or not) is read through ``transformers``' own GGUF loader, which
dequantises it into a Llama model (and undoes llama.cpp's q/k row order); that model's config and tensors then take
the folder's path. It needs the optional package ``gguf`` (``pip install 'qkv-lightning[gguf]'``).

The model's own tokenizer is stored in the checkpoint as data (the entry
:data:`~qkv_lightning.data.hf_tokenizer.CHECKPOINT_ENTRY`: the text of a ``tokenizer.json``): the folder's
``tokenizer.json`` when it has one, or for a GGUF file the fast tokenizer ``transformers`` builds from the file's
metadata (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``). Its identity and vocabulary (at most the
model's) become the checkpoint's ``data_spec``, so ``data.tokenizer: hf`` with ``data.tokenizer_file`` naming the
checkpoint scores text with it, and other tokenizers are refused.

What our GPT cannot express is a :class:`ConfigError` naming the ``config.json`` field: a sliding window shorter
than ``max_position_embeddings``, ``rope_scaling`` / ``rope_parameters`` types other than the default, partial
rotary, a ``head_dim`` other than ``hidden_size / num_attention_heads``, ``attention_bias`` / ``mlp_bias``, another
activation than SiLU, and model types other than these three (mixture-of-experts ones included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv_lightning.errors import CheckpointError, ConfigError
from qkv_lightning.files import read_json
from qkv_lightning.interop.common import language_data_spec, read_safetensors, require

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPES = ("llama", "mistral", "qwen2")
"""The ``model_type`` values that can be imported."""
SEQ_LEN_CAP = 2048
"""The recorded data ``seq_len`` when ``--seq_len`` is not given: ``max_position_embeddings``, at most this."""


def is_llama_folder(path: Path) -> bool:
    """Whether ``--format auto`` takes the folder ``path`` for ``hf-llama``: its ``config.json`` names a
    ``model_type`` other than GPT-2's (the types this module cannot import are then refused by name)."""
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type") not in (None, "gpt2")
    except (OSError, ValueError, AttributeError):
        return False


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a Llama-family folder, checked to be one."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no {CONFIG_FILE}: a Hugging Face Llama, Mistral or Qwen2 folder holds {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (or {INDEX_FILE} and its shards), as save_pretrained writes them."
        )
    config = read_json(path, "the model's config.json")  # a damaged file or another JSON type: one paragraph
    return config


def rope_theta(config: dict[str, Any], refuse: Any) -> float:
    """The RoPE base of a config, refusing scaled or partial rotary (``rope_parameters`` in transformers 5,
    ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` before)."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for field, values in (("rope_parameters", parameters), ("rope_scaling", scaling)):
        kind = values.get("rope_type", values.get("type", "default"))
        if kind != "default":
            refuse(field, f"RoPE scaling type {kind!r} is not implemented by our rotary positions (only the default).")
        if values.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(field, "our rotary positions rotate every dimension of a head (no partial_rotary_factor).")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "our rotary positions rotate every dimension of a head.")
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def our_settings(config: dict[str, Any], source: str = CONFIG_FILE) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``network`` and ``attention`` settings of our GPT equivalent to a Llama/Mistral/Qwen2 ``config.json``.

    Raises:
        ConfigError: naming the field our GPT cannot express.
    """

    def refuse(field: str, why: str) -> None:
        raise ConfigError(f"{source}: {field}={config.get(field)!r} cannot be imported: {why}")

    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        refuse("model_type", f"only {', '.join(MODEL_TYPES)} decoders can be imported (no mixture of experts).")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings"):
        if not isinstance(config.get(name), int) or config[name] < 1:
            refuse(name, f"it must be a positive integer, as in every model_type {model_type!r} config.json.")
    d, n_head = config["hidden_size"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    if d % n_head:
        refuse("num_attention_heads", f"it must divide hidden_size={d}.")
    if config.get("head_dim") not in (None, d // n_head):
        refuse("head_dim", f"our heads are hidden_size / num_attention_heads = {d // n_head} wide.")
    if not isinstance(n_kv, int) or n_head % n_kv:
        refuse("num_key_value_heads", f"it must divide num_attention_heads={n_head}.")
    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "our gated MLP (mlp: swiglu) uses SiLU.")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field, False):
            refuse(field, "our Llama-style trunk has no biases there (only Qwen2's q/k/v biases).")
    if config.get("num_experts") or config.get("num_local_experts"):
        refuse("num_experts" if config.get("num_experts") else "num_local_experts", "mixture of experts is not ours.")
    window = config.get("sliding_window")
    windowed = config.get("use_sliding_window", True) if model_type == "qwen2" else True
    if windowed and window is not None and window < config["max_position_embeddings"]:
        refuse("sliding_window", f"our attention sees the whole context (max_position_embeddings="
               f"{config['max_position_embeddings']}), not a window.")
    layer_types = config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types) and windowed:
        refuse("layer_types", "our layers all attend to the whole context (full_attention).")
    network: dict[str, Any] = {
        "n_layer": config["num_hidden_layers"],
        "n_head": n_head,
        "d_model": d,
        "d_mlp": config["intermediate_size"],
        "bias": False,
        "qkv_bias": True if model_type == "qwen2" else None,
        "norm": "rms",
        "mlp": "swiglu",
        "dropout": 0.0,
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "init_std": float(config.get("initializer_range", 0.02)),
        "max_seq_len": config["max_position_embeddings"],
        "vocab_size": config["vocab_size"],
        "position": "rope",
        "rope_base": rope_theta(config, refuse),
        "tie_embeddings": bool(config.get("tie_word_embeddings", model_type != "llama")),
        "output": "linear",
        "residual_scaling": False,
    }
    attention = {"sharing": "QKV", "n_kv_heads": None if n_kv == n_head else n_kv,
                 "dropout": float(config.get("attention_dropout", 0.0))}
    return network, attention


def to_our_state(weights: dict[str, Tensor], network: dict[str, Any], source: str) -> dict[str, Tensor]:
    """Llama-family tensors (``model.*`` names, ``lm_head.weight``) as our GPT's state dict (without the task's
    ``network.`` prefix): q, k and v stacked into the fused projection in that order.

    Raises:
        CheckpointError: naming missing, unexpected or misshapen tensors.
    """
    remaining = dict(weights)

    def take(key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in remaining:
            raise CheckpointError(f"{source} lacks the tensor {key}; it is not a complete checkpoint of this model.")
        tensor = remaining.pop(key)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, but config.json implies {shape}.")
        return tensor

    d, v, m = network["d_model"], network["vocab_size"], network["d_mlp"]
    head_dim = d // network["n_head"]
    kv = (network["n_kv_heads"] if "n_kv_heads" in network else None) or network["n_head"]
    kv_width = kv * head_dim
    state = {"embed.weight": take("model.embed_tokens.weight", (v, d))}
    for i in range(network["n_layer"]):
        h, ours = f"model.layers.{i}.", f"trunk.blocks.{i}."
        state[f"{ours}norm_attn.weight"] = take(f"{h}input_layernorm.weight", (d,))
        state[f"{ours}norm_mlp.weight"] = take(f"{h}post_attention_layernorm.weight", (d,))
        widths = {"q_proj": d, "k_proj": kv_width, "v_proj": kv_width}
        state[f"{ours}attn.qkv.weight"] = torch.cat(
            [take(f"{h}self_attn.{p}.weight", (w, d)) for p, w in widths.items()])  # (d + 2 kv_width, d): [q; k; v]
        if network.get("qkv_bias"):
            state[f"{ours}attn.qkv.bias"] = torch.cat([take(f"{h}self_attn.{p}.bias", (w,)) for p, w in widths.items()])
        state[f"{ours}attn.proj.weight"] = take(f"{h}self_attn.o_proj.weight", (d, d))
        state[f"{ours}mlp.gate.weight"] = take(f"{h}mlp.gate_proj.weight", (m, d))
        state[f"{ours}mlp.fc.weight"] = take(f"{h}mlp.up_proj.weight", (m, d))
        state[f"{ours}mlp.proj.weight"] = take(f"{h}mlp.down_proj.weight", (d, m))
    state["trunk.norm.weight"] = take("model.norm.weight", (d,))
    if network["tie_embeddings"]:
        remaining.pop("lm_head.weight", None)  # tied: the embedding (save_pretrained leaves it out)
        state["head.weight"] = state["embed.weight"]
    else:
        state["head.weight"] = take("lm_head.weight", (v, d))
    leftover = sorted(k for k in remaining if not k.endswith("rotary_emb.inv_freq"))  # a buffer older versions saved
    if leftover:
        raise CheckpointError(
            f"{source} holds tensors the Llama layout has no place for in our GPT: {', '.join(leftover[:6])}"
            f"{' ...' if len(leftover) > 6 else ''}."
        )
    return state


def read_folder_weights(folder: Path) -> tuple[dict[str, Tensor], str]:
    """Every tensor of a folder: ``model.safetensors``, or the shards that ``model.safetensors.index.json`` lists."""
    single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
    if single.is_file():
        return read_safetensors(single), str(single)
    if not index.is_file():
        raise ConfigError(
            f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; save the model with save_pretrained (safetensors,"
            " the default). pytorch_model.bin files are pickles and are not read."
        )
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{index} is not a safetensors index (a JSON object with a weight_map): {error}") from None
    weights: dict[str, Tensor] = {}
    for shard in shards:
        path = folder / shard
        if Path(shard).name != shard or not path.is_file():
            raise CheckpointError(f"{index} names the shard {shard!r}, which is not a file in {folder}.")
        weights.update(read_safetensors(path))
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise CheckpointError(f"{index} lists {', '.join(missing[:6])}, which its shards do not hold.")
    return weights, str(index)


def load_gguf_reference(path: Path) -> Any:
    """``transformers``' model read from a ``.gguf`` file by its own GGUF loader (dequantised, float32, eval)."""
    require("transformers", f"reading {path}")
    require("gguf", f"reading the GGUF file {path}", extra="gguf")
    require("accelerate", f"reading the GGUF file {path} (transformers needs it for GGUF)", extra="gguf")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, dtype=torch.float32
        )
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"transformers cannot read the GGUF file {path}: {error}") from None
    return model.eval()


def load_source(src: Path, fmt: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """Our network and attention settings, our GPT's state dict and the source's config of a folder (``hf-llama``)
    or a ``.gguf`` file (``gguf``)."""
    if fmt == "gguf":
        if not src.is_file():
            raise ConfigError(f"{src} is not a file; --format gguf takes a .gguf file.")
        model = load_gguf_reference(src)
        config = model.config.to_dict()
        weights, source = {k: t.detach() for k, t in model.state_dict().items()}, str(src)
    else:
        if not src.is_dir():
            raise ConfigError(f"{src} is not a folder; --format hf-llama takes a Hugging Face folder ({CONFIG_FILE}).")
        config = read_config(src)
        weights, source = read_folder_weights(src)
    network, attention = our_settings(config, str(src / CONFIG_FILE) if fmt != "gguf" else f"{src} (its config)")
    state = to_our_state(weights, {**network, "n_kv_heads": attention["n_kv_heads"]}, source)
    return network, attention, state, config


def read_tokenizer_text(src: Path, fmt: str) -> str | None:
    """The ``tokenizer.json`` text of the source model: the folder's file, or for a GGUF file the one ``transformers``
    builds from its metadata; None when the folder has none or ``transformers`` builds none from the file."""
    if fmt != "gguf":
        path = src / TOKENIZER_FILE
        if not path.is_file():
            return None
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CheckpointError(f"cannot read {path} as UTF-8 text ({error}).") from None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
        return tokenizer.backend_tokenizer.to_str()
    except (ValueError, OSError, KeyError, RuntimeError, AttributeError, TypeError):
        return None


def import_llama(src: Path, fmt: str, seq_len: int | None = None) -> tuple[Any, dict[str, Any], Any]:
    """A :class:`~qkv_lightning.tasks.language_model.LanguageModel` (eval mode) holding the model of ``src``; its
    ``data_spec`` records the vocabulary and ``seq_len`` (default ``max_position_embeddings``, at most
    :data:`SEQ_LEN_CAP`) and, when the source has a tokenizer, that tokenizer's identity and vocabulary. Returns the
    task, a summary for the command's report and the tokenizer
    (:class:`~qkv_lightning.data.hf_tokenizer.HFTokenizer`, or None), which the checkpoint stores.

    Raises:
        DataError: the folder's ``tokenizer.json`` is not a tokenizer the ``tokenizers`` library reads.
        ConfigError: the tokenizer has more tokens than the model's vocabulary.
    """
    from qkv_lightning.data.hf_tokenizer import HFTokenizer
    from qkv_lightning.tasks.language_model import LanguageModel

    network, attention, state, config = load_source(src, fmt)
    text = read_tokenizer_text(src, fmt)
    where = str(src / TOKENIZER_FILE) if fmt != "gguf" else f"that transformers builds from {src}"
    tokenizer = HFTokenizer(text, where) if text is not None else None
    data_spec = language_data_spec(
        network["vocab_size"], seq_len or min(network["max_seq_len"], SEQ_LEN_CAP), tokenizer=tokenizer
    )
    task = LanguageModel(network=network, attention=attention, data_spec=data_spec)
    task.configure_model()
    task.network.load_state_dict({k: t.float() for k, t in state.items()}, strict=True)
    summary = {"format": fmt, "model_type": config.get("model_type"), "config": jsonable(config)}
    return task.eval(), summary, tokenizer


def jsonable(config: dict[str, Any]) -> dict[str, Any]:
    """The config with values JSON cannot hold (dtypes, from a GGUF model's config) as strings."""
    return json.loads(json.dumps(config, default=str))


def check_with_transformers(src: Path, fmt: str, model: Any, n_tokens: int = 16, seed: int = 0) -> float | None:
    """Largest |logit difference| between ``transformers``' model of ``src`` and our ``model`` (a GPT in eval mode)
    on random tokens, or None when ``transformers`` (or for GGUF, ``gguf``) is not installed."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    if fmt == "gguf":
        try:
            reference = load_gguf_reference(src)
        except ConfigError:
            return None
    else:
        reference = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, min(n_tokens, model.config.max_seq_len)),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (reference(ids).logits.float() - model(ids).float()).abs().max().item()
