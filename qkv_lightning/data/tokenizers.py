"""Tokenizers for language modelling: WikiText's word level (the benchmark's standard) and GPT-2 byte-pair encoding.

Both work line by line on text as stored in the WikiText ``*.tokens`` files (each line ends with ``"\\n"``):

* :class:`WordTokenizer` splits on whitespace and appends ``<eos>`` at each line end; its vocabulary is built from
  the training split, most frequent first (so an adaptive softmax's head cluster holds the frequent words), with
  ``<unk>`` kept as an ordinary word and used for words the vocabulary lacks.
* :class:`BPETokenizer` is GPT-2's BPE through tiktoken, from a local ``.tiktoken`` ranks file (offline, read by
  tiktoken's own loader, which reads local files from tiktoken 0.12) or from ``tiktoken.get_encoding("gpt2")``. The
  line's newline is encoded as text.

Each tokenizer has an :attr:`~Tokenizer.identity` that changes whenever the ids of some text would change; token
caches record it, so a cache made by another tokenizer is never read as if it were this one's.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from qkv_lightning.errors import DataError
from qkv_lightning.files import atomic_write_text

EOS = "<eos>"
UNK = "<unk>"
ENDOFTEXT = "<|endoftext|>"

# The pre-tokenisation pattern of the original GPT-2 release (tiktoken's r50k_base uses an equivalent, faster one).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text whose ids enter a BPE tokenizer's identity: contractions, digits, runs of spaces, line ends, non-ASCII.
PROBE_TEXT = " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : it's 1 @,@ 000 km  long ; they'll  \n\n\t x"


def words_in_line(line: str) -> int:
    """Word-level tokens of one line: its whitespace-separated words plus the ``<eos>`` that ends it."""
    return len(line.split()) + 1


class Tokenizer(ABC):
    """Maps lines of text to token ids and back."""

    name: str
    """Short name used in cache paths (``word`` or ``gpt2``)."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """A string that differs between any two tokenizers that give different ids for some text."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids (the largest id plus one)."""

    @property
    @abstractmethod
    def boundary_id(self) -> int:
        """Id that separates documents and starts every token stream (``<eos>`` or ``<|endoftext|>``)."""

    @abstractmethod
    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        """Ids of each line (lines as read from a file, with their newline)."""

    @abstractmethod
    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt, without a line end."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids."""


class WordTokenizer(Tokenizer):
    """Whitespace words with ``<eos>`` at line ends, over a fixed vocabulary (WikiText's standard tokenization).

    Args:
        words: the vocabulary in id order; ``<eos>`` and ``<unk>`` are added at the end if missing.
    """

    name = "word"

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        for special in (EOS, UNK):
            if special not in words:
                words.append(special)
        if len(set(words)) != len(words):
            raise DataError("the word vocabulary holds a word twice; delete the vocabulary cache to rebuild it.")
        self.words = words
        self.index = {word: i for i, word in enumerate(words)}
        self.eos_id = self.index[EOS]
        self.unk_id = self.index[UNK]
        self.unknown = 0
        """Words not in the vocabulary met by :meth:`encode_lines` so far (each encoded as ``<unk>``)."""
        self._identity = "word:" + hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()[:16]

    @classmethod
    def build(cls, lines: Iterable[str]) -> WordTokenizer:
        """Vocabulary of ``lines`` (streamed), most frequent first; ties keep the order of first appearance."""
        counts: Counter[str] = Counter()
        for line in lines:
            counts.update(line.split())
            counts[EOS] += 1
        return cls([word for word, _ in counts.most_common()])

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def boundary_id(self) -> int:
        return self.eos_id

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        index, unk, eos = self.index, self.unk_id, self.eos_id
        encoded = []
        for line in lines:
            words = line.split()
            ids = [index.get(word, unk) for word in words]
            if unk in ids:
                self.unknown += sum(1 for word, i in zip(words, ids, strict=False) if i == unk and word != UNK)
            ids.append(eos)
            encoded.append(ids)
        return encoded

    def encode_prompt(self, text: str) -> list[int]:
        return [self.index.get(word, self.unk_id) for word in text.split()]

    def decode(self, ids: Iterable[int]) -> str:
        text, line = [], []
        for i in ids:
            word = self.words[i] if 0 <= i < len(self.words) else UNK
            if word == EOS:
                text.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(word)
        return "".join(text) + " ".join(line)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary, one word per line in id order (atomically: temporary file, then rename)."""
        atomic_write_text(path, "".join(f"{word}\n" for word in self.words))

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        """Read a vocabulary written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f])


