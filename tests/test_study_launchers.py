"""``study --launcher``: the cells of a study run as submitit jobs (here submitit's local executor, each cell a
separate process running the normal fit) give the local pool's results, into the same results.csv and summary; a
re-run skips the finished cells, and a re-run while an earlier run's jobs still run waits on them instead of
submitting them again."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkv_lightning.errors import ConfigError
from qkv_lightning.study import StudyConfig, run_study
from qkv_lightning.study.launchers import JOB_FILE
from tests.test_study import _task_config

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.mark.slow
def test_a_rerun_while_the_jobs_of_a_killed_study_still_run_waits_on_them_and_submits_nothing(tmp_path, capsys):
    """A study with submitit's local executor (real processes) is killed with SIGKILL once both cells' jobs run (they
    are held at the start of training); the same study again re-attaches to those jobs by the ids recorded in the
    cell folders, lets them go on, and collects their results: no cell is submitted twice."""
    go = tmp_path / "go"
    hold = [{"class_path": "tests.distributed_support.WaitForFile", "init_args": {"path": str(go)}}]
    task = str(_task_config(tmp_path, callbacks=hold))
    output = tmp_path / "jobs"
    settings = {"task": task, "sharing": ["QKV"], "seeds": [0, 1], "threads": 1, "launcher": "submitit_local",
                "output": str(output)}
    script = (f"from pathlib import Path; from qkv_lightning.study import StudyConfig, run_study; "
              f"run_study(StudyConfig(**{settings!r}), Path({str(output)!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(output.rglob(JOB_FILE))) < 2:
            assert first.poll() is None and time.monotonic() < deadline, "the first study did not submit its jobs"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGKILL)  # the study process only: its jobs go on (as SLURM jobs would)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
    records = [json.loads(p.read_text()) for p in output.rglob(JOB_FILE)]
    assert len(records) == 2 and all(r["launcher"] == "submitit_local" for r in records)
    ids = sorted(r["job_id"] for r in records)
    submitted = sorted(output.joinpath("slurm").glob("*_submitted.pkl"))
    assert len(submitted) == 2

    def echo(line: str) -> None:
        print(line)
        if "to run)" in line:  # the cells are pending for this run: now the held jobs may go on
            go.touch()

    capsys.readouterr()
    summary = run_study(StudyConfig(**settings), output, echo=echo)
    printed = capsys.readouterr().out
    assert f"2 cells still have their job from an earlier run of this study (jobs {', '.join(ids)})" in printed \
        or f"(jobs {', '.join(reversed(ids))})" in printed, printed
    assert "ran 2 runs (0 submitit local processes, 2 earlier ones waited on)" in printed, printed
    assert summary["ran"] == 2
    assert sorted(output.joinpath("slurm").glob("*_submitted.pkl")) == submitted  # nothing submitted again
    rows = _rows(output / "results.csv")
    assert sorted(rows) == [("QKV", "0"), ("QKV", "1")]
    assert all(row["status"] == "ok" for row in rows.values()), rows


def test_bad_launcher_settings_are_one_paragraph_errors(tmp_path: Path) -> None:
    task = str(_task_config(tmp_path))
    with pytest.raises(ConfigError, match="study.launcher='pbs' is not one of local, slurm, submitit_local"):
        StudyConfig(task=task, launcher="pbs")
    with pytest.raises(ConfigError, match="study.strategy='configs/strategy/none.yaml': no such config"):
        StudyConfig(task=task, strategy="configs/strategy/none.yaml")
