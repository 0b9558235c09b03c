"""Study sweeps: axes over any config key, several task configs, skipped impossible cells, the paper-layout sweep
table (recomputed here from results.csv) and matched-cell pairing."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import yaml

from qkv_lightning.errors import ConfigError
from qkv_lightning.study import StudyConfig, parse_study_args, run_study
from qkv_lightning.study.cell import cell_overrides, cell_spec
from qkv_lightning.study.config import cells, expand_grid
from qkv_lightning.study.sweep import matched_pairs, summarize_sweep, sweep_markdown
from qkv_lightning.variants import parse_label
from tests.test_study import _task_config

scipy_stats = pytest.importorskip("scipy.stats")
ROOT = Path(__file__).resolve().parents[1]


def _tasks(tmp_path: Path) -> list[str]:
    """Two task configs (sub and copy) of the tiny study task, 2 optimiser steps each."""
    paths = []
    for name in ("sub", "copy"):
        config = yaml.safe_load(_task_config(tmp_path).read_text())
        config["data"]["init_args"]["task"] = name
        config["trainer"]["max_steps"] = 2
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        paths.append(str(path))
    return paths


def test_axes_expand_to_exactly_the_expected_cells(tmp_path: Path) -> None:
    config = StudyConfig(
        task=_tasks(tmp_path),
        variants=["QKV", "(Q=K=V)+", "Q-K=V_kv2"],
        axes={"model.init_args.network.d_model": [16, 24], "data.init_args.seq_len": [4, 6]},
        seeds=[0, 1],
    )
    assert [v.label for v in expand_grid(config)[0]] == ["QKV", "Q=K=V+score", "Q-K=V_kv2"]
    grid = cells(config)
    assert len(grid) == 2 * 2 * 2 * 2 * 3  # seeds x tasks x widths x lengths x variants
    keys = [cell.key for cell in grid]
    assert len(set(keys)) == len(keys)
    assert keys[0] == "sub/d_model=16,seq_len=4/QKV/seed0" and keys[-1] == "copy/d_model=24,seq_len=6/Q-K=V_kv2/seed1"
    spec = cell_spec(config, tmp_path / "s", grid[-1])
    assert spec["dir"].endswith("runs/copy/d_model=24,seq_len=6/Q-K=V_kv2/seed1")
    assert spec["sweep"] == {"task": "copy", "d_model": 24, "seq_len": 6}
    layered = cell_overrides(spec)  # the axis values land in the cell's own config, beside the variant
    assert layered["model"]["init_args"]["network"] == {"d_model": 24}
    assert layered["model"]["init_args"]["attention"]["n_kv_heads"] == 2
    assert layered["data"] == {"init_args": {"seq_len": 6}}
    # the fingerprint tells cells apart by task and axis values
    assert len({cell_spec(config, tmp_path / "s", cell)["fingerprint"] for cell in grid}) == len(grid)
    assert parse_label("(Q=K-V)+").label == "Q=K-V+score" and parse_label("Q=K=V+relative+noself").breakers == (
        "relative", "noself")
    with pytest.raises(ConfigError, match=r"variant label 'Q=K-V\+alibi'"):
        StudyConfig(task=_tasks(tmp_path)[0], variants=["QKV", "Q=K-V+alibi"])
    with pytest.raises(ConfigError, match="study.axes key 'd_model'"):
        StudyConfig(task=_tasks(tmp_path)[0], axes={"d_model": [16]})


def _fake_result(variant: str, group: str, task: str, seed: int, value: float | None) -> dict:
    return {
        "variant": variant, "group": group, "sweep": {"task": task}, "seed": seed,
        "status": "ok" if value is not None else "failed",
        "metrics": {} if value is None else {"test/acc": value}, "wall_s": 1.0, "error": "" if value else "boom",
    }


def test_matched_cell_pairing_when_cells_fail(tmp_path: Path) -> None:
    config = StudyConfig(task=_tasks(tmp_path), variants=["QKV", "Q=K=V"], seeds=[0, 1, 2], metrics=["test/acc"],
                         axes={"data.init_args.seq_len": [4, 6]})
    variants = expand_grid(config)[0]
    values = {}
    results = []
    for i, (task, length, seed) in enumerate((t, n, s) for t in ("sub", "copy") for n in (4, 6) for s in (0, 1, 2)):
        group = f"{task}/seq_len={length}"
        values["QKV", group, seed] = 0.5 + 0.01 * i
        values["Q=K=V", group, seed] = 0.45 + 0.013 * i - 0.002 * seed
    failed = {("QKV", "sub/seq_len=6", 1), ("Q=K=V", "copy/seq_len=4", 2), ("Q=K=V", "copy/seq_len=6", 0)}
    for (label, group, seed), value in values.items():
        results.append(_fake_result(label, group, group.split("/")[0], seed, None if (label, group, seed) in failed
                                    else value))
    keys, mine, base = matched_pairs(results, "Q=K=V", "QKV", "test/acc")
    expected = sorted(k[1:] for k in values if k[0] == "Q=K=V" and k not in failed and ("QKV", *k[1:]) not in failed)
    assert keys == expected and len(keys) == 12 - 3
    summary = summarize_sweep(config, variants, results, groups=[])
    entry = summary["sweep_table"]["test/acc"]["Q=K=V"]
    reference = scipy_stats.ttest_rel([values[("Q=K=V", *k)] for k in keys], [values[("QKV", *k)] for k in keys])
    assert entry["pairs"] == 9 and entry["p"] == pytest.approx(reference.pvalue, rel=1e-8)
    assert entry["diff"] == pytest.approx(sum(values[("Q=K=V", *k)] - values[("QKV", *k)] for k in keys) / 9)
    # the task columns average every finished cell of the variant (not only the matched ones)
    sub = [v for (label, group, seed), v in values.items() if label == "QKV" and group.startswith("sub")
           and (label, group, seed) not in failed]
    assert summary["sweep_table"]["test/acc"]["QKV"]["per_task"]["sub"] == pytest.approx(sum(sub) / len(sub))
    assert summary["tasks"] == ["sub", "copy"]


BASE = [0.80, 0.83, 0.78, 0.85, 0.81, 0.79]  # the baseline's value per seed
OFFSETS = [0.004, -0.003, 0.001, -0.005, 0.002, 0.001]  # paired differences around their mean (mean 0)


def lower_with_p(p: float) -> list[float]:
    """BASE - c + OFFSETS, with c > 0 chosen so that the paired t-test against BASE gives the two-sided p-value p."""
    optimize = pytest.importorskip("scipy.optimize")

    def series(c: float) -> list[float]:
        return [b - c + e for b, e in zip(BASE, OFFSETS, strict=True)]

    c = optimize.brentq(lambda c: scipy_stats.ttest_rel(series(c), BASE).pvalue - p, 1e-6, 0.1, xtol=1e-15)
    return series(c)


@pytest.mark.parametrize(
    ("raw", "holm", "verdicts"),
    [((0.039, 0.032), (0.064, 0.064), ("n.s.", "n.s.")),  # raw p < 0.05 both, not after Holm
     ((0.039, 0.001), (0.039, 0.002), ("worse", "worse"))],  # Holm's step-down (Bonferroni would give 0.078)
)
def test_sweep_verdict_reads_holm_corrected_p(tmp_path: Path, raw, holm, verdicts) -> None:
    """The sweep table's verdict is significant only where the Holm-corrected p (over the variants compared with the
    baseline) is below alpha: p_(1) * m, then max(that, p_(2) * (m - 1)), computed here by hand."""
    config = StudyConfig(task=_tasks(tmp_path)[0], variants=["QKV", "Q-K=V", "Q=K=V"], seeds=list(range(6)),
                         metrics=["test/acc"])
    values = {"QKV": BASE, "Q-K=V": lower_with_p(raw[0]), "Q=K=V": lower_with_p(raw[1])}
    results = [_fake_result(label, "sub", "sub", seed, value) for label, series in values.items()
               for seed, value in enumerate(series)]
    summary = summarize_sweep(config, expand_grid(config)[0], results, groups=[])
    table = summary["sweep_table"]["test/acc"]
    for label, p, p_holm, verdict in zip(("Q-K=V", "Q=K=V"), raw, holm, verdicts, strict=True):
        assert table[label]["p"] == pytest.approx(p, rel=1e-9) and table[label]["diff"] < 0
        assert table[label]["p_holm"] == pytest.approx(p_holm, rel=1e-9)
        assert table[label]["verdict"] == verdict
    rows = {row["variant"]: row["metrics"]["test/acc"]["verdict"] for row in summary["variants"]}
    assert rows == {"QKV": "baseline", "Q-K=V": verdicts[0], "Q=K=V": verdicts[1]}
    assert sweep_markdown(summary, "t", []).count("| worse * |") == 2 * (verdicts[0] == "worse")


def test_sweep_study_skips_impossible_cells_and_its_table_follows_from_results_csv(tmp_path: Path) -> None:
    out = tmp_path / "study"
    study_yaml = tmp_path / "sweep.yaml"
    study_yaml.write_text(yaml.safe_dump({
        "task": _tasks(tmp_path),
        "variants": ["QKV", "Q=K=V+score"],
        # n_head 4 divides d_model 16; n_head 3 does not: those cells are skipped with a note
        "axes": {"model.init_args.network.n_head": [4, 3]},
        "seeds": [0, 1],
        "workers": 0,
        "validate": False,
        "output": str(out),
    }))
    config, _ = parse_study_args(["--config", str(study_yaml)])
    lines: list[str] = []
    summary = run_study(config, out, echo=lines.append)
    assert summary["ran"] == 2 * 2 * 2  # tasks x seeds x variants with n_head 4
    assert any("skipped copy/n_head=3/QKV" in line and "divisible" in line for line in lines), lines
    assert any("ETA" in line for line in lines)
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["task"], r["n_head"]) for r in rows} == {("sub", "4"), ("copy", "4")}
    table = json.loads((out / "summary.json").read_text())["sweep_table"]["test/acc"]
    for label in ("QKV", "Q=K=V+score"):
        per_task = {}
        for task in ("sub", "copy"):
            accs = [float(r["test/acc"]) for r in rows if r["variant"] == label and r["task"] == task]
            assert len(accs) == 2
            per_task[task] = sum(accs) / 2
            assert table[label]["per_task"][task] == pytest.approx(per_task[task])
        assert table[label]["average"] == pytest.approx((per_task["sub"] + per_task["copy"]) / 2)
    markdown = (out / "summary.md").read_text()
    assert "| variant | sub | copy | average |" in markdown and "n_head=3" in markdown
    assert "## copy/n_head=4" in (out / "cells.md").read_text()
    # a variant impossible in every cell is an error before anything runs
    with pytest.raises(ConfigError, match="study cell QKV_kv3 is impossible"):
        run_study(StudyConfig(task=_tasks(tmp_path), variants=["QKV", "QKV_kv3"], axes={
            "model.init_args.network.d_model": [16, 32]}), tmp_path / "never", echo=lambda line: None)
    assert not (tmp_path / "never").exists()


def test_paper_sweep_configs_parse_to_the_papers_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    full, _ = parse_study_args(["--config", "configs/study/paper-synthetic.yaml"])
    labels = ["QKV", "Q=K-V", "Q=K-V+score", "Q-K=V", "Q=K=V", "Q=K=V+score"]
    assert [v.label for v in expand_grid(full)[0]] == labels
    assert [Path(t).stem for t in full.task_paths] == ["reverse", "sort", "sub", "swap", "copy"]
    grid = cells(full)
    # d_model {32, 64, 256} x n_layer {2, 4} x n_head {2, 4} x length {16, 64, 128} x 3 seeds x 5 tasks x 6 variants
    assert len(grid) == 3 * 2 * 2 * 3 * 3 * 5 * 6
    cpu, _ = parse_study_args(["--config", "configs/study/paper-synthetic-cpu.yaml"])
    assert [v.label for v in expand_grid(cpu)[0]] == labels
    assert [Path(t).stem for t in cpu.task_paths] == ["reverse", "swap"] and cpu.seeds == [0, 1, 2]
    assert len(cpu.axes["model.init_args.network.d_model"]) >= 2 and len(cpu.axes["data.init_args.seq_len"]) >= 2


def test_sweep_rows_keep_from_scratch_and_converted_cells_apart(tmp_path: Path) -> None:
    """An init_from (or distill.teacher) axis is never averaged over: one row per variant and starting point, each
    the mean of its own cells and compared with the baseline at the same starting point; other axes still average."""
    source = tmp_path / "teacher.ckpt"
    source.write_bytes(b"")  # only its existence is checked here
    config = StudyConfig(task=_tasks(tmp_path)[0], variants=["Q-K=V", "Q=K-V"], baseline="Q-K=V", seeds=[0, 1, 2],
                         metrics=["val/ppl"],
                         axes={"model.init_args.init_from": [None, "convert:mean"], "data.init_args.seq_len": [4, 6]},
                         convert_from=str(source))
    variants = expand_grid(config)[0]
    values = {}
    for start, length, seed, label in itertools.product((None, "convert:mean"), (4, 6), (0, 1, 2), ("Q-K=V", "Q=K-V")):
        scratch = start is None
        values[label, start, length, seed] = (8000.0 if scratch else 380.0) + 7 * seed + length + (
            (50.0 if scratch else 3.0) * (label == "Q=K-V")) + 0.5 * seed * (label == "Q=K-V")
    results = [
        {"variant": label, "group": f"sub/init_from={start},seq_len={length}", "seed": seed, "status": "ok",
         "sweep": {"task": "sub", "init_from": start, "seq_len": length}, "metrics": {"val/ppl": value},
         "wall_s": 1.0, "error": ""}
        for (label, start, length, seed), value in values.items()
    ]
    summary = summarize_sweep(config, variants, results, groups=[])
    table = summary["sweep_table"]["val/ppl"]
    assert summary["kept_apart"] == ["init_from"]
    assert list(table) == ["Q-K=V (init_from=null)", "Q=K-V (init_from=null)", "Q-K=V (init_from=convert:mean)",
                           "Q=K-V (init_from=convert:mean)"]
    for (label, start), name in {("Q-K=V", None): "Q-K=V (init_from=null)",
                                 ("Q=K-V", "convert:mean"): "Q=K-V (init_from=convert:mean)"}.items():
        own = [v for (lab, st, _, _), v in values.items() if lab == label and st == start]
        assert len(own) == 6 and table[name]["average"] == pytest.approx(sum(own) / 6)  # the seq_len axis averages
        by_seed = [sum(values[label, start, n, seed] for n in (4, 6)) / 2 for seed in (0, 1, 2)]
        assert table[name]["seed_averages"] == pytest.approx(by_seed)
    for start, gap in ((None, 50.0), ("convert:mean", 3.0)):
        entry = table[f"Q=K-V (init_from={'null' if start is None else start})"]
        assert entry["pairs"] == 6 and entry["diff"] == pytest.approx(gap + 0.5)  # paired at the same start only
    assert table["Q-K=V (init_from=convert:mean)"]["verdict"] == "baseline"
    rows = [row["row"] for row in summary["variants"]]
    assert rows == list(table)
    markdown = sweep_markdown(summary, "t", [])
    assert "| Q=K-V (init_from=convert:mean) |" in markdown and "kept apart by `init_from`" in markdown


def _table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """The body rows (cells stripped) of the markdown table whose header line starts with ``header_start``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _cells_md_verdicts(text: str) -> dict[tuple[str, str], str]:
    """``{(group, variant): verdict}`` of every table in ``cells.md``."""
    verdicts, group = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            group = line[3:]
        elif line.startswith("| ") and not line.startswith("| variant ") and group is not None:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            verdicts[group, cells[0]] = cells[-1]
    return verdicts


