"""Progress lines while data is prepared (tokenizing, caching, downloading), shown on rank 0 only.

The data modules log to ``qkv_lightning.data.*`` loggers. :func:`show_data_progress` (called by the CLI) sends
those records to the terminal (stderr), on the global rank 0 process only, so that a first ``fit`` or ``report``
on a large corpus says what it is doing instead of staying silent; library users configure logging themselves.
:class:`Progress` writes a line when a job starts, at most every ``every`` seconds while it runs, and when it ends,
with its rate (``tokens/s``).
"""

from __future__ import annotations

import logging
import sys
import time

from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("qkv_lightning.data.progress")

DATA_LOGGER = "qkv_lightning.data"


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(rank_zero_only, "rank", 0) == 0


class _Stderr(logging.StreamHandler):
    """A stream handler that writes to the current ``sys.stderr`` (also when it was replaced after setup)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_data_progress(level: int = logging.INFO) -> None:
    """Send the data modules' log records (``qkv_lightning.data.*``) to stderr on global rank 0 (idempotent)."""
    logger = logging.getLogger(DATA_LOGGER)
    if any(getattr(handler, "_qkv_progress", False) for handler in logger.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("[data] %(message)s"))
    handler.addFilter(_RankZero())
    handler._qkv_progress = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(min(logger.level or level, level))
    logger.propagate = False  # not twice where the root logger prints too


def human(n: float) -> str:
    """``1234567`` -> ``1.23M``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class Progress:
    """Progress of one job, as log lines: started, every ``every`` seconds, done (count, time, rate).

    Args:
        what: the job, as it reads in a sentence (``tokenizing wiki.train.tokens (train)``).
        unit: what is counted (``tokens``, ``bytes``, ``files``).
        total: the count when done, if known (then the lines show a percentage).
        every: seconds between intermediate lines.
    """

    def __init__(self, what: str, unit: str = "tokens", total: float | None = None, every: float = 10.0) -> None:
        self.what, self.unit, self.total, self.every = what, unit, total, every
        self.start = self.last = time.perf_counter()
        self.count = 0.0
        log.info("%s ...", what)

    def update(self, count: float) -> None:
        """Add ``count`` units; logs a line when ``every`` seconds have passed since the last one."""
        self.count += count
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            share = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
            log.info("  %s: %s %s%s, %s %s/s", self.what, human(self.count), self.unit, share,
                     human(self.count / (now - self.start)), self.unit)

    def done(self, count: float | None = None) -> None:
        """Log the final line (``count`` replaces the running count when given)."""
        if count is not None:
            self.count = count
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        log.info("  %s: done, %s %s in %.1f s (%s %s/s)", self.what, human(self.count), self.unit, elapsed,
                 human(self.count / elapsed), self.unit)
