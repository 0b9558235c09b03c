"""``export``: a trained GPT as two graphs with its KV cache as explicit state, checked against eager decoding.

Run: ``python cli.py export --ckpt_path logs/.../last.ckpt --out exported/ [--format torch_export|onnx]
[--capacity 512 --prompt_len 16 --batch_size 1 --rope_keys on_read]``. It writes

- ``prefill.pt2``: prompt ids (B, T) -> ``(logits (B, V), *cache)``, with T dynamic (2 .. capacity) where
  ``torch.export`` can keep it so;
- ``decode_step.pt2``: ``(token (B, 1), pos (1,), *cache) -> (logits (B, V), *cache)``;
- ``export.json``: the cache layout (tensors per layer, shapes, dtype), the variant and the check's figures.

The cache is one tensor per layer for the K=V variants (Q-K=V, Q=K=V) and two (K, V) for the others, each
(B, H_kv, capacity, D). Before anything is written, the exported graphs decode ``--check_tokens`` tokens greedily
from a random prompt and are compared with eager decoding token by token (logits and tokens). Nothing existing is
overwritten: the three files are written into a scratch folder and put in place only when all are complete (a
``kill -9`` leaves none of them under its final name, and the re-run finishes). ``--format onnx`` uses
``torch.onnx.export(dynamo=True)`` when the ``onnx`` and ``onnxscript`` packages are installed (an optional extra,
``pip install onnx onnxscript``).

``--format hf`` writes no graphs but a Hugging Face folder (``config.json`` + ``model.safetensors`` +
``generation_config.json``) with the same logits: a QKV GPT with a LayerNorm/GELU trunk as GPT-2
(:mod:`qkv_lightning.interop.hf_gpt2`; shared variants are errors), an RMSNorm/SwiGLU trunk as Llama, or Qwen2 with
q/k/v biases (:mod:`qkv_lightning.interop.hf_llama`: QKV, GQA and MQA, and the shared variants with each shared
projection written under every role it serves, without their cache saving; the BOS, EOS and padding ids of the
tokenizer the checkpoint stores, if it stores one). Settings the folder cannot express are errors naming them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jsonargparse
import torch

from qkv_lightning.command_line import command_parser, parse
from qkv_lightning.errors import ConfigError
from qkv_lightning.files import atomic_write_json, staged_folder
from qkv_lightning.nn.decoding import PrefillGraph, StaticDecoder, StepGraph
from qkv_lightning.nn.gpt import GPT
from qkv_lightning.nn.kv_cache import ROPE_KEYS_DEFAULT
from qkv_lightning.tasks.language_model import load_gpt, load_gpt_checkpoint


def export_graphs(model: GPT, capacity: int, prompt_len: int, batch_size: int, rope_keys: str = ROPE_KEYS_DEFAULT,
                  dynamic_prompt: bool = True) -> dict[str, Any]:
    """``torch.export`` the prefill and decode-step graphs of ``model``; returns the programs and the layout."""
    if not 1 <= prompt_len < capacity:
        raise ConfigError(f"--prompt_len={prompt_len} must lie in [1, --capacity={capacity}).")
    decoder = StaticDecoder(model, capacity, rope_keys=rope_keys, inplace=False)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=generator)
    prefill_module, step_module = PrefillGraph(decoder).eval(), StepGraph(decoder).eval()
    with torch.no_grad():
        prefill, dynamic = None, False
        if dynamic_prompt and prompt_len >= 2:
            try:
                length = torch.export.Dim("prompt_len", min=2, max=capacity - 1)
                prefill = torch.export.export(prefill_module, (prompt,), dynamic_shapes=({1: length},))
                dynamic = True
            except Exception:  # noqa: BLE001 - a graph the exporter cannot keep dynamic is exported static
                prefill = None
        if prefill is None:
            prefill = torch.export.export(prefill_module, (prompt,))
        outputs = prefill_module(prompt)
        pos = torch.tensor([prompt_len])
        token = outputs[0].argmax(dim=-1, keepdim=True)
        step = torch.export.export(step_module, (token, pos, *outputs[1:]))
    layout = {
        "tensors_per_layer": decoder.tensors_per_layer(),
        "cache_shapes": [list(t.shape) for t in outputs[1:]],
        "dtype": str(outputs[1].dtype).removeprefix("torch."),
        "capacity": capacity,
        "rope_keys": decoder.rope_keys,
        "prompt_len": prompt_len,
        "prompt_len_dynamic": dynamic,
        "batch_size": batch_size,
    }
    return {"prefill": prefill, "step": step, "decoder": decoder, "prompt": prompt, "layout": layout}


def check_exported(model: GPT, prefill: Any, step: Any, prompt: torch.Tensor, n_tokens: int) -> dict[str, Any]:
    """Greedy decoding through the exported programs against eager decoding (the dynamic KV cache), token by
    token: the largest logit difference over the steps and whether every token agrees."""
    run_prefill, run_step = prefill.module(), step.module()
    with torch.no_grad():
        caches = model.new_caches(prompt.shape[0], prompt.shape[1] + n_tokens)
        eager = model.logits(model.hidden(prompt, caches)[0][:, -1:])[:, 0]  # (B, V)
        outputs = run_prefill(prompt)
        logits, cache = outputs[0], list(outputs[1:])
        worst, same = (logits - eager).abs().max().item(), True
        scale = eager.abs().max().item()
        for i in range(n_tokens - 1):
            token = eager.argmax(dim=-1, keepdim=True)  # (B, 1): both continue from eager's choice
            same = same and torch.equal(token, logits.argmax(dim=-1, keepdim=True))
            eager = model.logits(model.hidden(token, caches)[0])[:, 0]
            outputs = run_step(token, torch.tensor([prompt.shape[1] + i]), *cache)
            logits, cache = outputs[0], list(outputs[1:])
            worst = max(worst, (logits - eager).abs().max().item())
            scale = max(scale, eager.abs().max().item())
        same = same and torch.equal(eager.argmax(dim=-1), logits.argmax(dim=-1))
    return {"tokens": n_tokens, "max_abs_logit_diff": worst, "max_abs_logit": scale, "tokens_equal": bool(same)}


@dataclass
class ExportOptions:
    """The options of ``export``."""

    ckpt_path: str
    """a single-file checkpoint that fit saved (LanguageModel)"""
    out: str
    """folder for the graphs and export.json (must not hold them yet)"""
    format: Literal["torch_export", "onnx", "hf"] = "torch_export"
    """hf: a Hugging Face folder (config.json + model.safetensors), not graphs: GPT-2 for a LayerNorm/GELU trunk,
    Llama (Qwen2 with q/k/v biases) for an RMSNorm/SwiGLU one"""
    capacity: int | None = None
    """cache tokens; default network.max_seq_len"""
    prompt_len: int = 16
    """example prompt length (dynamic where possible)"""
    batch_size: int = 1
    """sequences per call (static in the graphs)"""
    rope_keys: str = ROPE_KEYS_DEFAULT
    """K=V with RoPE: on_read (one tensor per layer) or copy (and a rotated copy)"""
    check_tokens: int = 8
    """tokens compared with eager decoding"""
    weights_only: bool = True
    """load the checkpoint with torch's safe loading"""


