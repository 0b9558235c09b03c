"""A study in TensorBoard, where users already look: ``tensorboard --logdir <study>``.

* **Every cell is a session of one HParams view.** A cell's hyper-parameters (:func:`cell_hparams`) name it: its
  variant, task, every axis value (under the config key's last part, and under the full key), its seed, its status and
  accounting. A TensorBoard cell records them as a session of the HParams plugin (start and end, success or failure);
  a cell logging to MLflow, W&B or CSV gets the same dictionary through Lightning's ``log_hyperparams``
  (:func:`log_cell_hparams`).
* **The study has a run of its own, ``<study>/summary/``** (:class:`StudyBoard`): the one HParams experiment of the
  study (every column, its values and the metrics), ``summary.md`` and ``cells.md`` as text (the files' markdown),
  ``summary.png`` and a plot per task and axis setting as images, and the study's progress as scalars
  (``study/cells_finished``, ``study/cells_failed``, ``study/cells_pending``, one point per finished cell at the time
  its ``result.json`` was written). It is rewritten whole when a cell finishes, when a study resumes and when its
  report is rebuilt (``run: false``); when the cells log to MLflow, the study gets an MLflow run ``summary`` too,
  with the tables and plots as artifacts.

Which HParams columns show first. TensorBoard's HParams view reads the experiment of a run that holds one, sorts its
columns by the ``differs`` flag (True first), then by name, and shows the first five (TensorBoard 2.15 to 2.21,
``backend_context._sort_and_reduce_to_hparams_limit`` and the dashboard's ``_computeHParams``). So the study's
experiment, the only one (cells write sessions, not experiments), flags the variant, the task, the axes and the seed,
in that priority, five at most (:data:`SHOWN_COLUMNS`); the others stay one click away.

The run's event file is built in memory and written through :func:`qkv_lightning.files.atomic_open` under a new name
that sorts after the last (TensorBoard reads a run's files in name order); the folder's manifest (:data:`MANIFEST`)
lists what this module wrote, with SHA-256, and only those files, unchanged, are ever deleted, so a study folder holds
one summary event file and never loses a file that someone else put there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qkv_lightning.files import atomic_open, atomic_write_json, file_digest, read_json, temporary_prefix
from qkv_lightning.study.config import StudyConfig, short_axis_names, task_label
from qkv_lightning.study.results import RESULT_FILE, is_finished, read_result
from qkv_lightning.variants import row_columns

SUMMARY_RUN = "summary"
"""The study's own TensorBoard run: ``<study>/summary/`` (and the name of its MLflow run)."""

SHOWN_COLUMNS = 5
"""How many HParams columns TensorBoard's HParams view shows before the user ticks more."""

RESULT_COLUMNS = ("status", "params", "kv_cache_bytes_per_token")
"""The hyper-parameters that come from a cell's result (a cell not finished has none)."""

MANIFEST = ".qkv-study-run.json"
"""The summary folder's list of the event files this module wrote, with their SHA-256."""

EVENT_FILE = re.compile(r"events\.out\.tfevents\.\d{10}\.\d{9}\.qkv-study")
"""The names of those event files (``tfevents`` in the name: TensorBoard reads them)."""

MAX_PLOTS = 64
"""Plots per task and axis setting drawn at most (each takes a fraction of a second)."""

MLFLOW_ROLE = ("qkv_lightning_role", "study-summary")
"""The tag of the MLflow run this module makes for a study: earlier ones with it are deleted, no other run."""


# ------------------------------------------------------------------------------------------- a cell's columns
def hparam_value(value: Any) -> bool | int | float | str:
    """A value as TensorBoard's HParams plugin stores it: a bool, number or string (``null``; JSON for the rest)."""
    if isinstance(value, bool | int | float | str):
        return value
    return "null" if value is None else json.dumps(value, sort_keys=True, default=str)


