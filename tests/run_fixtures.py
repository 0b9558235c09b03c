"""Small, fast CLI runs of each task, in one place for every test module: the trainer settings of a run that logs and
checkpoints under a given folder (as a YAML file layered on a shipped config), the command-line options that shrink
each shipped config and point it at small data files, and a snapshot of a folder's files to show that a command
changed nothing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import yaml

from tests.imagedata import tar_tree, write_cifar10, write_cifar100, write_image_tree, write_mnist_gz

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
CPU_TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}
"""One CPU process in 32-bit floats."""
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


LEFT_BEHIND = ("PL_GLOBAL_SEED", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
               "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")
"""Settings a Lightning run in this pytest process leaves in ``os.environ`` (its seed, and the rendezvous of a
distributed run, with a port that may still be bound)."""


def subprocess_env() -> dict[str, str]:
    """The environment of a ``python cli.py`` subprocess: this checkout first on PYTHONPATH, one thread per process,
    unbuffered output, and none of :data:`LEFT_BEHIND` (``STANDALONE_PORT`` stays: each test's own rendezvous port)."""
    path = os.pathsep.join(p for p in (str(CONFIGS.parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in LEFT_BEHIND:
        env.pop(name, None)
    return env


def options(section: str, settings: dict[str, Any]) -> list[str]:
    """``settings`` as command-line options of ``section`` (``--data.seq_len 16``), values written as in YAML."""
    out = []
    for key, value in settings.items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        out += [f"--{section}.{key}", text]
    return out


# ------------------------------------------------------------------------------------------- run settings (YAML)
def run_settings(
    folder: Path,
    name: str,
    every: int = 2,
    save_on_exception: bool | None = False,
    dirpath: Path | None = None,
    filename: str | None = "{step}",
    devices: int | None = 1,
) -> dict[str, Any]:
    """Trainer settings shared by the runs: CPU, fp32, a TensorBoard logger under ``folder/logs/name`` and
    checkpoints every ``every`` steps, into its version folder (or ``dirpath``), named ``filename`` (``step=K.ckpt``;
    None: Lightning's ``epoch=E-step=K.ckpt``) and ``last.ckpt``. ``None`` leaves a setting to its default."""
    checkpoint: dict[str, Any] = {"save_last": True, "every_n_train_steps": every, "save_top_k": -1}
    if dirpath is not None:
        checkpoint = {"dirpath": str(dirpath), **checkpoint}
    if filename is not None:
        checkpoint["filename"] = filename
    if save_on_exception is not None:
        checkpoint["save_on_exception"] = save_on_exception
    trainer = {
        **CPU_TRAINER,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(folder / "logs"), "name": name},
        },
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint}],
    }
    if devices is None:
        del trainer["devices"]
    else:
        trainer["devices"] = devices
    return {"seed_everything": 0, "trainer": trainer}


def write_yaml(path: Path, settings: dict[str, Any]) -> Path:
    """``settings`` as a YAML config file at ``path``."""
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def run_yaml(folder: Path, name: str, every: int = 2, save_on_exception: bool = False) -> Path:
    """:func:`run_settings` as ``folder/<name>-run.yaml``."""
    return write_yaml(folder / f"{name}-run.yaml", run_settings(folder, name, every, save_on_exception))


# ------------------------------------------------------------------------------------------------ the tasks' data
def wikitext_data(data: Path, cache: Path) -> dict[str, Any]:
    """Data settings of a WikiText datamodule on the small files in ``data`` (tests.lm_fixtures.write_wikitext):
    word level, nothing downloaded or verified, the test split kept for testing, no worker processes."""
    return {
        "data_dir": str(data), "cache_dir": str(cache), "verify": False, "train_file": "wiki.train.tokens",
        "val_file": "wiki.valid.tokens", "split_test_for_val": None, "num_workers": 0,
    }


def image_data_args(config: str, folder: Path) -> list[str]:
    """Command-line options pointing a shipped configs/vit recipe at small files, written under ``folder``, in the
    official format of its data set."""
    name = os.path.basename(config)
    if name in ("cifar10.yaml", "cifar100.yaml"):
        (write_cifar10 if name == "cifar10.yaml" else write_cifar100)(str(folder / "data"))
        return ["--data.root", str(folder / "data"), "--data.download", "false"]
    if name == "mnist.yaml":
        write_mnist_gz(str(folder / "mnist"))
        return ["--data.root", str(folder / "mnist"), "--data.download", "false"]
    if name == "cifar10-jpeg.yaml":
        tree = write_image_tree(str(folder / "cifar10-jpeg"), CIFAR_CLASSES, 2, size=32, splits=("train", "test"))
        return ["--data.root", tar_tree(tree, str(folder / "cifar10-jpeg.tar.gz"))]
    if name == "imagenet-vit-s16.yaml":
        tree = write_image_tree(str(folder / "imagenet"), ["n01440764", "n01443537"], 3, size=40)
        return ["--data.root", tree, "--data.image_size", "32", "--model.network.d_model", "96"]
    raise AssertionError(f"no test data for {name}: add it to image_data_args()")


# ------------------------------------------------------------------------------------------------------ the runs
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
        *options("data", {**wikitext_data(data, folder / "cache"), "batch_size": 4, "seq_len": 16}),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1", "--trainer.gradient_clip_val", "null",
        "--model.network.n_layer", "1", "--model.network.n_head", "2", "--model.network.d_model", "16",
        "--model.network.d_mlp", "32", "--model.network.max_seq_len", "16", "--model.network.dropout", "0.0",
        "--model.network.adaptive_cutoffs", "[20, 40]",
    ]


def lm_config_args(folder: Path, data: Path, config: str = "wikitext2-offline", *extra: str) -> list[str]:
    """A config from configs/lm as shipped (its own logger, callbacks and sizes) on the small files in ``data``, on
    CPU, writing only under ``folder``."""
    return [
        "--config", str(CONFIGS / "lm" / f"{config}.yaml"),
        *options("data", {**wikitext_data(data, folder / "cache"), "batch_size": 4}),
        "--trainer.logger.init_args.save_dir", str(folder / "logs"), "--trainer.enable_progress_bar", "false",
        *options("trainer", CPU_TRAINER), "--trainer.default_root_dir", str(folder), *extra,
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
