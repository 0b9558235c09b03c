"""Tokenizers for language modelling: WikiText's word level (the benchmark's standard) and GPT-2 byte-pair encoding.

Both work line by line on text as stored in the WikiText ``*.tokens`` files (each line ends with ``"\\n"``):

* :class:`WordTokenizer` splits on whitespace and appends ``<eos>`` at each line end; its vocabulary is built from
  the training split, most frequent first (so an adaptive softmax's head cluster holds the frequent words), with
  ``<unk>`` kept as an ordinary word and used for words the vocabulary lacks.
* :class:`BPETokenizer` is GPT-2's BPE through tiktoken, from a local ``.tiktoken`` ranks file (offline) or from
  ``tiktoken.get_encoding("gpt2")``. The line's newline is encoded as text.

Each tokenizer has an :attr:`~Tokenizer.identity` that changes whenever the ids of some text would change; token
caches record it, so a cache made by another tokenizer is never read as if it were this one's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from qkv_lightning.errors import DataError

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
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        tmp.write_text("".join(f"{word}\n" for word in self.words), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        """Read a vocabulary written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f])


class BPETokenizer(Tokenizer):
    """GPT-2's byte-pair encoding through tiktoken.

    Args:
        encoding: a ``tiktoken.Encoding`` with GPT-2's ranks and ``<|endoftext|>``.
    """

    name = "gpt2"

    def __init__(self, encoding) -> None:
        self.encoding = encoding
        self.eot_id = encoding.eot_token
        # identity: the ranks, the special tokens and the ids of a probe text (equivalent regexes give equal ids)
        digest = hashlib.sha256()
        for token, rank in sorted(encoding._mergeable_ranks.items(), key=lambda item: item[1]):
            digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        digest.update(json.dumps(sorted(encoding._special_tokens.items())).encode("utf-8"))
        digest.update(json.dumps(encoding.encode_ordinary(PROBE_TEXT)).encode("utf-8"))
        self._identity = "bpe:" + digest.hexdigest()[:16]

    @classmethod
    def from_ranks_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """GPT-2 BPE from a local ``.tiktoken`` ranks file (e.g. ``gpt2.tiktoken``; works offline).

        The file is parsed here (one ``base64-token rank`` pair per line, tiktoken's format) rather than with
        ``tiktoken.load.load_tiktoken_bpe``, which at our tiktoken floor (0.7-0.9) reads local files only through
        the optional ``blobfile`` package."""
        import tiktoken

        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"GPT-2 BPE ranks file {path} not found (data.bpe_file): point it at a gpt2.tiktoken file (r50k_base), "
                "or set data.bpe_file: null to use tiktoken.get_encoding('gpt2') (needs internet or tiktoken's cache)."
            )
        try:
            pairs = [
                (base64.b64decode(token, validate=True), int(rank))
                for token, rank in (line.split() for line in path.read_bytes().splitlines() if line)
            ]
        except Exception as error:  # a file in another format
            raise DataError(f"data.bpe_file={path} is not a .tiktoken ranks file ({error}).") from error
        ranks = dict(pairs)
        numbers = sorted(rank for _, rank in pairs)
        if len(ranks) != len(pairs) or numbers != list(range(len(pairs))):
            gap = next((n for n, rank in enumerate(numbers) if rank != n), None)
            raise DataError(
                f"data.bpe_file={path} is not a complete .tiktoken ranks file: its {len(pairs)} lines must give "
                f"{'distinct tokens and ' if len(ranks) != len(pairs) else ''}the ranks 0 to {len(pairs) - 1}, each "
                f"once{f', but rank {gap} is missing or repeated' if gap is not None else ''}."
            )
        n_vocab = len(ranks) + 1
        encoding = tiktoken.Encoding(
            name="gpt2-local",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: len(ranks)},
            explicit_n_vocab=n_vocab,
        )
        return cls(encoding)

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