def _public_ranks(encoding) -> Iterator[tuple[bytes, int]]:
    """An encoding's ``(token bytes, rank)`` pairs through tiktoken's public API (special tokens left out)."""
    special = {encoding.encode_single_token(token) for token in encoding.special_tokens_set}
    for rank in range(encoding.n_vocab):
        if rank not in special:
            try:
                yield encoding.decode_single_token_bytes(rank), rank
            except KeyError:  # a rank the encoding leaves unused
                continue


class BPETokenizer(Tokenizer):
    """GPT-2's byte-pair encoding through tiktoken.

    Args:
        encoding: a ``tiktoken.Encoding`` with GPT-2's ranks and ``<|endoftext|>``.
        ranks: its mergeable ranks (token bytes -> rank), when at hand; else read through tiktoken's public API.
    """

    name = "gpt2"

    def __init__(self, encoding, ranks: dict[bytes, int] | None = None) -> None:
        self.encoding = encoding
        self.eot_id = encoding.eot_token
        # identity: the ranks, the special tokens and the ids of a probe text (equivalent regexes give equal ids),
        # all through tiktoken's public API; the same value as before tiktoken 0.12, so earlier caches and
        # checkpoints keep theirs
        digest = hashlib.sha256()
        pairs = ranks.items() if ranks is not None else _public_ranks(encoding)
        for token, rank in sorted(pairs, key=lambda item: item[1]):
            digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        specials = sorted((token, encoding.encode_single_token(token)) for token in encoding.special_tokens_set)
        digest.update(json.dumps(specials).encode("utf-8"))
        digest.update(json.dumps(encoding.encode_ordinary(PROBE_TEXT)).encode("utf-8"))
        self._identity = "bpe:" + digest.hexdigest()[:16]

    @classmethod
    def from_ranks_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """GPT-2 BPE from a local ``.tiktoken`` ranks file (e.g. ``gpt2.tiktoken``; works offline), read by
        ``tiktoken.load.load_tiktoken_bpe`` with the SHA-256 of the file's bytes as its expected hash: tiktoken keeps
        a copy in its cache folder (``$TIKTOKEN_CACHE_DIR``), keyed by the path, and the hash makes it read a file
        that changed since again, so the ranks (and the identity) are always those of the file as it is now."""
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"GPT-2 BPE ranks file {path} not found (data.bpe_file): point it at a gpt2.tiktoken file (r50k_base), "
                "or set data.bpe_file: null to use tiktoken.get_encoding('gpt2') (needs internet or tiktoken's cache)."
            )
        try:
            data = path.read_bytes()
            ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(data).hexdigest())
        except ValueError as error:  # a file in another format (or one that changed while it was read)
            cause = f" ({error.__cause__})" if error.__cause__ else ""
            raise DataError(f"data.bpe_file={path} is not a .tiktoken ranks file: {error}{cause}.") from error
        except OSError as error:  # tiktoken's cache folder cannot be written
            raise DataError(
                f"reading data.bpe_file={path} failed ({type(error).__name__}: {error}); tiktoken keeps a copy in "
                "$TIKTOKEN_CACHE_DIR (else <tmp>/data-gym-cache): make it writable, or set TIKTOKEN_CACHE_DIR='' to "
                "turn that copy off."
            ) from error
        if not ranks:
            raise DataError(f"data.bpe_file={path} is not a .tiktoken ranks file: it holds no ranks.")
        lines = sum(1 for line in data.splitlines() if line)
        numbers = sorted(ranks.values())
        if len(ranks) != lines or numbers != list(range(lines)):
            gap = next((n for n, rank in enumerate(numbers) if rank != n), None)
            raise DataError(
                f"data.bpe_file={path} is not a complete .tiktoken ranks file: its {lines} lines must give "
                f"{'distinct tokens and ' if len(ranks) != lines else ''}the ranks 0 to {lines - 1}, each "
                f"once{f', but rank {gap} is missing or repeated' if gap is not None else ''}."
            )
        encoding = tiktoken.Encoding(
            name="gpt2-local",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: len(ranks)},
            explicit_n_vocab=len(ranks) + 1,
        )
        return cls(encoding, ranks)

    @classmethod
    def from_tiktoken(cls, name: str = "gpt2") -> BPETokenizer:
        """A tiktoken encoding by name (downloads its file once, or reads ``$TIKTOKEN_CACHE_DIR``)."""
        import tiktoken

        try:
            return cls(tiktoken.get_encoding(name))
        except Exception as error:
            raise DataError(
                f"could not load tiktoken's '{name}' encoding ({type(error).__name__}: {error}). Without internet set "
                "data.bpe_file to a local gpt2.tiktoken ranks file."
            ) from error

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def boundary_id(self) -> int:
        return self.eot_id

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(lines))

    def encode_prompt(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self.encoding.decode(ids, errors="replace")
