"""Checkpoints never run code, predict never overwrites, evaluations open no new run folders, unwritable outputs are
found before any work (issue 13, items 2, 5, 12, 14 and 15), through the real command line.

The FSDP2 (two-process) entry points of items 2 and 12 are in tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from qkv_lightning.cli import main
from tests.lm_fixtures import write_wikitext
from tests.run_fixtures import CONFIGS, lm_args, snapshot, synthetic_args

ROOT = Path(__file__).resolve().parent.parent


class CreatesFile:
    """Unpickling this creates the file ``path``: what a malicious checkpoint item would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def dcp_folder(folder: Path, state: dict) -> Path:
    """A distributed-checkpoint folder written by DCP in this one process, with Lightning's ``meta.pt``."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder))
    torch.save({"global_step": 3, "epoch": 0, "hyper_parameters": {}}, folder / "meta.pt")
    return folder


# ------------------------------------------------------------------------------------ item 2: no code from a shard
def test_consolidate_refuses_a_shard_item_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "created-by-the-checkpoint"
    folder = dcp_folder(tmp_path / "evil.ckpt", {
        "state_dict": {"w": torch.ones(4)},
        "optimizer_0": {"state": {}, "param_groups": [{"lr": 0.1, "params": ["w"], "x": CreatesFile(marker)}]},
    })
    assert main(["consolidate", str(folder), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "refusing to load the sharded checkpoint" in err and "(io.open)" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


def test_the_safe_planner_refuses_what_torchs_default_planner_runs(tmp_path):
    """Defense in depth: the planner FSDP2 loading uses is weights-only even without the check before it."""
    import torch.distributed.checkpoint as dcp

    from qkv_lightning.checkpoints import ForbiddenCheckpointContent, safe_distributed_load

    marker = tmp_path / "created"
    folder = dcp_folder(tmp_path / "evil.ckpt", {"state_dict": {"w": torch.ones(2)}, "extra": CreatesFile(marker)})
    with pytest.raises(ForbiddenCheckpointContent, match="its item extra holds Python objects"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            safe_distributed_load({"state_dict": {"w": torch.zeros(2)}, "extra": None}, folder)
    assert not marker.exists()
    state = {"state_dict": {"w": torch.zeros(2)}, "extra": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder))  # torch's own planner: weights_only=False
    assert marker.exists()  # the threat is real


# ----------------------------------------------------------------- item 12: a missing or truncated shard (consolidate)
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_consolidate_with_a_missing_or_truncated_shard_is_one_paragraph(tmp_path, capsys, damage):
    folder = dcp_folder(tmp_path / "run.ckpt", {"state_dict": {"w": torch.arange(1000.0)}})
    shard = next(folder.glob("*.distcp"))
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    before = snapshot(tmp_path)
    assert main(["consolidate", str(folder), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    assert (f"is missing its shard {shard.name}" if damage == "missing" else "is truncated (100 bytes") in err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- item 14: FSDPStrategy's layout
def test_consolidate_reads_lightnings_fsdp_strategy_layout(tmp_path):
    weights = {"network.embed.weight": torch.randn(10, 4), "network.head.bias": torch.randn(10)}
    optimizer = {"state": {"network.embed.weight": {"exp_avg": torch.randn(10, 4), "step": torch.tensor(3.0)}},
                 "param_groups": [{"lr": 0.01, "betas": (0.9, 0.95), "params": ["network.embed.weight"]}]}
    folder = dcp_folder(tmp_path / "fsdp1.ckpt", {"model": weights, "optimizer_0": optimizer})  # FSDPStrategy's keys
    assert main(["consolidate", str(folder), str(tmp_path / "out.ckpt")]) == 0
    out = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert sorted(out["state_dict"]) == sorted(weights) and out["global_step"] == 3
    for name, tensor in weights.items():
        assert torch.equal(out["state_dict"][name], tensor)
    (group,) = out["optimizer_states"][0]["param_groups"]
    assert group["lr"] == 0.01 and tuple(group["betas"]) == (0.9, 0.95)
    assert torch.equal(out["optimizer_states"][0]["state"]["network.embed.weight"]["exp_avg"],
                       optimizer["state"]["network.embed.weight"]["exp_avg"])


# ------------------------------------------------------------ items 15 and 5: the README's offline sequence, predict
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    """The README's offline sequence on small files: validate before training, fit, then validate again."""
    folder = tmp_path_factory.mktemp("lm")
    data = write_wikitext(folder / "wikitext")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["validate", *lm_args(folder, data)]) == 0  # before training
        assert main(["fit", *lm_args(folder, data)]) == 0
        assert main(["validate", *lm_args(folder, data)]) == 0  # again, still untrained: no new folder either
    finally:
        os.chdir(cwd)
    return folder


