"""The study runner: statistics against scipy.stats, the grid, outputs, resume and failing cells."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import pytest
import yaml

from qkv_lightning.cli import main as cli_main
from qkv_lightning.errors import ConfigError
from qkv_lightning.study import StudyConfig, parse_study_args, run_study
from qkv_lightning.study import stats as S
from qkv_lightning.study.cell import cell_spec
from qkv_lightning.study.config import Cell, cells, expand_grid
from qkv_lightning.study.launchers import gpu_share
from qkv_lightning.study.report import TRAILING_COLUMNS, result_columns, summarize, summary_table
from qkv_lightning.study.results import is_finished
from qkv_lightning.variants import Variant

scipy_stats = pytest.importorskip("scipy.stats")

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ statistics
A = [0.912, 0.934, 0.901, 0.948, 0.925]
B = [0.871, 0.889, 0.902, 0.866, 0.880]
C = [0.915, 0.921, 0.899, 0.950, 0.930, 0.941]  # another length: Welch only


@pytest.mark.parametrize("df", [1.0, 2.0, 3.7, 9.0, 40.5, 300.0])
def test_t_quantiles_are_scipys(df: float) -> None:
    for q in (0.025, 0.5, 0.9, 0.975, 0.995):
        assert S.t_ppf(q, df) == scipy_stats.t.ppf(q, df)


def test_mean_std_and_confidence_interval_match_scipy() -> None:
    assert S.mean(A) == pytest.approx(sum(A) / len(A))
    assert S.std(A) == pytest.approx(scipy_stats.tstd(A), rel=1e-12)
    low, high = S.mean_ci(A)
    ref = scipy_stats.t.interval(0.95, len(A) - 1, loc=sum(A) / len(A), scale=scipy_stats.sem(A))
    assert (low, high) == pytest.approx(ref, rel=1e-10)
    assert all(math.isnan(v) for v in S.mean_ci([0.5]))


@pytest.mark.parametrize(("a", "b"), [(A, B), (C, B), (B, C), ([1.0, 2.0], [1.5, 2.5, 9.0])])
def test_welch_matches_scipy(a: list[float], b: list[float]) -> None:
    ours = S.welch_test(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert ours.kind == "welch"
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.df == pytest.approx(ref.df, rel=1e-10)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert ours.diff == pytest.approx(S.mean(a) - S.mean(b))


@pytest.mark.parametrize(("a", "b"), [(A, B), (B, A), ([0.5, 0.6, 0.4], [0.45, 0.58, 0.41])])
def test_paired_matches_scipy(a: list[float], b: list[float]) -> None:
    ours = S.paired_test(a, b)
    ref = scipy_stats.ttest_rel(a, b)
    assert ours.kind == "paired"
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    # pairing removes the seed-to-seed spread that Welch's test keeps
    shifted = [x + 0.01 for x in A]
    assert S.paired_test(shifted, A).p < 1e-6 < S.welch_test(shifted, A).p


def test_degenerate_samples() -> None:
    assert math.isnan(S.welch_test([1.0], [1.0, 2.0]).p)
    assert S.paired_test([1.0, 1.0], [1.0, 1.0]).p == 1.0  # identical: no difference at all
    assert S.paired_test([1.0, 1.0], [0.5, 0.5]).p == 0.0  # constant, non-zero difference
    assert S.welch_test([1.0, 1.0, 1.0], [1.0, 1.0]).p == 1.0  # scipy answers nan for both
    assert S.welch_test([1.0, 1.0], [0.5, 0.5]).p == 0.0
    with pytest.raises(ValueError):
        S.paired_test([1.0, 2.0], [1.0])


def test_holm_by_hand() -> None:
    # m = 4: sorted 0.01, 0.02, 0.03, 0.2 -> 0.04, max(0.04, 0.06), max(0.06, 0.06), max(0.06, 0.2)
    assert S.holm([0.03, 0.01, 0.2, 0.02]) == pytest.approx([0.06, 0.04, 0.2, 0.06])
    assert S.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    adjusted = S.holm([0.004, math.nan, 0.04])  # nan does not count towards m
    assert adjusted[0] == pytest.approx(0.008) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)


def test_holm_rejects_exactly_what_the_step_down_procedure_rejects() -> None:
    p_values = [0.001, 0.011, 0.013, 0.04, 0.3, 0.0125]
    alpha, m = 0.05, len(p_values)
    rejected = set()
    for rank, (p, i) in enumerate(sorted((p, i) for i, p in enumerate(p_values))):
        if p > alpha / (m - rank):
            break
        rejected.add(i)
    assert {i for i, p in enumerate(S.holm(p_values)) if p < alpha} == rejected


# ------------------------------------------------------------------------------------------------------ grid
def _task_config(tmp_path: Path, callbacks: list | None = None) -> Path:
    config = {
        "model": {
            "class_path": "qkv_lightning.tasks.sequence_tasks.SequenceTask",
            "init_args": {
                "network": {"n_layer": 1, "n_head": 4, "d_model": 16, "max_seq_len": 8},
                "optimizer": {"lr": 0.003, "warmup_steps": 2},
            },
        },
        "data": {
            "class_path": "qkv_lightning.data.synthetic.SyntheticSequenceData",
            "init_args": {
                "task": "sub",
                "seq_len": 4,
                "train_size": 128,
                "val_size": 32,
                "test_size": 32,
                "batch_size": 32,
            },
        },
        "trainer": {
            "max_steps": 4,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 1,
            "callbacks": callbacks or [],
        },
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_grid_leaves_out_query_sharing_with_fewer_kv_heads(tmp_path: Path) -> None:
    config = StudyConfig(
        task=str(_task_config(tmp_path)),
        sharing=["QKV", "shared_qk", "Q-K=V"],
        n_kv_heads=[None, 1],
        breakers=["none", "score"],
        seeds=[0, 1],
    )
    variants, notes = expand_grid(config)
    labels = [v.label for v in variants]
    assert labels == [
        "QKV",
        "QKV+score",
        "QKV_kv1",
        "QKV+score_kv1",
        "Q=K-V",
        "Q=K-V+score",
        "Q-K=V",
        "Q-K=V+score",
        "Q-K=V_kv1",
        "Q-K=V+score_kv1",
    ]
    assert len(notes) == 2 and all("Q=K-V" in note for note in notes)
    assert len(cells(config)) == 2 * len(labels)
    with pytest.raises(ConfigError, match="study.baseline"):
        expand_grid(StudyConfig(task=str(_task_config(tmp_path)), sharing=["Q=K=V"]))
    with pytest.raises(ConfigError, match="study.task"):
        StudyConfig(task=str(tmp_path / "missing.yaml"))


def test_a_changed_setting_invalidates_a_finished_cell(tmp_path: Path) -> None:
    task = _task_config(tmp_path)
    config = StudyConfig(task=str(task), seeds=[0])
    cell = Cell(Variant("QKV", None), 0)
    spec = cell_spec(config, tmp_path, cell)
    done = {"status": "ok", "fingerprint": spec["fingerprint"]}
    assert is_finished(done, spec, retry_failed=True)
    assert not is_finished({**done, "status": "failed"}, spec, retry_failed=True)
    assert is_finished({**done, "status": "failed"}, spec, retry_failed=False)
    other = cell_spec(StudyConfig(task=str(task), seeds=[0], overrides=["--trainer.max_steps=9"]), tmp_path, cell)
    assert not is_finished(done, other, retry_failed=True)
    task.write_text(task.read_text().replace("max_steps: 4", "max_steps: 5"))
    assert not is_finished(done, cell_spec(config, tmp_path, cell), retry_failed=True)


def test_gpu_shares() -> None:
    gpus = ["0", "1", "2", "3"]
    assert [gpu_share(gpus, 4, slot) for slot in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    assert [gpu_share(gpus, 2, slot) for slot in range(2)] == [["0", "2"], ["1", "3"]]  # two GPUs per worker
    assert gpu_share(gpus, 1, 0) == gpus  # one worker sees them all (a cell may use DDP)
    assert [gpu_share(["5", "7"], 3, slot) for slot in range(3)] == [["5"], ["7"], ["5"]]


def test_bad_study_settings_are_one_paragraph_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"task": str(tmp_path / "nowhere.yaml")}))
    assert cli_main(["study", "--config", str(bad)]) == 2
    assert "study.task=" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"task": str(_task_config(tmp_path)), "sharing": ["Q=Q-V"]}))
    assert cli_main(["study", "--config", str(bad)]) == 2
    assert "attention.sharing='Q=Q-V'" in capsys.readouterr().err
    assert cli_main(["study", "--config", str(bad), "--seeds", "[seven]"]) == 2
    assert "cli.py study: invalid configuration" in capsys.readouterr().err


def test_study_configs_parse_and_differ_only_in_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    study_dir = ROOT / "configs" / "study"
    texts = {}
    for name, task in (
        ("synthetic", "configs/synthetic/reverse.yaml"),
        ("wikitext2", "configs/lm/wikitext2-offline.yaml"),
        ("cifar10", "configs/vit/cifar10-jpeg.yaml"),
    ):
        raw = yaml.safe_load((study_dir / f"{name}.yaml").read_text())
        assert raw["task"] == task
        texts[name] = {k: v for k, v in raw.items() if k != "task"}
        if (ROOT / task).is_file():
            config, _ = parse_study_args(["--config", str(study_dir / f"{name}.yaml")])
            assert [v.label for v in expand_grid(config)[0]] == ["QKV", "Q=K-V", "Q-K=V", "Q=V-K", "Q=K=V"]
    assert texts["synthetic"] == texts["wikitext2"] == texts["cifar10"]
    if not all((ROOT / t).is_file() for t in ("configs/lm/wikitext2-offline.yaml", "configs/vit/cifar10-jpeg.yaml")):
        pytest.skip("the WikiText / CIFAR task configs are not in this checkout: only the synthetic study was parsed")


# -------------------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize("unequal_seeds", [False, True])
def test_study_verdicts_say_better_and_worse_in_the_direction_of_each_metric(
    tmp_path: Path, unequal_seeds: bool
) -> None:
    """A variant clearly better than the baseline is ``better *`` and one clearly worse is ``worse *``, for a metric
    where higher is better (acc), one recognised as lower-is-better by name (loss) and one declared so (wer); a
    variant equal to the baseline within noise is ``n.s.``. Paired test (same seeds), or Welch's when one variant
    finished other seeds."""
    config = StudyConfig(
        task=str(_task_config(tmp_path)),
        sharing=["QKV", "Q=K-V", "Q-K=V", "Q=K=V"],
        seeds=[0, 1, 2, 3],
        metrics=["test/acc", "test/loss", "test/wer"],
        lower_is_better=["test/wer"],
    )
    variants, _ = expand_grid(config)
    quality = {"QKV": 0.0, "Q=K-V": 0.0, "Q-K=V": 1.0, "Q=K=V": -1.0}  # Q-K=V better, Q=K=V worse, Q=K-V equal
    noise = [0.004, -0.003, 0.001, -0.002]
    results = []
    for variant in variants:
        seeds = [0, 1, 2, 4] if unequal_seeds and variant.label == "Q=K=V" else [0, 1, 2, 3]
        for k, seed in enumerate(seeds):
            good = quality[variant.label] * 0.1 + noise[(k + len(variant.label)) % 4]
            metrics = {"test/acc": 0.5 + good, "test/loss": 2.0 - good, "test/wer": 0.3 - good}
            results.append({"variant": variant.label, "seed": seed, "status": "ok", "metrics": metrics,
                            "params": 100, "attn_params": 10, "kv_cache_bytes_per_token": 4, "wall_s": 1.0})
    summary = summarize(config, variants, results)
    verdicts = {row["variant"]: {m: e["verdict"] for m, e in row["metrics"].items()} for row in summary["variants"]}
    for metric in config.metrics:
        assert verdicts["QKV"][metric] == "baseline"
        assert verdicts["Q-K=V"][metric] == "better", (metric, verdicts)
        assert verdicts["Q=K=V"][metric] == "worse", (metric, verdicts)
        assert verdicts["Q=K-V"][metric] == "n.s.", (metric, verdicts)
    tests = {row["variant"]: row["metrics"]["test/acc"].get("test") for row in summary["variants"]}
    assert tests == {"QKV": None, "Q=K-V": "paired", "Q-K=V": "paired", "Q=K=V": "welch" if unequal_seeds else "paired"}
    table = {line.split(" | ")[0].strip("| "): line for line in summary_table(summary).splitlines()[2:]}
    assert table["Q-K=V"].endswith("| better * |") and table["Q=K=V"].endswith("| worse * |")
    assert table["Q=K-V"].endswith("| n.s. |")


def test_mean_confidence_intervals_are_clipped_to_the_values_each_metric_can_take(tmp_path: Path) -> None:
    """Three seeds' t interval of an accuracy near 1 reaches past 1, of a small loss below 0, of a perplexity near 1
    below 1: the tables (per-variant and sweep) show them clipped there; the other end is scipy's t interval."""
    from qkv_lightning.study.sweep import summarize_sweep

    values = {"test/acc": [0.99, 1.0, 0.95], "test/loss": [0.01, 0.2, 0.02], "val/ppl": [1.01, 1.5, 1.02],
              "test/score": [-0.5, 0.5, 0.1]}  # an unknown metric: unbounded, never clipped
    clipped = {"test/acc": (None, 1.0), "test/loss": (0.0, None), "val/ppl": (1.0, None), "test/score": (None, None)}
    for axes in ({}, {"data.init_args.seq_len": [4]}):
        config = StudyConfig(task=str(_task_config(tmp_path)), sharing=["QKV"], seeds=[0, 1, 2], metrics=list(values),
                             axes=axes)
        variants, _ = expand_grid(config)
        results = [{"variant": "QKV", "seed": seed, "status": "ok", "params": 100, "attn_params": 10,
                    "kv_cache_bytes_per_token": 4, "wall_s": 1.0, "group": "t/seq_len=4",
                    "sweep": {"task": "t", "seq_len": 4}, "metrics": {m: v[seed] for m, v in values.items()}}
                   for seed in range(3)]
        summary = summarize_sweep(config, variants, results, []) if axes else summarize(config, variants, results)
        for metric, series in values.items():
            raw = scipy_stats.t.interval(0.95, 2, loc=sum(series) / 3, scale=scipy_stats.sem(series))
            expected = [raw[i] if clipped[metric][i] is None else clipped[metric][i] for i in (0, 1)]
            assert raw[0] < expected[0] or raw[1] > expected[1] or metric == "test/score"
            assert summary["variants"][0]["metrics"][metric]["ci95"] == pytest.approx(expected, rel=1e-9), metric


