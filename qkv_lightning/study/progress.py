"""What a study prints while its runs go on: a line per finished run, and a status line whenever nothing was printed
for :data:`HEARTBEAT_S` seconds (workers starting, first runs not finished yet), so a study never stays silent.

The ETA comes from measured run times (each result's ``wall_s``) spread over the runs that go on at once; until a run
has finished there is no measured time, and the line says so instead of guessing from the time the workers took to
start.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator

HEARTBEAT_S = 10.0
"""Longest stretch without a line while runs go on."""


def duration(seconds: float) -> str:
    """``1h02m``, ``3m07s`` or ``12s``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class StudyProgress:
    """Progress of ``total`` runs, ``slots`` of them at once (None: unknown, e.g. a SLURM array; the ETA then comes
    from the rate of finished runs), printed through ``echo``."""

    def __init__(self, total: int, slots: int | None, echo: Callable[[str], None]) -> None:
        self.total, self.slots, self.echo = total, slots, echo
        self.start = self.last = self.since_result = time.perf_counter()
        self.walls: list[float] = []
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        """Print ``text`` (and restart the silence clock)."""
        with self._lock:
            self.last = time.perf_counter()
            self.echo(text)

    def finished(self, wall_s: float | None) -> None:
        """Count a finished run and its measured time."""
        with self._lock:
            self.walls.append(float(wall_s) if wall_s is not None else math.nan)
            self.since_result = time.perf_counter()

    @property
    def done(self) -> int:
        return len(self.walls)

    def eta(self) -> str:
        """``ETA 3m40s`` from the measured run times (less the time since the last run finished), or why there is
        none yet."""
        remaining = self.total - self.done
        if remaining <= 0:
            return "ETA 0s"
        measured = [w for w in self.walls if math.isfinite(w)]
        if not measured:
            return "ETA once a run has finished"
        if self.slots is None:  # runs of unknown concurrency: the rate so far
            return f"ETA {duration((time.perf_counter() - self.start) / self.done * remaining)}"
        left = sum(measured) / len(measured) * math.ceil(remaining / max(1, self.slots))
        return f"ETA {duration(left - (time.perf_counter() - self.since_result))}"

    def clock(self) -> str:
        """``elapsed 1m05s, ETA 3m40s``."""
        return f"elapsed {duration(time.perf_counter() - self.start)}, {self.eta()}"

    def status(self) -> str:
        running = min(self.slots or self.total - self.done, self.total - self.done)
        return f"study: {self.done}/{self.total} runs done, {running} running | {self.clock()}"

    @contextlib.contextmanager
    def ticking(self, every: float = HEARTBEAT_S) -> Iterator[None]:
        """Print :meth:`status` whenever nothing was printed for ``every`` seconds, while the block runs."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(min(1.0, every)):
                if time.perf_counter() - self.last >= every:
                    self.line(self.status())

        thread = threading.Thread(target=tick, daemon=True, name="study-progress")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
