"""What the importers share: reading weight files safely, and writing a task as a ``fit``-style checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from qkv_lightning.errors import CheckpointError, ConfigError


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


def task_checkpoint(task: Any, source: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of ``task`` (built, weights loaded) in the layout ``fit`` saves: ``state_dict``, the
    ``hyper_parameters`` that rebuild the task, Lightning's version, step 0 and the task's own entries (a language
    model's ``tokens_seen``). It holds no optimiser state: start a fine-tune from it with
    ``--model.init_args.init_from``, or evaluate it with ``validate``/``test --ckpt_path``. ``source`` records where
    the weights came from (under ``qkv_import``)."""
    import lightning

    checkpoint: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": dict(task.state_dict()),  # tied weights stay one tensor, as in fit's checkpoints
        "hparams_name": None,
        "hyper_parameters": dict(task.hparams),
        "qkv_import": source,
    }
    task.on_save_checkpoint(checkpoint)
    return checkpoint


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
