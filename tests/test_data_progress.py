"""What a first run prints while its data is prepared (issue 18, item 5): one line per split while tokenizing and
caching, with tokens/s, on rank 0 only; and the offline LM config prints its final validation metrics."""

from __future__ import annotations

import re

import pytest
from lightning.pytorch.utilities import rank_zero_only

from qkv_lightning.cli import main
from tests.lm_fixtures import write_wikitext
from tests.run_fixtures import lm_config_args

SMALL = ["--model.network.n_layer", "1", "--model.network.n_head", "2", "--model.network.d_model", "16",
         "--model.network.d_mlp", "32", "--model.network.max_seq_len", "16", "--data.seq_len", "16",
         "--model.network.adaptive_cutoffs", "[20, 40]", "--trainer.max_steps", "2",
         "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2"]


def done_line(split: str, file: str) -> re.Pattern:
    number = r"[\d.]+[kMG]?"
    return re.compile(rf"^\[data\]   tokenizing the {split} split \({file}, word\): done, {number} tokens in [\d.]+ s "
                      rf"\({number} tokens/s\)$", re.M)


def test_a_first_fit_prints_data_progress_once_and_the_final_validation_metrics(tmp_path, capsys, monkeypatch):
    data = write_wikitext(tmp_path / "wikitext")
    assert main(["fit", *lm_config_args(tmp_path, data, "wikitext2-offline", *SMALL)]) == 0
    out, err = capsys.readouterr()
    assert done_line("train", "wiki.train.tokens").search(err) and done_line("val", "wiki.valid.tokens").search(err)
    assert "[data] building the word vocabulary" in err
    (final,) = [line for line in out.splitlines() if line.startswith("final validation (step 2): ")]
    values = dict(re.findall(r"(val/\w+) ([\d.e+-]+)", final))
    assert {"val/loss", "val/ppl", "val/tokens"} <= set(values)
    assert float(values["val/ppl"]) == pytest.approx(2.718281828 ** float(values["val/loss"]), rel=1e-3)

    # the caches exist now: a second run tokenizes nothing; and no other rank than 0 prints
    assert main(["fit", *lm_config_args(tmp_path, data, "wikitext2-offline", *SMALL)]) == 0
    assert "tokenizing" not in capsys.readouterr().err
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert main(["fit", *lm_config_args(tmp_path / "other", data, "wikitext2-offline", *SMALL)]) == 0
    out, err = capsys.readouterr()
    assert "[data]" not in err and "final validation" not in out
