"""Padded documents (the paper's protocol, ``data.document_mode: padded``): the exact row layout on a hand-written
corpus, the packed rows equal to the WikiText windows, and both perplexities equal to a direct forward pass."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from qkv_lightning.data.documents import packed_rows, padded_row
from qkv_lightning.data.wikitext import WikiText
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.gpt import IGNORE_INDEX, GPTConfig
from qkv_lightning.tasks.language_model import LanguageModel
from qkv_lightning.tasks.optim import OptimizerConfig

# three articles; the blank line before the first heading joins the first article
CORPUS = " \n = A = \n x y \n = B = \n z \n = C = \n a b c d e f g \n"


def datamodule(tmp_path, **kwargs) -> WikiText:
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        (tmp_path / name).write_text(CORPUS, encoding="utf-8")
    settings = dict(dataset="wikitext-2", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), verify=False,
                    seq_len=8, batch_size=2, num_workers=0, document_mode="padded")
    return WikiText(**{**settings, **kwargs})


def test_padded_rows_of_a_hand_written_corpus_have_the_exact_layout(tmp_path):
    dm = datamodule(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    ids = dm.tokenizer.index
    words = lambda text: [ids[w] for w in text.split()]  # noqa: E731
    e = ids["<eos>"]
    expected = [
        # (inputs, targets, padding): [boundary] + article, cut or padded with the boundary to T + 1 = 9 tokens
        (words("<eos> <eos> = A = <eos> x y"), words("<eos> = A = <eos> x y <eos>"), [0] * 8),  # exactly fits
        (words("<eos> = B = <eos> z <eos> <eos>"), words("= B = <eos> z <eos> <eos> <eos>"), [0] * 6 + [1] * 2),
        (words("<eos> = C = <eos> a b c"), words("= C = <eos> a b c d"), [0] * 8),  # cut: e f g <eos> never seen
    ]
    rows = dm.datasets["train"]
    assert len(rows) == 3 and rows.n_cut() == 4
    for i, (inputs, targets, padding) in enumerate(expected):
        got = rows[i]
        assert got[0].tolist() == inputs and got[1].tolist() == targets
        assert got[2].tolist() == [bool(p) for p in padding]
    assert e == dm.tokenizer.boundary_id
    # a document that does not end with the boundary (BPE lines end with a newline token) gets one appended
    row, n = padded_row(np.array([5, 6]), 4, boundary_id=0)
    assert row.tolist() == [0, 5, 6, 0, 0] and n == 3


def test_packed_rows_equal_the_wikitext_training_windows(tmp_path):
    dm = datamodule(tmp_path, document_mode="packed", seq_len=4)
    dm.prepare_data()
    dm.setup("fit")
    windows = dm.datasets["train"]
    stream = np.asarray(windows.data)
    meta = dm.meta["train"]
    bounds = [*meta["document_starts"], len(stream)]
    assert len(bounds) == 4  # three articles
    documents = [stream[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    rows = list(packed_rows(documents, 4, int(stream[0])))
    assert len(rows) == len(windows)
    for row, (inputs, targets) in zip(rows, (windows[i] for i in range(len(windows))), strict=True):
        assert row[:-1].tolist() == inputs.tolist() and row[1:].tolist() == targets.tolist()


def test_unknown_document_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="document_mode"):
        datamodule(tmp_path, document_mode="chunked")


@pytest.mark.parametrize("score_padding", [False, True])
def test_both_perplexities_equal_a_direct_forward_pass(tmp_path, score_padding):
    torch.manual_seed(0)
    network = GPTConfig(n_layer=2, n_head=2, d_model=32, d_mlp=64, max_seq_len=8, dropout=0.0)
    model = LanguageModel(network=network, optimizer=OptimizerConfig(lr=1e-3, warmup_steps=1))
    dm = datamodule(tmp_path, score_padding=score_padding, eval_batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    metrics = trainer.validate(model, dm, verbose=False)[0]
    rows = dm.datasets["val"]
    samples = [rows[i] for i in range(len(rows))]
    inputs, targets, padding = (torch.stack(x) for x in zip(*samples, strict=True))  # (N, T) each
    with torch.no_grad():
        logp = torch.log_softmax(model.network.eval()(inputs), dim=-1)  # (N, T, V)
    nll = -logp.gather(-1, targets[..., None])[..., 0]  # (N, T)
    with_padding = nll.mean().item()
    without_padding = nll[~padding].mean().item()
    assert int(padding.sum()) == 2  # the padding of article B
    assert metrics["val/ppl_with_padding"] == pytest.approx(math.exp(with_padding), rel=1e-5)
    assert metrics["val/ppl_without_padding"] == pytest.approx(math.exp(without_padding), rel=1e-5)
    assert metrics["val/tokens_with_padding"] == 24 and metrics["val/tokens_without_padding"] == 22
    objective = with_padding if score_padding else without_padding
    assert metrics["val/loss"] == pytest.approx(objective, rel=1e-5)
    # the training loss masks the padding the same way
    model.trainer.datamodule = dm  # the task reads data.score_padding from its trainer's datamodule
    batch = (inputs, targets, padding)
    assert model.training_loss(batch).item() == pytest.approx(objective, rel=1e-5)
    assert (model.scored_targets(batch) == IGNORE_INDEX).sum() == (0 if score_padding else 2)