def parser() -> jsonargparse.ArgumentParser:
    """The parser of ``export`` (:mod:`qkv_lightning.command_line`)."""
    return command_parser("export", ExportOptions, description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> int:
    """``export``: export, check against eager, write."""
    args = parse(parser(), argv or [])
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before anything is loaded or exported
        raise ConfigError(f"--out {out} is a file; name a folder (new, or without the export's files).")
    if args.format == "hf":  # a Hugging Face folder: GPT-2 or Llama by the trunk (qkv_lightning/interop)
        from qkv_lightning.interop import hf_gpt2, hf_llama
        from qkv_lightning.interop.common import check_hf_destination

        check_hf_destination(out)
        model, hparams, checkpoint = load_gpt_checkpoint(args.ckpt_path, args.weights_only)
        if not hf_llama.is_llama_trunk(model.config):
            return hf_gpt2.main_export(model, hparams, args.ckpt_path, out)
        from qkv_lightning.data.hf_tokenizer import HFTokenizer

        tokenizer = HFTokenizer.from_checkpoint(checkpoint, f"the checkpoint {args.ckpt_path}")  # None: it has none
        return hf_llama.main_export(model, hparams, args.ckpt_path, out, tokenizer)
    model, hparams = load_gpt(args.ckpt_path, args.weights_only)
    capacity = args.capacity or model.config.max_seq_len
    if args.check_tokens < 1 or args.prompt_len + args.check_tokens > capacity:
        raise ConfigError(f"--prompt_len {args.prompt_len} + --check_tokens {args.check_tokens} must fit in "
                          f"--capacity {capacity} (and --check_tokens be at least 1).")
    names = ("prefill.onnx", "decode_step.onnx") if args.format == "onnx" else ("prefill.pt2", "decode_step.pt2")
    existing = [str(out / name) for name in (*names, "export.json") if os.path.lexists(out / name)]
    if existing:
        raise ConfigError(f"--out {out} already holds {', '.join(existing)}; pick another folder, or remove them "
                          "(nothing is overwritten).")
    result = export_graphs(model, capacity, args.prompt_len, args.batch_size, args.rope_keys)
    check = check_exported(model, result["prefill"], result["step"], result["prompt"], args.check_tokens)
    attention = hparams.get("attention") or {}
    manifest = {"checkpoint": str(args.ckpt_path), "format": args.format, "files": list(names),
                "sharing": attention.get("sharing"), "n_kv_heads": attention.get("n_kv_heads"),
                "position": model.config.position, **result["layout"], "check": check}
    with staged_folder(out, last=("export.json",)) as stage:  # all three in place only once all are complete
        if args.format == "onnx":
            write_onnx(result, stage / names[0], stage / names[1])
        else:
            torch.export.save(result["prefill"], stage / names[0])
            torch.export.save(result["step"], stage / names[1])
        atomic_write_json(stage / "export.json", manifest, indent=2)
    per_layer = sorted(set(result["layout"]["tensors_per_layer"]))
    print(f"exported {out / names[0]} and {out / names[1]}: {len(per_layer) and per_layer[0]} cache tensor(s) per "
          f"layer, capacity {capacity}; {check['tokens']} greedy tokens equal eager: {check['tokens_equal']}, "
          f"largest logit difference {check['max_abs_logit_diff']:.3g} (logits up to {check['max_abs_logit']:.3g})")
    return 0 if check["tokens_equal"] else 1


def write_onnx(result: dict[str, Any], prefill_path: Path, step_path: Path) -> None:
    """The two graphs as ONNX through the dynamo exporter (needs the ``onnx`` and ``onnxscript`` packages)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("--format onnx needs the onnx and onnxscript packages: pip install onnx onnxscript (or "
                          "use --format torch_export).") from None
    for program, path in ((result["prefill"], prefill_path), (result["step"], step_path)):
        torch.onnx.export(program, (), str(path), dynamo=True)
