"""The optimiser in the Lightning way: any torch.optim class (``--optimizer`` or ``model.optimizer.name``), the two
named parameter groups the LR monitor logs, weight decay on all parameters or matrices only, the step schedule,
and resume with another optimiser's state."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from qkv_lightning.cli import main
from qkv_lightning.data.synthetic import SyntheticSequenceData
from qkv_lightning.errors import ConfigError
from qkv_lightning.lightning_cli import QKVLightningCLI
from qkv_lightning.tasks.optim import OptimizerConfig, lr_multiplier
from qkv_lightning.tasks.sequence_tasks import SequenceTask
from tests.run_fixtures import synthetic_args

SPEC = {"vocab_size": 10, "num_classes": 10, "seq_len": 8}


def tiny_task(**optimizer) -> SequenceTask:
    return SequenceTask(network={"n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 16},
                        optimizer=OptimizerConfig(**optimizer))


def tiny_data() -> SyntheticSequenceData:
    return SyntheticSequenceData(task="sort", seq_len=8, train_size=64, val_size=16, test_size=16, batch_size=8)


def test_lr_monitor_logs_the_named_decay_and_no_decay_groups(tmp_path):
    """A real Trainer with Lightning's LearningRateMonitor: the groups are logged by name (not pg1/pg2), each with
    the warm-up + cosine rate of its step."""
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=CSVLogger(tmp_path), callbacks=[monitor],
                        log_every_n_steps=1, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(tiny_task(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1), tiny_data())
    assert set(monitor.lrs) == {"lr-AdamW/decay", "lr-AdamW/no_decay"}
    expected = [1e-2 * lr_multiplier(step, 2, 4, "cosine", min_ratio=0.1) for step in range(4)]
    for name in monitor.lrs:
        assert monitor.lrs[name] == pytest.approx(expected, rel=1e-12), name
    header = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"lr-AdamW/decay", "lr-AdamW/no_decay"} <= set(header)


@pytest.mark.parametrize("decay_on", ["matrices", "all"])
def test_weight_decay_applies_to_the_parameters_decay_on_names(decay_on):
    """With zero gradients one AdamW step only decays: p -> p * (1 - lr * wd) for the decayed parameters, unchanged
    for the others; ``all`` decays biases and norms too, ``matrices`` only the 2-D weights."""
    task = tiny_task(lr=0.5, weight_decay=0.2, warmup_steps=0, schedule="constant", decay_on=decay_on)
    task.data_spec = dict(SPEC)
    task.configure_model()
    optimizer, _ = task.build_optimizer(total_steps=10)
    assert [group["name"] for group in optimizer.param_groups] == ["decay", "no_decay"]
    before = {name: p.detach().clone() for name, p in task.named_parameters()}
    for p in task.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    vectors = 0
    for name, p in task.named_parameters():
        decayed = p.ndim >= 2 or decay_on == "all"
        vectors += p.ndim < 2
        expected = before[name] * (1 - 0.5 * 0.2) if decayed else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)
    assert vectors > 0  # the model has biases and norms, so the two settings differ


def test_step_schedule_equals_torch_multisteplr_at_the_paper_fractions():
    """``schedule: step`` with milestones 0.5 and 0.75 of 40 steps and gamma 0.1 gives the rates of torch's
    MultiStepLR(milestones=[20, 30], gamma=0.1) stepped once per optimiser step."""
    task = tiny_task(name="Adam", lr=1e-3, weight_decay=0.0, warmup_steps=0, schedule="step",
                     step_milestones=[0.5, 0.75], step_gamma=0.1)
    task.data_spec = dict(SPEC)
    task.configure_model()
    optimizer, scheduler = task.build_optimizer(total_steps=40)
    assert type(optimizer) is torch.optim.Adam
    reference_optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = torch.optim.lr_scheduler.MultiStepLR(reference_optimizer, milestones=[20, 30], gamma=0.1)
    ours, theirs = [], []
    for _ in range(40):
        ours.append(scheduler.get_last_lr()[0])
        theirs.append(reference.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        reference_optimizer.step()
        reference.step()
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert ours[19] == pytest.approx(1e-3) and ours[20] == pytest.approx(1e-4) and ours[30] == pytest.approx(1e-5)


def fit(folder: Path, *extra: str, steps: int = 4) -> Path:
    """A tiny configs/synthetic/sort.yaml fit through the CLI, saving step=2.ckpt, step=4.ckpt and last.ckpt."""
    folder.mkdir(parents=True, exist_ok=True)
    assert main(["fit", *synthetic_args(folder, name="opt", steps=steps), "--trainer.limit_val_batches", "0",
                 *extra]) == 0
    (last,) = folder.rglob("last.ckpt")
    return last


def test_optimizer_flag_takes_any_torch_optim_class_and_resumes_its_state(tmp_path):
    """``--optimizer SGD --optimizer.momentum 0.9 --optimizer.lr 0.05`` trains with SGD over the named groups at
    peak rate 0.05; the checkpoint holds it as the task's settings, and a run resumed from step 2 (momentum buffers
    restored by parameter name) ends with the uninterrupted run's weights."""
    flag = ["--optimizer", "SGD", "--optimizer.momentum", "0.9", "--optimizer.lr", "0.05"]
    full = torch.load(fit(tmp_path / "full", *flag), weights_only=True)
    settings = full["hyper_parameters"]["optimizer"]
    assert settings["name"] == "torch.optim.SGD" and settings["kwargs"] == {"momentum": 0.9}
    assert settings["lr"] == 0.05
    (state,) = full["optimizer_states"]
    assert [(g["name"], g["momentum"]) for g in state["param_groups"]] == [("decay", 0.9), ("no_decay", 0.9)]
    assert full["lr_schedulers"][0]["base_lrs"] == [0.05, 0.05]
    assert all("momentum_buffer" in s for s in state["state"].values())

    (middle,) = (tmp_path / "full").rglob("step=2.ckpt")
    resumed = torch.load(fit(tmp_path / "resumed", *flag, "--ckpt_path", str(middle)), weights_only=True)
    assert resumed["global_step"] == full["global_step"] == 4
    for name, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)


