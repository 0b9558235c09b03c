"""How a token stream becomes training rows: the one chunking rule of every language-model data module.

Two document modes (``data.document_mode``):

* ``packed`` (the default, exact): documents are concatenated into one stream that starts with the boundary id;
  row ``i`` is the window ``stream[i*T : i*T + T + 1]``, so consecutive rows overlap by one token and every token
  after the first is a target exactly once. Nothing is padded.
* ``padded`` (the paper's protocol): each document is one row of ``T + 1`` tokens: the boundary id, the document
  (ending with one boundary id, appended if it does not end with one), cut to ``T`` tokens or filled up with the
  boundary id. The targets after the document's own tokens are *padding*; ``data.score_padding`` decides whether
  the loss scores them (the paper does, which lowers its perplexities). Both perplexities are logged.

:func:`padded_row` and :func:`packed_rows` are used by :class:`~qkv_lightning.data.wikitext.WikiText` and
:class:`~qkv_lightning.data.streaming.StreamingText` alike, and :func:`row_sample` turns a row into the batch
elements ``(inputs (T,), targets (T,), padding (T,))`` that :class:`~qkv_lightning.tasks.language_model.LanguageModel`
reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import torch

from qkv_lightning.errors import ConfigError

DocumentMode = Literal["packed", "padded"]

DOCUMENT_MODES = ("packed", "padded")


def check_document_mode(mode: str) -> None:
    """Raise a :class:`ConfigError` for a ``data.document_mode`` that is not ``packed`` or ``padded``."""
    if mode not in DOCUMENT_MODES:
        raise ConfigError(
            f"data.document_mode={mode!r} must be 'packed' (documents concatenated into one stream, exact) or "
            "'padded' (each document cut or padded to the context with the boundary token, the paper's protocol)."
        )


def padded_row(document: np.ndarray, seq_len: int, boundary_id: int) -> tuple[np.ndarray, int]:
    """One document as a row of ``seq_len + 1`` ids, and how many of its targets are the document's own.

    The row is ``[boundary, document..., boundary, boundary, ...]``: the document ends with one boundary id
    (appended unless it ends with one already), is cut after ``seq_len`` tokens, and the rest is filled with the
    boundary id. Targets are ``row[1:]``; the first ``n_document`` of them are the document's tokens (its end
    included), the others are padding.

    Args:
        document: the document's ids (1-D).
        seq_len: T, the model's context.
        boundary_id: the end-of-document id (``<eos>`` or ``<|endoftext|>``), also the padding id.

    Returns:
        ``(row, n_document)``: row (T+1,) int64, and ``n_document`` in [0, T].
    """
    document = np.asarray(document, dtype=np.int64)
    if document.size == 0 or document[-1] != boundary_id:
        document = np.append(document, boundary_id)
    n = min(document.size, seq_len)
    row = np.full(seq_len + 1, boundary_id, dtype=np.int64)  # (T+1,)
    row[1 : 1 + n] = document[:n]
    return row, n


def packed_rows(documents: Iterable[np.ndarray], seq_len: int, boundary_id: int) -> Iterator[np.ndarray]:
    """Rows of ``seq_len + 1`` ids of the packed stream ``[boundary] + documents concatenated``.

    Row ``i`` is ``stream[i*T : i*T + T + 1]`` (the windows of
    :class:`~qkv_lightning.data.token_datasets.TokenWindows` in training); a tail shorter than one row is not yielded.
    Memory stays bounded by one document plus one row.
    """
    buffer = np.array([boundary_id], dtype=np.int64)
    for document in documents:
        buffer = np.concatenate([buffer, np.asarray(document, dtype=np.int64)])
        n_rows = (buffer.size - 1) // seq_len
        for i in range(n_rows):
            yield buffer[i * seq_len : i * seq_len + seq_len + 1].copy()  # (T+1,)
        buffer = buffer[n_rows * seq_len :]


def row_sample(row: np.ndarray, n_document: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs (T,), targets (T,), padding (T,) bool)`` of a row; ``n_document`` None: no padding (packed)."""
    row = torch.as_tensor(np.asarray(row, dtype=np.int64))  # (T+1,)
    inputs, targets = row[:-1], row[1:].clone()  # (T,), (T,)
    padding = torch.zeros(targets.shape, dtype=torch.bool)  # (T,)
    if n_document is not None:
        padding[n_document:] = True
    return inputs, targets, padding
