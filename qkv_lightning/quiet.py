"""Quiet runs: Lightning's advertising tips, the lines that are not about the run and the warnings known to be
harmless here are dropped in the CLI (not only in pytest's settings), so that what a run prints is about the run.

Each entry of :data:`DROPPED_LINES`, :data:`KNOWN_WARNINGS` and :data:`COMMAND_WARNINGS` says why it is dropped.
Anything else still prints. Dropped elsewhere, at their source: ``Seed set to N`` (the CLI seeds with
``verbose=False``: the seed is in the saved ``config.yaml``; ``QKVLightningCLI._set_seed``) and the model summary's
``Total FLOPs: 0`` (the summary shows the closed-form FLOPs instead: :mod:`qkv_lightning.callbacks.summary`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

TIP_PREFIX = "💡 Tip:"
"""Lightning's tips (litlogger, litmodels): ``rank_zero_info`` lines, one or two per run."""

KNOWN_WARNINGS: list[tuple[str, str]] = [
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning's own pytree helper on torch >= 2.10; nothing of ours uses LeafSpec",
    ),
    (
        r"TypedStorage is deprecated",
        "torch.distributed.checkpoint's file writer calls tensor.storage() on torch 2.7 (saving an FSDP2 sharded "
        "checkpoint); nothing of ours uses TypedStorage",
    ),
    (
        r"LightningCLI's args parameter is intended to run from within Python",
        "main() and the study runner hand LightningCLI its arguments explicitly; sys.argv is pytest's or a study's",
    ),
]
"""(message regex, why it is harmless) of the warnings a run does not print."""


DROPPED_LINES: list[tuple[str, str]] = [
    (TIP_PREFIX, "advertising (litlogger, litmodels), not about the run"),
    ("GPU available: ", "which accelerators the machine has, on every run: the one used is trainer.accelerator (in "
                        "config.yaml), and Lightning still warns when a GPU is there but unused"),
    ("TPU available: ", "as the GPU line"),
    ("HPU available: ", "as the GPU line (older Lightning releases)"),
]
"""(start of a ``rank_zero_info`` line, why it is dropped)."""

COMMAND_WARNINGS: dict[str, list[tuple[str, str]]] = {
    "evaluate": [(
        r"The dirpath has changed from",
        "validate / test / predict log into version_K/<command> of the run they evaluate (guards."
        "place_evaluation_logs), so the ModelCheckpoint folder differs from the checkpoint's by design; they save no "
        "checkpoints, so the bookkeeping Lightning does not reload is not needed",
    )],
    "resume": [(
        r"Checkpoint directory .* exists and is not empty",
        "fit --ckpt_path resumes into the run's own checkpoint folder, which holds that run's earlier checkpoints by "
        "design (a new run gets a new version_N folder, so there the warning still prints)",
    )],
}
"""Warnings dropped while one kind of command runs (:func:`command_filters`): (message regex, why)."""


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(tuple(start for start, _why in DROPPED_LINES))


_TIP_FILTER = _DropTips()
TIP_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
"""The loggers through which ``rank_zero_info`` prints (whichever Lightning module was imported last)."""


def install() -> None:
    """Drop the :data:`DROPPED_LINES` and the :data:`KNOWN_WARNINGS` in this process (idempotent)."""
    for name in TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)
    for message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


@contextlib.contextmanager
def command_filters(subcommand: str, resuming: bool) -> Iterator[None]:
    """Drop the :data:`COMMAND_WARNINGS` that hold for this command while it runs (``validate`` / ``test`` /
    ``predict``: ``evaluate``; ``fit`` with a ``ckpt_path``: ``resume``); the filters are removed afterwards."""
    kinds = ["evaluate"] if subcommand in ("validate", "test", "predict") else ["resume"] if resuming else []
    with warnings.catch_warnings():
        for kind in kinds:
            for message, _why in COMMAND_WARNINGS[kind]:
                warnings.filterwarnings("ignore", message=message)
        yield
