"""Map-style datasets over a memory-mapped token cache (:mod:`qkv_lightning.data.token_cache`): contiguous windows
of ``seq_len + 1`` tokens (training, and exact evaluation that scores every token once), or one padded row per
document."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from qkv_lightning.data.documents import padded_row, row_sample
from qkv_lightning.errors import DataError
from qkv_lightning.nn.gpt import IGNORE_INDEX


class MemmapTokens(Dataset):
    """A dataset over the ``length`` ids (``dtype``) of a memory-mapped ``.bin`` token file at ``path``, mapped on first
    use: a data-loading worker gets the dataset without the map (it is not pickled) and opens its own."""

    def __init__(self, path: Path, length: int, dtype: np.dtype) -> None:
        self.path, self.length, self.dtype = Path(path), length, np.dtype(dtype)
        self._data: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}  # workers open their own memory map

    @property
    def data(self) -> np.ndarray:
        """The token array (length,), read-only."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.length,))
        return self._data


class TokenWindows(MemmapTokens):
    """Windows over a memory-mapped token array, as ``(input ids (T,), target ids (T,))`` pairs of int64.

    Kept (with the ``.bin`` caches) instead of LitData for WikiText: a split of at most 0.1B tokens is one memory map,
    read at any offset, which exact sliding evaluation windows need.

    The array starts with a boundary token that is never a target, so its ``n - 1`` later tokens are the targets.

    * training (``stride`` None): windows ``[i*T, i*T + T + 1)`` for ``i < (n - 1) // T``, all targets scored;
    * evaluation (``stride`` S <= T): windows start at 0, S, 2S, ... (the last one moved back to end at the array's
      end), and each scores only targets no earlier window scored, so every target is scored exactly once; targets
      not scored are :data:`IGNORE_INDEX`. ``pad_to`` appends windows that score nothing until the count is a
      multiple of it (so that every process gets as many batches).

    Args:
        path: the ``.bin`` file.
        length: number of ids in it.
        dtype: their dtype.
        seq_len: tokens per window input (T).
        stride: evaluation stride, or None for training windows.
        pad_to: make the number of windows a multiple of this.
    """

    def __init__(
        self, path: Path, length: int, dtype: np.dtype, seq_len: int, stride: int | None = None, pad_to: int = 1
    ) -> None:
        super().__init__(path, length, dtype)
        self.train = stride is None
        self.seq_len = seq_len if self.train else min(seq_len, length - 1)
        if self.seq_len < 1 or (self.train and (length - 1) // seq_len < 1):
            raise DataError(
                f"{self.path} holds {length - 1} tokens, too few for one window of data.seq_len={seq_len} + 1; "
                "lower data.seq_len or use a longer split."
            )
        if self.train:
            self.starts = None
            self.n_windows = (length - 1) // seq_len
        else:
            span = length - 1 - self.seq_len  # the largest start
            self.stride = stride
            self.n_windows = -(-span // stride) + 1 if span > 0 else 1
        self.padded = -(-self.n_windows // pad_to) * pad_to

    def __len__(self) -> int:
        return self.n_windows if self.train else self.padded

    def start(self, i: int) -> int:
        if self.train:
            return i * self.seq_len
        return min(i * self.stride, self.length - 1 - self.seq_len)

    def first_scored(self, i: int) -> int:
        """Absolute index of the first target window ``i`` scores (an earlier window scored those before it)."""
        if self.train or i == 0:
            return self.start(i) + 1
        return self.start(i - 1) + self.seq_len + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        padding = i >= self.n_windows
        j = 0 if padding else i
        begin = self.start(j)
        chunk = torch.from_numpy(self.data[begin : begin + self.seq_len + 1].astype(np.int64))  # (T+1,)
        inputs, targets = chunk[:-1], chunk[1:].clone()  # (T,), (T,)
        if padding:
            targets.fill_(IGNORE_INDEX)
        elif not self.train:
            targets[: self.first_scored(j) - begin - 1] = IGNORE_INDEX
        return inputs, targets


class DocumentRows(MemmapTokens):
    """One row per document (article) of a memory-mapped token array, cut or padded to ``seq_len`` (padded mode).

    Items are ``(inputs (T,), targets (T,), padding (T,) bool)`` from :func:`~qkv_lightning.data.documents.padded_row`.
    ``pad_to`` appends rows that score nothing (targets :data:`IGNORE_INDEX`) until the count is a multiple of it.

    Args:
        path: the ``.bin`` file.
        length: number of ids in it.
        dtype: their dtype.
        starts: array offsets where documents start (the first one 1: offset 0 is the stream's boundary token).
        seq_len: T.
        boundary_id: the end-of-document and padding id.
        pad_to: make the number of rows a multiple of this.
    """

    def __init__(
        self, path: Path, length: int, dtype: np.dtype, starts: list[int], seq_len: int, boundary_id: int,
        pad_to: int = 1,
    ) -> None:
        super().__init__(path, length, dtype)
        bounds = [*starts, length]
        self.spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        if not self.spans:
            raise DataError(f"{self.path} holds no document; use a longer split or data.document_mode: packed.")
        self.seq_len, self.boundary_id = seq_len, boundary_id
        self.padded = -(-len(self.spans) // pad_to) * pad_to

    def __len__(self) -> int:
        return self.padded

    def n_cut(self) -> int:
        """Document tokens (their end included) that do not fit into their row and are never seen."""
        return sum(max(0, b - a + (self.data[b - 1] != self.boundary_id) - self.seq_len) for a, b in self.spans)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = self.spans[min(i, len(self.spans) - 1)]
        row, n_document = padded_row(self.data[a : min(b, a + self.seq_len)], self.seq_len, self.boundary_id)
        inputs, targets, padding = row_sample(row, n_document)
        if i >= len(self.spans):
            targets.fill_(IGNORE_INDEX)
            padding.zero_()
        return inputs, targets, padding
