"""``import``: a Hugging Face GPT-2 folder or timm ViT weights as a checkpoint of our tasks (QKV), exactly.

Run: ``python cli.py import SRC DST.ckpt [--format auto|hf-gpt2|timm-vit]``

- ``hf-gpt2``: SRC is a folder with ``config.json`` + ``model.safetensors`` (``GPT2LMHeadModel.save_pretrained``);
  ``--bpe_file gpt2.tiktoken`` records the GPT-2 BPE's identity in the checkpoint, so that ``validate``/``test``
  check that their data uses the same tokenizer; ``--seq_len`` sets the recorded sequence length (default
  ``n_positions``).
- ``timm-vit``: SRC is a ``.safetensors`` file or a weights-only ``.pth`` of a timm ``vit_*`` model; ``--n_head``
  (default width / 64) or ``--timm_model NAME`` (with timm installed: the architecture is checked against timm's).

``auto`` takes a folder for GPT-2 and a file for timm. Loading is offline, from local files only; nothing read runs
code. When ``transformers`` (GPT-2) or timm with ``--timm_model`` (ViT) is installed, the written model's logits are
compared with the source library's on random inputs and the largest difference is printed; a difference that is not a
finite number fails the import, and nothing is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jsonargparse

from qkv_lightning.command_line import command_parser, parse
from qkv_lightning.errors import CheckpointError, ConfigError
from qkv_lightning.interop.common import check_destination, task_checkpoint, write_checkpoint


@dataclass
class ImportOptions:
    """The arguments of ``import``."""

    src: str
    """a Hugging Face GPT-2 folder, or a timm ViT .safetensors / .pth file"""
    dst: str
    """the checkpoint to write (must not exist)"""
    format: Literal["auto", "hf-gpt2", "timm-vit"] = "auto"
    """auto: a folder is hf-gpt2, a file timm-vit"""
    bpe_file: str | None = None
    """hf-gpt2: GPT-2 .tiktoken ranks recorded as the tokenizer"""
    seq_len: int | None = None
    """hf-gpt2: recorded data seq_len (default n_positions)"""
    n_head: int | None = None
    """timm-vit: attention heads (default width / 64)"""
    timm_model: str | None = None
    """timm-vit: timm model name whose architecture is checked"""


def parser() -> jsonargparse.ArgumentParser:
    """The parser of ``import`` (:mod:`qkv_lightning.command_line`)."""
    return command_parser("import", ImportOptions, description=__doc__.split("\n\n")[0], positional=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``import``: read, translate, check, write."""
    args = parse(parser(), argv or [])
    src, dst = Path(args.src), Path(args.dst)
    check_destination(dst)
    if not src.exists():
        raise ConfigError(f"{src} does not exist; give a Hugging Face GPT-2 folder or a timm ViT weights file.")
    fmt = args.format if args.format != "auto" else ("hf-gpt2" if src.is_dir() else "timm-vit")
    if fmt == "hf-gpt2":
        from qkv_lightning.interop.hf_gpt2 import check_with_transformers, import_gpt2

        task, source = import_gpt2(src, Path(args.bpe_file) if args.bpe_file else None, args.seq_len)
        difference = check_with_transformers(src, task.network)
        library = "transformers' GPT2LMHeadModel"
    else:
        from qkv_lightning.interop.timm_vit import check_with_timm, import_vit

        task, source = import_vit(src, args.n_head, args.timm_model)
        difference = check_with_timm(args.timm_model, src, task.network)
        library = f"timm's {args.timm_model}"
    if difference is not None and not math.isfinite(difference):
        raise CheckpointError(
            f"the model imported from {src} and {library} loaded from the same files give logits that differ by "
            f"{difference} (not a finite number) on random inputs: one of them computes NaN or infinite values, so "
            f"the import is wrong; nothing was written to {dst}."
        )
    source = {**source, "path": str(src.resolve()), "max_abs_logit_diff": difference}
    write_checkpoint(task_checkpoint(task, source), dst)
    n = task.network_config
    print(f"imported {src} ({fmt}) as {dst}: {type(task).__name__}, QKV, {n.n_layer} layers, width {n.d_model}, "
          f"{n.n_head} heads, {sum(p.numel() for p in task.network.parameters()):,} parameters")
    if difference is not None:
        print(f"largest |logit difference| against {library} on random inputs: {difference:.3g}")
    return 0
