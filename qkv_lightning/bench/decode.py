"""``bench-decode``: prefill and KV-cached decoding of every variant over a grid of context lengths and batch sizes.

Run: ``python cli.py bench-decode --config configs/bench/decode-gpt2-small.yaml [--contexts 256 1024 4096]
[--batch_sizes 1 8] [--variants QKV Q-K=V] [--n_kv_heads 4 1] [--rope_keys on_read copy window:1024]
[--cache dynamic|static] [--compile] [--memory_budget 80GB] [--serve] [--out results/]``.

Every cell (context, batch) builds one prompt of ``context`` random tokens per sequence and, for each contender
(a variant, and for K=V variants with RoPE each ``--rope_keys`` scheme), times the prefill and ``--new_tokens``
greedy decoding steps, every step on its own; contenders run round-robin in ``--rounds`` rounds, so that drifts in
machine load hit all alike, and ratios to ``QKV`` come from the same rounds. A cell gives prefill tokens/s, decode
tokens/s, time per output token (median and p90 over all timed steps), the KV cache's bytes (measured on the cache
tensors), the peak memory above what was resident before (CUDA allocator peak; on Linux CPUs the peak resident set,
reset per contender), and the bytes a decoding step must read per generated token in closed form (weights once per
step, shared by the batch, plus every cached tensor), with the bandwidth that implies.

``--memory_budget`` adds, per contender and context, the largest batch whose weights, static cache and one decoding
step fit in the budget: computed in closed form, then checked by allocating it (in a child process whose data
segment the kernel limits to the budget on CPUs; against the CUDA allocator's peak on GPUs), with one more sequence
checked not to fit. ``--serve`` runs a serving-style loop per variant: many requests of mixed prompt lengths
through ``--serve_slots`` slots of one static cache, a finished request's slot refilled at once (continuous
batching), with throughput and latency.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qkv_lightning.bench.timing import synchronize  # no Lightning import: the memory probe's child starts fast
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import ROPE_KEYS_DEFAULT, AttentionConfig, parse_rope_keys
from qkv_lightning.nn.cost import attention_shapes, kv_cache_bytes_per_token
from qkv_lightning.nn.decoding import StaticDecoder
from qkv_lightning.nn.gpt import GPT, GPTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FIT_MARK = "BENCH_DECODE_FIT "
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

if TYPE_CHECKING:
    from qkv_lightning.variants import Variant



# ------------------------------------------------------------------------------------------------ contenders
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


def parse_bytes(text: str) -> int:
    """``80GB``, ``512MiB``, ``1e9`` -> bytes.

    Raises:
        ConfigError: naming ``--memory_budget``.
    """
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGIB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if value <= 0 or unit not in UNITS:
        raise ConfigError(f"--memory_budget={text!r} is not an amount of memory: write e.g. 80GB, 512MiB or 1e9.")
    return int(value * UNITS[unit])


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


def param_bytes(model: GPT) -> int:
    """Bytes of the distinct parameters (tied ones once): what one decoding step reads of the weights."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def stored_bytes_per_position(model: GPT, rope_keys: str, capacity: int) -> int:
    """Cache bytes one sequence stores per position, every layer (the rotated copy of a K=V cache included)."""
    c = model.config
    element = model.embed.weight.element_size()
    copied = parse_rope_keys(rope_keys, capacity) / capacity if c.position == "rope" else 0.0
    shapes = attention_shapes(c.d_model, c.n_head, model.trunk.attention, c.bias, c.n_layer)
    return int(sum(kv_cache_bytes_per_token(shape, element, copied=copied) for shape in shapes))


def bytes_per_decoded_token(model: GPT, rope_keys: str, context: int, capacity: int, batch: int) -> int:
    """Closed form: bytes a decoding step reads per generated token at ``context`` cached tokens: the weights once
    per step (shared by the batch) plus each sequence's cached tensors. Rotating K=V keys on read adds traffic on
    top (the workspace), not counted here."""
    return int(param_bytes(model) / batch + context * stored_bytes_per_position(model, rope_keys, capacity))


# ------------------------------------------------------------------------------------------------- memory
def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block of work above what was allocated (CUDA) or resident (CPU, Linux) when it began.

    On CPUs the kernel's peak resident set is reset through ``/proc/self/clear_refs``; None where that is not
    possible."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0
        self.peak: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.before = _status("VmRSS") or 0
            except OSError:
                self.before = -1
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self.before >= 0:
            high = _status("VmHWM")
            self.peak = None if high is None else max(0, high - self.before)


