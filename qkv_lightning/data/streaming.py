"""Large text corpora (SlimPajama, FineWeb-Edu, or anything in their layout) streamed through LitData.

Data flow:

* The sources are local files (``data.train_files``, ``data.val_files``: paths or glob patterns): ``.txt`` (one
  document per non-empty line), ``.jsonl`` / ``.json`` / ``.jsonl.gz`` / ``.jsonl.zst`` (one JSON object per line,
  its ``data.text_field`` the document) and ``.parquet`` (the ``data.text_field`` column; needs pyarrow).
* :meth:`StreamingText.prepare_data` (rank 0 of each node) tokenizes every document with GPT-2 BPE
  (:mod:`qkv_lightning.data.tokenizers`) or a model's own Hugging Face tokenizer
  (:mod:`qkv_lightning.data.hf_tokenizer`; no special tokens inside a document), the boundary token
  (``<|endoftext|>``, or the tokenizer's BOS) after each document, and writes rows of ``seq_len + 1``
  token ids, packed or padded (:mod:`qkv_lightning.data.documents`, the same rule as WikiText), with LitData's
  ``optimize`` into ``<cache_dir>/<key>/{train,val}``. ``key`` digests the settings and each source file's path,
  size and modification time, so changed sources or settings make a new dataset and a finished one is reused.
  Packed rows are packed within each training file (a file's tail shorter than one row is dropped).
* Validation is a fixed slice: the first whole documents of ``val_files`` (or, without them, of the first training
  files, which training then skips) holding at least ``val_tokens`` document tokens; it is read in order and padded
  with empty rows to a multiple of the number of processes, so its perplexity is exact on any number of devices.
* Training reads ``StreamingDataset`` through ``StreamingDataLoader``: LitData shards the rows over processes and
  workers, shuffles them with the run's seed, and its loader state is saved in Lightning checkpoints, so a run
  resumed mid-epoch (also after ``kill -9``) continues with the batches an uninterrupted run would have seen.

LitData (``pip install 'qkv-lightning[streaming]'``) is imported only by this module.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qkv_lightning.data.documents import DocumentMode, check_document_mode, packed_rows, padded_row, row_sample
from qkv_lightning.data.hf_tokenizer import check_tokenizer_settings, subword_tokenizer
from qkv_lightning.data.loading import check_loader_settings
from qkv_lightning.data.progress import Progress
from qkv_lightning.data.text import TextData
from qkv_lightning.data.token_cache import read_metadata
from qkv_lightning.data.tokenizers import Tokenizer
from qkv_lightning.errors import ConfigError, DataError
from qkv_lightning.files import atomic_write_json
from qkv_lightning.nn.gpt import IGNORE_INDEX

log = logging.getLogger(__name__)

FORMAT = 1
"""Version of the optimized layout; another version makes a new dataset."""

SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")

DEFAULT_PROMPTS = ["The history of the", "In this lesson, we"]


def _litdata():
    try:
        import litdata
    except ImportError as error:
        raise ConfigError(
            "the streaming data module needs LitData: pip install 'qkv-lightning[streaming]' (or pip install litdata)."
        ) from error
    return litdata


# --------------------------------------------------------------------------------------------------------- sources
def resolve_files(patterns: list[str], setting: str) -> list[Path]:
    """The files that ``patterns`` (paths or globs, ``~`` expanded) name, sorted within each pattern, no repeats."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise DataError(f"{setting}: {path} is not a file; name text, JSONL or Parquet files (or globs).")
            if not path.name.endswith(SUFFIXES):
                raise DataError(f"{setting}: {path} is not one of the supported kinds {', '.join(SUFFIXES)}.")
            if path not in files:
                files.append(path)
    if not files:
        raise DataError(f"{setting}={patterns} names no file; point it at text, JSONL or Parquet files.")
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as error:
            raise DataError(f"{path} is zstd-compressed: pip install zstandard to read it.") from error
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one source file, in order (see the module docstring for the formats)."""
    if path.name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise DataError(f"{path} is Parquet: pip install pyarrow to read it.") from error
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise DataError(
                f"{path} has no column {text_field!r} (data.text_field); it has {table.schema_arrow.names}."
            )
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            yield from (text for text in batch.column(0).to_pylist() if text)
        return
    with _open_text(path) as f:
        if path.name.endswith(".txt"):
            yield from (line.rstrip("\n") for line in f if line.strip())
            return
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[text_field]
            except (ValueError, KeyError, TypeError) as error:
                raise DataError(
                    f"{path} line {number} is not a JSON object with a {text_field!r} field (data.text_field): {error}"
                ) from None
            if text:
                yield text


# ------------------------------------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class RowMaker:
    """Turns segments of source files into rows ``(ids (T+1,), n_document)``; LitData's ``optimize`` calls it in
    worker processes (it is picklable: the tokenizer is loaded once per process).

    Args:
        bpe_file: GPT-2 ranks file, or None for tiktoken's ``gpt2``.
        seq_len: T.
        document_mode: ``packed`` or ``padded``.
        text_field: the JSONL field or Parquet column holding the text.
        tokenizer_kind: ``gpt2`` or ``hf``.
        tokenizer_file: ``hf``: the ``tokenizer.json`` or the checkpoint that stores the tokenizer.
    """

    bpe_file: str | None
    seq_len: int
    document_mode: str
    text_field: str = "text"
    tokenizer_kind: str = "gpt2"
    tokenizer_file: str | None = None

    def tokenizer(self) -> Tokenizer:
        key = (self.tokenizer_kind, self.bpe_file, self.tokenizer_file)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = subword_tokenizer(self.tokenizer_kind, self.bpe_file, self.tokenizer_file)
        return _TOKENIZERS[key]

    def documents(self, segments: list[tuple[str, int, int | None]]) -> Iterator[np.ndarray]:
        """Token ids of documents ``start .. stop-1`` of each ``(file, start, stop)``, each ending with the boundary."""
        tokenizer = self.tokenizer()
        for path, start, stop in segments:
            for i, text in enumerate(iter_documents(Path(path), self.text_field)):
                if stop is not None and i >= stop:
                    break
                if i >= start:
                    yield np.array([*tokenizer.encode_prompt(text), tokenizer.boundary_id], dtype=np.int64)

    def rows(self, documents: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, int]]:
        boundary = self.tokenizer().boundary_id
        if self.document_mode == "packed":
            yield from ((row, self.seq_len) for row in packed_rows(documents, self.seq_len, boundary))
        else:
            yield from (padded_row(document, self.seq_len, boundary) for document in documents)

    def __call__(self, segments: list[tuple[str, int, int | None]]) -> Iterator[tuple[np.ndarray, int]]:
        dtype = np.uint16 if self.tokenizer().vocab_size <= 1 << 16 else np.uint32
        for row, n_document in self.rows(self.documents(segments)):
            yield row.astype(dtype), int(n_document)


_TOKENIZERS: dict[tuple, Tokenizer] = {}


def to_sample(item: Any, padded: bool) -> tuple[torch.Tensor, ...]:
    """A stored row as ``(inputs, targets)`` (packed) or ``(inputs, targets, padding)`` (padded)."""
    row, n_document = item
    row = np.asarray(row, dtype=np.int64)
    if not padded:
        return row_sample(row)[:2]
    return row_sample(row, int(n_document))


def count_rows(folder: Path) -> int:
    """Rows of an optimized dataset, from its ``index.json`` (``len(StreamingDataset)`` is per process under DDP)."""
    index = read_metadata(folder / "index.json") or {}
    return sum(int(chunk["chunk_size"]) for chunk in index.get("chunks", []))


class ValidationRows(Dataset):
    """The validation rows in order (read by global index), padded with rows that score nothing to a multiple of
    ``pad_to``, so that the sampler Lightning adds under DDP never repeats a row.

    Args:
        dataset: the ``StreamingDataset`` of the validation rows.
        n: its number of rows (all processes together).
        padded: samples with a padding mask (padded documents).
        pad_to: make the number of rows a multiple of this (the number of processes).
    """

    def __init__(self, dataset: Any, n: int, padded: bool, pad_to: int = 1) -> None:
        self.dataset, self.padded = dataset, padded
        self.n = n
        self.total = -(-self.n // pad_to) * pad_to

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if not 0 <= i < self.total:
            raise IndexError(i)
        sample = to_sample(self.dataset[min(i, self.n - 1)], self.padded)
        if i >= self.n:
            sample[1].fill_(IGNORE_INDEX)
            if self.padded:
                sample[2].zero_()
        return sample


# ------------------------------------------------------------------------------------------------------ datamodule
class StreamingText(TextData):
    """Pre-tokenized rows of large local corpora through LitData (see the module docstring).

    Args:
        train_files: training sources: paths or glob patterns of ``.txt``, ``.jsonl`` (``.gz``, ``.zst``) or
            ``.parquet`` files.
        val_files: validation sources; None carves the validation slice from the first training documents (which
            training then skips).
        text_field: the JSON field or Parquet column that holds a document's text.
        cache_dir: where the optimized datasets are written (``<cache_dir>/<key>/{train,val}``); a finished one is
            reused, and nothing else there is touched.
        bpe_file: ``gpt2``: GPT-2 ``.tiktoken`` ranks file for offline use; None uses
            ``tiktoken.get_encoding("gpt2")``.
        tokenizer: ``gpt2`` (GPT-2 BPE) or ``hf`` (a model's own Hugging Face tokenizer from ``tokenizer_file``,
            documents encoded without special tokens; :mod:`qkv_lightning.data.hf_tokenizer`).
        tokenizer_file: ``hf`` (and only then): a Hugging Face ``tokenizer.json``, or a checkpoint that ``import``
            wrote (it stores the imported model's own tokenizer) or that ``fit`` with ``hf`` wrote (the tokenizer of
            its data).
        seq_len: tokens per sample (the model sees ``seq_len`` and predicts the next ``seq_len``).
        document_mode: ``packed`` (documents concatenated, each followed by ``<|endoftext|>``, cut into rows; exact)
            or ``padded`` (one document per row, cut or padded with ``<|endoftext|>``; the paper's protocol).
        score_padding: in ``padded`` mode, the training loss and ``val/loss`` also score padding targets (the
            paper); ``val/ppl_with_padding`` and ``val/ppl_without_padding`` are logged either way.
        val_tokens: the validation slice: whole documents, in order, until they hold at least this many tokens
            (the paper used 10M).
        batch_size: training samples per device and step.
        eval_batch_size: validation samples per device; None means ``batch_size``.
        num_workers: data-loading worker processes per device.
        optimize_workers: worker processes of LitData's ``optimize`` while tokenizing (``prepare_data``).
        chunk_bytes: target size of LitData's chunk files.
        shuffle: shuffle the training rows (with the run's seed, a new order each epoch).
        pin_memory: pin batches in page-locked memory (only used when CUDA is available).
        prompts: texts that ``predict`` continues.
    """

    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        text_field: str = "text",
        cache_dir: str = ".cache/streaming",
        bpe_file: str | None = None,
        tokenizer: Literal["gpt2", "hf"] = "gpt2",
        tokenizer_file: str | None = None,
        seq_len: int = 2048,
        document_mode: DocumentMode = "packed",
        score_padding: bool = False,
        val_tokens: int = 10_000_000,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        optimize_workers: int = 1,
        chunk_bytes: str = "64MB",
        shuffle: bool = True,
        pin_memory: bool = True,
        prompts: list[str] | None = None,
    ) -> None:
        super().__init__()
        check_document_mode(document_mode)
        check_tokenizer_settings(tokenizer, ("gpt2", "hf"), bpe_file, tokenizer_file)
        if not train_files:
            raise ConfigError("data.train_files is empty; name the training text, JSONL or Parquet files.")
        for name, value in (("seq_len", seq_len), ("val_tokens", val_tokens), ("optimize_workers", optimize_workers)):
            if value < 1:
                raise ConfigError(f"data.{name}={value} must be at least 1.")
        check_loader_settings(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        self.train_patterns, self.val_patterns = list(train_files), list(val_files) if val_files else None
        self.text_field = text_field
        self.cache_dir = Path(cache_dir).expanduser()
        self.bpe_file = bpe_file
        self.seq_len = seq_len
        self.document_mode = document_mode
        self.score_padding = score_padding
        self.val_tokens = val_tokens
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.optimize_workers = optimize_workers
        self.chunk_bytes = chunk_bytes
        self.shuffle = shuffle
        self.pin_memory = pin_memory
        self.prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
        self.maker = RowMaker(bpe_file, seq_len, document_mode, text_field, tokenizer, tokenizer_file)
        self.datasets: dict[str, Any] = {}
        self.meta: dict | None = None
        self._folder: Path | None = None

    # ------------------------------------------------------------------------------------------------ locations
    def load_tokenizer(self) -> Tokenizer:
        return self.maker.tokenizer()

    def folder(self) -> Path:
        """``<cache_dir>/<key>``: the key digests the settings that change the rows and each source's identity."""
        if self._folder is None:
            sources = {
                setting: [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                          for p in resolve_files(pats, setting)]
                for setting, pats in (("data.train_files", self.train_patterns), ("data.val_files", self.val_patterns))
                if pats
            }
            # the tokenizer enters by its identity only (not the files that give it): GPT-2 datasets keep their key
            maker = {k: v for k, v in asdict(self.maker).items() if k not in ("tokenizer_kind", "tokenizer_file")}
            settings = {"format": FORMAT, **maker, "bpe_file": None, "tokenizer": self.tokenizer_identity,
                        "val_tokens": self.val_tokens, "sources": sources}
            key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
            self._folder = self.cache_dir / f"{self.document_mode}-{self.seq_len}-{key}"
        return self._folder

    @property
    def tokenizer_identity(self) -> str:
        return self.load_tokenizer().identity

    # ----------------------------------------------------------------------------------------------- preparing
    def plan_validation(self) -> tuple[list[tuple[str, int, int | None]], dict[str, int], int]:
        """The validation slice's segments, how many leading documents each training file gives to it (when it is
        carved from them), and its token count: whole documents until ``val_tokens`` tokens."""
        carve = self.val_patterns is None
        files = resolve_files(self.train_patterns if carve else self.val_patterns,
                              "data.train_files" if carve else "data.val_files")
        tokens, segments, taken = 0, [], {}
        for path in files:
            count = 0
            for document in self.maker.documents([(str(path), 0, None)]):
                count += 1
                tokens += min(document.size, self.seq_len) if self.document_mode == "padded" else document.size
                if tokens >= self.val_tokens:
                    break
            segments.append((str(path), 0, count))
            if carve:
                taken[str(path)] = count
            if tokens >= self.val_tokens:
                break
        return segments, taken, tokens

    def _optimize(self, inputs: list, output: Path, what: str) -> None:
        litdata = _litdata()
        progress = Progress(f"writing the {what} rows ({self.document_mode}, {self.seq_len} tokens) to {output}",
                            unit="files", total=len(inputs))
        litdata.optimize(
            fn=self.maker, inputs=inputs, output_dir=str(output), chunk_bytes=self.chunk_bytes,
            num_workers=min(self.optimize_workers, len(inputs)), mode="overwrite", verbose=False,
            reorder_files=False, start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else None,
        )
        progress.done(len(inputs))

    def prepare_data(self) -> None:
        """Tokenize the sources into LitData datasets unless this very dataset exists (rank 0 of each node)."""
        folder = self.folder()
        meta_path = folder / "meta.json"
        if read_metadata(meta_path) is not None:
            return
        log.info("preparing the streaming dataset %s (LitData optimize, %s tokenizer)", folder,
                 self.maker.tokenizer_kind)
        segments, taken, val_tokens = self.plan_validation()
        if val_tokens < self.val_tokens:
            log.warning("the validation sources hold only %d tokens, fewer than data.val_tokens=%d",
                        val_tokens, self.val_tokens)
        train = resolve_files(self.train_patterns, "data.train_files")
        jobs = [[(str(p), taken.get(str(p), 0), None)] for p in train]
        folder.mkdir(parents=True, exist_ok=True)
        self._optimize([segments], folder / "val", "validation")
        self._optimize(jobs, folder / "train", "training")
        counts = {split: count_rows(folder / split) for split in ("train", "val")}
        if counts["train"] == 0:
            raise DataError(
                f"data.train_files hold no training row of data.seq_len={self.seq_len} + 1 tokens after the "
                "validation slice; add text, lower data.val_tokens or data.seq_len."
            )
        atomic_write_json(meta_path, {"format": FORMAT, "rows": counts, "val_tokens": val_tokens,
                                      "val_segments": segments, "tokenizer": self.tokenizer_identity})
        log.info("streaming dataset ready: %d training rows, %d validation rows (%d tokens)", counts["train"],
                 counts["val"], val_tokens)

    def _dataset(self, folder: Path, shuffle: bool, **kwargs: Any) -> Any:
        litdata = _litdata()
        return litdata.StreamingDataset(str(folder), shuffle=shuffle, **kwargs)

    # ---------------------------------------------------------------------------------------------- Lightning
    def setup(self, stage: str | None = None) -> None:
        folder = self.folder()
        self.meta = read_metadata(folder / "meta.json")
        if self.meta is None:
            raise DataError(
                f"the streaming dataset {folder} is not prepared: run prepare_data() first (Lightning runs it before "
                "each stage on rank 0 of each node), or point data.cache_dir at a shared folder that holds it."
            )
        padded = self.document_mode == "padded"
        if stage in (None, "fit") and "train" not in self.datasets:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            self.datasets["train"] = self._dataset(
                folder / "train", shuffle=self.shuffle, seed=seed, drop_last=True,
                transform=partial(to_sample, padded=padded),
            )
        if stage in (None, "fit", "validate") and "val" not in self.datasets:
            self.datasets["val"] = ValidationRows(
                self._dataset(folder / "val", shuffle=False), count_rows(folder / "val"), padded, self.world_size
            )

    def train_dataloader(self) -> Any:
        """LitData's ``StreamingDataLoader``: sharded over processes, its position saved in checkpoints."""
        if "train" not in self.datasets:
            self.setup("fit")
        litdata = _litdata()
        return litdata.StreamingDataLoader(
            self.datasets["train"], batch_size=self.batch_size, num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(), drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        if "val" not in self.datasets:
            self.setup("validate")
        return DataLoader(self.datasets["val"], batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available())