def predict_args(folder: Path, *extra: str) -> list[str]:
    ckpt = folder / "logs" / "lm" / "version_0" / "checkpoints" / "last.ckpt"
    return ["predict", *lm_args(folder, folder / "wikitext"), "--ckpt_path", str(ckpt),
            "--model.generation.max_new_tokens", "3", "--model.generation.echo", "false", *extra]


def test_evaluations_open_no_new_version_folder_and_the_readme_sequence_works(lm_run, monkeypatch):
    monkeypatch.chdir(lm_run)
    out = lm_run / "generated.jsonl"
    assert main(predict_args(lm_run, "--model.generation.output_file", str(out))) == 0
    assert len(out.read_text().splitlines()) == 2  # the two default prompts
    ckpt = lm_run / "logs" / "lm" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["test", *lm_args(lm_run, lm_run / "wikitext"), "--ckpt_path", str(ckpt)]) == 0
    runs = lm_run / "logs" / "lm"
    assert sorted(p.name for p in runs.iterdir()) == ["validate", "version_0"]  # fit's run is version_0
    assert {"predict", "test", "checkpoints"} <= {p.name for p in (runs / "version_0").iterdir()}
    assert (runs / "version_0" / "predict" / "config.yaml").is_file()


def test_predict_never_overwrites_a_file_or_the_checkpoint_and_refuses_a_folder(lm_run, monkeypatch, capsys):
    monkeypatch.chdir(lm_run)
    ckpt = lm_run / "logs" / "lm" / "version_0" / "checkpoints" / "last.ckpt"
    user = lm_run / "notes.txt"
    user.write_text("the user's notes")
    (lm_run / "a-folder").mkdir(exist_ok=True)
    before = snapshot(lm_run / "logs")
    cases = [
        (str(user), [], "exists already; name another file, or set --model.generation.overwrite true"),
        (str(ckpt), [], "is the checkpoint being read"),
        (str(ckpt), ["--model.generation.overwrite", "true"], "is the checkpoint being read"),
        (str(lm_run / "a-folder"), [], "is a folder; name a file"),
    ]
    for path, extra, message in cases:
        capsys.readouterr()
        assert main(predict_args(lm_run, "--model.generation.output_file", path, *extra)) == 2, path
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "--- prompt" not in err, err[-2000:]
    assert user.read_text() == "the user's notes"
    assert snapshot(lm_run / "logs") == before  # the checkpoint and the run folder unchanged, nothing generated
    assert main(predict_args(lm_run, "--model.generation.output_file", str(user),
                             "--model.generation.overwrite", "true")) == 0
    assert json.loads(user.read_text().splitlines()[0])["prompt"]


# ------------------------------------------------------------------------ item 12: read-only outputs, before any work
@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write into: mode 0555, or (root writes anywhere) a read-only tmpfs mount."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        yield folder
        os.chmod(folder, 0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only file system")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_read_only_outputs_are_found_before_any_work(tmp_path, read_only_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = synthetic_args(tmp_path)
    commands = [
        (["fit", *args, "--trainer.default_root_dir", str(read_only_dir / "runs"), "--trainer.logger", "false"],
         f"trainer.default_root_dir={read_only_dir / 'runs'} cannot be created ({read_only_dir} is not writable)"),
        (["fit", *args, "--trainer.logger.init_args.save_dir", str(read_only_dir)],
         f"trainer.logger.init_args.save_dir={read_only_dir} is not writable"),
        (["study", "--config", str(CONFIGS / "study" / "synthetic.yaml"), "--output", str(read_only_dir / "study"),
          "--task", str(CONFIGS / "synthetic" / "reverse.yaml"), "--seeds", "[0]"],
         f"study.output={read_only_dir / 'study'} cannot be created"),
    ]
    for argv, message in commands:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("error: ") == 1, err[-2000:]
    assert list(read_only_dir.iterdir()) == []
    assert not (tmp_path / "logs").exists()  # nothing was started elsewhere either


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    from qkv_lightning.guards import guarded_yaml_load

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    bomb = "\n".join(lines) + "\n"
    with pytest.raises(Exception, match="expands to more than 100,000 YAML nodes"):
        guarded_yaml_load(bomb)
    assert guarded_yaml_load("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}
