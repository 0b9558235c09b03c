"""Quiet runs: Lightning's advertising tips and the warnings known to be harmless here are dropped in the CLI (not
only in pytest's settings), so that what a run prints is about the run.

Each entry of :data:`KNOWN_WARNINGS` says why it is harmless. Anything else still prints.
"""

from __future__ import annotations

import logging
import warnings

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


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


_TIP_FILTER = _DropTips()
TIP_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
"""The loggers through which ``rank_zero_info`` prints (whichever Lightning module was imported last)."""


def install() -> None:
    """Drop Lightning's tips and the :data:`KNOWN_WARNINGS` in this process (idempotent)."""
    for name in TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)
    for message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