def axis_columns(spec: dict) -> dict[str, str]:
    """Each axis key of the cell ``spec`` and its column: the key's last part, or the full key where that part is
    another column's (``seed``, ``task``, a variant column) or two keys end alike."""
    reserved = {"variant", "task", "seed", "task_config", *row_columns(), *RESULT_COLUMNS}
    return short_axis_names([key for key, _ in spec["axes"]], taken=reserved)


def leading_columns(spec: dict) -> list[str]:
    """The columns that name a cell, in the order they should show: variant, task, the axes, the seed."""
    names = axis_columns(spec)
    return ["variant", "task", *(names[key] for key, _ in spec["axes"]), "seed"]


def cell_hparams(spec: dict, result: dict | None = None) -> dict[str, bool | int | float | str]:
    """The hyper-parameters of the cell ``spec`` (:func:`qkv_lightning.study.cell.cell_spec`): the
    :func:`leading_columns`, every axis value under its full config key too, the variant's columns (null K/V heads
    are "all", booleans "true" / "false"), the task config's path, and, from its ``result``, its status and
    accounting."""
    names = axis_columns(spec)
    params: dict[str, Any] = {"variant": spec["label"], "task": task_label(spec["task_name"])}
    params.update({names[key]: hparam_value(value) for key, value in spec["axes"]})
    params["seed"] = spec["seed"]
    params.update({key: hparam_value(value) for key, value in spec["axes"]})
    for key, value in spec["row"].items():
        if key != "variant":
            params[key] = "all" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    params["task_config"] = spec["task_name"]
    if result is not None:
        params["status"] = result["status"]
        params["params"] = result.get("params") or 0
        params["kv_cache_bytes_per_token"] = result.get("kv_cache_bytes_per_token") or 0
    return params


def _hparams_summary(tag: str, data: Any) -> Any:
    """A ``Summary`` holding the HParams plugin's ``data`` (an ``HParamsPluginData``) under ``tag``."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    value = summary_pb2.Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))
    value.tensor.CopyFrom(metadata.NULL_TENSOR)
    return summary_pb2.Summary(value=[value])


def session_summaries(params: dict, ok: bool, when: float, name: str | None = None) -> list[Any]:
    """The HParams session of one cell: its start (the hyper-parameters; ``name``, the cell's key, is its trial ID in
    the HParams table, else a hash of the hyper-parameters) and its end (success or failure)."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2

    status = api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE
    end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(status=status,
                                                                                            end_time_secs=when))
    start = summary_v2.hparams_pb(params, trial_id=name, start_time_secs=when)
    return [start, _hparams_summary(metadata.SESSION_END_INFO_TAG, end)]


