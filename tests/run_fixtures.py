"""Small, fast runs of each task through the command line, for the reliability tests: the arguments of a run that
logs and checkpoints under a given folder, and a snapshot of a folder's files to show that a command changed nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run_yaml(folder: Path, name: str, every: int = 2, save_on_exception: bool = False) -> Path:
    """Trainer settings shared by the runs: CPU, fp32, a TensorBoard logger under ``folder/logs/name`` and
    checkpoints every ``every`` steps into its version folder (``step=K.ckpt`` and ``last.ckpt``)."""
    path = folder / f"{name}-run.yaml"
    path.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {folder / 'logs'}, name: {name}}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, every_n_train_steps: {every}, save_top_k: -1, filename: "{{step}}",
                  save_on_exception: {str(save_on_exception).lower()}}}
"""
    )
    return path


def synthetic_args(folder: Path, name: str = "synthetic", steps: int = 4, **run: object) -> list[str]:
    """configs/synthetic/sort.yaml, shrunk: 64 training lists of 8 digits, a 1-layer encoder of width 32."""
    return [
        "--config", str(CONFIGS / "synthetic" / "sort.yaml"), "--config", str(run_yaml(folder, name, **run)),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1",
        "--model.init_args.network.n_layer", "1", "--model.init_args.network.d_model", "32",
        "--model.init_args.network.max_seq_len", "16", "--model.init_args.optimizer.warmup_steps", "2",
        "--data.init_args.seq_len", "8", "--data.init_args.train_size", "64", "--data.init_args.val_size", "16",
        "--data.init_args.test_size", "16", "--data.init_args.batch_size", "8",
    ]


def lm_args(folder: Path, data: Path, name: str = "lm", steps: int = 2, **run: object) -> list[str]:
    """configs/lm/wikitext2-offline.yaml on the small WikiText files in ``data``: word level, a tiny GPT."""
    return [
        "--config", str(CONFIGS / "lm" / "wikitext2-offline.yaml"), "--config", str(run_yaml(folder, name, **run)),
        "--data.data_dir", str(data), "--data.cache_dir", str(folder / "cache"), "--data.verify", "false",
        "--data.train_file", "wiki.train.tokens", "--data.val_file", "wiki.valid.tokens",
        "--data.split_test_for_val", "null", "--data.num_workers", "0", "--data.batch_size", "4",
        "--data.seq_len", "16", "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1", "--trainer.gradient_clip_val", "null",
        "--model.network.n_layer", "1", "--model.network.n_head", "2", "--model.network.d_model", "16",
        "--model.network.d_mlp", "32", "--model.network.max_seq_len", "16", "--model.network.dropout", "0.0",
        "--model.network.adaptive_cutoffs", "[20, 40]",
    ]


def image_args(
    folder: Path, root: Path, name: str = "vit", steps: int = 2, config: str = "cifar10", patch: int = 8, **run: object
) -> list[str]:
    """A configs/vit recipe (CIFAR-10 by default) on small files in ``root``: a 1-layer ViT with 8-pixel patches."""
    return [
        "--config", str(CONFIGS / "vit" / f"{config}.yaml"), "--config", str(run_yaml(folder, name, **run)),
        "--data.root", str(root), "--data.download", "false", "--data.num_workers", "0", "--data.batch_size", "8",
        "--data.train_subset", "32", "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1",
        "--trainer.val_check_interval", str(steps), "--trainer.check_val_every_n_epoch", "null",
        "--trainer.limit_val_batches", "1",
        "--model.network.n_layer", "1", "--model.network.n_head", "2", "--model.network.d_model", "16",
        "--model.network.d_mlp", "32", "--model.network.patch_size", str(patch), "--model.mixup_alpha", "0",
        "--model.cutmix_alpha", "0",
    ]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) with the SHA-256 of its content."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
