"""Crash safety and numerical faults: checkpoints are replaced atomically, an interrupted FSDP2 swap is recovered,
sharded checkpoints are read safely, and a non-finite loss or gradient stops the run (or, within a budget, is skipped)
without a checkpoint of the bad state.

The kill -9 tests (one process, DDP, FSDP2: a real process killed mid-epoch, then ``fit --ckpt_path last``) are in
tests/test_distributed.py, next to the uninterrupted runs they are compared with.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qkv_lightning.checkpoints import (
    AtomicCheckpointIO,
    consolidate,
    read_sharded_metadata,
    recover_interrupted_swap,
)
from qkv_lightning.cli import main
from qkv_lightning.errors import CheckpointError
from qkv_lightning.lightning_cli import QKVLightningCLI
from qkv_lightning.loggers import DeferredSummaryWriter
from tests.run_fixtures import synthetic_args


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["cli.py"])


# ---------------------------------------------------------------------------------------------------- atomic saves
def test_a_save_that_fails_part_way_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    writer, path = AtomicCheckpointIO(), tmp_path / "ckpt" / "last.ckpt"
    writer.save_checkpoint({"step": 1, "weights": torch.arange(1000.0)}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):  # half of the bytes reach the disk, then the disk is full
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="No space left"):  # one paragraph naming the file (cli prints it)
        writer.save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    previous = torch.load(path, weights_only=True)
    assert previous["step"] == 1 and torch.equal(previous["weights"], torch.arange(1000.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the half-written file is gone


def test_stale_temporary_cleanup_never_deletes_a_temporary_file_of_a_live_process(tmp_path, monkeypatch):
    """A save first deletes the ``.checkpoint-<host>-<pid>-*.tmp`` files of writers that were killed, and only those:
    a file of a live process (another run saving into the same folder, this process itself) or of another host
    (whose processes cannot be checked from here) is kept. The host name has dashes, as cluster node names do."""
    monkeypatch.setattr("qkv_lightning.checkpoints.write.socket.gethostname", lambda: "gpu-node-07")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    try:
        names = {
            "live": f".checkpoint-gpu-node-07-{live.pid}-k2x_9q.tmp",
            "this process": f".checkpoint-gpu-node-07-{os.getpid()}-a1b2c3.tmp",
            "parent": f".checkpoint-gpu-node-07-{os.getppid()}-zz_top.tmp",
            "other host": f".checkpoint-gpu-node-08-{dead.pid}-p0q1r2.tmp",
            "dead": f".checkpoint-gpu-node-07-{dead.pid}-d3e4f5.tmp",
        }
        for name in names.values():
            (folder / name).write_bytes(b"half a checkpoint")
        AtomicCheckpointIO().save_checkpoint({"step": 1}, folder / "last.ckpt")
        deleted = {owner for owner, name in names.items() if not (folder / name).exists()}
        assert deleted == {"dead"}, f"deleted the temporary files of: {sorted(deleted)}"
        assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt"]
        assert (folder / names["live"]).read_bytes() == b"half a checkpoint"
    finally:
        live.kill()
        live.wait()


def test_the_cli_writes_checkpoints_atomically_and_opens_event_files_lazily(tmp_path):
    cli = QKVLightningCLI(args=synthetic_args(tmp_path), run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert isinstance(cli.trainer.logger._experiment, DeferredSummaryWriter)
    assert not (tmp_path / "logs").exists()  # nothing written before the run starts


def complete(folder: Path, tag: str) -> Path:
    folder.mkdir()
    (folder / ".metadata").write_text(tag)
    (folder / "meta.pt").write_text(tag)
    return folder


def test_an_fsdp2_swap_interrupted_between_its_renames_is_completed_or_undone(tmp_path):
    last = tmp_path / "last.ckpt"
    complete(tmp_path / "last.ckpt.old", "old")
    complete(tmp_path / "last.ckpt.partial", "new")
    assert recover_interrupted_swap(last) and (last / ".metadata").read_text() == "new"  # completed
    assert not recover_interrupted_swap(last)  # nothing to do once it exists

    other = tmp_path / "other.ckpt"
    complete(tmp_path / "other.ckpt.old", "old")
    (tmp_path / "other.ckpt.partial").mkdir()  # the new one was not complete: the old one comes back
    assert recover_interrupted_swap(other) and (other / ".metadata").read_text() == "old"


def test_a_real_sharded_checkpoint_index_is_accepted_and_consolidates(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "sharded.ckpt"
    weights = {"network.embed.weight": torch.randn(5, 4), "network.head.bias": torch.randn(5)}
    optimizer = {"state": {"network.embed.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(5, 4)}},
                 "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["network.embed.weight"]}]}
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"state_dict": weights, "optimizer_0": optimizer}, checkpoint_id=str(folder))
    torch.save({"global_step": 7, "hyper_parameters": {"attention": {"sharing": "QKV"}}}, folder / "meta.pt")
    metadata = read_sharded_metadata(folder)
    assert tuple(metadata.state_dict_metadata["state_dict.network.embed.weight"].size) == (5, 4)
    merged = consolidate(folder, tmp_path / "one.ckpt")
    loaded = torch.load(tmp_path / "one.ckpt", weights_only=True)
    assert loaded["global_step"] == merged["global_step"] == 7
    for name, tensor in weights.items():
        assert torch.equal(loaded["state_dict"][name], tensor)
    assert torch.equal(loaded["optimizer_states"][0]["state"]["network.embed.weight"]["exp_avg"],
                       optimizer["state"]["network.embed.weight"]["exp_avg"])


# ------------------------------------------------------------------------------------------------ numerical faults
def poisoned(tmp_path: Path, step: int, what: str, *extra: str, every: int = 2, steps: int = 6) -> list[str]:
    return ["fit", *synthetic_args(tmp_path, steps=steps, every=every, save_on_exception=True),
            "--trainer.callbacks+=tests.distributed_support.PoisonAt", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.what={what}", *extra]


def checkpoints(tmp_path: Path) -> dict[str, dict]:
    folder = tmp_path / "logs" / "synthetic" / "version_0" / "checkpoints"
    return {path.name: torch.load(path, weights_only=True) for path in sorted(folder.glob("*.ckpt"))}


@pytest.mark.parametrize(("what", "step", "said"), [("gradient", 3, "gradient"), ("loss", 1, "loss (nan)")])
def test_a_non_finite_step_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, what, step, said
):
    assert main(poisoned(tmp_path, step, what)) == 2
    err = capsys.readouterr().err
    assert f"error: non-finite {said} at global step {step} (epoch 0, batch {step})" in err
    assert "--nonfinite.max_skipped_steps" in err and "Traceback" not in err
    saved = checkpoints(tmp_path)
    good = (step // 2) * 2  # checkpoints every 2 steps; none of the bad step, though save_on_exception is on
    assert sorted(saved) == (sorted([f"step={good}.ckpt", "last.ckpt"]) if good else [])
    if good:
        assert saved["last.ckpt"]["global_step"] == good
        for name, tensor in saved["last.ckpt"]["state_dict"].items():
            assert torch.isfinite(tensor).all() and torch.equal(tensor, saved[f"step={good}.ckpt"]["state_dict"][name])


def test_the_guard_turned_off_lets_a_non_finite_step_through_and_the_validation_fails_the_run(tmp_path, capsys):
    """``--nonfinite.enabled false`` (no per-step device sync): the poisoned gradient reaches the optimiser; the
    validation after step 2 then gives ``val/loss nan`` and the run fails with exit code 2 (issue 26: it printed the
    NaN as a result and exited 0)."""
    assert main(poisoned(tmp_path, 1, "gradient", "--nonfinite.enabled", "false", every=1, steps=2)) == 2
    err = capsys.readouterr().err
    assert "error: the validation at global step 2 gave non-finite metrics (val/loss nan" in err
    assert "Traceback" not in err
    weights = checkpoints(tmp_path)["step=2.ckpt"]["state_dict"]
    assert any(not torch.isfinite(tensor).all() for tensor in weights.values())


def test_validate_and_test_of_non_finite_weights_fail_instead_of_reporting_nan(tmp_path, capsys):
    """``validate`` / ``test`` of a checkpoint with one non-finite weight: exit code 2 and an error naming the
    metrics, instead of a table of ``val/loss nan`` and exit code 0; the same checkpoint with finite weights: 0."""
    assert main(["fit", *synthetic_args(tmp_path, steps=2, every=2)]) == 0
    good = checkpoints(tmp_path)["step=2.ckpt"]
    bad = {**good, "state_dict": {k: v.clone() for k, v in good["state_dict"].items()}}
    next(iter(bad["state_dict"].values())).view(-1)[0] = math.nan
    torch.save(bad, tmp_path / "bad.ckpt")
    good_path = tmp_path / "logs" / "synthetic" / "version_0" / "checkpoints" / "step=2.ckpt"
    evaluation = synthetic_args(tmp_path, steps=2)
    capsys.readouterr()
    for command, stage, what in (("validate", "val", "validation"), ("test", "test", "test")):
        assert main([command, *evaluation, "--ckpt_path", str(good_path)]) == 0
        assert main([command, *evaluation, "--ckpt_path", str(tmp_path / "bad.ckpt")]) == 2
        err = capsys.readouterr().err
        assert f"error: the {what} at the end gave non-finite metrics ({stage}/loss nan" in err, err[-2000:]
        assert "Traceback" not in err


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_exits_non_zero_and_keeps_its_checkpoints(tmp_path):
    """A real ``python cli.py fit`` sent SIGTERM after its first checkpoints: Lightning stops the loops with a
    ``SystemExit`` whose code is 0, so the unfinished run exited 0 (issue 26); now 143 (128 + SIGTERM) and one error
    line, the checkpoints saved before the signal kept."""
    import signal
    import time

    from tests.run_fixtures import subprocess_env

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "cli.py"), "fit", *synthetic_args(tmp_path, steps=100_000, every=1),
               "--trainer.val_check_interval", "1000"]
    process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "logs" / "synthetic" / "version_0" / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and len(list(folder.glob("step=*.ckpt"))) < 2:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    assert "error: the run was stopped by SIGTERM before it finished" in err and "Traceback" not in err
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert 2 <= last["global_step"] < 100_000


def test_a_skipped_step_leaves_weights_and_optimizer_unchanged_and_is_logged(tmp_path):
    assert main(poisoned(tmp_path, 2, "gradient", "--nonfinite.max_skipped_steps", "1", every=1, steps=4)) == 0
    saved = checkpoints(tmp_path)
    before, skipped, after = (saved[f"step={k}.ckpt"] for k in (2, 3, 4))
    for name, tensor in before["state_dict"].items():
        assert torch.equal(skipped["state_dict"][name], tensor), name  # the bad step changed nothing
    assert any(not torch.equal(after["state_dict"][n], t) for n, t in skipped["state_dict"].items())  # then trains
    for key, state in before["optimizer_states"][0]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(skipped["optimizer_states"][0]["state"][key][moment], state[moment])
    guard = next(v for k, v in skipped["callbacks"].items() if k.startswith("NonFiniteGuard"))
    assert guard == {"skipped_steps": 1}
    events = EventAccumulator(str(tmp_path / "logs" / "synthetic" / "version_0"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/skipped_steps")]  # the count so far, from step 2
    assert logged[0] == (2, 1.0) and {value for _, value in logged} == {1.0}
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))


# ------------------------------------------------------------------------------------------- kill -9 during export
def lm_checkpoint(path: Path) -> Path:
    """A tiny language model's checkpoint, as fit saves its weights and hyper-parameters."""
    from qkv_lightning.nn.attention import AttentionConfig
    from qkv_lightning.nn.gpt import GPTConfig
    from qkv_lightning.tasks.language_model import LanguageModel

    network = GPTConfig(n_layer=1, n_head=2, d_model=16, d_mlp=32, max_seq_len=16, vocab_size=40, position="rope")
    task = LanguageModel(network=network, attention=AttentionConfig(sharing="Q-K=V"), data_spec={"vocab_size": 40})
    task.configure_model()
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("out_exists", [False, True], ids=["new-folder", "existing-folder"])
def test_kill_9_during_export_leaves_no_partial_file_and_the_rerun_finishes(tmp_path, out_exists):
    """Two inputs (--out missing, --out an empty folder of the user's): export is killed with SIGKILL as soon as
    the first file of its output appears (a temporary, or on main the first .pt2 being written). No file lies under a
    final name unless it is complete, and the re-run finishes: exactly the three outputs, no temporaries left."""
    from tests.run_fixtures import subprocess_env

    ckpt = lm_checkpoint(tmp_path / "model.ckpt")
    out = tmp_path / "exported"
    if out_exists:
        out.mkdir()
    args = ["export", "--ckpt_path", str(ckpt), "--out", str(out), "--prompt_len", "4", "--check_tokens", "3"]
    start = files_under(tmp_path)
    child = subprocess.Popen([sys.executable, "cli.py", *args], cwd=Path(__file__).resolve().parent.parent,
                             env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while child.poll() is None and files_under(tmp_path) == start:
            time.sleep(0.001)  # the kill must land while the first output is being written
        child.kill()
    finally:
        child.wait()
    assert child.returncode == -9, "the export finished before anything of its output appeared"
    finals = ("prefill.pt2", "decode_step.pt2", "export.json")
    for name in finals:
        if (out / name).exists():  # only a complete file may lie under a final name
            if name.endswith(".pt2"):
                torch.export.load(out / name)
            else:
                json.loads((out / name).read_text())
    assert main(args) == 0
    assert entries(out) == set(finals)
    assert json.loads((out / "export.json").read_text())["check"]["tokens_equal"]
    assert entries(tmp_path) == {"model.ckpt", "exported"}  # no scratch folder left beside it