# ------------------------------------------------------------------------------------------------ end to end
def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


FAILING_CALLBACK = '''
from lightning.pytorch.callbacks import Callback


class FailWithTwoKVHeads(Callback):
    """Fails the run of every cell with n_kv_heads=2 when training starts (as a run-time error would)."""

    def on_train_start(self, trainer, pl_module):
        if pl_module.attention_config.n_kv_heads == 2:
            raise RuntimeError("this run fails on purpose (n_kv_heads=2)")
'''


def test_study_writes_outputs_resumes_and_survives_a_failing_cell(
    tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "failing_callback.py").write_text(FAILING_CALLBACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = _task_config(tmp_path, callbacks=[{"class_path": "failing_callback.FailWithTwoKVHeads"}])
    study_yaml = tmp_path / "tiny.yaml"
    out = tmp_path / "study"
    study_yaml.write_text(
        yaml.safe_dump(
            {
                "task": str(task),
                # QKV_kv2 fails while it runs (the callback above): it is recorded, the study goes on
                "sharing": ["QKV", "Q=K=V"],
                "n_kv_heads": [None, 2],
                "seeds": [0, 1],
                "workers": 0,
                "output": str(out),
                "retry_failed": False,
            }
        )
    )
    assert cli_main(["study", "--config", str(study_yaml)]) == 1  # the tables are written, and the exit says it failed
    captured = capfd.readouterr()
    printed = captured.out
    assert "error: 2 of 6 runs of the study failed" in captured.err
    assert f"{out}/runs/QKV_kv2/seed0/log.txt: " in captured.err
    assert (
        "| variant | runs ok | params |" in printed
        and "| Q=K=V | 2/2 |" in printed
        and "QKV_kv2 seed 0: FAILED" in printed
    )

    columns, rows = _read_csv(out / "results.csv")
    metrics = ["test/acc", "test/loss", "test/seq_acc", "val/acc", "val/loss", "val/seq_acc"]
    assert columns == result_columns() + metrics + TRAILING_COLUMNS
    assert sorted((r["variant"], r["seed"], r["status"]) for r in rows) == [
        ("Q=K=V", "0", "ok"),
        ("Q=K=V", "1", "ok"),
        ("QKV", "0", "ok"),
        ("QKV", "1", "ok"),
        ("QKV_kv2", "0", "failed"),
        ("QKV_kv2", "1", "failed"),
    ]
    failed = [r for r in rows if r["status"] == "failed"]
    assert all("n_kv_heads=2" in r["error"] and r["test/acc"] == "" for r in failed)
    ok = {(r["variant"], r["seed"]): r for r in rows if r["status"] == "ok"}
    # exact accounting, d_model 16, one layer: QKV's fused projection has 2 * (16 * 16 + 16) more weights than Q=K=V
    assert int(ok["QKV", "0"]["params"]) - int(ok["Q=K=V", "0"]["params"]) == 2 * (16 * 16 + 16)
    assert int(ok["QKV", "0"]["kv_cache_bytes_per_token"]) == 2 * 16 * 2
    assert int(ok["Q=K=V", "0"]["kv_cache_bytes_per_token"]) == 16 * 2
    assert all(int(r["steps"]) == 4 and 0.0 <= float(r["test/acc"]) <= 1.0 for r in ok.values())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary"] == "test/acc"
    assert summary["metrics"] == ["test/acc", "test/seq_acc", "test/loss", "val/acc", "val/seq_acc", "val/loss"]
    by_label = {row["variant"]: row for row in summary["variants"]}
    assert list(by_label) == ["QKV", "QKV_kv2", "Q=K=V"]  # grid order: sharing, then n_kv_heads
    entry = by_label["Q=K=V"]["metrics"]["test/acc"]
    qkv = [float(ok["QKV", s]["test/acc"]) for s in ("0", "1")]
    single = [float(ok["Q=K=V", s]["test/acc"]) for s in ("0", "1")]
    reference = scipy_stats.ttest_rel(single, qkv)  # same seeds finished: paired
    assert entry["test"] == "paired" and entry["p"] == pytest.approx(reference.pvalue, rel=1e-8)
    assert entry["diff"] == pytest.approx(sum(single) / 2 - sum(qkv) / 2)
    assert entry["p_holm"] == pytest.approx(entry["p"])  # QKV_kv2 has no p-value: a family of one
    assert entry["verdict"] in ("n.s.", "better", "worse")
    assert by_label["Q=K=V"]["params_change"] == pytest.approx(
        int(ok["Q=K=V", "0"]["params"]) / int(ok["QKV", "0"]["params"]) - 1
    )
    assert by_label["QKV_kv2"]["runs_ok"] == 0 and by_label["QKV_kv2"]["metrics"]["test/acc"]["verdict"] == "n/a"
    markdown = (out / "summary.md").read_text()
    assert "diff vs QKV [95% CI]" in markdown and "Failed runs:" in markdown and "QKV_kv2 seed 1" in markdown
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # one TensorBoard run per cell, with its variant and seed in the HParams plugin's session info
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    run = EventAccumulator(str(out / "runs" / "Q=K=V" / "seed1"))
    run.Reload()
    content = run.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["variant"].string_value == "Q=K=V" and start.hparams["seed"].number_value == 1
    study_run = EventAccumulator(str(out / "summary"))  # the one experiment of the study is in its own run
    study_run.Reload()
    study_content = study_run.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(study_content[metadata.EXPERIMENT_TAG])
    assert {m.name.tag for m in experiment.metric_infos} >= {"test/acc", "val/acc"}
    assert run.Scalars("test/acc")[-1].value == pytest.approx(float(ok["Q=K=V", "1"]["test/acc"]))
    assert not list((out / "runs").rglob("*.ckpt"))

    # resume: nothing is run again; a half-finished cell (no result.json) is redone
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    config, _ = parse_study_args(["--config", str(study_yaml)])
    again = run_study(config, out, echo=lambda line: None)
    assert (again["ran"], again["skipped"]) == (0, 6)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    half = out / "runs" / "QKV" / "seed1"
    (half / "result.json").unlink()
    again = run_study(config, out, echo=lambda line: None)
    assert (again["ran"], again["skipped"]) == (1, 5)
    assert json.loads((half / "result.json").read_text())["status"] == "ok"
    _, rows_after = _read_csv(out / "results.csv")
    before = {(r["variant"], r["seed"]): r["test/acc"] for r in rows}
    # the redone cell repeats its result exactly (same seed, same data), the others were kept
    assert {(r["variant"], r["seed"]): r["test/acc"] for r in rows_after} == before

    # study.reference: the study's own results.csv as reference pairs its 4 finished runs with themselves (nothing
    # runs again); a reference that matches no run is a one-paragraph error (exit 2)
    (tmp_path / "reference.csv").write_text((out / "results.csv").read_text())
    config, _ = parse_study_args(["--config", str(study_yaml), "--reference", str(tmp_path / "reference.csv")])
    again = run_study(config, out, echo=lambda line: None)
    assert again["ran"] == 0 and again["reference"]["matched_runs"] == 4 and len(again["reference"]["rows"]) == 2
    assert all(row["difference"] == 0 and row["n"] == 2 for row in again["reference"]["rows"])
    assert "4 of 4 finished runs matched" in (out / "reference.md").read_text()
    assert "## Against the reference (test/acc)" in (out / "summary.md").read_text()
    (tmp_path / "other.csv").write_text("variant,task,n_embd,seed,accuracy\nQKV,reverse,32,5,0.5\n")
    capfd.readouterr()
    assert cli_main(["study", "--config", str(study_yaml), "--reference", str(tmp_path / "other.csv")]) == 2
    assert "study.reference: no finished run of this study matches" in capfd.readouterr().err


def test_an_impossible_cell_rejects_the_study_before_anything_is_written(tmp_path: Path) -> None:
    config = StudyConfig(task=str(_task_config(tmp_path)), sharing=["QKV", "Q-K=V"], n_kv_heads=[None, 3], seeds=[0])
    with pytest.raises(ConfigError, match=r"study cell QKV_kv3 is impossible .*n_kv_heads=3 must divide n_head=4"):
        run_study(config, tmp_path / "s", echo=lambda line: None)
    assert not (tmp_path / "s").exists()


CRASH_CALLBACK = '''
import os
from lightning.pytorch.callbacks import Callback


class DieOnSeed(Callback):
    """Kills the whole process (as an out-of-memory kill would) when the run's seed is 1."""

    def on_train_start(self, trainer, pl_module):
        if os.environ.get("PL_GLOBAL_SEED") == "1":
            os._exit(3)
'''


@pytest.mark.slow
def test_worker_processes_survive_a_dying_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dying_callback.py").write_text(CRASH_CALLBACK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path))
    task = _task_config(tmp_path, callbacks=[{"class_path": "dying_callback.DieOnSeed"}])
    config = StudyConfig(
        task=str(task), sharing=["QKV"], seeds=[1, 0], workers=1, threads=1, output=str(tmp_path / "s")
    )
    lines: list[str] = []
    summary = run_study(config, tmp_path / "s", echo=lines.append)
    assert summary["ran"] == 2, lines
    _, rows = _read_csv(tmp_path / "s" / "results.csv")
    status = {r["seed"]: (r["status"], r["error"]) for r in rows}
    assert status["1"][0] == "failed" and "exit code 3" in status["1"][1]
    assert status["0"][0] == "ok"  # run by a fresh worker after the first one died
    assert any("worker process" in line for line in lines)
    assert sys.executable  # the workers ran with this interpreter
