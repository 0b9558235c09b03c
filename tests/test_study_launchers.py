"""``study --launcher``: the cells of a study run as submitit jobs (here submitit's local executor, each cell a
separate process running the normal fit) give the local pool's results, into the same results.csv and summary; a
re-run skips the finished cells."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from qkv_lightning.errors import ConfigError
from qkv_lightning.study import StudyConfig, run_study
from tests.test_study import _task_config

pytest.importorskip("submitit")


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    with path.open() as f:
        return {(row["variant"], row["seed"]): row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_submitit_local_jobs_equal_the_local_pool_and_a_rerun_skips_them(tmp_path: Path) -> None:
    task = str(_task_config(tmp_path))
    common = {"task": task, "sharing": ["QKV", "Q-K=V"], "seeds": [0, 1], "threads": 1}
    local = run_study(StudyConfig(**common, workers=0, output=str(tmp_path / "local")), tmp_path / "local", echo=print)
    lines: list[str] = []
    jobs = StudyConfig(**common, launcher="submitit_local", output=str(tmp_path / "jobs"))
    summary = run_study(jobs, tmp_path / "jobs", echo=lines.append)
    assert summary["ran"] == 4 and local["ran"] == 4
    assert any("ran 4 runs (4 submitit local processes)" in line for line in lines), lines
    pool, submitted = _rows(tmp_path / "local" / "results.csv"), _rows(tmp_path / "jobs" / "results.csv")
    assert sorted(pool) == sorted(submitted) == [("Q-K=V", "0"), ("Q-K=V", "1"), ("QKV", "0"), ("QKV", "1")]
    metrics = [k for k in pool[("QKV", "0")] if k.startswith(("val/", "test/"))]
    assert metrics
    for key, row in pool.items():
        assert submitted[key]["status"] == row["status"] == "ok"
        for name in metrics:  # the same fit, in another process: the same numbers
            assert float(submitted[key][name]) == pytest.approx(float(row[name]), rel=1e-6, abs=1e-7), (key, name)
    # each job ran in its own process, writing through the job folder submitit keeps
    assert len(list((tmp_path / "jobs" / "slurm").glob("*_result.pkl"))) == 4
    assert (tmp_path / "jobs" / "summary.md").read_text().count("Q-K=V") >= 1
    again: list[str] = []
    rerun = run_study(jobs, tmp_path / "jobs", echo=again.append)
    assert rerun["ran"] == 0 and rerun["skipped"] == 4, again


def test_bad_launcher_settings_are_one_paragraph_errors(tmp_path: Path) -> None:
    task = str(_task_config(tmp_path))
    with pytest.raises(ConfigError, match="study.launcher='pbs' is not one of local, slurm, submitit_local"):
        StudyConfig(task=task, launcher="pbs")
    with pytest.raises(ConfigError, match="study.strategy='configs/strategy/none.yaml': no such config"):
        StudyConfig(task=task, strategy="configs/strategy/none.yaml")
