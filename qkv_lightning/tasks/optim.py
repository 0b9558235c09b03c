"""The optimiser and learning-rate schedule every task shares: :class:`OptimizerConfig` (any ``torch.optim`` class,
named decay / no-decay groups) and the warm-up + cosine / constant / step multiplier."""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from qkv_lightning.errors import ConfigError

OPTIMIZER_OWN_SETTINGS = ("params", "lr", "weight_decay", "betas", "eps")
"""Optimiser arguments set by :class:`OptimizerConfig`'s own fields (never through ``optimizer.kwargs``)."""


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimiser class named ``name``: a class of ``torch.optim`` (``AdamW``, ``Adam``, ``SGD``, ...) or the dotted
    path of a :class:`torch.optim.Optimizer` subclass in ``torch.optim`` or in a module that is already imported
    (``my_package.MyOptimizer`` once ``my_package`` is imported). A name read from a checkpoint's hyper-parameters
    therefore never imports, and so never runs, a module of its own choosing."""
    module_name, _, class_name = name.rpartition(".")
    try:
        if not module_name:
            cls = getattr(torch.optim, class_name)
        elif module_name == "torch.optim" or module_name.startswith("torch.optim."):
            cls = getattr(importlib.import_module(module_name), class_name)
        else:
            cls = getattr(sys.modules[module_name], class_name)
    except (ImportError, AttributeError, ValueError, KeyError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        known = sorted(
            n
            for n, c in vars(torch.optim).items()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
        )
        raise ConfigError(
            f"optimizer.name={name!r} is not a torch.optim.Optimizer class: use one of torch.optim's "
            f"({', '.join(known)}) or the dotted path of an Optimizer subclass in torch.optim or in a module that is "
            f"already imported (import your package first, e.g. from the model's class_path module)."
        )
    return cls


def optimizer_arguments(cls: type) -> set[str]:
    """The keyword arguments ``cls.__init__`` accepts (an ``Optimizer`` taking ``**kwargs`` accepts any)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return {"*"}
    return set(parameters) - {"self"}


