"""``import``: a Hugging Face GPT-2 folder, timm ViT weights or the paper authors' checkpoints as a checkpoint of
our tasks, exactly.

Run: ``python cli.py import SRC DST.ckpt [--format auto|hf-gpt2|timm-vit|authors]``

- ``hf-gpt2``: SRC is a folder with ``config.json`` + ``model.safetensors`` (``GPT2LMHeadModel.save_pretrained``);
  ``--bpe_file gpt2.tiktoken`` records the GPT-2 BPE's identity in the checkpoint, so that ``validate``/``test``
  check that their data uses the same tokenizer; ``--seq_len`` sets the recorded sequence length (default
  ``n_positions``).
- ``hf-llama``: SRC is a Hugging Face Llama, Mistral or Qwen2 folder (``config.json`` + safetensors, sharded ones
  included); ``gguf``: SRC is a ``.gguf`` file, read through transformers' GGUF loader (needs ``gguf``). Both give
  QKV/GQA checkpoints with the Llama-style trunk (:mod:`qkv_lightning.interop.hf_llama`), storing the model's own
  tokenizer (the folder's ``tokenizer.json``, or the one transformers builds from the GGUF metadata) in the checkpoint,
  where ``--data.tokenizer hf --data.tokenizer_file DST.ckpt`` reads it.
- ``timm-vit``: SRC is a ``.safetensors`` file or a weights-only ``.pth`` of a timm ``vit_*`` model; ``--n_head``
  (default width / 64) or ``--timm_model NAME`` (with timm installed: the architecture is checked against timm's).
- ``authors``: SRC is a ``.pt`` file the paper's authors' code saved: their language models, synthetic-task encoders
  or ViTs, told apart by the file's contents (see :mod:`qkv_lightning.interop.authors`).

``auto`` takes a folder for GPT-2, a torch file holding the authors' ``model_state_dict`` for theirs (by its
contents), and any other file for timm. Loading is offline, from local files only; nothing read runs
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
from qkv_lightning.variants import Variant


@dataclass
class ImportOptions:
    """The arguments of ``import``."""

    src: str
    """a Hugging Face GPT-2, Llama, Mistral or Qwen2 folder, a .gguf file, a timm ViT .safetensors / .pth file, or a
    .pt file of the paper's authors"""
    dst: str
    """the checkpoint to write (must not exist)"""
    format: Literal["auto", "hf-gpt2", "hf-llama", "gguf", "timm-vit", "authors"] = "auto"
    """auto: a .gguf file is gguf; a folder whose config.json names another model_type than gpt2 hf-llama, another
    folder hf-gpt2; a file with the authors' model_state_dict theirs (by its contents); another file timm-vit"""
    bpe_file: str | None = None
    """hf-gpt2, authors (a language model): GPT-2 .tiktoken ranks recorded as the tokenizer"""
    seq_len: int | None = None
    """hf-gpt2, hf-llama, gguf, authors (a language model): recorded data seq_len (default n_positions;
    max_position_embeddings, at most 2048)"""
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
    from qkv_lightning.interop import authors

    fmt = args.format
    tokenizer = None  # the model's own tokenizer, stored in the checkpoint (Llama-family folders and GGUF files)
    if fmt == "auto" and src.is_dir():
        from qkv_lightning.interop.hf_llama import is_llama_folder

        fmt = "hf-llama" if is_llama_folder(src) else "hf-gpt2"
    elif fmt == "auto":
        fmt = "gguf" if src.suffix == ".gguf" else authors.detect(src) or "timm-vit"
    if fmt in ("hf-llama", "gguf"):  # Llama, Mistral, Qwen2 folders and GGUF files (interop/hf_llama.py)
        from qkv_lightning.interop.hf_llama import check_with_transformers, import_llama

        task, source, tokenizer = import_llama(src, fmt, args.seq_len)
        difference = check_with_transformers(src, fmt, task.network)
        library = f"transformers' {source['model_type']} model" + (" (its GGUF loader)" if fmt == "gguf" else "")
    elif fmt == "authors" or fmt in authors.FORMATS:  # the paper authors' own checkpoints
        task, source = authors.import_authors(src, Path(args.bpe_file) if args.bpe_file else None, args.seq_len)
        difference, library = None, ""
    elif fmt == "hf-gpt2":
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
    from qkv_lightning.data.hf_tokenizer import CHECKPOINT_ENTRY

    records = {CHECKPOINT_ENTRY: tokenizer.checkpoint_entry()} if tokenizer is not None else {}
    write_checkpoint(task_checkpoint(task, source, **records), dst)
    n = task.network_config
    label = Variant.of(task.attention_config, n.n_head).paper_name if hasattr(task, "attention_config") else "QKV"
    print(f"imported {src} ({fmt}) as {dst}: {type(task).__name__}, {label}, {n.n_layer} layers, width {n.d_model}, "
          f"{n.n_head} heads, {sum(p.numel() for p in task.network.parameters()):,} parameters")
    if difference is not None:
        print(f"largest |logit difference| against {library} on random inputs: {difference:.3g}")
    if tokenizer is not None:
        print(f"stored the model's own tokenizer ({tokenizer.identity}, {tokenizer.vocab_size} tokens): --ckpt_path "
              f"{dst} --data.tokenizer hf scores text with it (elsewhere: --data.tokenizer_file {dst}); evaluate "
              "uses it")
    elif fmt in ("hf-llama", "gguf"):
        print(f"{src} has no tokenizer ({'tokenizer.json' if fmt == 'hf-llama' else 'in its metadata'}): none stored")
    return 0
