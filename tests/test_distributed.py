"""DDP, FSDP2 and two-node training on CPU (gloo, 2 processes) against one process, through the normal CLI.

Each run is ``python cli.py fit`` in a subprocess (Lightning re-runs the command for rank 1), with
``tests.distributed_support.RecordRun`` recording global mean losses, shard sizes, full final weights and the
network's output on a probe batch. One process uses batch 8; two processes use batch 4 each, the same global batch,
and the resumable sampler gives the global batch the same samples in both cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkv_lightning.checkpoints import METADATA_FILE, is_sharded_checkpoint, load_checkpoint_file
from qkv_lightning.cli import main
from qkv_lightning.tasks.language_model import LanguageModel
from tests.conftest import rendezvous_port
from tests.distributed_support import needs_cpu_fsdp2, probe_batch
from tests.lm_fixtures import write_wikitext
from tests.run_fixtures import CONFIGS, run_settings, subprocess_env, wikitext_data, write_yaml

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
CHECKPOINT_EVERY = 4
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("distributed")
    write_wikitext(folder / "data", {"wiki.train.tokens": 20, "wiki.valid.tokens": 2, "wiki.test.tokens": 2})
    return folder


def run_yaml(workdir: Path, name: str) -> Path:
    """Trainer, model and callbacks of one run: tiny tied-embedding GPT, no dropout, checkpoints every 4 steps."""
    settings = run_settings(workdir, name, CHECKPOINT_EVERY, save_on_exception=None,
                            dirpath=workdir / name / "checkpoints", filename=None, devices=None)
    settings["trainer"].update(max_steps=STEPS, limit_val_batches=0)
    settings["trainer"]["callbacks"].append(
        {"class_path": "tests.distributed_support.RecordRun", "init_args": {"out": str(workdir / name / "record")}}
    )
    settings["model"] = {
        "init_args": {
            "network": {"n_layer": 2, "n_head": 4, "d_model": 32, "d_mlp": 64, "max_seq_len": 16, "dropout": 0.0,
                        "output": "linear", "tie_embeddings": True},
            "optimizer": {"lr": 0.003, "warmup_steps": 2},
        }
    }
    settings["data"] = {"init_args": {**wikitext_data(workdir / "data", workdir / "cache"), "seq_len": 16}}
    return write_yaml(workdir / f"{name}.yaml", settings)


def cli_command(workdir: Path, name: str, batch_size: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config", str(CONFIGS / "lm" / "wikitext2-offline.yaml"),
        "--config", str(run_yaml(workdir, name)),
        "--data.batch_size", str(batch_size),
        *extra,
    ]


def fit(workdir: Path, name: str, batch_size: int, *extra: str, timeout: int = 300) -> dict:
    """Run ``python cli.py fit`` in a subprocess; returns the recorded run."""
    command = [sys.executable, str(ROOT / "cli.py"), *cli_command(workdir, name, batch_size, *extra)]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return load(workdir, name)


def load(workdir: Path, name: str) -> dict:
    record = workdir / name / "record"
    run = json.loads((record / "run.json").read_text())
    run["state"] = torch.load(record / "state.pt", weights_only=True)
    run["probe"] = torch.load(record / "probe.pt", weights_only=True)
    return run


DDP = ("--config", str(CONFIGS / "strategy" / "ddp.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "2")
FSDP2 = ("--config", str(CONFIGS / "strategy" / "fsdp2.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "2")


@pytest.fixture(scope="module")
def single(workdir) -> dict:
    return fit(workdir, "single", 8, "--trainer.devices", "1")


@pytest.fixture(scope="module")
def ddp(workdir) -> dict:
    return fit(workdir, "ddp", 4, *DDP)


@pytest.fixture(scope="module")
def fsdp2(workdir) -> dict:
    if needs_cpu_fsdp2.args[0]:
        pytest.skip(needs_cpu_fsdp2.kwargs["reason"])
    return fit(workdir, "fsdp2", 4, *FSDP2)


def assert_same_training(run: dict, reference: dict, start: int = 0) -> None:
    """Same global losses step by step (from ``start``), same final weights, same output on the probe batch."""
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"][start:]), rtol=1e-5,
                               atol=1e-6)
    assert run["state"].keys() <= reference["state"].keys()
    for name, tensor in run["state"].items():
        torch.testing.assert_close(tensor, reference["state"][name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(run["probe"], reference["probe"], rtol=1e-4, atol=1e-5)


def test_ddp_matches_one_process_with_the_same_global_batch(single, ddp):
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert ddp["strategy"] == "DDPStrategy" and len(ddp["losses"]) == STEPS
    assert_same_training(ddp, single)
    assert single["losses"][-1] < single["losses"][0]  # it trained


def logged(workdir: Path, name: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar a run logged to TensorBoard (rank 0 writes the events) in its one version folder
    (``version_0`` for fit, ``validate`` for validate)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = [folder for folder in (workdir / "logs" / name).iterdir() if folder.is_dir()]
    events = EventAccumulator(str(version))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_ddp_train_tokens_equal_the_single_process_count_for_the_same_global_batch(workdir, single, ddp):
    """``train/tokens`` counts the tokens of all processes: under DDP (2 x batch 4) it equals one process's count
    with batch 8, step by step, in the logs and in the checkpoints (which a resumed run continues from)."""
    tokens_per_step = 8 * 16  # global batch x sequence length
    expected = [(step - 1, float(step * tokens_per_step)) for step in range(1, STEPS + 1)]  # after k steps, at k - 1
    assert logged(workdir, "single", "train/tokens") == expected
    assert logged(workdir, "ddp", "train/tokens") == expected, "DDP (2 processes x batch 4)"
    for name in ("single", "ddp"):
        saved = torch.load(workdir / name / "checkpoints" / f"epoch=0-step={CHECKPOINT_EVERY}.ckpt", weights_only=True)
        assert saved["tokens_seen"] == CHECKPOINT_EVERY * tokens_per_step, name


def test_ddp_validation_logs_the_one_process_values_and_no_sync_dist_warning(workdir, single):
    """``val/loss``, ``val/ppl`` and ``val/tokens`` come from sums over every process (``SummedLoss``), reduced once:
    a 2-process DDP ``validate`` of a checkpoint logs what one process logs, and Lightning does not ask for
    ``sync_dist`` (it warns about epoch-level values it was not told are synced)."""
    checkpoint = workdir / "single" / "checkpoints" / "last.ckpt"

    def validate(name: str, *extra: str) -> list[str]:
        args = cli_command(workdir, name, 2, *extra, "--trainer.limit_val_batches", "1.0", "--ckpt_path",
                           str(checkpoint))
        return ["validate", *args[1:]]

    assert main(validate("validate-single", "--trainer.devices", "1")) == 0  # one process: this one
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *validate("validate-ddp", *DDP)], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-6000:]
    assert "sync_dist" not in printed, printed[-3000:]
    for tag in ("val/loss", "val/ppl", "val/tokens"):
        ((_, one),), ((_, two),) = logged(workdir, "validate-single", tag), logged(workdir, "validate-ddp", tag)
        assert two == pytest.approx(one, rel=1e-6), tag
    assert logged(workdir, "validate-ddp", "val/tokens")[0][1] > 2 * 16  # several windows: both processes scored


def test_fsdp2_matches_one_process_with_the_same_global_batch(single, fsdp2):
    assert fsdp2["strategy"] == "FSDP2Strategy" and fsdp2["world_size"] == 2
    assert_same_training(fsdp2, single)


def test_fsdp2_each_rank_holds_about_half_of_every_parameter(fsdp2):
    for name, per_rank in fsdp2["shard_numel"].items():
        full = fsdp2["full_numel"][name]
        assert sum(per_rank) == full, name  # the shards partition the parameter
        rows = fsdp2["state"][name].shape[0]
        row = full // rows
        for numel in per_rank:  # dim-0 sharding: ceil(rows / 2) rows at most on any rank
            assert numel <= -(-rows // 2) * row, name
        if rows >= 2:
            assert min(per_rank) >= (rows // 2) * row, name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_mid_epoch_resume_continues_exactly(workdir, strategy, ddp, fsdp2):
    """Resume from the step-4 checkpoint (a sharded folder under FSDP2) in fresh processes: steps 5-8 and the final
    weights equal the uninterrupted run's."""
    uninterrupted = {"ddp": ddp, "fsdp2": fsdp2}[strategy]
    checkpoint = workdir / strategy / "checkpoints" / f"epoch=0-step={CHECKPOINT_EVERY}.ckpt"
    assert checkpoint.is_dir() == (strategy == "fsdp2")  # sharded: one folder with a file per rank
    args = DDP if strategy == "ddp" else FSDP2
    resumed = fit(workdir, f"{strategy}-resumed", 4, *args, "--ckpt_path", str(checkpoint))
    assert resumed["global_step"] == STEPS and len(resumed["losses"]) == STEPS - CHECKPOINT_EVERY
    assert_same_training(resumed, uninterrupted, start=CHECKPOINT_EVERY)


