"""``bench-decode``'s memory arithmetic and budget: the bytes a decoding step reads per generated token and the
cache bytes per position in closed form (the KV part from :func:`qkv_lightning.nn.cost.kv_cache_bytes_per_token`),
and the largest batch that fits a memory budget, computed in closed form and then checked by allocating it (in a
child process whose data segment is limited on CPUs, against the CUDA allocator's peak on GPUs)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch

from qkv_lightning.bench.memory import PeakMemory, proc_status  # no Lightning import: the probe's child starts fast
from qkv_lightning.bench.timing import synchronize
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.cost import attention_shapes, kv_cache_bytes_per_token
from qkv_lightning.nn.decoding import StaticDecoder
from qkv_lightning.nn.gpt import GPT, GPTConfig
from qkv_lightning.nn.kv_cache import parse_rope_keys

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FIT_MARK = "BENCH_DECODE_FIT "
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


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



def param_bytes(model: GPT) -> int:
    """Bytes of the distinct parameters (tied ones once): what one decoding step reads of the weights."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def stored_bytes_per_position(model: GPT, rope_keys: str, capacity: int) -> int:
    """Cache bytes one sequence stores per position, every layer: the one KV-bytes formula
    (:func:`~qkv_lightning.nn.cost.kv_cache_bytes_per_token`) of each layer's shape, the rotated copy of a K=V cache
    included."""
    c = model.config
    element = model.embed.weight.element_size()
    shapes = attention_shapes(c.d_model, c.n_head, model.trunk.attention, c.bias, c.n_layer)
    copied = parse_rope_keys(rope_keys, capacity) / capacity if c.position == "rope" else 0.0  # the rotated copy's
    total = 0  # share of the positions (K=V layers that rotate keys: kv_cache_bytes_per_token decides)
    for shape in shapes:
        total += kv_cache_bytes_per_token(shape, element, copied=copied)
    return int(total)


def bytes_per_decoded_token(model: GPT, rope_keys: str, context: int, capacity: int, batch: int) -> int:
    """Closed form: bytes a decoding step reads per generated token at ``context`` cached tokens: the weights once
    per step (shared by the batch) plus each sequence's cached tensors. Rotating K=V keys on read adds traffic on
    top (the workspace), not counted here."""
    return int(param_bytes(model) / batch + context * stored_bytes_per_position(model, rope_keys, capacity))



def step_activation_bytes(model: GPT, capacity: int) -> int:
    """Closed-form bytes one sequence needs beyond the cache during a static decoding step: the logits, the widest
    hidden activations, the attention scores over the capacity, and the workspace keys are rotated into (one
    layer's keys, K=V with RoPE rotated on read) or, otherwise, the attention kernel's transient of about as much."""
    c = model.config
    element = model.embed.weight.element_size()
    attn = model.blocks[0].attn
    # one layer's keys: the workspace K=V keys with RoPE are rotated into on read, or else the attention kernel's
    # transient of about as much (measured on CPUs)
    workspace = attn.n_kv_heads * capacity * attn.head_dim * element
    logits = 2 * c.vocab_size * max(element, 4)  # the logits and their float32 copy
    hidden = 4 * (c.mlp_width + 3 * c.d_model) * element
    scores = 3 * attn.n_head * capacity * 4
    return workspace + logits + hidden + scores


def computed_largest_batch(model: GPT, capacity: int, rope_keys: str, budget: int) -> int:
    """The largest batch whose weights, static cache (``capacity`` tokens) and one decoding step fit ``budget``, in
    closed form."""
    free = budget - param_bytes(model)
    per_sequence = capacity * stored_bytes_per_position(model, rope_keys, capacity)
    per_sequence += step_activation_bytes(model, capacity)
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
    held = proc_status("VmData")
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

