"""Files written by the code before the package was put on floors (commit b5c632a; tests/fixtures/legacy/make.py
wrote them) still work: the checkpoint validates, resumes and converts through the one task builder, and the study
folder resumes without re-running anything and reports the same table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qkv_lightning.cli import main

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"


def _copy(tmp_path: Path) -> Path:
    """The fixture folder copied (the tests never write into the checkout), its study marker pointed at the copy."""
    folder = tmp_path / "legacy"
    shutil.copytree(LEGACY, folder)
    marker = folder / "study" / ".qkv-study.json"
    data = json.loads(marker.read_text())
    data["task"] = str((folder / "task.yaml").resolve())
    marker.write_text(json.dumps(data))
    return folder


def test_a_legacy_checkpoint_validates_and_resumes(tmp_path: Path, capsys) -> None:
    folder = _copy(tmp_path)
    ckpt = folder / "sequence-step3.ckpt"
    task = ["--config", str(folder / "task.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    assert main(["validate", *task, "--ckpt_path", str(ckpt)]) == 0
    assert "val/loss" in capsys.readouterr().out
    assert main(["fit", *task, "--ckpt_path", str(ckpt), "--trainer.max_steps", "5"]) == 0
    resumed = sorted((tmp_path / "logs").rglob("*step=5.ckpt"))
    assert resumed, sorted((tmp_path / "logs").rglob("*.ckpt"))
    assert torch.load(resumed[-1], weights_only=True)["global_step"] == 5


def test_a_legacy_checkpoint_converts(tmp_path: Path, capsys) -> None:
    folder = _copy(tmp_path)
    out = tmp_path / "kv.ckpt"
    assert main(["convert", str(folder / "sequence-step3.ckpt"), str(out), "--sharing", "Q-K=V"]) == 0
    assert torch.load(out, weights_only=True)["hyper_parameters"]["attention"]["sharing"] == "Q-K=V"


def test_a_legacy_study_folder_resumes_without_running_and_reports_the_same_table(tmp_path: Path, capsys) -> None:
    folder = _copy(tmp_path)
    study = folder / "study"
    table = (study / "summary.md").read_text().split("\n\n")[2]  # the per-variant table
    args = ["study", "--task", str(folder / "task.yaml"), "--output", str(study), "--sharing", "[QKV, Q-K=V]",
            "--seeds", "[0]", "--workers", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(2 already finished, 0 to run)" in out
    assert table.startswith("| variant | runs ok |") and table in (study / "summary.md").read_text()