def log_cell_hparams(
    logger: Any, params: dict, metrics: dict[str, float], step: int, ok: bool, name: str | None = None
) -> None:
    """Record a cell's hyper-parameters and final metrics through ``logger``: TensorBoard gets ``hparams.yaml``, the
    metrics as scalars and the cell's HParams session (no experiment of its own: the study's run holds the one
    experiment, :func:`experiment_summary`); any other logger (MLflow, W&B, CSV) gets them through its
    ``log_hyperparams`` and ``log_metrics`` (:func:`qkv_lightning.loggers.log_hyperparams_and_metrics`). ``name``: the
    session's trial ID (the cell's key)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from qkv_lightning.loggers import log_hyperparams_and_metrics, record_hyperparams

    if not isinstance(logger, TensorBoardLogger):
        log_hyperparams_and_metrics(logger, params, metrics, step)
        return
    record_hyperparams(logger, params)  # hparams.yaml, no summary
    if metrics:
        logger.log_metrics(dict(metrics), step=step)
    writer = logger.experiment._get_file_writer()  # as Lightning's own log_hyperparams writes its summaries
    for summary in session_summaries(params, ok, time.time(), name):
        writer.add_summary(summary, step)


# ------------------------------------------------------------------------------------------- the study's run
def _domain(name: str, values: list) -> Any:
    """The HParams domain of a column from the values the cells have (None where the types are mixed)."""
    from tensorboard.plugins.hparams import summary_v2

    if name == "status":
        return summary_v2.Discrete(["failed", "ok"])
    if all(isinstance(v, bool) for v in values):
        return summary_v2.Discrete(sorted(set(values)), dtype=bool)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        numbers = sorted({float(v) for v in values})
        if name in RESULT_COLUMNS:
            return summary_v2.RealInterval(numbers[0], numbers[-1])
        return summary_v2.Discrete(numbers, dtype=float)
    if all(isinstance(v, str) for v in values):
        return summary_v2.Discrete(sorted(set(values)), dtype=str)
    return None


def experiment_summary(cells: list[dict], leading: list[str], metrics: list[str], created: float) -> Any:
    """The study's HParams experiment: every column of the ``cells`` (their :func:`cell_hparams`) with the values
    they take, the ``metrics``, and the first :data:`SHOWN_COLUMNS` of ``leading`` flagged so that TensorBoard shows
    them first (the module's docstring says why the ``differs`` flag)."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2, summary_v2

    names = list(dict.fromkeys(name for params in cells for name in params))
    columns = [summary_v2.HParam(name, _domain(name, [p[name] for p in cells if name in p])) for name in names]
    summary = summary_v2.hparams_config_pb(columns, [summary_v2.Metric(m) for m in metrics], created)
    value = summary.value[0]
    experiment = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
    shown = set(leading[:SHOWN_COLUMNS])
    for info in experiment.hparam_infos:
        info.differs = info.name in shown
    value.metadata.CopyFrom(metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=experiment)))
    return summary


def _event(step: int, wall_time: float, values: list) -> Any:
    from tensorboard.compat.proto import event_pb2, summary_pb2

    return event_pb2.Event(step=step, wall_time=wall_time, summary=summary_pb2.Summary(value=values))


def text_value(tag: str, text: str) -> Any:
    """A text summary (rendered as markdown by TensorBoard's text plugin)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.text import metadata
    from tensorboard.util import tensor_util

    return summary_pb2.Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(tag, ""),
                                     tensor=tensor_util.make_tensor_proto(text))


def image_value(tag: str, png: bytes) -> Any:
    """An image summary holding the PNG ``png`` as it is."""
    from PIL import Image
    from tensorboard.compat.proto import summary_pb2

    with Image.open(io.BytesIO(png)) as image:
        (width, height), channels = image.size, len(image.getbands())
    picture = summary_pb2.Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
    return summary_pb2.Summary.Value(tag=tag, image=picture)


def event_file(events: list) -> bytes:
    """The bytes of a TensorBoard event file holding ``events`` (TFRecord framing, after the version record)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    buffer = io.BytesIO()
    records = RecordWriter(buffer)
    records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
    for event in events:
        records.write(event.SerializeToString())
    return buffer.getvalue()


