"""Distillation from a frozen teacher's logits, a training option of every task (``model.init_args.distill``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv_lightning.errors import ConfigError


@dataclass
class DistillConfig:
    """Knowledge distillation: the training loss becomes ``alpha * hard + (1 - alpha) * T^2 * KL(teacher_T ||
    student_T)``, ``hard`` the task's own loss on the labels and ``*_T = softmax(logits / T)``, the KL summed over
    the classes and averaged over the counted positions (a language model's ignored targets do not count), as in the
    paper authors' distillation_llm.py / distillation_vision.py (T = 2, alpha = 0.5)."""

    teacher: str | None = None
    """Checkpoint of the teacher (a single .ckpt of the same task and data, any attention variant, e.g. the model a
    converted checkpoint was made from); None turns distillation off. It is frozen (eval mode, no gradients), runs
    in the run's precision, is sharded like the student under FSDP2, and is kept out of the student's checkpoints
    and optimiser."""

    temperature: float = 2.0
    """Softmax temperature T of both distributions; the KL term is scaled by T^2 so that its gradients keep their
    size as T changes."""

    alpha: float = 0.5
    """Weight of the hard-label loss; 1 - alpha weighs the distillation term (0: pure distillation)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"model.distill.temperature={self.temperature} must be a positive number (e.g. 2).")
        if not 0.0 <= self.alpha <= 1.0:  # also NaN
            raise ConfigError(f"model.distill.alpha={self.alpha} must lie in [0, 1] (the weight of the hard loss).")


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """``T^2 * mean over counted rows of KL(softmax(teacher / T) || softmax(student / T))``.

    Args:
        student: logits or log-probabilities (N, V) (an adaptive softmax's log-probabilities give the same
            distributions as logits).
        teacher: the teacher's, (N, V).
        temperature: T.
        mask: (N,) booleans, the rows that count (None: all); no counted row gives 0.
    """
    if student.shape != teacher.shape:
        raise ConfigError(
            f"model.distill.teacher gives outputs of shape {tuple(teacher.shape)}, the student {tuple(student.shape)}: "
            "the teacher must be a model of the same task, data and classes / vocabulary."
        )
    log_s = F.log_softmax(student.float() / temperature, dim=-1)  # (N, V)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)  # (N, V)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=-1)  # (N,)
    if mask is not None:
        kl = kl[mask]
    if kl.numel() == 0:
        return student.sum() * 0.0
    return kl.mean() * temperature**2


def freeze(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` in eval mode with no parameter requiring gradients."""
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network
