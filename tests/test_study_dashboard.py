"""A study in TensorBoard and MLflow (qkv_lightning/study/dashboard.py), read back with their own readers after a real
sweep (one tiny synthetic task, 2 variants x 1 seed x d_model in {16, 24}, 2 steps a cell, in this process): the
study's run <study>/summary/ holds summary.md and cells.md as text, summary.png and a plot per axis setting as images,
the progress while the study ran, and the one HParams experiment, whose first columns are the variant, task, axis
and seed; every cell's HParams session (or MLflow params) holds its axis values, task, variant and seed; a re-run
leaves one summary event file (one MLflow summary run) and a file the tool did not write where it was."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata
from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit

from qkv_lightning.cli import main
from qkv_lightning.study import parse_study_args, run_study
from qkv_lightning.study.plots import figure_png, summary_figure
from tests.test_study import _task_config

pytestmark = pytest.mark.usefixtures("one_thread", "plain_argv")
AXIS = "model.init_args.network.d_model"
EVERYTHING = {"tensors": 0, "images": 0, "scalars": 0}  # keep every event (the reader's default samples some)


def _study(tmp_path: Path, logger: dict | None = None) -> tuple[Path, Path]:
    """The study config of the tiny sweep (and the folder it writes), its cells logging to ``logger`` if given."""
    task = _task_config(tmp_path)
    config = yaml.safe_load(task.read_text())
    config["trainer"].update(max_steps=2, enable_progress_bar=False)
    if logger:
        config["trainer"]["logger"] = logger
    task.write_text(yaml.safe_dump(config))
    out = tmp_path / "study"
    study_yaml = tmp_path / "sweep.yaml"
    study_yaml.write_text(yaml.safe_dump({
        "task": str(task), "variants": ["QKV", "Q=K=V"], "seeds": [0], "axes": {AXIS: [16, 24]},
        "workers": 0, "validate": False, "quiet": True, "output": str(out),
    }))
    return study_yaml, out


def _cells(out: Path) -> dict[Path, tuple[int, str]]:
    """Every cell folder of the sweep with its d_model and variant."""
    return {out / "runs" / f"d_model={width}" / variant / "seed0": (width, variant)
            for width in (16, 24) for variant in ("QKV", "Q=K=V")}


def _summary_run(out: Path) -> EventAccumulator:
    run = EventAccumulator(str(out / "summary"), size_guidance=EVERYTHING)
    run.Reload()
    return run


def _event_files(out: Path) -> list[Path]:
    return sorted((out / "summary").glob("*tfevents*"))


def test_the_study_folder_is_a_tensorboard_dashboard(tmp_path: Path) -> None:
    study_yaml, out = _study(tmp_path)
    config, _ = parse_study_args(["--config", str(study_yaml)])
    seen: list[int] = []  # cells_finished in <study>/summary/ each time the study printed a line while it ran

    def watch(line: str) -> None:
        if _event_files(out):
            seen.append(int(_summary_run(out).Scalars("study/cells_finished")[-1].value))

    run_study(config, out, echo=watch)
    assert seen[0] == 0 and {1, 2, 3} <= set(seen) and seen == sorted(seen)  # the progress, while it ran
    (first,) = _event_files(out)

    run = _summary_run(out)
    text = {tag: run.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in ("summary.md", "cells.md")}
    assert text["summary.md"] == (out / "summary.md").read_text()
    assert text["cells.md"] == (out / "cells.md").read_text()
    assert "| variant | task | average |" in text["summary.md"]
    (plot,) = run.Images("summary.png")
    assert plot.encoded_image_string == (out / "summary.png").read_bytes()
    with Image.open(io.BytesIO(plot.encoded_image_string)) as image, Image.open(out / "summary.png") as on_disk:
        assert image.size == on_disk.size == (plot.width, plot.height)
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert [part["group"] for part in groups] == ["d_model=16", "d_model=24"]
    for part in groups:  # the plot of each axis setting, as the study's own summary_figure draws it
        (event,) = run.Images(f"plots/{part['group']}")
        drawn = figure_png(summary_figure({**part, "task": part["group"]}))
        with Image.open(io.BytesIO(event.encoded_image_string)) as image, Image.open(io.BytesIO(drawn)) as again:
            assert image.size == again.size and image.tobytes() == again.tobytes()
    finished = run.Scalars("study/cells_finished")
    assert [(e.step, e.value) for e in finished] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert [e.value for e in run.Scalars("study/cells_failed")] == [0.0] * 4
    assert [e.value for e in run.Scalars("study/cells_pending")] == [3.0, 2.0, 1.0, 0.0]
    written = sorted((cell / "result.json").stat().st_mtime for cell in _cells(out))
    assert [e.wall_time for e in finished] == pytest.approx(written)

    # the study's experiment is the only one; TensorBoard's own ordering puts variant, task, axis and seed first
    experiment = metadata.parse_experiment_plugin_data(run.PluginTagToContent("hparams")[metadata.EXPERIMENT_TAG])
    assert {m.name.tag for m in experiment.metric_infos} == {"test/acc", "test/seq_acc", "test/loss"}
    _sort_and_reduce_to_hparams_limit(experiment, 1000)
    names = [info.name for info in experiment.hparam_infos]
    assert set(names[:4]) == {"variant", "task", "d_model", "seed"} and AXIS in names
    domains = {info.name: [v.number_value or v.string_value for v in info.domain_discrete.values]
               for info in experiment.hparam_infos}
    assert domains["d_model"] == [16, 24] and domains["variant"] == ["Q=K=V", "QKV"]

    for cell, (width, variant) in _cells(out).items():
        events = EventAccumulator(str(cell))
        events.Reload()
        content = events.PluginTagToContent("hparams")
        assert metadata.EXPERIMENT_TAG not in content
        session = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        assert session.group_name == str(cell.relative_to(out / "runs"))  # the trial ID in the HParams table
        start = session.hparams
        assert start["d_model"].number_value == width and start[AXIS].number_value == width
        assert (start["variant"].string_value, start["task"].string_value) == (variant, "task")
        assert start["seed"].number_value == 0 and start["status"].string_value == "ok"
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        assert end.status == api_pb2.STATUS_SUCCESS
        result = json.loads((cell / "result.json").read_text())
        assert events.Scalars("test/acc")[-1].value == pytest.approx(result["metrics"]["test/acc"])

    # re-run, every cell finished: the run is rewritten, one event file, and a file the tool did not write stays
    (out / "summary" / "notes.md").write_text("mine")
    assert main(["study", "--config", str(study_yaml)]) == 0
    (second,) = _event_files(out)
    assert second != first and not first.exists() and (out / "summary" / "notes.md").read_text() == "mine"
    rebuilt = _summary_run(out).Tensors("summary.md")[-1].tensor_proto.string_val[0].decode()
    assert rebuilt == (out / "summary.md").read_text() != text["summary.md"]  # the CLI titles it by its config


def test_mlflow_cells_get_the_same_hyper_parameters_and_the_study_gets_an_mlflow_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = f"file:{tmp_path / 'study' / 'mlruns'}"
    study_yaml, out = _study(tmp_path, {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                                        "init_args": {"tracking_uri": uri}})
    assert main(["study", "--config", str(study_yaml)]) == 0
    assert main(["study", "--config", str(study_yaml)]) == 0  # re-run: the study's run is replaced, not added
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "study"]
    active = client.search_runs([experiment.experiment_id])  # one run per cell and one of the study, no repeat
    assert sorted(run.info.run_name for run in active) == sorted(["summary", *(str(c.relative_to(out / "runs"))
                                                                             for c in _cells(out))])
    runs = {run.info.run_name: run for run in active}
    for cell, (width, variant) in _cells(out).items():
        params = runs[str(cell.relative_to(out / "runs"))].data.params
        assert {k: params[k] for k in ("variant", "task", "d_model", AXIS, "seed", "status")} == {
            "variant": variant, "task": "task", "d_model": str(width), AXIS: str(width), "seed": "0", "status": "ok"}
    study_run = runs["summary"].info.run_id
    local = Path(client.download_artifacts(study_run, "", str(tmp_path / "download")))
    assert (local / "summary.md").read_text() == (out / "summary.md").read_text()
    assert (local / "cells.md").read_text() == (out / "cells.md").read_text()
    assert (local / "summary.png").read_bytes() == (out / "summary.png").read_bytes()
    board = _summary_run(out)  # the TensorBoard run is written for MLflow cells too, with the same plots
    for width in (16, 24):
        (event,) = board.Images(f"plots/d_model={width}")
        with Image.open(local / "plots" / f"d_model={width}.png") as image:
            with Image.open(io.BytesIO(event.encoded_image_string)) as shown:
                assert image.size == shown.size and image.tobytes() == shown.tobytes()
    history = client.get_metric_history(study_run, "study/cells_finished")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
