"""Properties every task module shares: the hyper-parameters it saves are arguments it accepts."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch

from qkv_lightning.tasks.base import TaskModule
from qkv_lightning.tasks.image_classifier import ImageClassifier
from qkv_lightning.tasks.language_model import LanguageModel
from qkv_lightning.tasks.optim import warmup_cosine
from qkv_lightning.tasks.sequence_tasks import SequenceTask

TASKS = [LanguageModel, ImageClassifier, SequenceTask]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.__name__)
def test_saved_hyperparameters_rebuild_the_task(task):
    """``fit --ckpt_path`` re-parses the saved hyper-parameters as init arguments, so each must be accepted and
    every base-class setting must be a setting of the task."""
    module = task()
    own = inspect.signature(task.__init__).parameters
    accepted = set(own) - {"self", "kwargs"}
    if "kwargs" in own:  # the shared settings are declared once, in TaskModule, and forwarded
        accepted |= set(inspect.signature(TaskModule.__init__).parameters) - {"self", "stored"}
    saved = set(module.hparams) - {"_class_path"}
    assert saved <= accepted, f"saved but not accepted: {saved - accepted}"
    assert set(inspect.signature(TaskModule.__init__).parameters) - {"self", "stored"} <= accepted
    assert module.hparams["_class_path"] == f"{task.__module__}.{task.__qualname__}"
    rebuilt = task(**{k: v for k, v in module.hparams.items() if k != "_class_path"})  # dicts, as in checkpoints
    assert rebuilt.attention_config == module.attention_config


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    values = [warmup_cosine(step, 4, 14, 0.1, "cosine") for step in range(15)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and abs(values[9] - (0.1 + 0.9 * 0.5)) < 1e-12 and abs(values[14] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(values[3:], values[4:], strict=False))
    assert [warmup_cosine(s, 2, 10, 0.1, "constant") for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_optimizer_decays_matrices_only_and_schedules_per_step():
    module = SequenceTask(data_spec={"vocab_size": 10, "num_classes": 10, "seq_len": 8})
    module.configure_model()

    module.trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    config = module.configure_optimizers()
    decay, no_decay = config["optimizer"].param_groups
    assert decay["weight_decay"] == module.optimizer_config.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))
    assert config["lr_scheduler"]["interval"] == "step"
    scheduler = config["lr_scheduler"]["scheduler"]
    warmup_lr = module.optimizer_config.lr / module.optimizer_config.warmup_steps
    assert scheduler.get_last_lr()[0] == pytest.approx(warmup_lr)
    assert torch.is_tensor(decay["params"][0])


class RecordingFSDP(torch.distributed.fsdp.FullyShardedDataParallel):
    """Stands in for an FSDP1 root (which needs a GPU here): records what it is asked to clip."""

    def __init__(self) -> None:  # no process group, no wrapping
        torch.nn.Module.__init__(self)
        self.clipped = []

    def clip_grad_norm_(self, max_norm, norm_type=2.0):
        self.clipped.append(max_norm)


def attached_task(root):
    task = SequenceTask(network={"n_layer": 1, "n_head": 2, "d_model": 8},
                        data_spec={"vocab_size": 10, "num_classes": 10, "seq_len": 8})
    task.configure_model()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    task.trainer = trainer
    if root is not None:
        trainer.strategy._model = root
    else:
        trainer.strategy.connect(task)
    for p in task.parameters():
        p.grad = torch.full_like(p, 10.0)
    return task


def test_gradient_clipping_under_fsdp1_goes_through_fsdps_own_clip_grad_norm():
    """Lightning's FSDPStrategy cannot clip by norm through its precision plugin; the task asks the FSDP root."""
    root = RecordingFSDP()
    task = attached_task(root)
    task.configure_gradient_clipping(None, 1.0, "norm")
    assert root.clipped == [1.0]
    assert all(torch.all(p.grad == 10.0) for p in task.parameters())  # not clipped a second time by Lightning
    with pytest.raises(Exception, match="gradient_clip_algorithm='value' is not supported with FSDPStrategy"):
        task.configure_gradient_clipping(None, 1.0, "value")


def test_gradient_clipping_without_fsdp_clips_the_total_norm():
    task = attached_task(None)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    task.configure_gradient_clipping(optimizer, 1.0, "norm")
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in task.parameters()]))
    assert total == pytest.approx(1.0, rel=1e-4)
