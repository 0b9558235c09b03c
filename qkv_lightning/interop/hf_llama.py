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
metadata (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``), with the BOS, EOS and padding ids of the
source's config (the GGUF file's, as ``transformers`` reads them). Its identity and vocabulary (at most the model's)
become the checkpoint's ``data_spec``, so ``data.tokenizer: hf`` with ``data.tokenizer_file`` naming the checkpoint
scores text with it, and other tokenizers are refused.

What our GPT cannot express is a :class:`ConfigError` naming the ``config.json`` field: a sliding window shorter
than ``max_position_embeddings``, ``rope_scaling`` / ``rope_parameters`` types other than the default, partial
rotary, a ``head_dim`` other than ``hidden_size / num_attention_heads``, ``attention_bias`` / ``mlp_bias``, another
activation than SiLU, and model types other than these three (mixture-of-experts ones included).

``export --format hf`` writes such a GPT back (:func:`main_export`, the inverse of :func:`to_our_state`): a Llama
folder, or Qwen2 where the q/k/v projections have biases, that ``transformers`` loads with our logits. Each of
``q_proj``, ``k_proj`` and ``v_proj`` is the rows of its role's group in the fused projection, so QKV, GQA and MQA are
written as they are, and a shared variant (Q-K=V, Q-GQA, Q-MQA, also Q=K-V, Q=V-K, Q=K=V) as the shared weights under
every role they serve: the same logits, but a standard model projects and caches K and V apart, so the folder has
none of the variant's cache saving (the export says so). What a standard folder cannot express is refused naming our
setting: a LayerNorm or GELU trunk, learned or no positions, biases outside q/k/v, partial rotary, a decoupled rotary
key, score encodings, ``mask_self``, per-role norms, cross-layer K/V sharing, K/V heads that differ between layers.
"""

from __future__ import annotations

import json
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
    require,
    write_hf_folder,
)

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
    (:class:`~qkv_lightning.data.hf_tokenizer.HFTokenizer`, or None, with the source config's BOS, EOS and padding
    ids), which the checkpoint stores.

    Raises:
        DataError: the folder's ``tokenizer.json`` is not a tokenizer the ``tokenizers`` library reads.
        ConfigError: the tokenizer has more tokens than the model's vocabulary.
    """
    from qkv_lightning.data.hf_tokenizer import SPECIAL_TOKEN_IDS, HFTokenizer
    from qkv_lightning.tasks.language_model import LanguageModel

    network, attention, state, config = load_source(src, fmt)
    text = read_tokenizer_text(src, fmt)
    where = str(src / TOKENIZER_FILE) if fmt != "gguf" else f"that transformers builds from {src}"
    special_ids = {key: config.get(key) for key in SPECIAL_TOKEN_IDS}  # as the source's config names them
    tokenizer = HFTokenizer(text, where, special_ids) if text is not None else None
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


# ---------------------------------------------------------------------------------------------------- export
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""The class ``export --format hf`` names in ``config.json``, by ``model_type``."""
EXPORT_TOLERANCE = 1e-2
"""Largest |logit difference| between ``transformers``' model of the written folder and ours that the export accepts
(float32 round-off is far below; a misplaced tensor far above); beyond it nothing is put in place."""


def is_llama_trunk(network_config: Any) -> bool:
    """Whether ``export --format hf`` writes a GPT with this config as a Llama-family folder (an RMSNorm or SwiGLU
    trunk) rather than as GPT-2."""
    return network_config.norm == "rms" or network_config.mlp == "swiglu"


def export_settings(model: Any, hparams: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
    """The Llama (or Qwen2) ``config.json`` of a checkpoint's GPT (eval mode, depth factors fused), with the BOS, EOS
    and padding ids of the checkpoint's stored ``tokenizer``
    (:class:`~qkv_lightning.data.hf_tokenizer.HFTokenizer`; None: no ids).

    Raises:
        ConfigError: naming our setting that a standard Llama or Qwen2 folder cannot express.
    """
    n, trunk = model.config, model.trunk
    attention = hparams.get("attention") or {}

    def refuse(setting: str, value: Any, why: str, layer: int | None = None) -> None:
        where = f" (layer {layer}, from attention.layers)" if layer is not None and trunk.attention.layers else ""
        raise ConfigError(f"the checkpoint's {setting}={value!r}{where} cannot be exported as a Hugging Face Llama "
                          f"folder: {why} Convert or fine-tune the model to a setting Llama has, or export graphs "
                          "(--format torch_export) instead.")

    for setting, value, wanted, why in (
        ("norm", n.norm, "rms", "Llama's norms are RMSNorm (norm: rms)."),
        ("mlp", n.mlp, "swiglu", "Llama's MLP is the gated SiLU one (mlp: swiglu)."),
        ("position", n.position, "rope", "Llama has rotary positions (position: rope), no learned or missing ones."),
        ("bias", n.bias, False, "Llama has no biases on its output projection, MLP or norms (Qwen2 has them on "
         "q/k/v only: bias: false, qkv_bias: true)."),
        ("output", n.output, "linear", "Llama's head is a full linear softmax."),
    ):
        if value != wanted:
            refuse(f"network.{setting}", value, why)
    if any(source is not None for source in trunk.kv_sources):
        setting = "kv_sources" if attention.get("kv_sources") else "kv_share_every"
        refuse(f"attention.{setting}", attention.get(setting), "every Llama layer projects its own K and V (no "
               "cross-layer K/V sharing).")
    kv_heads = {block.attn.n_kv_heads for block in model.blocks}
    if len(kv_heads) > 1:
        refuse("attention.layers", attention.get("layers"), f"its layers have {sorted(kv_heads)} K/V heads; a Llama "
               "config has one num_key_value_heads for every layer.")
    for i, block in enumerate(model.blocks):
        c = block.attn.config
        if c.score_encoding != "none":
            refuse("attention.score_encoding", c.score_encoding, "Llama's scores are q.k / sqrt(head_dim) with a "
                   "causal mask and nothing added (no '+score' / '+relative' encoding).", i)
        if c.mask_self:
            refuse("attention.mask_self", True, "Llama lets each token attend to itself (no '+noself').", i)
        for role in ("q_norm", "k_norm", "v_norm"):
            if getattr(c, role) != "none":
                refuse(f"attention.{role}", getattr(c, role), "Llama has no per-role norms.", i)
        if c.rope_key_dim:
            refuse("attention.rope_key_dim", c.rope_key_dim, "Llama rotates the query and key heads themselves (no "
                   "decoupled rotary key).", i)
        if c.rope_fraction != 1.0:
            refuse("attention.rope_fraction", c.rope_fraction, "Llama rotates every dimension of a head; its config "
                   "has no partial rotary.", i)
    model_type = "qwen2" if model.blocks[0].attn.qkv.bias is not None else "llama"
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": n.vocab_size,
        "hidden_size": n.d_model,
        "intermediate_size": n.mlp_width,
        "num_hidden_layers": n.n_layer,
        "num_attention_heads": n.n_head,
        "num_key_value_heads": kv_heads.pop(),
        "head_dim": n.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": n.max_seq_len,
        "rms_norm_eps": n.norm_eps,
        "initializer_range": n.init_std,
        "tie_word_embeddings": bool(n.tie_embeddings),
        "rope_theta": n.rope_base,  # transformers 4's field; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": n.rope_base},
        "attention_dropout": float(attention.get("dropout", 0.0)),
        "bos_token_id": None,  # without a stored tokenizer, the checkpoint names no special tokens
        "eos_token_id": None,
        "pad_token_id": None,
        **(tokenizer.special_token_ids if tokenizer is not None else {}),  # the imported model's, or fit's boundary
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if model_type == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=n.n_layer)
    else:
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return config


def from_our_state(model: Any, config: dict[str, Any]) -> dict[str, Tensor]:
    """Our GPT's tensors under the Llama names (the inverse of :func:`to_our_state`): ``q_proj``, ``k_proj`` and
    ``v_proj`` are the rows of each role's group in the fused projection (a shared group's under each of its roles),
    as float32 tensors that share no memory.

    Raises:
        ConfigError: if the GPT holds weights the Llama layout has no place for.
    """
    remaining = {k: t.detach() for k, t in model.state_dict().items()}
    out: dict[str, Tensor] = {}

    def put(theirs: str, tensor: Tensor) -> None:
        out[theirs] = tensor.float().contiguous().clone()

    put("model.embed_tokens.weight", remaining.pop("embed.weight"))
    for i, block in enumerate(model.blocks):
        h, ours, layout = f"model.layers.{i}.", f"trunk.blocks.{i}.", block.attn.layout
        put(f"{h}input_layernorm.weight", remaining.pop(f"{ours}norm_attn.weight"))
        put(f"{h}post_attention_layernorm.weight", remaining.pop(f"{ours}norm_mlp.weight"))
        weight = remaining.pop(f"{ours}attn.qkv.weight")  # (sum of the groups' widths, C)
        bias = remaining.pop(f"{ours}attn.qkv.bias", None)
        for role, name in (("Q", "q_proj"), ("K", "k_proj"), ("V", "v_proj")):
            rows = layout.rows(layout.sharing.group_of(role))  # (heads of the role's group * head_dim) rows
            put(f"{h}self_attn.{name}.weight", weight[rows])
            if bias is not None:
                put(f"{h}self_attn.{name}.bias", bias[rows])
        put(f"{h}self_attn.o_proj.weight", remaining.pop(f"{ours}attn.proj.weight"))
        for theirs, mine in (("gate_proj", "gate"), ("up_proj", "fc"), ("down_proj", "proj")):
            put(f"{h}mlp.{theirs}.weight", remaining.pop(f"{ours}mlp.{mine}.weight"))
    put("model.norm.weight", remaining.pop("trunk.norm.weight"))
    head = remaining.pop("head.weight")
    if not config["tie_word_embeddings"]:
        put("lm_head.weight", head)
    if remaining:
        raise ConfigError(
            f"the checkpoint's GPT has weights the Llama layout has no place for: {', '.join(sorted(remaining)[:6])}; "
            "only GPTs with the Llama-style trunk (norm: rms, mlp: swiglu, position: rope, bias: false) can be "
            "exported."
        )
    return out


def sharing_note(model: Any) -> str | None:
    """What a folder of a shared variant does not keep: the cache saving (None for QKV, GQA and MQA)."""
    shared = sorted({block.attn.sharing.name for block in model.blocks} - {"QKV"})
    if not shared:
        return None
    ours = sum(block.attn.cached_tensors for block in model.blocks)
    return (f"the checkpoint shares projections ({', '.join(shared)}): the folder holds each shared projection under "
            f"every role it serves (q_proj, k_proj, v_proj), so its logits are the checkpoint's, but a Hugging Face "
            f"model projects and caches K and V apart: its cache holds {2 * len(model.blocks)} K/V head tensors per "
            f"token (K and V in each of {len(model.blocks)} layers) where the checkpoint's holds {ours}, so the folder "
            "has no cache saving (and fine-tuning it unties the shared weights).")


def main_export(model: Any, hparams: dict[str, Any], ckpt_path: str | Path, out: Path, tokenizer: Any = None) -> int:
    """``export --format hf`` of an RMSNorm/SwiGLU trunk: write ``model`` (a checkpoint's GPT, eval mode, with its
    ``hparams`` and the ``tokenizer`` it stores, whose special token ids ``config.json`` and
    ``generation_config.json`` name) as a Llama or Qwen2 folder; with ``transformers`` installed, the folder's logits
    are compared with ours before it is put in place, and a difference beyond :data:`EXPORT_TOLERANCE` writes
    nothing."""
    config = export_settings(model, hparams, tokenizer)
    architecture = config["architectures"][0]
    checked: dict[str, float | None] = {}

    def check(folder: Path) -> None:
        difference = checked["difference"] = check_with_transformers(folder, "hf-llama", model)
        if difference is not None and not difference <= EXPORT_TOLERANCE:
            raise CheckpointError(
                f"transformers' {architecture} loaded from the folder written for {ckpt_path} gives logits that "
                f"differ from the checkpoint's GPT by {difference:.3g} (more than {EXPORT_TOLERANCE}) on random "
                f"tokens, so the folder would not be this model; nothing was written to {out}."
            )

    write_hf_folder(out, config, from_our_state(model, config), check)
    print(f"exported {ckpt_path} as a Hugging Face {architecture} folder {out} ({CONFIG_FILE} + {WEIGHTS_FILE} + "
          f"{GENERATION_FILE}): {config['num_hidden_layers']} layers, width {config['hidden_size']}, "
          f"{config['num_attention_heads']} query heads over {config['num_key_value_heads']} K/V heads, vocabulary "
          f"{config['vocab_size']}, tied embeddings {config['tie_word_embeddings']}; special tokens bos "
          f"{config['bos_token_id']}, eos {config['eos_token_id']}, pad {config['pad_token_id']}"
          f"{' (from the tokenizer the checkpoint stores)' if tokenizer is not None else ' (it stores no tokenizer)'}")
    note = sharing_note(model)
    if note:
        print(f"note: {note}")
    if checked.get("difference") is not None:
        print(f"largest |logit difference| of transformers' {architecture} loaded from {out} against the "
              f"checkpoint's GPT on random tokens: {checked['difference']:.3g}")
    return 0