def step_activation_bytes(model: GPT, capacity: int, rope_keys: str) -> int:
    """Closed-form bytes one sequence needs beyond the cache during a static decoding step: the logits, the widest
    hidden activations, the attention scores over the capacity, and the workspace keys are rotated into (one
    layer's keys, K=V with RoPE rotated on read) or, otherwise, the attention kernel's transient of about as much."""
    c = model.config
    element = model.embed.weight.element_size()
    attn = model.blocks[0].attn
    workspace = 0
    if attn.kv_shared and c.position == "rope" and parse_rope_keys(rope_keys, capacity) == 0:
        workspace = attn.n_kv_heads * capacity * attn.head_dim * element
    logits = 2 * c.vocab_size * max(element, 4)  # the logits and their float32 copy
    hidden = 4 * (c.mlp_width + 3 * c.d_model) * element
    scores = 3 * attn.n_head * capacity * 4
    if not workspace:  # the attention kernel's transient of about one layer's keys (measured on CPUs)
        workspace = attn.n_kv_heads * capacity * attn.head_dim * element
    return workspace + logits + hidden + scores


def computed_largest_batch(model: GPT, capacity: int, rope_keys: str, budget: int) -> int:
    """The largest batch whose weights, static cache (``capacity`` tokens) and one decoding step fit ``budget``, in
    closed form."""
    free = budget - param_bytes(model)
    per_sequence = capacity * stored_bytes_per_position(model, rope_keys, capacity)
    per_sequence += step_activation_bytes(model, capacity, rope_keys)
    return max(0, free // per_sequence)


def model_spec(model: GPT) -> dict[str, Any]:
    """The configs that rebuild ``model``'s shapes in a child process (plain data)."""
    attention = model.trunk.attention  # the whole network's (a schedule, cross-layer sharing)
    return {"network": dataclasses.asdict(model.config), "attention": dataclasses.asdict(attention),
            "dtype": str(model.embed.weight.dtype).removeprefix("torch.")}


def fits(spec: dict[str, Any], batches: Sequence[int], capacity: int, rope_keys: str, budget: int,
         device: torch.device) -> list[bool]:
    """Whether each of ``batches`` fits ``budget``: weights, a static cache of ``capacity`` tokens and one decoding
    step, allocated for real. On CUDA the allocator's peak is compared with the budget; on CPUs a child process
    runs them with its data segment limited (``RLIMIT_DATA``) to what it held before the caches plus the budget
    less the weights, so that an allocation past the budget fails."""
    if device.type == "cuda":
        model = rebuild(spec, device)
        out = []
        for batch in batches:
            try:
                with PeakMemory(device) as peak:
                    fit_step(model, batch, capacity, rope_keys)
                out.append(param_bytes(model) + (peak.peak or 0) <= budget)
            except torch.cuda.OutOfMemoryError:
                out.append(False)
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
        return out
    # one fresh process per batch (what an earlier, larger attempt leaves allocated would count against the next);
    # one thread and one malloc arena; every allocation of 64 KiB or more mapped and unmapped on its own, so that
    # the data segment follows the live tensors (no freed memory kept for reuse)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = []
    for batch in batches:
        payload = json.dumps({"spec": spec, "batches": [batch], "capacity": capacity, "rope_keys": rope_keys,
                              "budget": budget})
        result = subprocess.run([sys.executable, "-m", "qkv_lightning.bench.decode", "--fit_probe", payload],
                                capture_output=True, text=True, env=env, check=False)
        lines = [line for line in result.stdout.splitlines() if line.startswith(FIT_MARK)]
        if not lines:
            raise RuntimeError(f"the memory probe failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
        out += json.loads(lines[-1][len(FIT_MARK):])["fits"]
    return out


def rebuild(spec: dict[str, Any], device: torch.device) -> GPT:
    network = GPTConfig(**spec["network"])
    model = GPT(network, AttentionConfig(**spec["attention"]))
    return model.to(device=device, dtype=DTYPES[spec["dtype"]]).eval()


def fit_step(model: GPT, batch: int, capacity: int, rope_keys: str) -> None:
    """Allocate a static cache for ``batch`` sequences and run one decoding step at its last position."""
    device = model.embed.weight.device
    decoder = StaticDecoder(model, capacity, rope_keys=rope_keys, workspace=True)
    with torch.inference_mode():
        cache = decoder.new_cache(batch)
        for tensor in cache:
            tensor.fill_(0.5)  # touch every page
        token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        decoder.step(token, torch.tensor([capacity - 1], device=device), cache)
        synchronize(device)


def fit_probe(payload: str) -> None:
    """The child of :func:`fits` on CPUs: build the model, warm up, limit the data segment, then allocate and step
    each batch in turn (each freed before the next); prints which fitted."""
    import gc

    torch.set_num_threads(1)
    job = json.loads(payload)
    model = rebuild(job["spec"], torch.device("cpu"))
    fit_step(model, 1, job["capacity"], job["rope_keys"])  # lazily allocated buffers, once
    gc.collect()
    held = _status("VmData")
    if held is None:
        raise RuntimeError("the CPU memory probe needs Linux's /proc/self/status")
    limit = held + job["budget"] - param_bytes(model)
    results = []
    if limit > held:
        import resource  # POSIX only: imported here, so that the module imports on Windows

        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    for batch in job["batches"]:
        ok = limit > held
        if ok:
            try:
                fit_step(model, batch, job["capacity"], job["rope_keys"])
            except (RuntimeError, MemoryError):
                ok = False
            gc.collect()
        results.append(ok)
    print(FIT_MARK + json.dumps({"fits": results, "held": held, "limit": limit}), flush=True)


def largest_batch(model: GPT, capacity: int, rope_keys: str, budget: int, device: torch.device) -> dict[str, Any]:
    """The computed largest batch, then checked by allocating batches around it until one fits and one more does
    not (fitting is taken as monotonic in the batch)."""
    spec = model_spec(model)
    computed = computed_largest_batch(model, capacity, rope_keys, budget)
    best, fail = 0, None  # the largest batch seen to fit, the smallest seen not to
    ask = [max(1, computed), max(1, computed) + 1]
    while True:
        for batch, ok in zip(ask, fits(spec, ask, capacity, rope_keys, budget, device), strict=True):
            if ok:
                best = max(best, batch)
            elif fail is None or batch < fail:
                fail = batch
        if fail is not None and fail <= best:
            raise RuntimeError(f"memory use is not monotonic in the batch here ({best} fits, {fail} does not)")
        if fail == best + 1:
            break
        if fail is None:  # gallop up, then bisect
            ask = [max(best + 1, round(best * 1.25))]
        elif best == 0 and fail > 1:
            ask = [max(1, fail // 2)]
        else:
            ask = [(best + fail) // 2] if fail - best > 2 else [best + 1]
    return {"computed": int(computed), "checked": int(best), "capacity": capacity,
            "cache_bytes": int(best * capacity * stored_bytes_per_position(model, rope_keys, capacity))}


# ------------------------------------------------------------------------------------------------ decoding
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


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


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
    ref = next((row for row in rows if row["name"] == "QKV"), rows[0])
    for row in rows:
        row["decode_ratio"] = row["decode_tokens_per_sec"] / ref["decode_tokens_per_sec"]
        row["tpot_ratio"] = row["tpot_median_ms"] / ref["tpot_median_ms"]
        row["prefill_ratio"] = row["prefill_tokens_per_sec"] / ref["prefill_tokens_per_sec"]
        row["kv_bytes_ratio"] = row["kv_cache_bytes"] / ref["kv_cache_bytes"]
    del runners
    return rows


# ------------------------------------------------------------------------------------------------- serving
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
    return {"name": contender.label, "requests": len(queue), "slots": slots, "new_tokens": new_tokens,
            "generated_tokens": generated, "seconds": total, "tokens_per_sec": generated / total,
            "requests_per_sec": len(queue) / total,
            "latency_median_s": statistics.median(latency), "latency_p90_s": percentile(latency, 0.9),
            "ttft_median_s": statistics.median(ttft), "ttft_p90_s": percentile(ttft, 0.9),
            "cache_bytes": decoder.cache_bytes(slots)}


# ------------------------------------------------------------------------------------------------- outputs
def format_tables(result: dict[str, Any], markdown: bool) -> str:
    """The per-cell table (one block per batch size), the memory-budget table and the serving table."""
    from qkv_lightning.bench.report import render_table

    s = result["setup"]
    load = s["load_average_before"], s["load_average_after"]
    blocks = [
        f"{s['command']}\n{s['network']}: {s['n_layer']} layers, width {s['d_model']}, {s['n_head']} heads, "
        f"position {s['position']}, vocabulary {s['vocab_size']}; {s['dtype']} on {s['device']} ({s['device_name']}), "
        f"torch {s['torch']}, {s['threads']} threads, load average {load[0]} -> {load[1]}; {s['cache']} cache"
        f"{', compiled step' if s['compile'] else ''}; {s['new_tokens']} new tokens (first from the prefill), "
        f"{s['rounds']} interleaved decoding rounds after {s['warmup']} warm-up; prefill timed in the first "
        f"{s['prefill_rounds']}."
    ]
    header = ["variant", "context", "prefill tok/s", "x QKV", "decode tok/s", "x QKV", "TPOT ms (p90)", "KV MiB",
              "x QKV", "peak MiB", "read MB/token", "GB/s"]
    for batch in s["batch_sizes"]:
        table = [header]
        for row in (r for r in result["cells"] if r["batch"] == batch):
            table.append([
                row["name"], str(row["context"]), f"{row['prefill_tokens_per_sec']:,.0f}",
                f"{row['prefill_ratio']:.3f}", f"{row['decode_tokens_per_sec']:,.2f}", f"{row['decode_ratio']:.3f}",
                f"{row['tpot_median_ms']:.1f} ({row['tpot_p90_ms']:.1f})", f"{row['kv_cache_bytes'] / 2**20:,.1f}",
                f"{row['kv_bytes_ratio']:.3f}",
                "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:,.0f}",
                f"{row['bytes_read_per_token'] / 1e6:,.1f}", f"{row['implied_gb_per_sec']:.2f}",
            ])
        blocks.append(f"batch {batch}:\n" + render_table(table, markdown))
    if result.get("memory_budget"):
        budget = result["memory_budget"]
        table = [["variant", "context", "largest batch (computed)", "checked", "cache GiB at it"]]
        for row in budget["rows"]:
            table.append([row["name"], str(row["context"]), str(row["computed"]), str(row["checked"]),
                          f"{row['cache_bytes'] / 2**30:.3f}"])
        blocks.append(f"memory budget {budget['bytes'] / 1e9:g} GB (weights + static cache + one decoding step; "
                      "checked: it fits and one more sequence does not):\n" + render_table(table, markdown))
    if result.get("serving"):
        sv = result["serving"]
        table = [["variant", "tokens/s", "x QKV", "requests/s", "latency s median (p90)", "TTFT s median (p90)",
                  "cache MiB"]]
        ref = next((r for r in sv["rows"] if r["name"] == "QKV"), sv["rows"][0])
        for row in sv["rows"]:
            table.append([row["name"], f"{row['tokens_per_sec']:,.1f}",
                          f"{row['tokens_per_sec'] / ref['tokens_per_sec']:.3f}", f"{row['requests_per_sec']:.3f}",
                          f"{row['latency_median_s']:.2f} ({row['latency_p90_s']:.2f})",
                          f"{row['ttft_median_s']:.2f} ({row['ttft_p90_s']:.2f})",
                          f"{row['cache_bytes'] / 2**20:,.1f}"])
        blocks.append(f"serving: {sv['requests']} requests, prompts {sv['prompt_lens'][0]}..{sv['prompt_lens'][1]} "
                      f"tokens, {sv['new_tokens']} new tokens each, {sv['slots']} slots (continuous batching); median "
                      f"of {sv['rounds']} interleaved rounds:\n" + render_table(table, markdown))
    return "\n\n".join(blocks)


def plot(result: dict[str, Any], path: Path) -> None:
    """Decode tokens/s and KV-cache bytes against the context length, one line per contender (first batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = result["setup"]["batch_sizes"][0]
    rows = [r for r in result["cells"] if r["batch"] == batch]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        contexts = [r["context"] for r in mine]
        speed.plot(contexts, [r["decode_tokens_per_sec"] for r in mine], marker="o", label=name)
        memory.plot(contexts, [r["kv_cache_bytes"] / 2**20 for r in mine], marker="o", label=name)
    for axis, title in ((speed, f"decode tokens/s (batch {batch})"), (memory, "KV cache MiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    memory.set_yscale("log", base=2)
    speed.legend(fontsize=8)
    s = result["setup"]
    fig.suptitle(f"{s['n_layer']} layers, width {s['d_model']}, {s['position']} positions, {s['dtype']}, "
                 f"{s['device_name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    from qkv_lightning.bench.common import add_config_arguments

    p = argparse.ArgumentParser(
        prog="cli.py bench-decode", allow_abbrev=False,
        description="Prefill and KV-cached decoding of every variant of a language-model config over context lengths "
        "and batch sizes, interleaved, with ratios to QKV. Other --model... options change the config.")
    add_config_arguments(p)
    p.add_argument("--labels", nargs="+", default=None,
                   help="keep only these of the variants' labels, e.g. QKV QKV_kv4 Q-K=V Q-K=V_kv1")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024], help="prompt tokens in the cache")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1], help="sequences decoded together")
    p.add_argument("--new_tokens", type=int, default=16, help="tokens generated per sequence (the first by prefill)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per cell")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per cell first")
    p.add_argument("--prefill_rounds", type=int, default=1,
                   help="first rounds that also prefill, timed (the others rewind the cache to the prompt and decode)")
    p.add_argument("--rope_keys", nargs="+", default=[ROPE_KEYS_DEFAULT],
                   help="K=V variants with RoPE: on_read (half the cache), copy (rotated copy: QKV's size), "
                   "window:W; one contender each")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="the growing KVCache, or a static preallocated cache (fixed shapes; masked attention)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the static-cache decoding step (CUDA graphs on GPUs); implies --cache static")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights, activations and cache")
    p.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--memory_budget", default=None,
                   help="e.g. 80GB: the largest batch per contender and context, computed and checked")
    p.add_argument("--serve", action="store_true", help="also run the serving-style loop per variant")
    p.add_argument("--serve_requests", type=int, default=16)
    p.add_argument("--serve_prompt_lens", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX"))
    p.add_argument("--serve_new_tokens", type=int, default=32)
    p.add_argument("--serve_slots", type=int, default=4, help="sequences decoding together")
    p.add_argument("--serve_rounds", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for result.json, table.md and decode.png (must not hold them)")
    p.add_argument("--progress", type=lambda s: s.lower() not in ("0", "false", "no"), default=True,
                   help="a progress bar on stderr (default true)")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    return p


def _check(args: argparse.Namespace, max_len: int) -> None:
    for name in ("new_tokens", "rounds", "prefill_rounds", "serve_requests", "serve_slots", "serve_rounds"):
        least = 2 if name == "new_tokens" else 1
        if getattr(args, name) < least:
            raise ConfigError(f"--{name}={getattr(args, name)} must be at least {least}.")
    if args.prefill_rounds > args.rounds + args.warmup:
        raise ConfigError(f"--prefill_rounds={args.prefill_rounds} cannot exceed --rounds plus --warmup.")
    if args.warmup < 0 or min(args.contexts) < 1 or min(args.batch_sizes) < 1:
        raise ConfigError("--warmup must be at least 0, and --contexts and --batch_sizes at least 1.")
    if max(args.contexts) + args.new_tokens > max_len:
        raise ConfigError(f"--contexts up to {max(args.contexts)} + --new_tokens {args.new_tokens} exceed "
                          f"network.max_seq_len={max_len}; raise --model.network.max_seq_len.")
    for scheme in args.rope_keys:
        kept = parse_rope_keys(scheme, 1 << 30)
        if args.cache == "static" and kept not in (0, 1 << 30):
            raise ConfigError(f"--rope_keys {scheme}: the static cache takes on_read or copy.")
    lo, hi = args.serve_prompt_lens
    if args.serve and not 1 <= lo <= hi or (args.serve and hi + args.serve_new_tokens > max_len):
        raise ConfigError(f"--serve_prompt_lens {lo} {hi} must be increasing, at least 1, and with "
                          f"--serve_new_tokens fit network.max_seq_len={max_len}.")


def main(argv: Sequence[str] | None = None) -> int:
    """``bench-decode``: measure, print, and write the outputs."""
    argv = list(argv or [])
    if argv[:1] == ["--fit_probe"]:
        fit_probe(argv[1])
        return 0
    args, overrides = parser().parse_known_args(argv)
    if args.compile:
        args.cache = "static"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out) if args.out else None
    names = ("result.json", "table.md", "decode.png")
    if out is not None and any((out / n).exists() for n in names):
        raise ConfigError(f"--out {out} already holds results ({', '.join(n for n in names if (out / n).exists())});"
                          " pick another folder (nothing is overwritten).")
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    from qkv_lightning.bench.common import load_task, variants_of
    from qkv_lightning.bench.steps import build

    loaded = load_task(args.config, overrides, args.data_spec)
    task = loaded.task
    if not task.autoregressive:
        raise ConfigError("bench-decode needs a language-model config (model.class_path: ...LanguageModel).")
    max_len = task.resolved_network_config(loaded.data_spec).max_seq_len
    _check(args, max_len)
    variants = variants_of(task.attention_config, task.network_config.n_head, args.variants, args.n_kv_heads)
    if args.labels:
        unknown = [name for name in args.labels if name not in [v.label for v in variants]]
        if unknown:
            raise ConfigError(f"--labels {' '.join(unknown)}: not among the variants {[v.label for v in variants]}.")
        variants = [v for v in variants if v.label in args.labels]
    if "QKV" not in [v.label for v in variants]:
        raise ConfigError("bench-decode compares with QKV: keep QKV among --variants.")
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    models = {}
    for v in variants:
        network = build(task, v.attention_config(task.attention_config), device, "32-true").network.eval()
        network.fuse()  # depth-factorised projections as one matmul each, as they are served
        models[v.label] = network.to(dtype)
    contenders = contenders_of(variants, models, list(dict.fromkeys(args.rope_keys)))
    cells = [(c, b) for b in args.batch_sizes for c in args.contexts]
    total = len(cells) * (args.warmup + args.rounds) * len(contenders)
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc="bench-decode", disable=not args.progress, file=sys.stderr)
    rows = []
    for context, batch in cells:
        progress.set_postfix_str(f"context {context}, batch {batch}")
        rows += bench_cell(contenders, context, batch, args, device, progress)
    progress.close()
    memory = None
    if budget:
        budget_rows = []
        for context in args.contexts:
            for c in contenders:
                found = largest_batch(c.model, context + args.new_tokens, c.rope_keys, budget, device)
                budget_rows.append({"name": c.label, "context": context, **found})
        memory = {"bytes": budget, "rows": budget_rows}
    serving = None
    if args.serve:
        lo, hi = args.serve_prompt_lens
        lens = torch.randint(lo, hi + 1, (args.serve_requests,), generator=torch.Generator().manual_seed(1)).tolist()
        per_variant = [c for c in contenders if c.rope_keys == args.rope_keys[0] or not c.kv_shared]
        runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in per_variant}
        for _ in range(args.serve_rounds):
            for c in per_variant:
                runs[c.label].append(serve(c, lens, args.serve_new_tokens, args.serve_slots, device))
        serving_rows = []
        for results in runs.values():
            serving_rows.append(sorted(results, key=lambda r: r["seconds"])[len(results) // 2])  # the median round
        serving = {"requests": args.serve_requests, "prompt_lens": [lo, hi], "new_tokens": args.serve_new_tokens,
                   "slots": args.serve_slots, "rounds": args.serve_rounds, "rows": serving_rows}
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    config = models["QKV"].config
    from qkv_lightning.bench.models import _cpu_name

    result = {
        "setup": {
            "command": "python cli.py bench-decode " + " ".join(argv), "network": "GPT", "n_layer": config.n_layer,
            "d_model": config.d_model, "n_head": config.n_head, "position": config.position,
            "vocab_size": config.vocab_size, "dtype": args.dtype, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average_before": load_before,
            "load_average_after": load_after, "cache": args.cache, "compile": args.compile,
            "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup,
            "prefill_rounds": args.prefill_rounds, "contexts": args.contexts, "batch_sizes": args.batch_sizes,
            "weights_bytes": param_bytes(models["QKV"]),
            "peak_memory": "CUDA allocator peak above the memory allocated before" if device.type == "cuda" else
            "peak resident set above the resident set before (all contenders' weights), reset per contender",
        },
        "cells": rows,
        "memory_budget": memory,
        "serving": serving,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        (out / "table.md").write_text(format_tables(result, markdown=True) + "\n")
        plot(result, out / "decode.png")
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(format_tables(result, markdown=args.format == "markdown"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