def test_another_optimizer_flag_on_resume_is_refused(tmp_path, capsys):
    """The checkpoint's optimiser state fits only its own class: ``--optimizer`` naming another is refused."""
    last = fit(tmp_path / "run", steps=2)
    (tmp_path / "again").mkdir()
    args = [*synthetic_args(tmp_path / "again", name="opt", steps=4), "--ckpt_path", str(last)]
    assert main(["fit", *args, "--optimizer", "SGD"]) == 2
    assert "the run resumes with the checkpoint's optimiser (AdamW)" in capsys.readouterr().err


def test_the_optimizer_on_the_task_and_its_errors(tmp_path):
    """``model.optimizer.name`` / ``kwargs`` choose the class on the task (what ``--optimizer`` fills in); a wrong
    class, an unknown argument, or the peak rate given as a kwarg is a ConfigError naming the setting."""
    config = QKVLightningCLI.parse_only(synthetic_args(tmp_path) + [
        "--model.init_args.optimizer.name", "RMSprop", "--model.init_args.optimizer.kwargs", "{alpha: 0.9}"])
    settings = OptimizerConfig(**config.model.init_args.optimizer.as_dict())
    groups = [{"params": [torch.nn.Parameter(torch.ones(2, 2))], "weight_decay": 0.0, "name": "decay"}]
    optimizer = settings.build(groups)
    assert type(optimizer) is torch.optim.RMSprop and optimizer.param_groups[0]["alpha"] == 0.9
    assert optimizer.param_groups[0]["lr"] == settings.lr and math.isclose(optimizer.param_groups[0]["eps"], 1e-8)
    for bad, words in [({"name": "Adamm"}, "optimizer.name='Adamm'"),
                       ({"name": "torch.nn.Linear"}, "not a torch.optim.Optimizer"),
                       ({"name": "SGD", "kwargs": {"momentun": 0.9}}, "momentun"),
                       ({"kwargs": {"lr": 0.1}}, "optimizer.lr"),
                       ({"name": "LBFGS"}, "takes no weight_decay"),
                       ({"schedule": "step", "step_milestones": [0.75, 0.5]}, "step_milestones")]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
            OptimizerConfig(**bad)


def test_a_checkpoint_saved_before_the_groups_had_names_gets_them_back():
    """The optimiser takes its groups' settings from the checkpoint, so groups saved without names would make the LR
    monitor log pg1/pg2 again: loading names them ``decay`` / ``no_decay``, and keeps names that are there."""
    task = tiny_task()
    groups = [{"lr": 1.0, "params": [0]}, {"lr": 1.0, "params": [1]}]
    old = {"optimizer_states": [{"state": {}, "param_groups": groups}]}
    task.on_load_checkpoint(old)
    assert [g["name"] for g in old["optimizer_states"][0]["param_groups"]] == ["decay", "no_decay"]
    named = {"optimizer_states": [{"param_groups": [{"name": "a", "params": []}, {"name": "b", "params": []}]}]}
    task.on_load_checkpoint(named)
    assert [g["name"] for g in named["optimizer_states"][0]["param_groups"]] == ["a", "b"]


def test_an_optimizer_name_never_imports_a_module_of_its_own(tmp_path, monkeypatch):
    """A dotted ``optimizer.name`` (which a checkpoint's hyper-parameters can carry) resolves only in torch.optim or
    an already imported module: naming a module whose import has a side effect neither imports nor runs it."""
    from qkv_lightning.errors import ConfigError
    from qkv_lightning.tasks.optim import optimizer_class

    marker = tmp_path / "ran"
    (tmp_path / "planted_optimizer_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport torch\nclass Opt(torch.optim.SGD):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="already imported"):
        optimizer_class("planted_optimizer_module.Opt")
    assert not marker.exists()
    import planted_optimizer_module  # once the user imports it, the name resolves

    assert optimizer_class("planted_optimizer_module.Opt") is planted_optimizer_module.Opt
    assert optimizer_class("torch.optim.SGD") is torch.optim.SGD
