"""Small text files in the official WikiText format, for the language-modelling tests."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

# The offline data sets (read only): $QKV_SHARED_DATA, else ../shared/data next to the checkout. Tests that need
# them are skipped where they are missing; every other test writes its own files in the official formats.
SHARED = Path(os.environ.get("QKV_SHARED_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
WIKITEXT2 = SHARED / "wikitext-2"
GPT2_RANKS = SHARED / "tokenizers" / "gpt2" / "gpt2.tiktoken"

WORDS = (
    "the of and in to a was is for on as by with he that at from his it an were are which this also be has or had "
    "first its new after who their one two not but they her she game season album song film river city team war "
    "@-@ @,@ @.@ <unk> 1 000 20 1990 ; : ( ) \" '"
).split()


def article(rng: random.Random, index: int, n_paragraphs: int) -> list[str]:
    """One article as WikiText lines: a title, sections, paragraphs of sentences, blank lines between."""
    lines = [" \n", f" = {rng.choice(WORDS).title()} {index} = \n", " \n"]
    for p in range(n_paragraphs):
        if p and p % 2 == 0:
            lines += [f" = = Section {p} = = \n", " \n"]
        sentences = []
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(4, 14)
            sentences.append(" ".join(WORDS[min(int(rng.paretovariate(1.2)) - 1, len(WORDS) - 1)] for _ in range(n)))
        lines += [" " + " . ".join(sentences) + " . \n", " \n"]
    return lines


def write_wikitext(folder: Path, articles: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``wiki.{train,valid,test}.tokens`` (name -> number of articles) into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counter = 0
    for name, count in (articles or {"wiki.train.tokens": 12, "wiki.valid.tokens": 3, "wiki.test.tokens": 4}).items():
        lines = []
        for _ in range(count):
            counter += 1
            lines += article(rng, counter, rng.randint(3, 6))
        (folder / name).write_text("".join(lines), encoding="utf-8")
    return folder


def word_count(path: Path) -> int:
    """Word-level tokens of a file: whitespace words plus one ``<eos>`` per line."""
    return sum(len(line.split()) + 1 for line in path.read_text(encoding="utf-8").splitlines(keepends=True))


def validate_against(reference, args: list[str]) -> tuple[float, float, int]:
    """``validate`` through the CLI with ``args`` (a ``--ckpt_path`` among them), and the cross-entropy that the
    Hugging Face model ``reference`` gives on the same validation windows: (our val/loss, theirs, scored tokens)."""
    import pytest
    import torch
    import torch.nn.functional as F

    from qkv_lightning.lightning_cli import QKVLightningCLI

    with pytest.warns(UserWarning, match="replace the config's"):
        cli = QKVLightningCLI(args=["validate", *args])
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in cli.datamodule.val_dataloader():
            logits = reference(inputs).logits
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return cli.trainer.callback_metrics["val/loss"].item(), total / max(count, 1), count


def train_bpe(path: Path, lines: list[str], vocab_size: int = 300, bos: bool = True) -> Any:
    """A byte-level BPE trained on ``lines``, with ``<s>`` (added before every text by its post-processor when
    ``bos``) and ``<|endoftext|>``, saved as a tokenizer.json at ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    tokenizer.save(str(path))
    return tokenizer


def train_words(path: Path, lines: list[str]) -> Any:
    """A WordLevel tokenizer over the whitespace words of ``lines`` (``[UNK]`` for the rest, and ``<|endoftext|>``),
    saved as a tokenizer.json at ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    tokenizer.save(str(path))
    return tokenizer