def test_consolidated_fsdp2_checkpoint_loads_into_a_plain_model_and_continues_a_run(workdir, fsdp2, capsys):
    sharded = workdir / "fsdp2" / "checkpoints" / "last.ckpt"
    assert (sharded / ".metadata").is_file() and len(list(sharded.glob("*.distcp"))) == 2
    consolidated = workdir / "consolidated.ckpt"
    assert main(["consolidate", str(sharded), str(consolidated)]) == 0
    assert "wrote" in capsys.readouterr().out

    model = LanguageModel.load_from_checkpoint(consolidated, map_location="cpu")  # no FSDP, weights_only loading
    model.eval()
    with torch.no_grad():
        logits = model.network(probe_batch(model.data_spec["vocab_size"]))
    torch.testing.assert_close(logits, fsdp2["probe"], rtol=1e-5, atol=1e-6)
    for name, tensor in fsdp2["state"].items():
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)

    # back into a run: one process continues from the consolidated file (weights, optimiser, step)
    continued = fit(workdir, "continued", 8, "--trainer.devices", "1", "--trainer.max_steps", str(STEPS + 2),
                    "--ckpt_path", str(consolidated))
    assert continued["global_step"] == STEPS + 2 and len(continued["losses"]) == 2


def fit_until_killed(workdir: Path, name: str, batch_size: int, *extra: str, timeout: int = 300) -> str:
    """Run ``python cli.py fit`` in a new session, expect it to die by SIGKILL (a ``KillAt`` callback on every rank);
    returns its output. Stragglers of the session are killed afterwards."""
    command = [sys.executable, str(ROOT / "cli.py"), *cli_command(workdir, name, batch_size, *extra)]
    log = workdir / f"{name}-killed.txt"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text()
    assert code == -signal.SIGKILL, f"{name} was not killed (exit code {code}):\n{output[-5000:]}"
    return output


