"""A study never writes into a folder it did not make, never runs twice on one folder, leaves no worker behind when
killed, and refuses results it did not write (issue 13, items 4, 6 and part of 12), with real folders and processes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qkv_lightning.cli import main
from qkv_lightning.files import make_owned_dir
from qkv_lightning.study.safety import LOCK, LOCK_OWNER, MARKER, OWNER, STALE_S, identity, process_start_time
from tests.run_fixtures import snapshot

ROOT = Path(__file__).resolve().parent.parent


def task_config(folder: Path, steps: int = 2) -> Path:
    """A tiny synthetic task (one-layer encoder, 4-token lists)."""
    config = {
        "model": {"class_path": "qkv_lightning.tasks.sequence_tasks.SequenceTask",
                  "init_args": {"network": {"n_layer": 1, "n_head": 2, "d_model": 8, "max_seq_len": 8},
                                "optimizer": {"lr": 0.003, "warmup_steps": 1}}},
        "data": {"class_path": "qkv_lightning.data.synthetic.SyntheticSequenceData",
                 "init_args": {"task": "sub", "seq_len": 4, "train_size": 64, "val_size": 16, "test_size": 16,
                               "batch_size": 16}},
        "trainer": {"max_steps": steps, "max_epochs": -1, "accelerator": "cpu", "devices": 1,
                    "log_every_n_steps": 1, "enable_checkpointing": False, "limit_val_batches": 1},
    }
    path = folder / f"task-{steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def study_args(task: Path, output: Path, *extra: str) -> list[str]:
    return ["study", "--task", str(task), "--output", str(output), "--sharing", "[QKV]", "--seeds", "[0]",
            "--workers", "0", *extra]


# ------------------------------------------------------------------------------------------ item 4: foreign folders
def test_a_folder_that_is_not_a_study_or_a_file_is_refused_and_left_alone(tmp_path, capsys):
    task = task_config(tmp_path)
    user = tmp_path / "my-results"
    (user / "runs" / "QKV" / "seed0").mkdir(parents=True)
    (user / "runs" / "QKV" / "seed0" / "notes.txt").write_text("hand-made")
    (user / "results.csv").write_text("the user's table")
    (user / "study.yaml").write_text("mine: true")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    before = snapshot(tmp_path)
    for output, message in ((user, "is a folder that holds files but is not a study folder"),
                            (a_file, "is a file, not a folder")):
        capsys.readouterr()
        assert main(study_args(task, output)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("error: ") == 1, err
    assert snapshot(tmp_path) == before


def test_a_study_of_another_task_is_refused_and_the_same_study_resumes(tmp_path, capsys):
    task, other = task_config(tmp_path), task_config(tmp_path, steps=3)
    out = tmp_path / "study"
    assert main(study_args(task, out)) == 0
    assert json.loads((out / MARKER).read_text())["task"] == str(task.resolve())
    assert not (out / LOCK_OWNER).exists() and not (out / "runs" / "QKV" / "seed0" / OWNER).exists()
    before = snapshot(out)
    capsys.readouterr()
    assert main(study_args(other, out)) == 2
    assert "holds a study of another task" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main(study_args(task, out)) == 0  # the same study: resumed (nothing to run)
    assert "1 already finished, 0 to run" in capsys.readouterr().out


# ----------------------------------------------------------------------------- item 6: locks, survivors, orphans
def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def lock_holder(lock: Path, owner: dict | None) -> subprocess.Popen:
    """Another process that holds the study lock ``lock`` (and writes ``owner`` as its record), as a study would."""
    code = (
        "import json, sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(timeout=0); "
        "owner = json.loads(sys.argv[2]); owner and open(sys.argv[1] + '.json', 'w').write(json.dumps(owner)); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock), json.dumps(owner)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_lock_is_refused_a_free_one_is_taken_and_a_survivors_cell_is_left_alone(tmp_path, capsys):
    task = task_config(tmp_path)
    out = tmp_path / "study"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"task": str(task.resolve())}))
    live = sleeper()
    holder = lock_holder(out / LOCK, {**identity(), "pid": 4242, "start": None})
    try:
        before = snapshot(out)
        assert main(study_args(task, out)) == 2
        err = capsys.readouterr().err
        assert f"is in use by another study process (pid 4242 on host {identity()['host']} (this host))" in err
        assert snapshot(out) == before  # the holder's lock and record untouched
        holder.kill()  # as by kill -9: the kernel releases its lock, its record stays behind
        holder.wait()
        assert (out / LOCK_OWNER).exists()

        owner = {**identity(), "pid": live.pid, "start": process_start_time(live.pid)}
        cell = make_owned_dir(out / "runs" / "QKV" / "seed0")  # the killed study made it (and marked it)
        (cell / OWNER).write_text(json.dumps(owner))  # a worker of the killed study, still running this cell
        (cell / "events.out.tfevents.1").write_text("the survivor's events")
        before = snapshot(out)
        assert main(study_args(task, out)) == 2
        assert f"is still being run by process {live.pid}" in capsys.readouterr().err
        after = snapshot(out)
        assert {k: v for k, v in before.items() if k != LOCK_OWNER} == after  # the dead holder's record replaced
    finally:
        live.kill()
        live.wait()
        holder.kill()
        holder.wait()
    assert main(study_args(task, out)) == 0  # the survivor is gone: the cell is redone in a folder of its own
    assert json.loads((out / "runs" / "QKV" / "seed0" / "result.json").read_text())["status"] == "ok"
    assert not (out / LOCK_OWNER).exists()


def test_a_lock_held_on_another_host_is_refused_and_left_in_place(tmp_path, capsys):
    """A study folder on a shared file system: a study on host node-b holds the lock (the file system passes the
    kernel lock on, simulated here by a process of this host that writes node-b's record), or, on a file system that
    shares no locks, its record is still being refreshed; both are refused, naming node-b and its pid, and nothing of
    its lock is changed. A record of node-b not refreshed for STALE_S seconds is a study that is gone: replaced."""
    task = task_config(tmp_path)
    out = tmp_path / "study"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"task": str(task.resolve())}))
    remote = {"pid": 777, "host": "node-b", "start": "123"}
    holder = lock_holder(out / LOCK, remote)
    try:
        before = snapshot(out)
        assert main(study_args(task, out)) == 2
        assert "in use by another study process (pid 777 on host node-b)" in capsys.readouterr().err
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(study_args(task, out)) == 2  # the lock is free, but node-b refreshed its record just now
    err = capsys.readouterr().err
    assert re.search(r"\(pid 777 on host node-b\), refreshed \d+ s ago although its lock is free", err), err
    assert snapshot(out) == before
    stale = time.time() - STALE_S - 1
    os.utime(out / LOCK_OWNER, (stale, stale))
    assert main(study_args(task, out)) == 0
    assert not (out / LOCK_OWNER).exists() and (out / "runs" / "QKV" / "seed0" / "result.json").exists()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead
        return stat.read().rpartition(")")[2].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_studies_on_one_folder_and_kill_9_of_the_study_process(tmp_path):
    """A second study is refused while the first runs; after ``kill -9`` of the first, its worker dies too, and the
    next run takes the lock the kernel released and runs the cell again."""
    slow_task = task_config(tmp_path, steps=100000)
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, str(ROOT / "cli.py")]
    first_args = [*study_args(slow_task, out)[:-2], "--workers", "1", "--threads", "1"]
    first = subprocess.Popen([*cli, *first_args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        owner_file = out / "runs" / "QKV" / "seed0" / OWNER
        wait_for(owner_file.exists, 120, "the worker to start its cell")
        worker = json.loads(owner_file.read_text())["pid"]
        assert worker != first.pid and alive(worker)
        second = subprocess.run([*cli, *study_args(slow_task, out)], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2 and f"in use by another study process (pid {first.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait()
        wait_for(lambda: not alive(worker), 10, f"the worker {worker} to die with its study process")
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    third = subprocess.run([*cli, *study_args(slow_task, out, "--overrides", "[--trainer.max_steps=2]")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert third.returncode == 0, third.stderr[-3000:]
    result = json.loads((out / "runs" / "QKV" / "seed0" / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 2


# ------------------------------------------------------------------------------- item 12: an edited result.json
def test_an_edited_result_is_a_clear_error(tmp_path, capsys):
    task = task_config(tmp_path)
    out = tmp_path / "study"
    assert main(study_args(task, out)) == 0
    path = out / "runs" / "QKV" / "seed0" / "result.json"
    result = json.loads(path.read_text())
    result["metrics"]["test/acc"] = "0.99 (trust me)"
    path.write_text(json.dumps(result))
    before = snapshot(out)
    capsys.readouterr()
    assert main(study_args(task, out)) == 2
    err = capsys.readouterr().err
    assert f"the study result {path} was edited or damaged" in err and "are not numbers" in err
    assert "Traceback" not in err and snapshot(out) == before
    # a number the metric cannot take: an accuracy of 7.5, a perplexity below 1, a negative loss
    for name, value in {"test/acc": 7.5, "val/acc": -0.1, "val/ppl": 0.5, "test/loss": -2.0}.items():
        path.write_text(json.dumps({**result, "metrics": {**result["metrics"], "test/acc": 0.5, name: value}}))
        before = snapshot(out)
        assert main(study_args(task, out)) == 2
        err = capsys.readouterr().err
        assert f"its metric {name}={value!r} lies outside the values" in err and "Traceback" not in err
        assert snapshot(out) == before


# --------------------------------------------------------------------------- issue 28: no silent stretch, an honest ETA
def test_the_eta_comes_from_measured_run_times_and_waits_for_the_first():
    """Two runs at once, 5 runs: before any finishes there is no ETA; after one run of 30 s (whatever time the
    workers took to start), the 4 left take ceil(4 / 2) x 30 s = 1m00s; between results the estimate counts down."""
    from qkv_lightning.study.progress import StudyProgress

    lines = []
    progress = StudyProgress(5, 2, lines.append)
    assert progress.eta() == "ETA once a run has finished"
    progress.finished(30.0)
    assert progress.eta() == "ETA 1m00s"
    progress.finished(50.0)  # mean 40 s, 3 left: 2 rounds
    assert progress.eta() == "ETA 1m20s" and progress.status().startswith("study: 2/5 runs done, 2 running")
    progress.since_result -= 15  # 15 s later, with no run finished: the estimate counts down
    assert progress.eta() == "ETA 1m05s"


@pytest.mark.slow
def test_a_study_prints_a_line_at_least_every_10_seconds(tmp_path):
    """``python cli.py study`` in a real process, one worker: its first line comes early (a generous 60 s bound on
    a loaded machine; seen at 13 s for the README's main command with 8 other jobs on 2 cores), and while its runs go
    on no two lines are more than 10 s (plus 5 s of slack for a loaded machine) apart: the workers' start and the
    first run are covered by status lines, whose ETA waits for a measured run time."""
    task = task_config(tmp_path, steps=3000)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [*study_args(task, tmp_path / "study")[:-2], "--workers", "1", "--threads", "1", "--seeds", "[0, 1]"]
    start = time.monotonic()
    process = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.monotonic() - start, line.rstrip()) for line in process.stdout]
    assert process.wait(timeout=600) == 0, lines[-20:]
    assert lines and lines[0][0] < 60, lines[:3]
    first = next(i for i, (_, text) in enumerate(lines) if text.startswith("study: checking the 2 runs"))
    end = next(i for i, (_, text) in enumerate(lines) if text.startswith("study: ran 2 runs"))
    gaps = [(later - earlier, text) for (earlier, _), (later, text) in itertools.pairwise(lines[first : end + 1])]
    assert max(gap for gap, _ in gaps) <= 15, gaps
    texts = [text for _, text in lines]
    waiting = [t for t in texts if t.startswith("study: 0/2 runs done")]
    assert waiting and all(t.endswith("ETA once a run has finished") for t in waiting), texts
    assert any(t.startswith("[1/2] QKV seed") and "ETA " in t for t in texts), texts
