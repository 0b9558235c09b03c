"""``bench-decode --serve``: a serving-style loop per variant, many requests of mixed prompt lengths through the slots
of one static cache, a finished request's slot refilled at once (continuous batching), with throughput and
latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from qkv_lightning.bench.decode_timing import Contender
from qkv_lightning.bench.timing import percentile, synchronize
from qkv_lightning.nn.decoding import StaticDecoder
from qkv_lightning.nn.kv_cache import parse_rope_keys


def serve(contender: Contender, prompt_lens: list[int], new_tokens: int, slots: int, device: torch.device,
          seed: int = 0) -> dict[str, Any]:
    """Serving-style loop: every request (prompt of the given length, ``new_tokens`` greedy tokens) waits from the
    start; ``slots`` sequences decode together through one static cache, and a finished request's slot is refilled
    at once with the next request's prefill (continuous batching). Latency counts from the start."""
    model = contender.model
    capacity = max(prompt_lens) + new_tokens
    rope_keys = contender.rope_keys if parse_rope_keys(contender.rope_keys, capacity) in (0, capacity) else "on_read"
    decoder = StaticDecoder(model, capacity, rope_keys=rope_keys, workspace=True)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    queue = [torch.randint(0, vocab, (1, n), generator=generator).to(device) for n in prompt_lens]
    pending = list(range(len(queue)))
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    owner = [-1] * slots
    left = [0] * slots
    pos = torch.zeros(slots, dtype=torch.long, device=device)
    tokens = torch.zeros(slots, 1, dtype=torch.long, device=device)
    generated = 0
    with torch.inference_mode():
        cache = decoder.new_cache(slots)
        synchronize(device)
        start = time.perf_counter()
        while pending or any(o >= 0 for o in owner):
            for slot in range(slots):
                if owner[slot] >= 0 or not pending:
                    continue
                request = pending.pop(0)
                prompt = queue[request]
                logits, filled = decoder.prefill(prompt)
                for target, source in zip(cache, filled, strict=True):
                    target[slot : slot + 1, :, : prompt.shape[1]] = source[:, :, : prompt.shape[1]]
                tokens[slot] = logits.argmax(dim=-1)
                pos[slot] = prompt.shape[1]
                owner[slot], left[slot] = request, new_tokens - 1
                synchronize(device)
                first[request] = time.perf_counter() - start
                generated += 1
                if left[slot] == 0:
                    done[request], owner[slot] = first[request], -1
            if not any(o >= 0 for o in owner):
                continue
            logits, cache = decoder.step(tokens, pos, cache)
            tokens = logits.argmax(dim=-1, keepdim=True)
            synchronize(device)
            now = time.perf_counter() - start
            for slot in range(slots):
                if owner[slot] < 0:
                    continue
                generated += 1
                pos[slot] += 1
                left[slot] -= 1
                if left[slot] == 0:
                    done[owner[slot]], owner[slot] = now, -1
        total = time.perf_counter() - start
    latency = list(done.values())
    ttft = list(first.values())
    return {"name": contender.label, "variant": contender.variant.label, "requests": len(queue), "slots": slots,
            "new_tokens": new_tokens,
            "generated_tokens": generated, "seconds": total, "tokens_per_sec": generated / total,
            "requests_per_sec": len(queue) / total,
            "latency_median_s": statistics.median(latency), "latency_p90_s": percentile(latency, 0.9),
            "ttft_median_s": statistics.median(ttft), "ttft_p90_s": percentile(ttft, 0.9),
            "cache_bytes": decoder.cache_bytes(slots)}