CRASHES = {  # strategy: (CLI arguments, step of the kill, killed half-way through writing that step's checkpoint)
    "single": (("--trainer.devices", "1"), STEPS, True),
    "ddp": (DDP, 6, False),
    "fsdp2": (FSDP2, STEPS, True),
}


@pytest.mark.parametrize("strategy", sorted(CRASHES))
def test_kill_9_mid_epoch_then_fit_ckpt_path_last_continues_exactly(workdir, strategy, single, ddp, fsdp2):
    """SIGKILL every process of a run in the middle of its first epoch, after the step-4 checkpoint: at step 6, or
    half-way through writing the step-8 checkpoint (single file, or FSDP2 shards). The step-4 checkpoint survives as
    ``last.ckpt``, nothing half-written takes its place, and re-running the same command with ``--ckpt_path last``
    continues from it with the same data order: steps 5-8 and the final weights equal the uninterrupted run's."""
    args, kill_step, during_save = CRASHES[strategy]
    batch_size = 8 if strategy == "single" else 4
    name = f"{strategy}-killed"
    kill = ("--trainer.callbacks+=tests.distributed_support.KillAt", f"--trainer.callbacks.step={kill_step}",
            f"--trainer.callbacks.during_save={str(during_save).lower()}")
    fit_until_killed(workdir, name, batch_size, *args, *kill)

    folder = workdir / name / "checkpoints"
    last = folder / "last.ckpt"
    if strategy == "fsdp2":
        assert is_sharded_checkpoint(last)
        saved = load_checkpoint_file(last / METADATA_FILE, lightning=False)
        staging = folder / f"epoch=0-step={STEPS}.ckpt.partial"
        assert staging.is_dir() and not is_sharded_checkpoint(staging)  # the interrupted save, never swapped in
    else:
        saved = load_checkpoint_file(last)  # complete, loads with weights_only
        assert len(list(folder.glob(".checkpoint-*.tmp"))) == int(during_save)  # the half-written file, aside
    assert saved["global_step"] == CHECKPOINT_EVERY and saved["epoch"] == 0
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["samples_yielded"] > 0  # mid-epoch
    assert not (folder / f"epoch=0-step={STEPS}.ckpt").exists()

    resumed = fit(workdir, name, batch_size, *args, "--ckpt_path", "last")
    assert resumed["global_step"] == STEPS and len(resumed["losses"]) == STEPS - CHECKPOINT_EVERY
    assert_same_training(resumed, {"single": single, "ddp": ddp, "fsdp2": fsdp2}[strategy], start=CHECKPOINT_EVERY)
    assert not list(folder.glob(".checkpoint-*.tmp")) and not list(folder.glob("*.partial"))  # cleaned up


