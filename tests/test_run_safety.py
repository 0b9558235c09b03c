"""Checkpoints never run code, predict never overwrites, evaluations open no new run folders, unwritable outputs are
found before any work (issue 13, items 2, 5, 12, 14 and 15), through the real command line.

The FSDP2 (two-process) entry points of items 2 and 12 are in tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import shutil
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


# ----------------------------------------------------------------- issue 26: a user's file is never replaced or deleted
def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def users_config(path: Path) -> Path:
    """The user's own experiment config (a tiny synthetic task, no logger, no checkpoints), with their comments."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# my experiment: keep this file as written\n"
        "model:\n  class_path: qkv_lightning.tasks.sequence_tasks.SequenceTask\n"
        "  init_args:\n    network: {n_layer: 1, n_head: 2, d_model: 8, max_seq_len: 8}\n"
        "    optimizer: {lr: 0.003, warmup_steps: 1}\n"
        "data:\n  class_path: qkv_lightning.data.synthetic.SyntheticSequenceData\n"
        "  init_args: {task: sub, seq_len: 4, train_size: 32, val_size: 16, test_size: 16, batch_size: 16}\n"
        "trainer: {max_steps: 1, max_epochs: -1, accelerator: cpu, devices: 1, enable_checkpointing: false,\n"
        "          limit_val_batches: 1, num_sanity_val_steps: 0, enable_progress_bar: false,\n"
        "          enable_model_summary: false}\n"
    )
    return path


def test_fit_never_replaces_a_config_yaml_it_did_not_write(tmp_path, monkeypatch, capsys):
    """Five inputs: the user's config.yaml in trainer.default_root_dir (passed as --config, and not), in the default
    root folder (logs/) when no default_root_dir is given, in a logger's fixed version folder, and a saved config the
    user edited. Each is
    refused with one paragraph naming it, keeping its SHA-256; the tool's own saved config is replaced on a re-run."""
    monkeypatch.chdir(tmp_path)
    mine = users_config(tmp_path / "exp" / "config.yaml")
    other = users_config(tmp_path / "exp2" / "config.yaml")
    cwd_config = users_config(tmp_path / "config.yaml")
    default_root_config = users_config(tmp_path / "logs" / "config.yaml")  # trainer.default_root_dir's default: logs
    logged = users_config(tmp_path / "logs" / "run" / "v" / "config.yaml")
    no_logger = ["--trainer.logger", "false"]
    cases = [
        (["--config", str(mine), *no_logger, "--trainer.default_root_dir", str(tmp_path / "exp")], mine),
        (["--config", str(cwd_config), *no_logger, "--trainer.default_root_dir", str(tmp_path / "exp2")], other),
        (["--config", str(mine), *no_logger], default_root_config),
        (["--config", str(mine), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.logger.init_args.name", "run",
          "--trainer.logger.init_args.version", "v"], logged),
    ]
    for argv, user_file in cases:
        before = sha256(user_file)
        capsys.readouterr()
        assert main(["fit", *argv]) == 2, argv
        err = capsys.readouterr().err
        named = {str(user_file), str(user_file.relative_to(tmp_path))}  # the default root is named as logs/config.yaml
        assert any(name in err for name in named) and "Traceback" not in err and err.count("error: ") == 1, err[-2000:]
        assert sha256(user_file) == before, user_file
    # the tool's own saved config is replaced by a re-run into the same folder; once edited by the user, it is not
    run = ["fit", "--config", str(mine), *no_logger, "--trainer.default_root_dir", str(tmp_path / "own")]
    assert main(run) == 0
    saved = tmp_path / "own" / "config.yaml"
    assert "max_steps: 1" in saved.read_text()
    assert main([*run, "--trainer.max_steps", "2"]) == 0
    assert "max_steps: 2" in saved.read_text()
    saved.write_text(saved.read_text().replace("max_steps: 2", "max_steps: 3"))
    before = sha256(saved)
    capsys.readouterr()
    assert main(run) == 2
    err = capsys.readouterr().err
    assert str(saved) in err and "Traceback" not in err and err.count("error: ") == 1, err[-2000:]
    assert sha256(saved) == before


