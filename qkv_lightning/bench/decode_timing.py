"""``bench-decode``'s timing: the contenders (a variant's model with one K=V RoPE scheme), the prefill and timed
decoding steps of one contender (:class:`Runner`), and one cell of the grid (:func:`bench_cell`): every contender at
one context length and batch size, interleaved over rounds, with ratios to ``QKV`` (or ``--baseline``)."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from qkv_lightning.bench.decode_memory import bytes_per_decoded_token
from qkv_lightning.bench.decode_tables import baseline_row
from qkv_lightning.bench.memory import PeakMemory
from qkv_lightning.bench.timing import percentile, synchronize
from qkv_lightning.nn.decoding import StaticDecoder
from qkv_lightning.nn.gpt import GPT
from qkv_lightning.nn.kv_cache import ROPE_KEYS_DEFAULT

if TYPE_CHECKING:
    from qkv_lightning.variants import Variant


@dataclasses.dataclass
class Contender:
    """One line of the tables: a variant's model with one K=V RoPE scheme."""

    label: str
    variant: Variant
    model: GPT
    rope_keys: str

    @property
    def kv_shared(self) -> bool:
        return any(block.attn.kv_shared for block in self.model.blocks)



def contenders_of(variants: Sequence[Variant], models: dict[str, GPT], schemes: Sequence[str]) -> list[Contender]:
    """A contender per variant, and per RoPE scheme for the K=V variants with rotary positions (the default scheme
    keeps the variant's plain label; the others are labelled ``Q-K=V [copy]`` and so on)."""
    out = []
    for variant in variants:
        model = models[variant.label]
        rope = model.config.position == "rope" and any(block.attn.kv_shared for block in model.blocks)
        for scheme in schemes if rope else [ROPE_KEYS_DEFAULT]:
            label = variant.label if scheme == ROPE_KEYS_DEFAULT else f"{variant.label} [{scheme}]"
            out.append(Contender(label, variant, model, scheme))
    return out


class Runner:
    """Prefill and timed decoding steps of one contender in one cell; keeps its cache between rounds."""

    def __init__(self, contender: Contender, prompt: torch.Tensor, new_tokens: int, cache: str, compiled: bool,
                 device: torch.device) -> None:
        self.contender, self.prompt, self.new_tokens, self.device = contender, prompt, new_tokens, device
        self.capacity = prompt.shape[1] + new_tokens
        self.static = cache == "static"
        self.decoder = None
        self.step_fn: Callable | None = None
        if self.static:
            self.decoder = StaticDecoder(contender.model, self.capacity, rope_keys=contender.rope_keys,
                                         workspace=not compiled)
            self.step_fn = self.decoder.step
            if compiled:
                mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on GPUs
                self.step_fn = torch.compile(self.decoder.step, mode=mode, dynamic=False)
        self.state: Any = None
        self.first_token: torch.Tensor | None = None
        self.cache_bytes = 0

    def prefill(self) -> float:
        """Run the prompt (timed), keep the cache and the first token; returns seconds."""
        model = self.contender.model
        self.state = None
        synchronize(self.device)
        start = time.perf_counter()
        if self.static:
            logits, self.state = self.decoder.prefill(self.prompt)
        else:
            self.state = model.new_caches(self.prompt.shape[0], self.capacity, self.contender.rope_keys)
            logits = model.logits(model.hidden(self.prompt, self.state)[0][:, -1:])[:, 0]
        self.first_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        tensors = self.state if self.static else [t for c in self.state for t in c.buffers
                                                  + ([] if c.rotated is None else [c.rotated])]
        self.cache_bytes = sum(t.numel() * t.element_size() for t in tensors)
        return seconds

    def decode(self) -> list[float]:
        """``new_tokens - 1`` greedy steps after the prefilled prompt (the cache rewound to it); seconds of each."""
        model, context = self.contender.model, self.prompt.shape[1]
        token, times = self.first_token, []
        if not self.static:
            for cache in self.state:
                cache.length = context
        for i in range(self.new_tokens - 1):
            synchronize(self.device)
            start = time.perf_counter()
            if self.static:
                logits, self.state = self.step_fn(token, torch.tensor([context + i], device=self.device), self.state)
            else:
                logits = model.logits(model.hidden(token, self.state)[0])[:, 0]
            token = logits.argmax(dim=-1, keepdim=True)
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        return times



def bench_cell(contenders: list[Contender], context: int, batch: int, args: argparse.Namespace, device: torch.device,
               progress: Any) -> list[dict[str, Any]]:
    """Every contender at one (context, batch), interleaved over ``args.rounds`` rounds."""
    vocab = contenders[0].model.config.vocab_size
    generator = torch.Generator().manual_seed(context * 1000 + batch)
    prompt = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
    runners = {c.label: Runner(c, prompt, args.new_tokens, args.cache, args.compile, device) for c in contenders}
    prefill_s: dict[str, list[float]] = {name: [] for name in runners}
    steps_s: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, int | None] = {}
    with torch.inference_mode():  # prefills (timed) in the first rounds; warm-up rounds only decode, untimed
        for round_index in range(args.warmup + args.rounds):
            for name, runner in runners.items():
                if round_index < args.prefill_rounds:
                    with PeakMemory(device) as peak:
                        prefill_s[name].append(runner.prefill())
                        steps = runner.decode()
                    if name not in peaks or (peak.peak or 0) > (peaks[name] or 0):
                        peaks[name] = peak.peak
                else:
                    steps = runner.decode()
                if round_index >= args.warmup:
                    steps_s[name] += steps
                progress.update(1)
    rows = []
    for c in contenders:
        r = runners[c.label]
        steps = steps_s[c.label]
        median = statistics.median(steps)
        read = bytes_per_decoded_token(c.model, c.rope_keys, context, r.capacity, batch)
        rows.append({
            "name": c.label, "variant": c.variant.label, "rope_keys": c.rope_keys if c.kv_shared else None,
            "context": context, "batch": batch,
            "prefill_s": statistics.median(prefill_s[c.label]),
            "prefill_tokens_per_sec": batch * context / statistics.median(prefill_s[c.label]),
            "decode_tokens_per_sec": batch / median,
            "tpot_median_ms": 1e3 * median, "tpot_p90_ms": 1e3 * percentile(steps, 0.9),
            "steps_timed": len(steps),
            "kv_cache_bytes": r.cache_bytes,
            "kv_cache_bytes_per_token": r.cache_bytes // (batch * r.capacity),
            "peak_memory_bytes": peaks.get(c.label),
            "bytes_read_per_token": read,
            "implied_gb_per_sec": read * batch / median / 1e9,
        })
    ref = baseline_row(rows, args.baseline)
    for row in rows:
        row["decode_ratio"] = row["decode_tokens_per_sec"] / ref["decode_tokens_per_sec"]
        row["tpot_ratio"] = row["tpot_median_ms"] / ref["tpot_median_ms"]
        row["prefill_ratio"] = row["prefill_tokens_per_sec"] / ref["prefill_tokens_per_sec"]
        row["kv_bytes_ratio"] = row["kv_cache_bytes"] / ref["kv_cache_bytes"]
    del runners
    return rows