@dataclass
class OptimizerConfig:
    """The optimiser (AdamW by default, or any ``torch.optim`` class), its two named parameter groups (``decay``: the
    matrices, ``no_decay``: biases, norms and other 1-D parameters; the LR monitor logs ``lr-AdamW/decay`` and
    ``lr-AdamW/no_decay``) and a per-step learning-rate schedule with linear warm-up.

    The optimiser is built in ``configure_optimizers``, after FSDP has wrapped the network. Choose another class as a
    Lightning user would with ``--optimizer`` (``fit ... --optimizer SGD --optimizer.momentum 0.9``), or on the task:
    ``model.init_args.optimizer: {name: SGD, kwargs: {momentum: 0.9}}``.
    """

    lr: float = 3e-4
    """Peak learning rate."""

    betas: tuple[float, float] = (0.9, 0.95)
    """Adam-style betas, passed to optimiser classes that take ``betas`` (AdamW, Adam, NAdam, RAdam, Adamax, ...)."""

    eps: float = 1e-8
    """Epsilon, passed to optimiser classes that take ``eps``."""

    weight_decay: float = 0.1
    """Weight decay (decoupled for AdamW), applied to the parameters ``decay_on`` names."""

    decay_on: Literal["matrices", "all"] = "matrices"
    """Which parameters weight decay applies to: ``matrices`` (parameters with 2 or more dimensions; not biases or
    norms, as nanoGPT does; our recipe) or ``all`` (every parameter, as the paper's LM training does). Either way the
    parameters form the same two named groups, so a checkpoint resumes under both settings."""

    name: str = "AdamW"
    """The optimiser class: a class of ``torch.optim`` (AdamW, Adam, SGD, RMSprop, ...) or the dotted path of a
    ``torch.optim.Optimizer`` subclass in torch.optim or an already imported module (a name never imports a module
    of its own). ``--optimizer CLASS`` on the command line sets it too."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    """Further init arguments of that class (e.g. ``{momentum: 0.9, nesterov: true}`` for SGD); ``lr``,
    ``weight_decay``, ``betas`` and ``eps`` are the settings above, not kwargs."""

    warmup_steps: int = 100
    """Steps of linear warm-up from 0 to ``lr`` (ignored when warmup_fraction is set)."""

    warmup_fraction: float | None = None
    """Warm-up over this fraction of the run's optimiser steps instead of warmup_steps: max(1, int(fraction *
    total steps)) steps, e.g. 0.05 as in the paper's synthetic tasks; None uses warmup_steps."""

    schedule: Literal["cosine", "constant", "step"] = "cosine"
    """After warm-up: ``cosine`` decay to ``min_lr_ratio * lr`` at the last step, ``constant``, or ``step``: the
    learning rate is multiplied by ``step_gamma`` at each of ``step_milestones`` (as the paper's vision recipe, Adam
    with MultiStepLR at 50% and 75% of training, gamma 0.1)."""

    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""

    step_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """The ``step`` schedule's milestones as fractions of the run's optimiser steps: the rate drops at step
    ``int(fraction * total steps)``. The paper steps per epoch at ``int(0.5 * E)`` and ``int(0.75 * E)`` epochs, so
    for E = 50 epochs its second drop is at epoch 37, i.e. 0.74."""

    step_gamma: float = 0.1
    """Factor by which the ``step`` schedule multiplies the learning rate at each milestone (0.1 in the paper)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:  # also NaN
            raise ConfigError(f"optimizer.lr={self.lr} must be positive.")
        if not math.isfinite(self.lr):
            raise ConfigError(f"optimizer.lr={self.lr} must be a finite number.")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"optimizer.eps={self.eps} must be a finite number >= 0.")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):  # NaN fails every comparison
            raise ConfigError(f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1).")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay={self.weight_decay} must be a finite number >= 0.")
        if self.decay_on not in ("matrices", "all"):
            raise ConfigError(f"optimizer.decay_on={self.decay_on!r} must be 'matrices' or 'all'.")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0.")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:  # also NaN
            raise ConfigError(f"optimizer.warmup_fraction={self.warmup_fraction} must lie in [0, 1) (or be null).")
        if not 0.0 <= self.min_lr_ratio <= 1.0:  # also NaN
            raise ConfigError(f"optimizer.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1].")
        self.step_milestones = [float(m) for m in self.step_milestones]
        if not all(0.0 < m < 1.0 for m in self.step_milestones) or self.step_milestones != sorted(self.step_milestones):
            raise ConfigError(
                f"optimizer.step_milestones={self.step_milestones} must be increasing fractions of the run in (0, 1)."
            )
        if not 0.0 < self.step_gamma <= 1.0:  # also NaN
            raise ConfigError(f"optimizer.step_gamma={self.step_gamma} must lie in (0, 1].")
        self.betas = tuple(self.betas)
        self.kwargs = dict(self.kwargs or {})
        cls = optimizer_class(self.name)
        own = sorted(set(self.kwargs) & set(OPTIMIZER_OWN_SETTINGS))
        if own:
            raise ConfigError(
                f"optimizer.kwargs sets {own}: set them as optimizer.{own[0]} (the schedule and the decay groups use "
                "these settings), not as kwargs."
            )
        accepted = optimizer_arguments(cls)
        unknown = sorted(set(self.kwargs) - accepted) if "*" not in accepted else []
        if unknown:
            raise ConfigError(
                f"optimizer.kwargs {unknown} are not arguments of {cls.__module__}.{cls.__name__}; it accepts "
                f"{sorted(accepted - set(OPTIMIZER_OWN_SETTINGS))}."
            )
        if self.weight_decay and "weight_decay" not in accepted and "*" not in accepted:
            raise ConfigError(
                f"optimizer.name={self.name!r} takes no weight_decay: set optimizer.weight_decay to 0."
            )
        try:  # torch.optim's own checks of the values (SGD's momentum >= 0, ...), on one stand-in parameter
            if cls.__module__.startswith("torch.optim"):
                self.build([{"params": [torch.zeros(1, requires_grad=True)], "weight_decay": self.weight_decay}])
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"optimizer.name={self.name!r} with optimizer.kwargs={self.kwargs} (--optimizer.X on the command "
                f"line): {cls.__name__} refuses these settings ({error}); change the value it names."
            ) from None

    def build(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimiser over ``groups`` (parameter groups holding their own ``weight_decay``)."""
        cls = optimizer_class(self.name)
        accepted = optimizer_arguments(cls)
        settings: dict[str, Any] = {"lr": self.lr}
        if "betas" in accepted:
            settings["betas"] = self.betas
        if "eps" in accepted:
            settings["eps"] = self.eps
        if "weight_decay" not in accepted and "*" not in accepted:
            groups = [{k: v for k, v in group.items() if k != "weight_decay"} for group in groups]
        return cls(groups, **settings, **self.kwargs)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine decay to ``min_ratio`` (or constant)."""
    return lr_multiplier(step, warmup_steps, total_steps, schedule, min_ratio=min_ratio)


def lr_multiplier(
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_ratio: float = 0.1,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
) -> float:
    """Learning-rate multiplier at optimiser ``step`` (0-based): linear warm-up over ``warmup_steps``, then ``cosine``
    decay to ``min_ratio`` at ``total_steps``, ``constant``, or ``step``: times ``gamma`` for each milestone
    ``int(fraction * total_steps)`` that ``step`` has reached."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return gamma ** sum(step >= int(fraction * total_steps) for fraction in milestones)
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
