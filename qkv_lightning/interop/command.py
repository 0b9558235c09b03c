"""``import``: a Hugging Face GPT-2 folder or timm ViT weights as a checkpoint of our tasks (QKV), exactly.

Run: ``python cli.py import SRC DST.ckpt [--format auto|hf-gpt2|timm-vit|authors-lm|authors-synthetic|authors-vit]``

- ``hf-gpt2``: SRC is a folder with ``config.json`` + ``model.safetensors`` (``GPT2LMHeadModel.save_pretrained``);
  ``--bpe_file gpt2.tiktoken`` records the GPT-2 BPE's identity in the checkpoint, so that ``validate``/``test``
  check that their data uses the same tokenizer; ``--seq_len`` sets the recorded sequence length (default
  ``n_positions``).
- ``timm-vit``: SRC is a ``.safetensors`` file or a weights-only ``.pth`` of a timm ``vit_*`` model; ``--n_head``
  (default width / 64) or ``--timm_model NAME`` (with timm installed: the architecture is checked against timm's).

- ``authors-lm`` / ``authors-synthetic`` / ``authors-vit``: SRC is a ``.pt`` file the paper's authors' code saved
  (their language models, synthetic-task encoders, ViTs; see :mod:`qkv_lightning.interop.authors`).

``auto`` takes a folder for GPT-2, a torch file holding the authors' ``model_state_dict`` for theirs (by its
contents), and any other file for timm. Loading is offline, from local files only; nothing read runs
code. When ``transformers`` (GPT-2) or timm with ``--timm_model`` (ViT) is installed, the written model's logits are
compared with the source library's on random inputs and the largest difference is printed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from qkv_lightning.errors import ConfigError
from qkv_lightning.interop.common import check_destination, task_checkpoint, write_checkpoint

FORMATS = ("auto", "hf-gpt2", "timm-vit", "authors-lm", "authors-synthetic", "authors-vit")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cli.py import", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a Hugging Face GPT-2 folder, or a timm ViT .safetensors / .pth file")
    p.add_argument("dst", help="the checkpoint to write (must not exist)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="auto: a folder is hf-gpt2, a file timm-vit")
    p.add_argument("--bpe_file", default=None, help="hf-gpt2: GPT-2 .tiktoken ranks recorded as the tokenizer")
    p.add_argument("--seq_len", type=int, default=None, help="hf-gpt2: recorded data seq_len (default n_positions)")
    p.add_argument("--n_head", type=int, default=None, help="timm-vit: attention heads (default width / 64)")
    p.add_argument("--timm_model", default=None, help="timm-vit: timm model name whose architecture is checked")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``import``: read, translate, check, write."""
    args = parser().parse_args(list(argv or []))
    src, dst = Path(args.src), Path(args.dst)
    check_destination(dst)
    if not src.exists():
        raise ConfigError(f"{src} does not exist; give a Hugging Face GPT-2 folder or a timm ViT weights file.")
    from qkv_lightning.interop import authors

    fmt = args.format if args.format != "auto" else ("hf-gpt2" if src.is_dir() else authors.detect(src) or "timm-vit")
    if fmt in authors.FORMATS:  # the paper authors' own checkpoints
        task, source = authors.import_authors(src, fmt, Path(args.bpe_file) if args.bpe_file else None, args.seq_len)
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
    source = {**source, "path": str(src.resolve()), "max_abs_logit_diff": difference}
    write_checkpoint(task_checkpoint(task, source), dst)
    n = task.network_config
    label = task.attention_config.sharing if hasattr(task, "attention_config") else "QKV"
    print(f"imported {src} ({fmt}) as {dst}: {type(task).__name__}, {label}, {n.n_layer} layers, width {n.d_model}, "
          f"{n.n_head} heads, {sum(p.numel() for p in task.network.parameters()):,} parameters")
    if difference is not None:
        print(f"largest |logit difference| against {library} on random inputs: {difference:.3g}")
    return 0
