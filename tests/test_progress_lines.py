"""Progress where a person waits: bench prints one line per contender and round (with the time it measured)."""

from __future__ import annotations

import re

import torch

from qkv_lightning.bench.timing import interleaved_samples


def test_bench_timing_reports_each_contender_and_round_with_the_measured_time():
    calls: list[str] = []
    steps = {"QKV": lambda: calls.append("QKV"), "Q-K=V": lambda: calls.append("Q-K=V")}
    lines: list[str] = []
    samples = interleaved_samples(steps, repeats=3, warmup=2, device=torch.device("cpu"), progress=lines.append)
    assert calls == ["QKV"] * 2 + ["Q-K=V"] * 2 + ["QKV", "Q-K=V"] * 3  # warm-up, then round-robin
    assert [line.split(" (")[0] for line in lines[:2]] == ["bench step: warm-up QKV", "bench step: warm-up Q-K=V"]
    rounds = [re.fullmatch(r"bench step: round (\d)/3 (\S+) ([\d.]+) ms", line) for line in lines[2:]]
    assert all(rounds) and len(rounds) == 6
    assert [(int(m.group(1)), m.group(2)) for m in rounds] == [(r, n) for r in (1, 2, 3) for n in ("QKV", "Q-K=V")]
    for m in rounds:  # each line carries the time that was recorded for that contender and round
        assert float(m.group(3)) == round(1e3 * samples[m.group(2)][int(m.group(1)) - 1], 1)