def test_a_sweep_with_a_margin_states_its_verdicts_at_the_margin_in_summary_md(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A real sweep (two tasks, three variants, three seeds, through the CLI) with a relative margin: summary.md's
    paper-layout table reads each matched-cell difference at the margin (TOST over the matched cells, checked against
    scipy's one-sided t-tests and Holm by hand), and lists every task's verdict at its margin exactly as cells.md and
    summary.json's per-cell summaries state it (never the margin-blind `n.s.`)."""
    from qkv_lightning.cli import main

    out = tmp_path / "study"
    study_yaml = tmp_path / "sweep.yaml"
    study_yaml.write_text(yaml.safe_dump({
        "task": _tasks(tmp_path), "variants": ["QKV", "Q=K=V", "Q-K=V"], "seeds": [0, 1, 2], "workers": 0,
        "validate": False, "output": str(out), "metrics": ["test/acc"], "equivalence_margin": "50%",
    }))
    assert main(["study", "--config", str(study_yaml)]) == 0
    printed = capsys.readouterr().out
    assert "equivalent * = within the margin" in printed and "n.s. = no significant" not in printed
    summary = json.loads((out / "summary.json").read_text())
    markdown = (out / "summary.md").read_text()
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # the paper-layout table: the margin is half the baseline's average over the tasks, read as TOST over matched cells
    def value(label: str, task: str, seed: int) -> float:
        (row,) = [r for r in rows if r["variant"] == label and r["task"] == task and r["seed"] == str(seed)]
        return float(row["test/acc"])

    tasks, seeds = ("sub", "copy"), (0, 1, 2)
    margin = 0.5 * abs(sum(value("QKV", t, s) for t in tasks for s in seeds) / 6)
    table = summary["sweep_table"]["test/acc"]
    raw = {}
    for label in ("Q=K=V", "Q-K=V"):
        diffs = [value(label, t, s) - value("QKV", t, s) for t in tasks for s in seeds]
        assert table[label]["margin"] == pytest.approx(margin, rel=1e-12)
        assert sorted(table[label]["diff_points"].values()) == pytest.approx(sorted(diffs), abs=1e-12)
        if len(set(diffs)) == 1:
            raw[label] = 0.0 if abs(diffs[0]) < margin else 1.0  # no spread: known exactly
        else:
            raw[label] = max(scipy_stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue,
                             scipy_stats.ttest_1samp(diffs, margin, alternative="less").pvalue)
        assert table[label]["tost_p"] == pytest.approx(raw[label], rel=1e-9, abs=1e-12)
    low, high = sorted(raw, key=raw.get)
    holm = {low: min(1.0, 2 * raw[low])}
    holm[high] = min(1.0, max(holm[low], raw[high]))
    paper = {r[0]: r for r in _table_rows(markdown, "| variant | sub | copy | average |")}
    assert set(paper) == {"QKV", "Q=K=V", "Q-K=V"} and paper["QKV"][-1] == "baseline"
    for label in ("Q=K=V", "Q-K=V"):
        entry = table[label]
        assert entry["tost_p_holm"] == pytest.approx(holm[label], rel=1e-9, abs=1e-12)
        if holm[label] < 0.05:
            expected = "equivalent"
        elif entry["p_holm"] < 0.05:
            expected = "worse" if entry["diff"] < 0 else "better"
        else:
            expected = "inconclusive"
        assert entry["verdict"] == expected
        row = next(r for r in summary["variants"] if r["variant"] == label)["metrics"]["test/acc"]
        assert row["verdict"] == expected and row["tost_ci"] == entry["tost_ci"]
        assert paper[label][-1] == {"equivalent": "equivalent *", "worse": "worse *", "better": "better *"}.get(
            expected, expected)
        assert paper[label][-2] == ("<1e-4" if holm[label] < 1e-4 else f"{holm[label]:.4f}")  # TOST p Holm
        assert paper[label][-3] == f"50% = {margin:.4g}"
    # every task's verdict at its margin: summary.md == cells.md == summary.json's per-cell summaries
    groups = {part["group"]: part for part in summary["groups"]}
    assert set(groups) == set(tasks)
    from_json = {
        (group, row["variant"]): row["metrics"]["test/acc"]["verdict"]
        for group, part in groups.items() for row in part["variants"] if row["variant"] != "QKV"
    }
    marked = {key: {"equivalent": "equivalent *", "worse": "worse *", "better": "better *"}.get(v, v)
              for key, v in from_json.items()}
    cell_rows = _table_rows(markdown, "| task and axes | variant |")
    from_md = {(r[0], r[1]): r[-1] for r in cell_rows}
    assert len(cell_rows) == 4 and from_md == marked
    assert {key: v for key, v in _cells_md_verdicts((out / "cells.md").read_text()).items()
            if key[1] != "QKV"} == marked
    for r in cell_rows:
        assert r[4] == groups[r[0]]["equivalence_margins"]["test/acc"]["stated"]  # that task's own margin
    assert set(from_json.values()) <= {"equivalent", "inconclusive", "worse", "better"}
    assert set(from_json.values()) & {"equivalent", "inconclusive"}  # verdicts only a margin gives