class StudyBoard:
    """The study's own run, ``<study>/summary/`` (and, for MLflow cells, its MLflow run): see the module.

    Made when the study starts (it writes the progress so far and the last report's tables); :meth:`progress` after
    each finished cell; :meth:`finish` once the report is written. None of them raises: a problem is said once
    through ``echo`` and the study goes on (its tables are in the study folder all the same).
    """

    def __init__(self, config: StudyConfig, study_dir: Path, specs: list[dict], echo: Callable[[str], None]) -> None:
        self.config, self.study_dir, self.specs, self.echo = config, Path(study_dir), specs, echo
        self.folder = self.study_dir / SUMMARY_RUN
        self.report: list = []
        self.said: set[str] = set()
        self._safely("TensorBoard run", lambda: self._report(None))

    def progress(self) -> None:
        """Rewrite the run with the progress so far (after a cell finished)."""
        self._safely("TensorBoard run", self._write)

    def finish(self, summary: dict) -> None:
        """Rewrite the run with the report just written, and write the MLflow run if the cells log to MLflow."""
        self._safely("TensorBoard run", lambda: self._report(summary))
        if any(str(spec.get("logger") or "").endswith(".MLFlowLogger") for spec in self.specs):
            self._safely("MLflow run", lambda: self._mlflow(summary))

    def _safely(self, what: str, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as error:  # noqa: BLE001 - the dashboard must never stop or fail a study
            if what not in self.said:
                self.said.add(what)
                self.echo(f"study: the study's {what} ({self.folder}) was not written: {type(error).__name__}: {error}")

    # ------------------------------------------------------------------------------------------ contents
    def finished(self) -> list[tuple[float, dict, dict]]:
        """The finished cells, oldest first: the time its ``result.json`` was written, its spec and its result."""
        done = []
        for spec in self.specs:
            path = Path(spec["dir"]) / RESULT_FILE
            result = read_result(path.parent)
            if is_finished(result, spec, retry_failed=False):
                try:
                    done.append((path.stat().st_mtime, spec, result))
                except OSError:
                    continue
        return sorted(done, key=lambda item: item[0])

    def _report(self, summary: dict | None) -> None:
        """The report's events (the tables and plots of the study folder, and, given the ``summary`` just written,
        a plot per task and axis setting), then the run rewritten."""
        from qkv_lightning.study.plots import figure_png, summary_figure

        step, values, when = len(self.finished()), [], 0.0
        for name in ("summary.md", "cells.md"):
            path = self.study_dir / name
            if path.is_file() and not path.is_symlink():
                values.append(text_value(name, path.read_text()))
                when = max(when, path.stat().st_mtime)
        plot = self.study_dir / "summary.png"
        if plot.is_file() and not plot.is_symlink():
            values.append(image_value("summary.png", plot.read_bytes()))
        groups = (summary or {}).get("groups") or []
        for part in groups[:MAX_PLOTS]:
            figure = summary_figure({**part, "task": part["group"]})
            if figure is not None:
                values.append(image_value(f"plots/{part['group']}", figure_png(figure)))
        if len(groups) > MAX_PLOTS:
            values.append(text_value("plots", f"{len(groups)} task and axis settings: the first {MAX_PLOTS} drawn."))
        self.report = [_event(step, when or time.time(), values)] if values else []
        self._write()

    def _events(self) -> list:
        """The run's events: the experiment, the report, the progress."""
        done = self.finished()
        results = {spec["dir"]: result for _, spec, result in done}
        cells = [cell_hparams(spec, results.get(spec["dir"])) for spec in self.specs]
        metrics = self.config.resolve_metrics(list(results.values()))
        if not self.config.metrics:  # the cells record every final metric (log_cell_record), after the summarised
            logged = {name for r in results.values() if r.get("status") == "ok" for name in r["metrics"]}
            metrics += sorted(logged - set(metrics))
        leading = leading_columns(self.specs[0]) if self.specs else ["variant"]
        events = [_event(0, time.time(), list(experiment_summary(cells, leading, metrics, time.time()).value))]
        events += self.report
        total, failed = len(self.specs), 0
        if not done:
            events.append(_event(0, time.time(), self._progress(0, 0, total)))
        for finished, (when, _, result) in enumerate(done, 1):
            failed += result.get("status") != "ok"
            events.append(_event(finished, when, self._progress(finished, failed, total)))
        return events

    @staticmethod
    def _progress(finished: int, failed: int, total: int) -> list:
        from tensorboard.compat.proto import summary_pb2

        counts = {"study/cells_finished": finished, "study/cells_failed": failed,
                  "study/cells_pending": total - finished}
        return [summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in counts.items()]

    # ------------------------------------------------------------------------------------------ the files
    def _write(self) -> None:
        """Put a new event file in the summary folder, then delete the ones this module wrote before."""
        folder = self.folder
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise FileExistsError(f"{folder} is a link or a file, not the study's run folder: move it away")
        data = event_file(self._events())
        folder.mkdir(exist_ok=True)
        owned = self._owned()
        now = max([time.time_ns(), *(_stamp(name) + 1 for name in owned)])
        name = f"events.out.tfevents.{now // 10**9:010d}.{now % 10**9:09d}.qkv-study"
        digest = hashlib.sha256(data).hexdigest()
        self._record({**owned, name: digest})  # listed before it exists: a crash never leaves a file unlisted
        with atomic_open(folder / name, "wb", prefix=temporary_prefix(folder / "qkv-study-events")) as file:
            file.write(data)
        left = {old: value for old, value in owned.items() if not self._remove(folder / old, value)}
        self._record({**left, name: digest})

    def _owned(self) -> dict[str, str]:
        """The event files the manifest lists (name: SHA-256), names checked (a plain file name of this module's)."""
        manifest = read_json(self.folder / MANIFEST, "the study run's manifest", damaged_ok=True) or {}
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        return {name: value for name, value in files.items() if EVENT_FILE.fullmatch(name) and isinstance(value, str)}

    def _record(self, files: dict[str, str]) -> None:
        atomic_write_json(self.folder / MANIFEST, {"made_by": "qkv-lightning study dashboard", "files": files})

    @staticmethod
    def _remove(path: Path, digest: str) -> bool:
        """Delete ``path`` if it is the plain file this module wrote (same SHA-256); whether it is gone."""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            if file_digest(path) == digest:
                path.unlink()
                return True
            return False
        except FileNotFoundError:
            return True
        except OSError:
            return False

    # ------------------------------------------------------------------------------------------ MLflow
    def _mlflow(self, summary: dict) -> None:
        """The study's MLflow run ``summary`` in the cells' experiment (their tracking URI): the tables, the plots and
        the progress; the earlier run of the study that this module made is deleted."""
        from lightning.pytorch.loggers import MLFlowLogger
        from mlflow.entities import Metric
        from PIL import Image

        spec = next(s for s in self.specs if str(s.get("logger") or "").endswith(".MLFlowLogger"))
        args = {k: v for k, v in (spec.get("logger_args") or {}).items() if k not in ("run_id", "run_name")}
        args["tags"] = {**(args.get("tags") or {}), MLFLOW_ROLE[0]: MLFLOW_ROLE[1]}
        logger = MLFlowLogger(**{**args, "experiment_name": self.study_dir.resolve().name, "run_name": SUMMARY_RUN})
        client, run_id = logger.experiment, logger.run_id
        earlier = client.search_runs([logger.experiment_id], f"tags.{MLFLOW_ROLE[0]} = '{MLFLOW_ROLE[1]}'")
        for run in earlier:
            if run.info.run_id != run_id:
                client.delete_run(run.info.run_id)
        for name in ("summary.md", "cells.md"):
            if (self.study_dir / name).is_file():
                client.log_text(run_id, (self.study_dir / name).read_text(), name)
        if (self.study_dir / "summary.png").is_file():
            client.log_artifact(run_id, str(self.study_dir / "summary.png"))
        for event in self.report:
            for value in event.summary.value:
                if value.tag.startswith("plots/"):
                    with Image.open(io.BytesIO(value.image.encoded_image_string)) as image:
                        client.log_image(run_id, image.copy(), artifact_file=f"{value.tag}.png")
        failed, metrics = 0, []
        for finished, (when, _, result) in enumerate(self.finished(), 1):
            failed += result.get("status") != "ok"
            for tag, count in (("study/cells_finished", finished), ("study/cells_failed", failed)):
                metrics.append(Metric(tag, float(count), int(when * 1000), finished))
        if metrics:
            client.log_batch(run_id, metrics=metrics)
        logger.finalize("success")


def _stamp(name: str) -> int:
    """The nanosecond time in the name of an event file this module wrote."""
    seconds, nanos = name.split(".")[3:5]
    return int(seconds) * 10**9 + int(nanos)