def tampered_checkpoint(source: Path, target: Path, generation: dict) -> Path:
    """``source`` with ``generation`` settings added to its hyper-parameters (what a shared checkpoint could carry)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["generation"] = generation
    torch.save(checkpoint, target)
    return target


def test_a_checkpoints_stored_settings_never_choose_the_output_file_or_overwrite(lm_run, monkeypatch, capsys):
    """Three inputs: a checkpoint naming a user file with overwrite, naming a new file, and granting overwrite of the
    file the user names. The user's file keeps its SHA-256 and no file the checkpoint names is created."""
    monkeypatch.chdir(lm_run)
    ckpt = lm_run / "logs" / "lm" / "version_0" / "checkpoints" / "last.ckpt"
    user = lm_run / "precious.txt"
    user.write_text("the user's file\n")
    before = sha256(user)
    named = lm_run / "named-by-the-checkpoint.jsonl"
    with_user_file = tampered_checkpoint(ckpt, lm_run / "t1.ckpt", {"output_file": str(user), "overwrite": True})
    with_new_file = tampered_checkpoint(ckpt, lm_run / "t2.ckpt", {"output_file": str(named)})
    with_overwrite = tampered_checkpoint(ckpt, lm_run / "t3.ckpt", {"overwrite": True})
    for tampered in (with_user_file, with_new_file):
        args = predict_args(lm_run)
        args[args.index("--ckpt_path") + 1] = str(tampered)
        assert main(args) == 0
        assert sha256(user) == before and not named.exists(), tampered
    args = predict_args(lm_run, "--model.generation.output_file", str(user))
    args[args.index("--ckpt_path") + 1] = str(with_overwrite)
    capsys.readouterr()
    assert main(args) == 2
    assert "exists already" in capsys.readouterr().err
    assert sha256(user) == before


def test_a_study_rerun_deletes_no_folder_it_cannot_prove_it_made(tmp_path, capsys):
    """Three inputs: a finished cell folder replaced by a link to a user's folder, by a link to a user's folder with
    the link one level up (the variant folder), and by a user's own folder (no link). Each re-run is refused with one
    paragraph naming the folder; every user file keeps its SHA-256 and nothing is added to the user's folders."""
    from tests.test_study_safety import study_args, task_config

    task = task_config(tmp_path)
    out = tmp_path / "study"
    assert main(study_args(task, out)) == 0
    cell = out / "runs" / "QKV" / "seed0"
    assert (cell / "result.json").is_file()
    user = tmp_path / "user-files"
    (user / "seed0").mkdir(parents=True)
    (user / "seed0" / "thesis.tex").write_text("years of work")
    (user / "seed0" / "data.bin").write_bytes(os.urandom(1000))
    before = snapshot(user)

    def link_cell() -> None:
        shutil.rmtree(cell)
        cell.symlink_to(user / "seed0", target_is_directory=True)

    def link_variant() -> None:
        variant = cell.parent
        shutil.rmtree(variant)
        variant.symlink_to(user, target_is_directory=True)

    def own_folder() -> None:
        variant = cell.parent
        variant.unlink()
        variant.mkdir()
        shutil.copytree(user / "seed0", cell)

    for damage, where in ((link_cell, user / "seed0"), (link_variant, user / "seed0"), (own_folder, cell)):
        damage()
        capsys.readouterr()
        assert main(study_args(task, out)) == 2, damage.__name__
        err = capsys.readouterr().err
        assert str(where) in err and "Traceback" not in err and err.count("error: ") == 1, err[-2000:]
        assert snapshot(user) == before, damage.__name__
        assert sorted(p.name for p in (user / "seed0").iterdir()) == ["data.bin", "thesis.tex"]
    assert snapshot(cell) == snapshot(user / "seed0")  # the copy in the cell folder was not deleted either


