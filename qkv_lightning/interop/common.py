"""What the importers and the Hugging Face writers share: reading weight files safely, writing a task as a
``fit``-style checkpoint, and writing a Hugging Face folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from qkv_lightning.data.hf_tokenizer import SPECIAL_TOKEN_IDS
from qkv_lightning.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
"""A Hugging Face folder's model config."""
WEIGHTS_FILE = "model.safetensors"
"""A Hugging Face folder's weights (one file; larger models shard them, listed in ``model.safetensors.index.json``)."""
GENERATION_FILE = "generation_config.json"
"""A Hugging Face folder's generation defaults (``GenerationConfig``): the special token ids ``generate`` uses."""


def require(package: str, purpose: str, extra: str = "interop") -> Any:
    """Import an optional package, or raise a :class:`ConfigError` that says how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(
            f"{purpose} needs the optional package {package!r}: pip install {package} (or pip install "
            f"'qkv-lightning[{extra}]')."
        ) from None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file (no code runs: the format holds only tensors)."""
    require("safetensors", f"reading {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: it is not a complete .safetensors file ({error}).") from None


def read_weights(path: Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file read with ``weights_only=True`` (a plain state dict,
    or one under a ``state_dict`` / ``model`` key, as training scripts save them)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; give a .safetensors file or a weights-only .pth/.pt/.bin file.")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    from qkv_lightning.checkpoints import load_checkpoint_file

    state = load_checkpoint_file(path, weights_only=True, lightning=False)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return dict(state)


def language_data_spec(
    vocab_size: int, seq_len: int, bpe_file: Path | None = None, tokenizer: Any = None
) -> dict[str, Any]:
    """An imported language model's ``data_spec``: its vocabulary and sequence length and, with a tokenizer (a GPT-2
    ``.tiktoken`` ranks file ``bpe_file``, or the model's own ``tokenizer``, a
    :class:`~qkv_lightning.data.tokenizers.Tokenizer`), that tokenizer's identity, so that the CLI checks that
    evaluation data is tokenized with it (the vocabulary is then the tokenizer's, at most the model's)."""
    data_spec: dict[str, Any] = {"vocab_size": vocab_size, "seq_len": seq_len}
    what = "the stored tokenizer"
    if bpe_file is not None:
        from qkv_lightning.data.tokenizers import BPETokenizer

        tokenizer, what = BPETokenizer.from_ranks_file(bpe_file), f"--bpe_file {bpe_file}"
    if tokenizer is not None:
        if tokenizer.vocab_size > vocab_size:
            raise ConfigError(
                f"{what} has {tokenizer.vocab_size} tokens, more than the model's vocab_size {vocab_size}; its ids "
                "would run past the model's embedding. Give the tokenizer the model was trained with."
            )
        data_spec["tokenizer"] = tokenizer.identity
        data_spec["vocab_size"] = tokenizer.vocab_size
    return data_spec


def task_checkpoint(task: Any, source: dict[str, Any], **records: Any) -> dict[str, Any]:
    """:func:`qkv_lightning.checkpoints.start_checkpoint` of ``task``, recording ``source`` under ``qkv_import`` (and
    ``records`` as further top-level entries, such as the model's own tokenizer)."""
    from qkv_lightning.checkpoints import start_checkpoint

    return start_checkpoint(task, qkv_import=source, **records)


def write_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """Save atomically to ``path``, which must not exist (nothing is overwritten)."""
    from qkv_lightning.checkpoints import atomic_save

    if path.exists():
        raise ConfigError(f"{path} exists already; name a new file (nothing is overwritten).")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(checkpoint, path)


def check_destination(path: Path) -> None:
    """Refuse an existing destination before any work is done."""
    if path.exists():
        raise ConfigError(f"{path} exists already; name a new file (nothing is overwritten).")


def check_hf_destination(out: Path) -> None:
    """Refuse an ``--out`` folder that already holds a Hugging Face folder's files, before anything is loaded."""
    existing = [str(out / name) for name in (CONFIG_FILE, WEIGHTS_FILE, GENERATION_FILE) if os.path.lexists(out / name)]
    if existing:
        raise ConfigError(
            f"--out {out} already holds {', '.join(existing)}; pick another folder (nothing is overwritten)."
        )


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``generation_config.json`` that ``save_pretrained`` writes for a causal LM with this ``config.json``: the
    config's special token ids (:data:`~qkv_lightning.data.hf_tokenizer.SPECIAL_TOKEN_IDS`) that are not None,
    marked as taken from the model's config."""
    ids = {key: config[key] for key in SPECIAL_TOKEN_IDS if config.get(key) is not None}
    return {"_from_model_config": True, **ids, "use_cache": True}


def write_hf_folder(out: Path, config: dict[str, Any], tensors: dict[str, Tensor],
                    check: Callable[[Path], None] | None = None) -> None:
    """Write ``config.json``, ``model.safetensors`` and ``generation_config.json`` (:func:`generation_config`) into
    ``out`` (new, or without them) through a staged folder (:func:`qkv_lightning.files.staged_folder`): ``check`` reads
    the complete folder before it is put in place, and if it raises, or the process dies, nothing lies under the final
    names. ``tensors`` must not share memory."""
    require("safetensors", "export --format hf")
    from safetensors.torch import save

    from qkv_lightning.files import atomic_open, atomic_write_json, staged_folder

    check_hf_destination(out)
    with staged_folder(out, last=(CONFIG_FILE,)) as stage:
        with atomic_open(stage / WEIGHTS_FILE, "wb") as file:
            file.write(save(tensors, metadata={"format": "pt"}))
        atomic_write_json(stage / GENERATION_FILE, generation_config(config), indent=2)
        atomic_write_json(stage / CONFIG_FILE, config, indent=2)
        if check is not None:
            check(stage)
