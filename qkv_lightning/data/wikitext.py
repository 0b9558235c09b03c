"""WikiText-103 and WikiText-2 for language modelling, word level, GPT-2 BPE or a model's own Hugging Face tokenizer,
with memory-mapped token caches.

Data flow:

* ``data_dir`` holds the official files ``wiki.{train,valid,test}.tokens`` (or ``download: true`` fetches the
  official archive once and checks its MD5). Each split's file is a setting, and ``split_test_for_val`` carves the
  validation split out of the test file, so the offline "validation text for training, test text split into
  validation and test" arrangement is a config.
* :meth:`WikiText.prepare_data` (rank 0 of each node only) streams each file line by line through the tokenizer into
  ``<cache_dir>/<tokenizer>/<split>.bin`` (a flat array of ids that starts with the boundary token; ``<tokenizer>``
  is ``word``, ``gpt2``, or ``hf-<identity>`` for a Hugging Face tokenizer) next to a small ``<split>.json``
  recording the source file's SHA-256, the line range, the tokenizer's identity and the array's size and SHA-256.
  Writes go to a temporary file that is renamed into place. A cache that no longer matches its source or tokenizer
  is rebuilt (or, with ``rebuild_cache: false``, reported as an error).
* :meth:`WikiText.setup` memory-maps the caches. Training samples are contiguous windows of ``seq_len + 1`` tokens;
  evaluation windows score every token exactly once (non-overlapping, or sliding with ``eval_stride``), and are padded
  with empty windows to a multiple of the number of processes, so that the summed loss over all ranks divided by the
  number of scored tokens is the exact perplexity.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from qkv_lightning.data.documents import DocumentMode, check_document_mode
from qkv_lightning.data.hf_tokenizer import check_tokenizer_settings, subword_tokenizer
from qkv_lightning.data.loading import check_loader_settings, train_loader
from qkv_lightning.data.progress import Progress
from qkv_lightning.data.text import TextData
from qkv_lightning.data.token_cache import (
    CACHE_FORMAT,
    FileInfo,
    SplitSource,
    article_starts,
    build_token_cache,
    cache_dtype,
    cache_mismatch,
    iter_lines,
    read_metadata,
    scan_file,
)
from qkv_lightning.data.token_datasets import DocumentRows, TokenWindows
from qkv_lightning.data.tokenizers import Tokenizer, WordTokenizer
from qkv_lightning.data.wikitext_release import OFFICIAL, download_release
from qkv_lightning.errors import ConfigError, DataError
from qkv_lightning.files import atomic_write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

DEFAULT_PROMPTS = [" = Valkyria Chronicles III = \n", " The history of the"]


class WikiText(TextData):
    """WikiText-103 or WikiText-2, word level, GPT-2 BPE or a Hugging Face tokenizer, as windows of ``seq_len + 1``
    tokens.

    Args:
        dataset: which release; decides the download and the official line/token counts files are checked against.
        data_dir: folder with the split files (the official ``wiki.{train,valid,test}.tokens``). Only read, unless
            ``download`` fetches the files into it.
        cache_dir: writable folder for token caches and the word vocabulary; None means ``<data_dir>/cache``.
        download: fetch the official archive (checking its MD5) when split files are missing.
        tokenizer: ``word``: whitespace words plus ``<eos>`` per line over the training split's vocabulary (the
            benchmark's standard); ``gpt2``: GPT-2 BPE (tiktoken); ``hf``: a model's own Hugging Face tokenizer from
            ``tokenizer_file``, each line encoded with its newline and without special tokens, the stream started by
            its BOS (or ``<|endoftext|>``-like special token; :mod:`qkv_lightning.data.hf_tokenizer`).
        bpe_file: ``gpt2``: GPT-2 ``.tiktoken`` ranks file for offline use; None uses
            ``tiktoken.get_encoding("gpt2")``. Other tokenizers ignore it.
        tokenizer_file: ``hf`` (and only then): a Hugging Face ``tokenizer.json``, or a checkpoint (``.ckpt``,
            ``.pt``, ``.pth``) that ``import`` wrote (it stores the imported model's own tokenizer) or that ``fit``
            with ``hf`` wrote (it stores the tokenizer of its data).
        train_file: training text, relative to ``data_dir`` (or absolute).
        val_file: validation text; unused when ``split_test_for_val`` is set.
        test_file: test text.
        split_test_for_val: carve validation out of ``test_file``: the articles in the first fraction of its lines
            become the validation split, the rest the test split (cut at an article boundary). None: use ``val_file``.
        seq_len: tokens per sample (the model sees ``seq_len`` and predicts the next ``seq_len``).
        eval_stride: evaluation windows advance by this many tokens and score only their last ``eval_stride``
            targets (more context per scored token); None means ``seq_len`` (non-overlapping windows).
        batch_size: training samples per device and step.
        eval_batch_size: evaluation samples per device; None means ``batch_size``.
        num_workers: data-loading worker processes per device.
        pin_memory: pin batches in page-locked memory (only used when CUDA is available).
        verify: check official files (by file name) against the release's line and token counts, which catches
            truncated or altered files.
        rebuild_cache: rebuild caches that no longer match their source file or tokenizer; False raises an error
            instead (for shared caches that must not change).
        prompts: texts that ``predict`` continues; None gives two WikiText-style prompts.
        document_mode: ``packed`` (default, exact): the split is one token stream cut into windows; ``padded`` (the
            paper's protocol): each document is one sample, cut or padded to ``seq_len`` with the boundary token
            (see :mod:`qkv_lightning.data.documents`). A WikiText document is an article: from its top-level heading
            line `` = Title = `` to the line before the next one (text before the first heading joins the first
            article). Evaluation then scores each document's first ``seq_len`` tokens and logs both perplexities.
        score_padding: in ``padded`` mode, the training loss (and ``val/loss``, ``val/ppl``) also scores the padding
            targets, as the paper did; ``val/ppl_with_padding`` and ``val/ppl_without_padding`` are logged either way.
    """

    def __init__(
        self,
        dataset: Literal["wikitext-103", "wikitext-2"] = "wikitext-103",
        data_dir: str = "data/wikitext-103",
        cache_dir: str | None = None,
        download: bool = False,
        tokenizer: Literal["word", "gpt2", "hf"] = "word",
        bpe_file: str | None = None,
        tokenizer_file: str | None = None,
        train_file: str = "wiki.train.tokens",
        val_file: str | None = "wiki.valid.tokens",
        test_file: str = "wiki.test.tokens",
        split_test_for_val: float | None = None,
        seq_len: int = 512,
        eval_stride: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        verify: bool = True,
        rebuild_cache: bool = True,
        prompts: list[str] | None = None,
        document_mode: DocumentMode = "packed",
        score_padding: bool = False,
    ) -> None:
        super().__init__()
        check_document_mode(document_mode)
        if dataset not in OFFICIAL:
            raise ConfigError(f"data.dataset={dataset!r} is not one of {sorted(OFFICIAL)}.")
        check_tokenizer_settings(tokenizer, ("word", "gpt2", "hf"), bpe_file, tokenizer_file)
        if seq_len < 1:
            raise ConfigError(f"data.seq_len={seq_len} must be at least 1.")
        if eval_stride is not None and not 1 <= eval_stride <= seq_len:
            raise ConfigError(f"data.eval_stride={eval_stride} must lie in [1, data.seq_len={seq_len}] (or be null).")
        if split_test_for_val is not None and not 0.0 < split_test_for_val < 1.0:
            raise ConfigError(f"data.split_test_for_val={split_test_for_val} must lie strictly between 0 and 1.")
        if split_test_for_val is None and val_file is None:
            raise ConfigError("data.val_file is null: name a validation file or set data.split_test_for_val.")
        check_loader_settings(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        self.release = OFFICIAL[dataset]
        self.dataset = dataset
        self.data_dir = Path(data_dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.data_dir / "cache"
        self.download = download
        self.tokenizer_kind = tokenizer
        self.bpe_file = bpe_file
        self.tokenizer_file = tokenizer_file
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.split_test_for_val = split_test_for_val
        self.seq_len = seq_len
        self.eval_stride = eval_stride or seq_len
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.verify = verify
        self.rebuild_cache = rebuild_cache
        self.prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
        self.document_mode = document_mode
        self.score_padding = score_padding
        self.tokenizer: Tokenizer | None = None
        self.datasets: dict[str, TokenWindows | DocumentRows] = {}
        self.meta: dict[str, dict] = {}
        self._infos: dict[Path, FileInfo] = {}

    # ------------------------------------------------------------------------------------------------ locations
    def path_of(self, split: str) -> Path:
        """The file that holds ``split``'s text (the test file for both splits when it is split)."""
        name = self.files["test" if split == "val" and self.split_test_for_val is not None else split]
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.data_dir / path

    def setting_of(self, split: str) -> str:
        return "data.test_file" if split == "val" and self.split_test_for_val is not None else f"data.{split}_file"

    @property
    def token_dir(self) -> Path:
        """``<cache_dir>/word``, ``<cache_dir>/gpt2``, or ``<cache_dir>/hf-<identity>`` (one folder per tokenizer)."""
        if self.tokenizer_kind == "hf":
            return self.cache_dir / self.load_tokenizer().identity.replace(":", "-")
        return self.cache_dir / self.tokenizer_kind

    def needed_splits(self, stage: str | None) -> tuple[str, ...]:
        """Splits a stage reads (all of them when the stage is unknown)."""
        return {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}.get(stage, SPLITS)

    def _stage(self) -> str | None:
        """The running trainer's stage (fit, validate, test, predict), or None outside a trainer."""
        fn = getattr(getattr(self.trainer, "state", None), "fn", None)
        return getattr(fn, "value", None)

    def info(self, path: Path, split: str) -> FileInfo:
        """Scan a source file once per run (checksum, lines), and reject empty, cut or (verify) altered files."""
        if path in self._infos:
            return self._infos[path]
        info = scan_file(path)
        setting = self.setting_of(split)
        if info.size == 0:
            raise DataError(f"{path} ({setting}) is empty; replace it with the official {self.release.title} file.")
        if not info.ends_with_newline:
            raise DataError(
                f"{path} ({setting}) does not end with a line end, so it was cut short (an interrupted copy or "
                f"download?); replace it with the official {self.release.title} file."
            )
        official = self.release.lines.get(path.name)
        if self.verify and official is not None and info.lines != official:
            raise DataError(
                f"{path} ({setting}) has {info.lines} lines, but the official {self.release.title} {path.name} has "
                f"{official}: the file is truncated or not the official one. Replace it (data.download: true fetches "
                "it), or set data.verify: false to use it anyway."
            )
        self._infos[path] = info
        return info

    def sources(self) -> dict[str, SplitSource]:
        """Each split's text: a whole file, or a line range of the test file with ``split_test_for_val``."""
        sources = {split: SplitSource(self.path_of(split)) for split in SPLITS}
        if self.split_test_for_val is not None:
            path = sources["test"].path
            info = self.info(path, "test")
            starts = [s for s in article_starts(path) if s >= self.split_test_for_val * info.lines]
            cut = starts[0] if starts else round(self.split_test_for_val * info.lines)
            if not 0 < cut < info.lines:
                raise ConfigError(
                    f"data.split_test_for_val={self.split_test_for_val} leaves no lines for validation or test in "
                    f"{path}."
                )
            sources["val"] = SplitSource(path, 0, cut)
            sources["test"] = SplitSource(path, cut, None)
        return sources

    def check_files(self, splits: tuple[str, ...], download: bool = True) -> None:
        """Make sure the files of ``splits`` exist: download them when allowed (``data.download``, and only from
        ``prepare_data``), else explain what is missing."""
        missing = [(split, self.path_of(split)) for split in splits if not self.path_of(split).is_file()]
        if not missing:
            return
        official_names = all(path.name in self.release.lines and path.parent == self.data_dir for _, path in missing)
        if self.download and download and official_names:
            download_release(self.release, self.data_dir)
            return
        listing = ", ".join(f"{path} ({self.setting_of(split)})" for split, path in missing)
        if not self.download:
            hint = (
                "set data.download: true on a machine with internet to fetch the official archive, or put the "
                f"official {self.release.title} files there"
            )
        elif not download:
            hint = "run prepare_data() first, which downloads them (Lightning runs it before every stage)"
        else:
            hint = "data.download only fetches the official file names into data.data_dir; fix the file settings"
        raise DataError(f"{self.release.title} split file(s) not found: {listing}. Set data.data_dir, or {hint}.")

    # ------------------------------------------------------------------------------------------------ tokenizer
    def vocab_paths(self) -> tuple[Path, Path]:
        return self.cache_dir / "word" / "vocab.txt", self.cache_dir / "word" / "vocab.json"

    def prepare_vocab(self, source: SplitSource, info: FileInfo) -> None:
        """Build the word vocabulary from the training split, unless a matching one is cached."""
        vocab_path, meta_path = self.vocab_paths()
        expected = self.expected_meta(source, None, info)
        meta = read_metadata(meta_path)
        if meta is not None and vocab_path.is_file() and all(meta.get(k) == v for k, v in expected.items()):
            return
        if meta is not None and not self.rebuild_cache:
            raise DataError(
                f"the cached word vocabulary {vocab_path} was built from other training text than "
                f"{source.path} ({self.setting_of('train')}) and data.rebuild_cache is false; delete it, point "
                "data.cache_dir elsewhere, or set data.rebuild_cache: true."
            )
        progress = Progress(f"building the word vocabulary of {source.path}", unit="lines")

        def counted(lines: Iterator[str]) -> Iterator[str]:
            for line in lines:
                progress.update(1)
                yield line

        tokenizer = WordTokenizer.build(counted(iter_lines(source.path, source.start, source.stop)))
        progress.done()
        log.info("the word vocabulary has %d types", tokenizer.vocab_size)
        official = self.release.vocab_size
        official_train = source.whole_file and source.path.name == "wiki.train.tokens"
        if self.verify and official_train and tokenizer.vocab_size != official:
            log.warning(
                "the word vocabulary of %s has %d types, the official %s vocabulary %d",
                source.path, tokenizer.vocab_size, self.release.title, official,
            )
        vocab_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(vocab_path)
        atomic_write_json(meta_path, {**expected, "n_types": tokenizer.vocab_size, "tokenizer": tokenizer.identity},
                          sort_keys=True)

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer: GPT-2 BPE, a Hugging Face tokenizer, or the word vocabulary that :meth:`prepare_data`
        built."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_kind in ("gpt2", "hf"):
            self.tokenizer = subword_tokenizer(self.tokenizer_kind, self.bpe_file, self.tokenizer_file)
            return self.tokenizer
        vocab_path, meta_path = self.vocab_paths()
        self.check_files(("train",), download=False)
        source = SplitSource(self.path_of("train"))
        meta = read_metadata(meta_path)
        expected = self.expected_meta(source, None, None)
        if meta is None or not vocab_path.is_file() or any(meta.get(k) != v for k, v in expected.items()):
            raise DataError(
                f"no word vocabulary for {source.path} ({self.setting_of('train')}) in {vocab_path.parent}: run "
                "prepare_data() first (Lightning does so before fit/validate/test/predict), or fix data.cache_dir."
            )
        self.tokenizer = WordTokenizer.load(vocab_path)
        if self.tokenizer.identity != meta.get("tokenizer"):
            raise DataError(f"{vocab_path} was modified after it was built; delete it so that it is rebuilt.")
        return self.tokenizer

    # ---------------------------------------------------------------------------------------------- Lightning
    def prepare_data(self) -> None:
        """Download (if allowed), check the files, build the vocabulary and the token caches (rank 0 only)."""
        splits = self.needed_splits(self._stage())
        word = self.tokenizer_kind == "word"
        self.check_files(tuple(dict.fromkeys((*splits, "train") if word else splits)))
        try:
            self.token_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.token_dir):
                pass
        except OSError as error:
            raise DataError(
                f"cannot write token caches to {self.token_dir} ({error}); set data.cache_dir to a writable folder."
            ) from error
        sources = self.sources()
        if word:
            self.prepare_vocab(sources["train"], self.info(sources["train"].path, "train"))
        tokenizer = self.load_tokenizer()
        for split in splits:
            source = sources[split]
            info = self.info(source.path, split)
            prefix = self.token_dir / split
            expected = self.expected_meta(source, tokenizer, info)
            reason = cache_mismatch(prefix, expected, check_array=True) or self.documents_missing(prefix)
            if reason is None:
                continue
            if reason != "it does not exist yet" and not self.rebuild_cache:
                raise DataError(
                    f"the token cache {prefix}.bin does not match {source.path} and data.tokenizer="
                    f"{self.tokenizer_kind}: {reason}. Delete it, point data.cache_dir elsewhere, or set "
                    "data.rebuild_cache: true."
                )
            log.info("building the token cache %s.bin of %s (%s split): %s", prefix, source.path, split, reason)
            what = f"tokenizing the {split} split ({source.path.name}, {self.tokenizer_kind})"
            meta = build_token_cache(source, info, tokenizer, prefix, what=what)
            self.check_counts(split, source, meta, prefix)

    def documents_missing(self, prefix: Path) -> str | None:
        """Why a cache cannot serve ``padded`` mode (it records no document starts: an older cache), or None."""
        if self.document_mode != "padded" or "document_starts" in (read_metadata(prefix.with_suffix(".json")) or {}):
            return None
        return "it records no document boundaries (made by an older version), which data.document_mode: padded needs"

    def expected_meta(self, source: SplitSource, tokenizer: Tokenizer | None, info: FileInfo | None) -> dict:
        """Metadata a valid cache of ``source`` must record (the checksum only when ``info`` has been computed)."""
        expected: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "source_bytes": info.size if info else source.path.stat().st_size,
            "range": [source.start, source.stop],
        }
        if tokenizer is not None:
            expected["tokenizer"] = tokenizer.identity
            expected["dtype"] = cache_dtype(tokenizer.vocab_size).name
        if info is not None:
            expected["source_sha256"] = info.sha256
        return expected

    def check_counts(self, split: str, source: SplitSource, meta: dict, prefix: Path) -> None:
        """Reject a whole official file whose word count differs from the release's (after tokenizing it)."""
        official = self.release.tokens.get(source.path.name)
        if not (self.verify and source.whole_file and official is not None) or meta["n_words"] == official:
            return
        prefix.with_suffix(".json").unlink(missing_ok=True)
        raise DataError(
            f"{source.path} ({self.setting_of(split)}) has {meta['n_words']} word-level tokens, but the official "
            f"{self.release.title} {source.path.name} has {official}: the file is altered or not the official one. "
            "Replace it (data.download: true fetches it), or set data.verify: false to use it anyway."
        )

    def setup(self, stage: str | None = None) -> None:
        tokenizer = self.load_tokenizer()
        splits = self.needed_splits(stage)
        if not splits:
            return
        self.check_files(splits, download=False)
        sources = self.sources() if self.split_test_for_val is not None else None
        for split in splits:
            if split in self.datasets:
                continue
            source = sources[split] if sources else SplitSource(self.path_of(split))
            prefix = self.token_dir / split
            reason = cache_mismatch(prefix, self.expected_meta(source, tokenizer, None), check_array=False)
            reason = reason or self.documents_missing(prefix)
            if reason is not None:
                raise DataError(
                    f"the token cache {prefix}.bin cannot be used for {source.path} with data.tokenizer="
                    f"{self.tokenizer_kind}: {reason}. Run prepare_data() (Lightning runs it before each stage on rank "
                    "0), or delete the cache so that it is rebuilt."
                )
            meta = read_metadata(prefix.with_suffix(".json"))
            self.meta[split] = meta
            if self.document_mode == "padded":
                self.datasets[split] = DocumentRows(
                    prefix.with_suffix(".bin"), meta["n_tokens"] + 1, np.dtype(meta["dtype"]),
                    meta["document_starts"], self.seq_len, tokenizer.boundary_id,
                    pad_to=1 if split == "train" else self.world_size,
                )
                log.info(
                    "%s: %d documents, padded or cut to %d tokens (%d of %d tokens cut off)", split,
                    len(self.datasets[split].spans), self.seq_len, self.datasets[split].n_cut(), meta["n_tokens"],
                )
                continue
            stride = None if split == "train" else self.eval_stride
            self.datasets[split] = TokenWindows(
                prefix.with_suffix(".bin"), meta["n_tokens"] + 1, np.dtype(meta["dtype"]), self.seq_len, stride,
                pad_to=1 if split == "train" else self.world_size,
            )

    def tokens_per_word(self, split: str) -> float | None:
        """Tokens per word-level token of a loaded split: turns per-token into per-word loss (None if not loaded)."""
        meta = self.meta.get(split)
        if not meta or not meta["n_words"] or self.document_mode == "padded":  # padded: not the whole text is scored
            return None
        return meta["n_tokens"] / meta["n_words"]

    # --------------------------------------------------------------------------------------------- dataloaders
    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup({"val": "validate", "test": "test"}[split])
        return DataLoader(
            self.datasets[split],
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled windows in a seeded order (``seed_everything``'s seed), resumable mid-epoch from checkpoints."""
        if "train" not in self.datasets:
            self.setup("fit")
        return train_loader(
            self.datasets["train"],
            self.batch_size,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
