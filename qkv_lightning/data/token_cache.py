"""Token caches: a text file (or a line range of it) tokenized line by line into a flat ``<prefix>.bin`` array of ids
that starts with the boundary token, next to a ``<prefix>.json`` recording the source file's SHA-256, the line
range, the tokenizer's identity and the array's size and SHA-256; and the check that a cache still fits its source
and tokenizer. Also the streamed reading of the source text (checksum, lines, article starts)."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkv_lightning.data.progress import Progress
from qkv_lightning.data.tokenizers import Tokenizer, words_in_line
from qkv_lightning.errors import DataError
from qkv_lightning.files import atomic_open, atomic_write_json, file_digest, read_json

CACHE_FORMAT = 1
"""Version of the cache layout; caches of another version are rebuilt."""

ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")
"""A top-level heading (`` = Title = ``) starts a new article."""


# ------------------------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class FileInfo:
    """What one pass over a text file tells: checksum, size, line count, and whether it ends with a line end."""

    sha256: str
    size: int
    lines: int
    ends_with_newline: bool


def scan_file(path: Path) -> FileInfo:
    """Checksum and count the lines of ``path`` in one streamed pass."""
    digest, size, lines, last = hashlib.sha256(), 0, 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return FileInfo(digest.hexdigest(), size, lines, last == b"\n")


def iter_lines(path: Path, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Lines ``start .. stop-1`` of a UTF-8 text file, each with its line end, streamed."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from itertools.islice(f, start, stop)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}); use the official WikiText files.") from error


def article_starts(path: Path) -> list[int]:
    """Indices of the lines that start an article (top-level headings)."""
    return [i for i, line in enumerate(iter_lines(path)) if ARTICLE_HEADING.match(line.rstrip("\n"))]



def read_metadata(path: Path) -> dict | None:
    """The metadata this code wrote beside a cache (:func:`~qkv_lightning.files.read_json`); None if it is missing
    or damaged (the cache is then rebuilt).

    Raises:
        DataError: the file holds JSON that is not a mapping (edited or replaced), or ``path`` is a folder.
    """
    return read_json(path, "the cache metadata", "point data.cache_dir elsewhere", damaged_ok=True)


# ------------------------------------------------------------------------------------------------------------ caches
@dataclass(frozen=True)
class SplitSource:
    """Where a split's text is: lines ``start .. stop-1`` of ``path`` (``stop`` None: to the end)."""

    path: Path
    start: int = 0
    stop: int | None = None

    @property
    def whole_file(self) -> bool:
        return self.start == 0 and self.stop is None


def cache_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def build_token_cache(
    source: SplitSource, info: FileInfo, tokenizer: Tokenizer, prefix: Path, chunk_lines: int = 4096,
    what: str | None = None,
) -> dict:
    """Tokenize ``source`` line by line into ``<prefix>.bin`` (boundary id, then the text's ids) and ``.json``.

    Memory stays bounded by one chunk of lines; progress lines (tokens, tokens/s) name the job ``what``. Returns the
    metadata that was written.
    """
    progress = Progress(what or f"tokenizing {source.path}", unit="tokens")
    dtype = cache_dtype(tokenizer.vocab_size)
    bin_path, meta_path = prefix.with_suffix(".bin"), prefix.with_suffix(".json")
    digest = hashlib.sha256()
    n_tokens = n_words = n_lines = 0
    document_starts = [1]  # array offsets where a document (article) starts; text before the first heading joins it
    headings = 0
    unknown_before = getattr(tokenizer, "unknown", 0)
    meta_path.unlink(missing_ok=True)  # the old metadata never describes a new array
    with atomic_open(bin_path) as out:
        head = np.array([tokenizer.boundary_id], dtype=dtype).tobytes()
        out.write(head)
        digest.update(head)
        lines = iter_lines(source.path, source.start, source.stop)
        while chunk := list(itertools.islice(lines, chunk_lines)):
            ids = tokenizer.encode_lines(chunk)
            offset = 1 + n_tokens
            for line, line_ids in zip(chunk, ids, strict=True):
                if ARTICLE_HEADING.match(line.rstrip("\n")):
                    if headings and offset > document_starts[-1]:
                        document_starts.append(offset)
                    headings += 1
                offset += len(line_ids)
            array = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype)
            data = array.tobytes()
            out.write(data)
            digest.update(data)
            n_tokens += array.size
            n_words += sum(words_in_line(line) for line in chunk)
            n_lines += len(chunk)
            progress.update(array.size)
    progress.done()
    meta = {
        "format": CACHE_FORMAT,
        "source": str(source.path),
        "source_sha256": info.sha256,
        "source_bytes": info.size,
        "range": [source.start, source.stop],
        "n_lines": n_lines,
        "tokenizer": tokenizer.identity,
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "n_words": n_words,
        "n_unknown": getattr(tokenizer, "unknown", 0) - unknown_before,
        "array_bytes": (n_tokens + 1) * dtype.itemsize,
        "array_sha256": digest.hexdigest(),
        "document_starts": document_starts,
    }
    atomic_write_json(meta_path, meta, sort_keys=True)
    return meta


def cache_mismatch(prefix: Path, expected: dict, check_array: bool) -> str | None:
    """Why the cache at ``prefix`` does not fit ``expected`` (metadata keys and values), or None if it does.

    The array's size is always checked; its SHA-256 too with ``check_array``.
    """
    meta_path, bin_path = prefix.with_suffix(".json"), prefix.with_suffix(".bin")
    for path in (meta_path, bin_path):
        if path.exists() and not path.is_file():
            raise DataError(
                f"the token cache path {path} is a {'folder' if path.is_dir() else 'special file'}, not a file; it "
                "was not made by this code, so it is left alone. Move it away, or point data.cache_dir elsewhere."
            )
    meta = read_metadata(meta_path)
    if meta is None or not bin_path.is_file():
        return "it does not exist yet"
    for key, value in expected.items():
        if meta.get(key) != value:
            return f"its {key} is {meta.get(key)!r}, but the current one is {value!r}"
    size = bin_path.stat().st_size
    if size != meta.get("array_bytes"):
        return f"its token file has {size} bytes instead of the recorded {meta.get('array_bytes')} (truncated?)"
    try:
        itemsize = np.dtype(meta.get("dtype")).itemsize if meta.get("dtype") in ("uint16", "uint32") else None
        counted = (int(meta["n_tokens"]) + 1) * itemsize if itemsize else None
    except (KeyError, TypeError, ValueError):
        counted = None
    if counted != size:
        return (
            f"its recorded dtype {meta.get('dtype')!r} x {meta.get('n_tokens')!r} tokens (+1) does not make the "
            f"{size} bytes of its token file (the metadata was edited)"
        )
    if check_array and file_digest(bin_path) != meta.get("array_sha256"):
        return "its token file's SHA-256 differs from the recorded one (modified or damaged)"
    return None
