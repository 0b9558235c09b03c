"""``study.reference``: a study's runs against a reference results file, over matched cells only."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from scipy import stats

from qkv_lightning.errors import ConfigError
from qkv_lightning.study.config import StudyConfig
from qkv_lightning.study.reference import compare
from qkv_lightning.study.report import write_results_csv

AUTHORS_COLUMNS = ["variant", "task", "n_embd", "n_layer", "n_head", "seq_len", "seed", "accuracy"]


def their_value(variant: str, n_embd: int, n_layer: int, seq_len: int, seed: int) -> float:
    return round(0.1 * len(variant) + n_embd / 1000 + n_layer / 100 + seq_len / 10000 + seed / 50, 4)


def authors_csv(path: Path, seq_lens=(16, 64)) -> Path:
    """Their layout: every (variant, size, layers, length, seed) of REVERSE and SORT."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(AUTHORS_COLUMNS)
        for variant in ("QKV", "Q=K!=V", "(Q=K=V)+"):
            for task in ("REVERSE", "SORT"):
                for n_embd in (32, 256):
                    for n_layer in (2, 4):
                        for seq_len in seq_lens:
                            for seed in (0, 1, 2):
                                writer.writerow([variant, task, n_embd, n_layer, 2, seq_len, seed,
                                                 their_value(variant, n_embd, n_layer, seq_len, seed)])
    return path


def our_results() -> list[dict]:
    """A sweep's runs: reverse, d_model 32, lengths 16 (in their sweep) and 32 (not), three seeds, plus a failure."""
    results = []
    for label in ("QKV", "Q=K-V", "Q=K=V+score"):
        for seq_len in (16, 32):
            for seed in (0, 1, 2):
                axes = {"task": "reverse", "model.init_args.network.d_model": 32, "data.init_args.seq_len": seq_len}
                results.append({"variant": label, "seed": seed, "status": "ok", "axes": axes,
                                "sweep": {"task": "reverse", "d_model": 32, "seq_len": seq_len},
                                "metrics": {"test/acc": 0.5 + 0.01 * seed + 0.1 * len(label)}})
    results.append({**results[0], "seed": 7, "status": "failed", "metrics": {}})
    return results


def test_reference_pairs_only_matched_cells(tmp_path):
    reference = authors_csv(tmp_path / "synthetic_results_shard0.csv")
    comparison = compare([str(reference)], our_results(), "test/acc", {"n_layer": 2, "n_head": 2})
    assert comparison["matched_runs"] == 9 and comparison["runs"] == 18  # length 32 is not in their sweep
    rows = {row["variant"]: row for row in comparison["rows"]}
    assert sorted(rows) == ["Q=K-V", "Q=K=V+score", "QKV"]
    for ours_label, theirs_label in (("QKV", "QKV"), ("Q=K-V", "Q=K!=V"), ("Q=K=V+score", "(Q=K=V)+")):
        row = rows[ours_label]
        assert (row["task"], row["n_embd"], row["n_layer"], row["seq_len"], row["n"]) == ("reverse", "32", "2", "16", 3)
        theirs = [their_value(theirs_label, 32, 2, 16, seed) for seed in (0, 1, 2)]
        ours = [0.5 + 0.01 * seed + 0.1 * len(ours_label) for seed in (0, 1, 2)]
        diffs = [o - t for o, t in zip(ours, theirs, strict=True)]
        assert row["reference"] == pytest.approx(sum(theirs) / 3) and row["ours"] == pytest.approx(sum(ours) / 3)
        assert row["difference"] == pytest.approx(sum(diffs) / 3)
        mean = sum(diffs) / 3
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
        half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((mean - half, mean + half))


def test_our_own_results_csv_is_a_reference(tmp_path):
    results = our_results()
    write_results_csv(results, tmp_path / "results.csv")
    comparison = compare([str(tmp_path / "results.csv")], results, "test/acc", {})
    assert comparison["matched_runs"] == 18 and len(comparison["rows"]) == 6
    assert all(row["difference"] == 0 for row in comparison["rows"])


def test_reference_without_a_match_or_with_two_matches_is_refused(tmp_path):
    far = authors_csv(tmp_path / "far.csv", seq_lens=(64, 128))
    with pytest.raises(ConfigError, match="no finished run of this study matches"):
        compare([str(far)], our_results(), "test/acc", {"n_layer": 2})
    near = authors_csv(tmp_path / "near.csv")
    with pytest.raises(ConfigError, match="differ in n_layer.*study.reference_cell"):
        compare([str(near)], our_results(), "test/acc", {})
    with pytest.raises(ConfigError, match="study.reference: .*missing.csv is not a file"):
        StudyConfig(task="configs/synthetic/reverse.yaml", reference=str(tmp_path / "missing.csv"))
    config = StudyConfig(task="configs/synthetic/reverse.yaml", reference=[str(near), str(far)])
    assert config.reference_files == [str(near), str(far)]


def test_their_vision_layout_matches_by_dataset_patch_lr_and_run(tmp_path):
    """Their vision files: ``dataset`` is our task config's name (fmnist: fashion-mnist), ``run`` the seed."""
    path = tmp_path / "vision_results_shard0.csv"
    path.write_text("variant,dataset,patch,lr,n_embd,n_layer,n_head,run,accuracy\n"
                    "Q!=K=V,fmnist,4,0.001,64,2,2,0,0.8800\nQ!=K=V,fmnist,4,0.001,64,2,2,1,0.8900\n"
                    "Q!=K=V,fmnist,7,0.001,64,2,2,0,0.5000\nQ!=K=V,mnist,4,0.001,64,2,2,0,0.9800\n")
    results = [{"variant": "Q-K=V", "seed": seed, "status": "ok", "metrics": {"test/acc": 0.87},
                "axes": {"task": "fashion-mnist", "model.init_args.network.patch_size": 4,
                         "model.init_args.optimizer.lr": 0.001}} for seed in (0, 1)]
    comparison = compare([str(path)], results, "test/acc", {"n_embd": 64, "n_layer": 2, "n_head": 2})
    assert comparison["matched_runs"] == 2
    (row,) = comparison["rows"]
    assert (row["task"], row["patch"], row["n"]) == ("fashion-mnist", "4", 2)
    assert row["reference"] == pytest.approx(0.885) and row["difference"] == pytest.approx(-0.015)
