"""Decoding with a static (preallocated) KV cache, as plain tensors: the form that compiles, replays as a CUDA graph
and exports.

:class:`StaticDecoder` wraps a :class:`~qkv_lightning.nn.gpt.GPT` with two entry points:

* :meth:`StaticDecoder.prefill`: prompt ids (B, T) -> last logits (B, V) and the cache tensors, each
  (B, H_kv, capacity, D), filled at positions 0 .. T-1;
* :meth:`StaticDecoder.step`: one token (B, 1), its position (1,) and the cache tensors -> logits (B, V) and the
  cache tensors after the step.

Each layer has one cache tensor for the K=V variants (Q-K=V, Q=K=V) and two (K, V) for the others; with RoPE and
``rope_keys=copy`` a K=V layer keeps a second, rotated, tensor (its rotated dimensions); with a decoupled rotary key
(``attention.rope_key_dim``) every layer keeps one more, the rotated key (B, 1, capacity, rope_key_dim). Every shape
depends on the capacity only, so a compiled step compiles once; positions past the current one are masked.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.cost import attention_shapes, kv_cache_bytes_per_token
from qkv_lightning.nn.gpt import GPT
from qkv_lightning.nn.kv_cache import ROPE_KEYS_DEFAULT, is_fused, parse_rope_keys


class StaticDecoder(nn.Module):
    """Prefill and decode-step graphs of a GPT with its KV cache as explicit tensors.

    Args:
        model: the decoder (in eval mode; its weights are shared, not copied).
        capacity: tokens the cache holds (prompt plus generated); at most ``network.max_seq_len``.
        rope_keys: K=V with RoPE: ``on_read`` (one tensor per layer) or ``copy`` (a rotated copy too); ignored
            otherwise. ``window:W`` is a dynamic-cache scheme only.
        inplace: steps write into the given cache tensors (eager, compiled); False returns new tensors (export).
        workspace: eager steps rotate cached keys into one preallocated tensor shared by the layers (no
            temporaries); leave False for compiled and exported graphs.
    """

    def __init__(
        self,
        model: GPT,
        capacity: int,
        rope_keys: str = ROPE_KEYS_DEFAULT,
        inplace: bool = True,
        workspace: bool = False,
    ) -> None:
        super().__init__()
        if capacity > model.config.max_seq_len:
            raise ConfigError(
                f"a static cache of {capacity} tokens exceeds network.max_seq_len={model.config.max_seq_len}; lower "
                "the context plus the new tokens, or raise network.max_seq_len."
            )
        self.model = model
        self.capacity = capacity
        self.uses_rope = model.config.position == "rope"
        rotated = parse_rope_keys(rope_keys, capacity) if self.uses_rope else 0
        if rotated not in (0, capacity) or (self.uses_rope and is_fused(rope_keys)):
            raise ConfigError(f"rope_keys={rope_keys!r}: a static cache takes on_read or copy (window:W and fused "
                              "are steps of the dynamic cache).")
        self.rope_keys = "copy" if rotated else "on_read"
        self.inplace = inplace
        self.use_workspace = workspace
        self._workspace: Tensor | None = None
        weight = model.embed.weight
        tables = model.rope(capacity, weight.device)
        self.register_buffer("cos", None if tables is None else tables[0], persistent=False)
        self.register_buffer("sin", None if tables is None else tables[1], persistent=False)

    @property
    def tables(self) -> tuple[Tensor, Tensor] | None:
        return None if self.cos is None else (self.cos, self.sin)

    def tensors_per_layer(self) -> list[int]:
        """Cache tensors of each layer (0 for a layer that reuses an earlier layer's K/V)."""
        return [len(shapes) for shapes in self.cache_shapes(1)]

    def cache_shapes(self, batch_size: int) -> list[list[tuple[int, ...]]]:
        """The shapes of each layer's cache tensors (:meth:`Attention.cache_shapes`)."""
        copy = self.rope_keys == "copy"
        return [block.attn.cache_shapes(batch_size, self.capacity, copy) for block in self.model.blocks]

    def new_cache(self, batch_size: int) -> list[Tensor]:
        """Zero cache tensors, flat over layers, each (B, H_kv, capacity, D) (see :meth:`cache_shapes`)."""
        weight = self.model.embed.weight
        shapes = [shape for layer in self.cache_shapes(batch_size) for shape in layer]
        return [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for shape in shapes]

    def cache_bytes(self, batch_size: int) -> int:
        """Bytes of the cache tensors for ``batch_size`` sequences: each layer's
        :func:`~qkv_lightning.nn.cost.kv_cache_bytes_per_token` with its tensors (:meth:`tensors_per_layer`), times
        the positions and the sequences."""
        c = self.model.config
        shapes = attention_shapes(c.d_model, c.n_head, self.model.trunk.attention, c.bias, c.n_layer)
        element = self.model.embed.weight.element_size()
        copied = 1.0 if self.rope_keys == "copy" else 0.0
        per_token = sum(kv_cache_bytes_per_token(shape, element, copied=copied) for shape in shapes)
        return batch_size * self.capacity * per_token

    def prefill(self, idx: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the prompt ``idx`` (B, T); returns the last position's logits (B, V) and the filled cache tensors."""
        model = self.model
        caches = model.new_caches(idx.shape[0], self.capacity, self.rope_keys)
        hidden = model.hidden(idx, caches)[0][:, -1:]  # (B, 1, C)
        flat = []
        for cache in caches:
            flat += cache.buffers + ([] if cache.rotated is None else [cache.rotated])
        return model.logits(hidden)[:, 0], flat

    def step(self, token: Tensor, pos: Tensor, cache: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Decode one token ``token`` (B, 1) at position ``pos`` (int64, shape (1,), or (B,): one per sequence)
        against ``cache``."""
        model = self.model
        x = model.embed(token)  # (B, 1, C)
        if model.position is not None:
            x = x + model.position(pos).unsqueeze(1)  # (P, 1, C) broadcast
        workspace = self._workspace_for(cache[0]) if self.use_workspace else None
        out: list[Tensor] = []
        i = 0
        trunk = model.trunk
        provided: dict[int, tuple[Tensor, Tensor]] = {}  # cross-layer sharing: K/V of the source layers
        for layer, (block, count) in enumerate(zip(model.blocks, self.tensors_per_layer(), strict=True)):
            source = trunk.kv_sources[layer]
            shared = None if source is None else provided[source]
            result = block.static_step(x, pos, self.tables, cache[i : i + count], self.inplace, workspace, shared,
                                       layer in trunk.kv_providers)
            x, stored = result[0], result[1]
            if layer in trunk.kv_providers:
                provided[layer] = result[2]
            out += stored
            i += count
        return model.logits(model.trunk.norm(x))[:, 0], out

    def _workspace_for(self, like: Tensor) -> Tensor:
        """The tensor cached keys are rotated into: ``like``'s (B, H_kv, capacity) by the rotated width."""
        shape = like.shape if self.cos is None else (*like.shape[:3], self.cos.shape[-1])
        if self._workspace is None or self._workspace.shape != shape or self._workspace.is_inference() != (
            torch.is_inference_mode_enabled()
        ):
            self._workspace = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._workspace

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, step=None) -> Tensor:
        """Greedy continuation of ``prompt`` (B, T) by ``max_new_tokens`` tokens through :meth:`prefill` and
        :meth:`step` (or ``step``, e.g. its compiled form, with the same signature)."""
        step = step or self.step
        logits, cache = self.prefill(prompt)
        tokens = [logits.argmax(dim=-1, keepdim=True)]  # (B, 1)
        for i in range(max_new_tokens - 1):
            pos = torch.tensor([prompt.shape[1] + i], device=prompt.device)
            logits, cache = step(tokens[-1], pos, cache)
            tokens.append(logits.argmax(dim=-1, keepdim=True))
        return torch.cat([prompt, *tokens], dim=1)


class PrefillGraph(nn.Module):
    """:meth:`StaticDecoder.prefill` as a module with flat outputs: ``(logits, *cache)`` (for ``torch.export``)."""

    def __init__(self, decoder: StaticDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, idx: Tensor) -> tuple[Tensor, ...]:
        logits, cache = self.decoder.prefill(idx)
        return (logits, *cache)


class StepGraph(nn.Module):
    """:meth:`StaticDecoder.step` as a module with flat inputs and outputs: ``(token, pos, *cache) -> (logits,
    *cache)`` (for ``torch.export``)."""

    def __init__(self, decoder: StaticDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, token: Tensor, pos: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        logits, new = self.decoder.step(token, pos, list(cache))
        return (logits, *new)
