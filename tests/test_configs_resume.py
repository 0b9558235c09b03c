"""Every shipped fit config saves ``last.ckpt`` and resumes from it with ``fit --ckpt_path last`` (issue 13, item 8).

Every config under configs/ that trains (it names a model and a data class) is parsed and instantiated through the
real command line and must have a ModelCheckpoint with ``save_last``; one config of each kind (synthetic task,
language model, ViT, the benchmark model) is also trained for two steps and resumed through the CLI at tiny sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from qkv_lightning.cli import main
from qkv_lightning.lightning_cli import QKVLightningCLI
from tests.imagedata import write_cifar10
from tests.lm_fixtures import write_wikitext
from tests.run_fixtures import CONFIGS, QUIET, image_args, lm_args, synthetic_args
from tests.test_shipped_configs import FIT

FIT_CONFIGS = [CONFIGS / name for name in FIT]  # the walk of tests/test_shipped_configs.py


def test_the_walk_finds_every_kind_of_fit_config():
    names = {str(p.relative_to(CONFIGS)) for p in FIT_CONFIGS}
    assert {"synthetic/sort.yaml", "lm/wikitext2-offline.yaml", "vit/cifar10.yaml", "bench/gpt-mid.yaml"} <= names
    assert len(names) >= 16 and not any(n.startswith(("variants/", "strategy/", "study/")) for n in names)


class ParseOnly(QKVLightningCLI):
    def before_instantiate_classes(self) -> None:  # nothing resolved or checked against files
        pass


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=[str(p.relative_to(CONFIGS)) for p in FIT_CONFIGS])
def test_every_fit_config_saves_last_ckpt(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = ParseOnly(args=["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                          "--trainer.strategy", "auto", "--trainer.precision", "32-true"], run=False)
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert any(c.save_last for c in checkpoints), f"{config}: no ModelCheckpoint(save_last=True)"


class RecordStart(Callback):
    """Writes the global step at which training starts (0 unless resumed) to ``out``.

    Args:
        out: the JSON file to write.
    """

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        Path(self.out).write_text(json.dumps({"start": trainer.global_step}))


def without_run_yaml(args: list[str], config: Path) -> list[str]:
    """A run_fixtures command line with its run config (and its callbacks) removed and ``config`` first."""
    assert args[0] == args[2] == "--config"
    return ["--config", str(config), *args[4:]]


def tiny(name: str, folder: Path) -> list[str]:
    if name.startswith("synthetic/"):
        return without_run_yaml(synthetic_args(folder), CONFIGS / name)
    if name.startswith(("lm/", "bench/")):
        data = write_wikitext(folder / "wikitext")
        return without_run_yaml(lm_args(folder, data), CONFIGS / name)
    write_cifar10(str(folder / "cifar"))
    return without_run_yaml(image_args(folder, folder / "cifar"), CONFIGS / name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["synthetic/sort.yaml", "bench/gpt-mid.yaml", "lm/wikitext2-offline.yaml",
                                  "vit/cifar10.yaml"])
def test_a_config_resumes_from_last_ckpt_through_the_cli(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "start.json"
    common = [*tiny(name, tmp_path), *QUIET, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.val_check_interval", "2",
              "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
              "--trainer.callbacks+=tests.test_configs_resume.RecordStart", "--trainer.callbacks.out", str(record)]
    assert main(["fit", *common, "--trainer.max_steps", "2"]) == 0
    (last,) = (tmp_path / "logs").rglob("last.ckpt")
    assert json.loads(record.read_text())["start"] == 0
    assert main(["fit", *common, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0
    assert json.loads(record.read_text())["start"] == 2  # resumed at the saved step, not from scratch
    assert list((tmp_path / "logs").rglob("last.ckpt")) == [last]  # into the same run


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_a_max_epochs_run_resumed_twice_across_an_epoch_end_through_the_cli_ends_with_the_same_weights(tmp_path,
                                                                                                       monkeypatch):
    """Issue 26, through ``main``: a 3-epoch run (4 steps an epoch) resumed from its step-4 checkpoint (the end of
    epoch 0), then from that run's step-6 checkpoint, takes 12 steps in all and ends with the uninterrupted run's
    weights, bit for bit (today's main: 14 steps, epoch 1 replayed; a mid-epoch resume of a ``max_epochs`` run also
    lost its position, because the task's schedule asks for the step count before the checkpoint is read)."""
    monkeypatch.chdir(tmp_path)

    def fit(name: str, *extra: str) -> dict:
        args = [*synthetic_args(tmp_path, name=name, every=1), *QUIET, "--data.init_args.train_size", "32",
                "--trainer.max_steps", "-1", "--trainer.max_epochs", "3", "--trainer.val_check_interval", "2",
                "--model.init_args.network.dropout", "0.0", *extra]
        assert main(["fit", *args]) == 0
        return {int(p.stem.removeprefix("step=")): p for p in (tmp_path / "logs" / name).rglob("step=*.ckpt")}

    uninterrupted = fit("uninterrupted")
    once = fit("once", "--ckpt_path", str(uninterrupted[4]))
    twice = fit("twice", "--ckpt_path", str(once[6]))
    assert sorted(twice) == [7, 8, 9, 10, 11, 12]
    for step in (8, 12):
        expected, found = (torch.load(path[step], weights_only=True) for path in (uninterrupted, twice))
        assert found["global_step"] == step
        assert found["loops"]["fit_loop"]["state_dict"] == expected["loops"]["fit_loop"]["state_dict"]
        assert expected["state_dict"].keys() == found["state_dict"].keys()
        for key, value in expected["state_dict"].items():
            assert torch.equal(found["state_dict"][key], value), f"{key} at step {step}"


def shipped(config: str, *extra: str) -> list[str]:
    """A shipped config as it is (its logger too), shrunk to a few CPU steps."""
    return ["--config", str(CONFIGS / config), *QUIET, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--data.train_size", "32", "--data.val_size", "16", "--data.test_size", "16", "--data.batch_size", "8",
            *extra]


def test_default_root_dir_decides_where_logs_and_checkpoints_go(tmp_path, monkeypatch):
    """``fit --trainer.default_root_dir runs/a`` on a shipped config writes its logs, config.yaml and checkpoints into
    runs/a/<name>/version_0 and nothing into logs/ (the default: configs/ give the logger no save_dir), and
    ``validate --ckpt_path last`` with the same root evaluates that run; a logger's own save_dir still wins."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *shipped("synthetic/sort.yaml", "--trainer.default_root_dir", "runs/a")]) == 0
    run = tmp_path / "runs" / "a" / "default" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*")) and not (tmp_path / "logs").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert saved["default_root_dir"] == "runs/a" and saved["logger"]["init_args"]["save_dir"] == "runs/a"
    assert main(["validate", *shipped("synthetic/sort.yaml", "--trainer.default_root_dir", "runs/a"),
                 "--ckpt_path", "last"]) == 0
    assert list((run / "validate").glob("events.out.tfevents.*"))  # logged inside the run it evaluated

    assert main(["fit", *shipped("synthetic/sort.yaml")]) == 0  # the default: logs/
    assert (tmp_path / "logs" / "default" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert main(["fit", *shipped("synthetic/sort.yaml", "--trainer.default_root_dir", "runs/b",
                                 "--trainer.logger.init_args.save_dir", "mine")]) == 0
    assert (tmp_path / "mine" / "default" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs" / "b").exists()


def test_logger_false_works_with_the_shipped_configs(tmp_path, monkeypatch):
    """The shipped configs hold a LearningRateMonitor, which Lightning refuses without a logger: with
    ``--trainer.logger false`` it is left out (said in one line), the fit runs, its checkpoints go to
    <default_root_dir>/checkpoints, and ``validate --ckpt_path last`` finds them there."""
    monkeypatch.chdir(tmp_path)
    with_monitor = [p for p in FIT_CONFIGS if "LearningRateMonitor" in p.read_text()]
    assert len(with_monitor) >= 10
    for config in with_monitor:
        cli = ParseOnly(args=["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                              "--trainer.strategy", "auto", "--trainer.precision", "32-true", "--trainer.logger",
                              "false"], run=False)
        assert not cli.trainer.loggers and not any(type(c).__name__ == "LearningRateMonitor"
                                                   for c in cli.trainer.callbacks), config
    assert main(["fit", *shipped("synthetic/sort.yaml", "--trainer.logger", "false")]) == 0
    assert (tmp_path / "logs" / "checkpoints" / "last.ckpt").is_file()
    assert main(["validate", *shipped("synthetic/sort.yaml", "--trainer.logger", "false"), "--ckpt_path", "last"]) == 0


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=[str(p.relative_to(CONFIGS)) for p in FIT_CONFIGS])
def test_every_fit_config_shows_progress(config, tmp_path, monkeypatch):
    """No shipped fit config trains in silence: Lightning's progress bar is on (the offline LM config turned it off,
    so a fit printed nothing until it ended)."""
    monkeypatch.chdir(tmp_path)
    cli = ParseOnly(args=["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                          "--trainer.strategy", "auto", "--trainer.precision", "32-true"], run=False)
    assert cli.trainer.progress_bar_callback is not None, f"{config}: trainer.enable_progress_bar is off"
