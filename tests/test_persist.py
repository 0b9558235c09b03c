"""The one task builder (qkv_lightning/tasks/persist.py): only the package's task classes (or the class the user's
config names) are ever built from a checkpoint or a study axis, and a checkpoint never chooses where output goes.

The malicious files here really would run code: each test first runs the file's payload the naive way (import the
named object, call it with the stored arguments) and sees its effect, then hands the same file to the real command
and sees none.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qkv_lightning.cli import main
from qkv_lightning.errors import CheckpointError, ConfigError
from qkv_lightning.tasks.base import TaskModule
from qkv_lightning.tasks.language_model import LanguageModel
from qkv_lightning.tasks.persist import OUTPUT_SETTINGS, build_task, resolve_class, stored_settings
from qkv_lightning.tasks.sequence_tasks import SequenceTask
from tests.run_fixtures import CONFIGS, subprocess_env


def touch_payload(marker: Path) -> dict:
    """Hyper-parameters whose ``_class_path`` names ``subprocess.call``: building them naively runs ``touch``."""
    return {"_class_path": "subprocess.call", "args": ["touch", str(marker)]}


def naive_build(hparams: dict) -> object:
    """What a builder that trusts the file does (the code this module replaced): import the path and call it."""
    values = dict(hparams)
    module_name, _, name = values.pop("_class_path").rpartition(".")
    return getattr(importlib.import_module(module_name), name)(**values)


def evil_checkpoint(path: Path, hparams: object, state_dict: object | None = None) -> Path:
    torch.save({"state_dict": {} if state_dict is None else state_dict, "hyper_parameters": hparams}, path)
    return path


def test_the_payload_is_real(tmp_path: Path) -> None:
    """Control: the payload used below does create its marker when built the naive way."""
    marker = tmp_path / "ran"
    naive_build(touch_payload(marker))
    assert marker.exists()


def test_convert_of_a_checkpoint_naming_subprocess_call_runs_nothing(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    source = evil_checkpoint(tmp_path / "evil.ckpt", touch_payload(marker))
    code = main(["convert", str(source), str(tmp_path / "out.ckpt"), "--sharing", "Q-K=V"])
    err = capsys.readouterr().err
    assert code == 2
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()
    assert "'subprocess.call' is not a TaskModule of qkv_lightning" in err and "Traceback" not in err


def test_validate_with_a_checkpoint_naming_subprocess_call_runs_nothing(tmp_path: Path, capsys) -> None:
    """LightningCLI's --ckpt_path re-parsing would import the saved class path: it is vetted first."""
    marker = tmp_path / "ran"
    source = evil_checkpoint(tmp_path / "evil.ckpt", touch_payload(marker))
    code = main(["validate", "--config", str(CONFIGS / "synthetic" / "sort.yaml"), "--ckpt_path", str(source),
                 "--trainer.logger", "false"])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "subprocess.call" in err and "Traceback" not in err


HOSTILE_CLASS_PATHS = [
    "subprocess.call", "os.system", "builtins.eval", "builtins.exec", "antigravity.geohash", "this.s",
    "qkv_lightning.tasks.persist.resolve_class",  # a function of the package, not a class
    "qkv_lightning.tasks.base.TaskModule",  # abstract
    "qkv_lightning.nn.gpt.GPT",  # a class of the package, but not a task
    "qkv_lightning.tasks.nonexistent.Task", "qkv_lightning", "", "a b.C", "os.path.join", 42, None, ["os.system"],
]


@pytest.mark.parametrize("class_path", HOSTILE_CLASS_PATHS, ids=str)
def test_resolve_class_refuses_everything_but_the_packages_tasks_before_importing(class_path: object) -> None:
    before = set(sys.modules)
    with pytest.raises(ConfigError, match="is not a TaskModule of qkv_lightning"):
        resolve_class(class_path, TaskModule, "model.class_path")
    assert not {"antigravity", "this"} & (set(sys.modules) - before)  # modules that act when imported stayed out


def test_resolve_class_accepts_the_tasks_and_the_users_validated_class() -> None:
    for cls in (LanguageModel, SequenceTask):
        assert resolve_class(f"{cls.__module__}.{cls.__qualname__}", TaskModule, "x") is cls
    user = f"{__name__}.UserTask"  # a class of the user's own module, already imported (as LightningCLI does)
    assert resolve_class(user, TaskModule, "x", trusted=[user]) is UserTask
    with pytest.raises(ConfigError):  # the same class, not named by the user's config: refused
        resolve_class(user, TaskModule, "x")
    with pytest.raises(ConfigError):  # a task, but not the one the caller needs
        resolve_class("qkv_lightning.tasks.sequence_tasks.SequenceTask", LanguageModel, "x")


class UserTask(SequenceTask):
    """A user's subclass, imported by its own module (this one)."""


def test_a_checkpoint_never_chooses_where_output_goes() -> None:
    hparams = {"_class_path": "x.Y", "generation": {"output_file": "/home/user/notes.txt", "overwrite": True,
                                                    "max_new_tokens": 5}, "_instantiator": "z"}
    class_path, values = stored_settings(hparams, "f.ckpt")
    assert class_path == "x.Y"
    assert values == {"generation": {"max_new_tokens": 5}}
    assert OUTPUT_SETTINGS == {"generation": ("output_file", "overwrite")}


@pytest.mark.parametrize("hparams", ["not a dict", ["a", "b"], 3], ids=repr)
def test_hyper_parameters_of_another_shape_are_an_error_naming_the_file(tmp_path: Path, hparams: object, capsys):
    source = evil_checkpoint(tmp_path / "odd.ckpt", hparams)
    assert main(["convert", str(source), str(tmp_path / "out.ckpt"), "--sharing", "Q-K=V"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {source}: its hyper_parameters is a {type(hparams).__name__}" in err and "Traceback" not in err


def test_saved_settings_the_class_does_not_take_are_an_error_naming_the_file() -> None:
    hparams = {"_class_path": "qkv_lightning.tasks.sequence_tasks.SequenceTask", "no_such_setting": 1}
    with pytest.raises(CheckpointError, match="f.ckpt: its saved settings do not build SequenceTask"):
        build_task(hparams, "f.ckpt", expected=TaskModule)


def test_export_builds_only_a_language_model(tmp_path: Path, capsys) -> None:
    other = evil_checkpoint(tmp_path / "seq.ckpt", {"_class_path": "qkv_lightning.tasks.sequence_tasks.SequenceTask"})
    code = main(["export", "--ckpt_path", str(other), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a LanguageModel of qkv_lightning" in err and not (tmp_path / "out").exists()


def test_a_study_axis_over_data_class_path_calls_nothing(tmp_path: Path) -> None:
    """The issue's case: axes over data.class_path naming os.abort. In a real process: a guard that failed would
    abort it (exit -6) instead of exiting 2 with the error."""
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "task": str(CONFIGS / "synthetic" / "sort.yaml"), "sharing": ["QKV"], "seeds": [0],
        "output": str(tmp_path / "out"),
        "axes": {"data.class_path": ["os.abort"], "data.init_args": [None]},
    }))
    done = subprocess.run([sys.executable, "cli.py", "study", "--config", str(study)], cwd=CONFIGS.parent,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "data.class_path (study.axes)='os.abort' is not a LightningDataModule of qkv_lightning" in done.stderr
    assert "Traceback" not in done.stderr