def test_resuming_deletes_no_path_a_checkpoints_callback_state_puts_outside_its_folder(tmp_path):
    """A checkpoint whose ModelCheckpoint state names user files (``best_k_models``, ``kth_best_model_path``,
    ``last_model_path``) by a path that leads out of the checkpoint folder (``dirpath/../..``, which Lightning's own
    check takes for a path inside it), its ``dirpath`` that of the resumed run (Lightning restores the paths only
    then): resuming from it, Lightning would delete them when it saves the next best and last checkpoints. Each is
    dropped when the checkpoint is loaded; the files keep their SHA-256."""
    import hashlib

    assert main(["fit", *synthetic_args(tmp_path, steps=4)]) == 0
    last = next(tmp_path.glob("logs/**/last.ckpt"))
    victims = {role: tmp_path / f"{role}.txt" for role in ("best", "kth", "last")}
    for victim in victims.values():
        victim.write_text(f"the user's {victim.name}\n")
    digests = {role: hashlib.sha256(victim.read_bytes()).hexdigest() for role, victim in victims.items()}
    checkpoint = torch.load(last, weights_only=True)
    states = [state for state in checkpoint["callbacks"].values() if "best_k_models" in state]
    assert states, "the run saves ModelCheckpoint state"
    resumed = last.parent.parent.parent / "version_1" / "checkpoints"  # the resumed run's folder: a new version
    down = {role: os.path.join(resumed, os.path.relpath(victim, resumed)) for role, victim in victims.items()}
    worst = torch.tensor(-1.0)  # sort.yaml's checkpoint maximises val/seq_acc: any score beats it
    for state in states:
        state.update(dirpath=str(resumed), best_k_models={down["best"]: worst, down["kth"]: worst},
                     kth_best_model_path=down["kth"], kth_value=worst, last_model_path=down["last"])
    tampered = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, tampered)
    assert main(["fit", *synthetic_args(tmp_path, steps=8), "--ckpt_path", str(tampered)]) == 0
    assert {role: hashlib.sha256(v.read_bytes()).hexdigest() for role, v in victims.items() if v.exists()} == digests


def test_a_sharded_save_deletes_only_leftovers_it_wrote(tmp_path):
    """Before a sharded save, ``<name>.partial`` and ``<name>.old`` are cleared: a real DCP folder (an interrupted
    save: shards without the index, or a whole set-aside checkpoint) is deleted; a folder with a user's file in it, a
    link to a user's folder and a plain file of that name are refused with the path named and kept byte for byte."""
    from qkv_lightning.checkpoints import leftover_refusal, remove_leftover

    whole = dcp_folder(tmp_path / "last.ckpt.old", {"w": torch.ones(3)})
    interrupted = dcp_folder(tmp_path / "a.ckpt.partial", {"w": torch.ones(3)})
    (interrupted / ".metadata").unlink()  # DCP writes its index last
    for leftover in (whole, interrupted, tmp_path / "missing.partial"):
        assert leftover_refusal(leftover) is None
        remove_leftover(leftover)
        assert not os.path.lexists(leftover)

    users = dcp_folder(tmp_path / "b.ckpt.partial", {"w": torch.ones(3)})
    (users / "notes.txt").write_text("mine\n")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(users, elsewhere)
    (elsewhere / "notes.txt").unlink()  # only what a save writes, but reached through a link
    link = tmp_path / "c.ckpt.partial"
    link.symlink_to(elsewhere)
    plain = tmp_path / "d.ckpt.old"
    plain.write_text("a file\n")
    before = snapshot(tmp_path)
    reasons = [leftover_refusal(path) for path in (users, link, plain)]
    assert reasons[0] == f"{users} holds notes.txt, which no sharded save writes"
    assert reasons[1] == f"{link} is a link" and reasons[2] == f"{plain} is not a folder"
    assert snapshot(tmp_path) == before