def test_two_nodes_with_torchrun_train_together_through_the_cli(workdir, ddp):
    """Two "nodes" of one process each, rendezvous on localhost: the same training as 2-process DDP."""
    port = str(rendezvous_port())
    extra = ("--config", str(CONFIGS / "strategy" / "ddp.yaml"),
             "--config", str(CONFIGS / "strategy" / "multinode.yaml"),
             "--trainer.accelerator", "cpu", "--trainer.num_nodes", "2", "--trainer.devices", "1")
    processes = []
    for node_rank in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", port,
            str(ROOT / "cli.py"), *cli_command(workdir, "torchrun", 4, *extra),
        ]
        processes.append(subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-5000:]
    run = load(workdir, "torchrun")
    assert run["world_size"] == 2 and run["num_nodes"] == 2
    assert_same_training(run, ddp)


@pytest.mark.parametrize("strategy", sorted(p.stem for p in (CONFIGS / "strategy").glob("*.yaml")))
def test_every_strategy_config_parses_on_a_task_config(strategy, capsys):
    args = ["fit", "--config", str(CONFIGS / "lm" / "wikitext2-offline.yaml"),
            "--config", str(CONFIGS / "strategy" / f"{strategy}.yaml"), "--print_config"]
    assert main(args) == 0  # --print_config ends the parse; main turns that SystemExit into its exit code
    printed = capsys.readouterr().out
    assert "strategy:" in printed and "class_path: qkv_lightning.tasks.language_model.LanguageModel" in printed


# ------------------------------------------------------------------- issue 13: sharded folders that lie or run code
class CreatesFile:
    """Unpickling this creates the file ``path``: what a malicious checkpoint item would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def refused(workdir: Path, name: str, command: str, *extra: str) -> str:
    """Run ``python cli.py <command>`` under FSDP2 on 2 processes; it must fail with one paragraph (exit 2)."""
    args = cli_command(workdir, name, 4, *FSDP2, *extra)
    args[0] = command
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-5000:]
    return errors[0]


def test_fsdp2_fit_refuses_an_optimizer_item_that_would_run_code(workdir, fsdp2):
    """The FSDP2 loader reads the optimiser's param_groups through DCP, whose own planner unpickles them with
    weights_only=False: a real FSDP2 checkpoint with a payload in param_groups must not run it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    source = workdir / "fsdp2" / "checkpoints" / "last.ckpt"
    flat_file = workdir / "flat.pt"
    dcp_to_torch_save(source, flat_file)  # our own trusted folder
    flat = torch.load(flat_file, weights_only=True)
    marker = workdir / "created-by-the-checkpoint"
    flat["optimizer_0"]["param_groups"][0]["evil"] = CreatesFile(marker)
    evil = workdir / "evil.ckpt"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(flat, checkpoint_id=str(evil))
    (evil / METADATA_FILE).write_bytes((source / METADATA_FILE).read_bytes())
    error = refused(workdir, "evil-run", "fit", "--ckpt_path", str(evil), "--trainer.max_steps", str(STEPS + 1))
    assert "refusing to load the sharded checkpoint" in error and "optimizer_0.param_groups" in error
    assert not marker.exists()
    assert main(["consolidate", str(evil), str(workdir / "evil-out.ckpt")]) == 2
    assert not marker.exists() and not (workdir / "evil-out.ckpt").exists()


@pytest.mark.parametrize(("command", "damage"), [("validate", "missing"), ("fit", "truncated")])
def test_fsdp2_with_a_missing_or_truncated_shard_is_one_paragraph(workdir, fsdp2, command, damage):
    import shutil

    folder = workdir / f"{damage}.ckpt"
    shutil.copytree(workdir / "fsdp2" / "checkpoints" / "last.ckpt", folder)
    shard = folder / "__1_0.distcp"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    error = refused(workdir, f"{damage}-run", command, "--ckpt_path", str(folder))
    assert ("is missing its shard __1_0.distcp" if damage == "missing" else "__1_0.distcp of the sharded") in error
    assert not (workdir / f"{damage}-run").exists()  # nothing written for the run
