"""Small corpora and a batch recorder for the streaming data tests (tests/test_streaming.py).

``RecordBatches`` (``--trainer.callbacks+=tests.streaming_support.RecordBatches --trainer.callbacks.out DIR``) writes
every training batch's rows as one JSON line per step into ``DIR/rank<k>.jsonl`` and flushes it to disk, so the
record of a run killed with SIGKILL is complete up to the step it died in.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

WORDS = "the of and in to a was is for on as by with he that at from his it an were are which this".split()


def write_byte_ranks(path: Path) -> Path:
    """A ``.tiktoken`` ranks file of the 256 single bytes (no merges): GPT-2's format and pre-tokenizer, with a
    vocabulary of 257 (``<|endoftext|>`` is 256); every byte of the text is one token."""
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


def documents(rng: random.Random, n: int, low: int = 2, high: int = 12) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


class RecordBatches(Callback):
    """Appends ``{"step", "rows"}`` of every training batch to ``out/rank<k>.jsonl`` (flushed and synced).

    Args:
        out: folder to write into.
    """

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": trainer.global_step, "rows": batch[0].tolist()}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_batches(out: Path, rank: int = 0) -> dict[int, list[list[int]]]:
    """The recorded batches of one rank: step -> its rows' input ids."""
    lines = (out / f"rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record["rows"] for record in map(json.loads, lines)}


def write_corpus(data: Path, n_train: int, seed: int = 1) -> None:
    """Two training JSONL files of ``n_train`` distinct documents each, a validation file and the byte ranks."""
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    write_byte_ranks(data / "bytes.tiktoken")
    for k in range(2):
        write_jsonl(data / f"train-{k}.jsonl", [f"{k} {i} {t}" for i, t in enumerate(documents(rng, n_train))])
    write_jsonl(data / "val.jsonl", documents(rng, 4))


def streaming_data_args(data: Path, seq_len: int = 8) -> list[str]:
    """Command-line options pointing configs/lm/streaming.yaml at the files of :func:`write_corpus`."""
    return [
        "--data.train_files", f"[{data / 'train-*.jsonl'}]", "--data.val_files", f"[{data / 'val.jsonl'}]",
        "--data.cache_dir", str(data / "cache"), "--data.bpe_file", str(data / "bytes.tiktoken"),
        "--data.seq_len", str(seq_len), "--data.val_tokens", "20", "--data.batch_size", "2",
        "--data.num_workers", "0", "--data.optimize_workers", "1",
    ]
