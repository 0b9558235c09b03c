"""The steps ``bench`` times: a training step, KV-cached decoding and a matrix product, each as a call with no
arguments, built for one variant on one device and precision; and the batch they run on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from qkv_lightning.bench.common import LoadedTask, task_variant
from qkv_lightning.bench.timing import interleaved_medians
from qkv_lightning.errors import ConfigError
from qkv_lightning.tasks.base import TaskModule

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a Lightning precision setting (nothing for 32-bit and bf16-true)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_precision(precision: str) -> str:
    """``precision`` as a string, if ``bench`` measures it.

    Raises:
        ConfigError: for another precision.
    """
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"bench measures precision {', '.join(PRECISIONS)}; got trainer.precision={precision!r}. Pass --precision."
        )
    return precision


def first_batch(loaded: LoadedTask, source: str, seed: int = 0) -> tuple:
    """One training batch: the datamodule's first (``source='config'``) or random contents of its shapes (the
    task's :meth:`~qkv_lightning.tasks.base.TaskModule.example_batch`)."""
    datamodule = loaded.datamodule
    if source == "random":
        batch_size = getattr(datamodule, "batch_size", None) or 8
        return loaded.task.example_batch(int(batch_size), torch.Generator().manual_seed(seed))
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return tuple(batch) if isinstance(batch, list | tuple) else (batch,)


def build(task: TaskModule, attention: Any, device: torch.device, precision: str) -> TaskModule:
    """A built, trainable copy of ``task`` with another attention variant, on ``device``."""
    variant = task_variant(task, attention)
    variant.configure_model()
    variant.to(device)
    if precision == "bf16-true":
        variant.to(torch.bfloat16)
    variant.train()
    return variant


def to_device(batch: tuple, device: torch.device, precision: str) -> tuple:
    """The batch's tensors on ``device`` (floating-point ones in bfloat16 for ``bf16-true``)."""
    moved = tuple(t.to(device) for t in batch)
    if precision == "bf16-true":
        moved = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in moved)
    return moved


def train_step(
    task: TaskModule, batch: tuple, precision: str, device: torch.device, clip: float | None
) -> Callable[[], None]:
    """One optimiser step, as Lightning's automatic optimisation does it: forward (loss), backward, gradient
    clipping by norm, AdamW step, scheduler step, zero_grad."""
    optimizer, scheduler = task.build_optimizer(total_steps=10**6)
    params = [p for p in task.parameters() if p.requires_grad]

    def step() -> None:
        with autocast(precision, device):
            loss = task.training_loss(batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def decode_step(task: TaskModule, batch_size: int, context: int, n_tokens: int, device: torch.device, precision: str):
    """Greedy decoding of ``n_tokens`` tokens with the KV cache after a prompt of ``context`` tokens; the prompt is
    run once, and every call rewinds the caches to it. Returns the call and the caches' bytes per token."""
    network = task.network
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, network.config.vocab_size, (batch_size, context), generator=generator).to(device)
    caches = network.new_caches(batch_size, context + n_tokens)
    with torch.inference_mode(), autocast(precision, device):
        network.hidden(prompt, caches)
    last = prompt[:, -1:]
    cache_bytes = sum(c.nbytes for c in caches) // (batch_size * (context + n_tokens))

    def step() -> None:
        for cache in caches:
            cache.length = context
        token = last
        with torch.inference_mode(), autocast(precision, device):
            for _ in range(n_tokens):
                hidden = network.hidden(token, caches)[0][:, -1:]  # (B, 1, C)
                token = network.logits(hidden)[:, 0].argmax(dim=-1, keepdim=True)  # (B, 1)

    return step, cache_bytes


GEMM = "GEMM"
"""Name of the matrix-multiply step among the timed training steps."""


def gemm_step(device: torch.device, dtype: torch.dtype, size: int) -> Callable[[], None]:
    """One ``size`` x ``size`` matrix product (2 size^3 FLOPs), written into a preallocated output."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def measure_gemm(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """The device's matrix-multiply throughput: median FLOP/s of ``size`` x ``size`` products after warm-up."""
    seconds = interleaved_medians({GEMM: gemm_step(device, dtype, size)}, repeats, 3, device)[GEMM]
    return 2 * size**3 / seconds
