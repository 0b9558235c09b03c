"""Hyper-parameters logged once with the final and best validation metrics, and images, hparams and metrics through
the logger API: TensorBoard's HParams plugin, and an MLflow local file store read back with MLflow's client."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qkv_lightning.cli import main
from qkv_lightning.loggers import final_and_best

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread", "plain_argv")


def fit_args(*extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/synthetic/reverse.yaml"), "--trainer.max_steps", "9",
            "--trainer.log_every_n_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
            "--data.seq_len", "12", "--data.train_size", "200", "--data.batch_size", "16",
            "--model.network.d_model", "32", "--model.optimizer.lr", "0.003", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


def test_final_and_best_follow_each_metrics_direction():
    history = [{"val/loss": 2.0, "val/acc": 0.3}, {"val/loss": 1.5, "val/acc": 0.5}, {"val/loss": 1.7, "val/acc": 0.4}]
    assert final_and_best(history) == {"final/val/loss": 1.7, "best/val/loss": 1.5, "final/val/acc": 0.4,
                                       "best/val/acc": 0.5}
    assert final_and_best(history, {"val/loss": 1.2})["best/val/loss"] == 1.2  # a checkpoint's best, before a resume


def test_tensorboard_hparams_hold_the_real_final_and_best_validation_metrics(tmp_path, monkeypatch):
    from tensorboard.plugins.hparams import metadata

    monkeypatch.chdir(tmp_path)
    assert main(fit_args()) == 0
    run = EventAccumulator(str(tmp_path / "logs" / "default" / "version_0"), size_guidance={"scalars": 0})
    run.Reload()
    content = run.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    names = {m.name.tag for m in experiment.metric_infos}
    assert {"final/val/loss", "best/val/loss", "final/val/acc", "best/val/acc"} <= names
    assert "hp_metric" not in names and "hp_metric" not in run.Tags()["scalars"]
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["model.init_args.attention.sharing"].string_value == "QKV"
    losses = [event.value for event in run.Scalars("val/loss")]
    accuracies = [event.value for event in run.Scalars("val/acc")]
    assert len(losses) == 3  # three validations
    assert run.Scalars("final/val/loss")[-1].value == pytest.approx(losses[-1])
    assert run.Scalars("best/val/loss")[-1].value == pytest.approx(min(losses))
    assert run.Scalars("best/val/acc")[-1].value == pytest.approx(max(accuracies))
    assert len(content) == 3  # the hyper-parameters were written once (one experiment, one session start, one end)


def test_mlflow_file_store_gets_metrics_params_and_attention_map_images(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
              "init_args": {"tracking_uri": uri, "experiment_name": "qkv-test", "run_name": "tiny"}}
    assert main(fit_args("--trainer.logger", json.dumps(logger), "--trainer.default_root_dir", str(tmp_path))) == 0
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "qkv-test"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["model.init_args.attention.sharing"] == "QKV"
    assert run.data.params["model.init_args.network.d_model"] == "32"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert len(losses) == 3
    assert run.data.metrics["final/val/loss"] == pytest.approx(losses[-1])
    assert run.data.metrics["best/val/loss"] == pytest.approx(min(losses))
    assert {"train/loss", "perf/samples_per_sec"} <= set(run.data.metrics)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "attention/layer1/probs")]
    assert images == [f"attention/layer1/probs/step_{s:06d}.png" for s in (3, 6, 9)]
    local = client.download_artifacts(run.info.run_id, images[0], str(tmp_path / "download"))
    with Image.open(local) as image:
        assert image.size == (4 * 13 - 1, 12)  # 4 heads of 12 x 12 with 1-pixel gaps


# ------------------------------------------------------------------ --ckpt_path last whatever the logger (issue 28)
def csv_metric(path: Path, name: str) -> list[float]:
    lines = path.read_text().splitlines()
    column = lines[0].split(",").index(name)
    return [float(row.split(",")[column]) for row in lines[1:] if row.split(",")[column]]


def test_validate_ckpt_path_last_after_a_fit_with_csvlogger(tmp_path, monkeypatch):
    """CSVLogger: ``validate --ckpt_path last`` evaluates the fit's last.ckpt (its val/loss is the one the fit logged
    at that checkpoint's step) and logs inside that run (version_0/validate)."""
    monkeypatch.chdir(tmp_path)
    csv = ["--trainer.logger", "CSVLogger", "--trainer.logger.name", "csvrun"]
    assert main(fit_args(*csv)) == 0
    run = tmp_path / "logs" / "csvrun" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert main(["validate", *fit_args(*csv)[1:], "--ckpt_path", "last"]) == 0
    fitted, validated = csv_metric(run / "metrics.csv", "val/loss"), csv_metric(run / "validate" / "metrics.csv",
                                                                                  "val/loss")
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]  # validations every 3
    assert len(fitted) == 3 and validated == pytest.approx([fitted[step // 3 - 1]], rel=1e-6)


def test_ckpt_path_last_with_mlflowlogger_validates_resumes_and_says_where_it_looked(tmp_path, monkeypatch, capsys):
    """MLFlowLogger (its own store, ./mlruns): ``validate --ckpt_path last`` finds the fit's checkpoint in
    mlruns/<experiment id>/<run id>/checkpoints (its val/loss is the one the fit logged at that step), ``fit
    --ckpt_path last`` resumes it (in a new MLflow run), and an experiment without a run is an error that says where
    it looked."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    mlflow = ["--trainer.logger", "MLFlowLogger", "--trainer.logger.experiment_name", "qkv-last"]
    assert main(fit_args(*mlflow)) == 0
    (last,) = (tmp_path / "mlruns").rglob("last.ckpt")
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("*.ckpt"))
    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "qkv-last"]
    (fit_run,) = client.search_runs([experiment.experiment_id])
    assert last.parent.parent.name == fit_run.info.run_id

    assert main(["validate", *fit_args(*mlflow)[1:], "--ckpt_path", "last"]) == 0
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    (validate_run,) = [run for run_id, run in runs.items() if run_id != fit_run.info.run_id]
    step = torch.load(last, weights_only=True)["global_step"]
    fitted = [m.value for m in sorted(client.get_metric_history(fit_run.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert len(fitted) == 3 and validate_run.data.metrics["val/loss"] == pytest.approx(fitted[step // 3 - 1], rel=1e-6)

    assert main(fit_args(*mlflow, "--trainer.max_steps", "12", "--ckpt_path", "last")) == 0
    resumed = max((tmp_path / "mlruns").rglob("last.ckpt"), key=lambda path: path.stat().st_mtime)
    assert resumed.parent.parent.name not in runs  # a new MLflow run (MLflow refuses changed params in an old one)
    assert step == 3  # Lightning 2.6 updates last.ckpt only with a new best val/seq_acc, which stays 0 here
    new_run = resumed.parent.parent.name
    assert len(client.get_metric_history(new_run, "val/loss")) == 3  # steps 6, 9, 12: resumed at 3, not from 0

    capsys.readouterr()
    other = ["--trainer.logger", "MLFlowLogger", "--trainer.logger.experiment_name", "other"]
    assert main(["validate", *fit_args(*other)[1:], "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert "no last.ckpt was found (looked for mlruns/<id of experiment 'other'>/<run id>/checkpoints/last.ckpt)" in err


def test_logger_errors_name_the_extra_to_install(tmp_path, monkeypatch, capsys):
    """A logger whose package is missing (W&B here; MLflow made to look missing) names the extra of this package
    that installs it, in one paragraph without jsonargparse's list of union types; MLflow refusing its file store
    names the switch."""
    monkeypatch.chdir(tmp_path)
    if importlib.util.find_spec("mlflow") is not None:  # a fresh process: MLflow caches its stores in a process
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MLFLOW_ALLOW_FILE_STORE", None)
        out = subprocess.run([sys.executable, str(ROOT / "cli.py"), *fit_args("--trainer.logger", "MLFlowLogger")],
                             capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 2 and "MLFLOW_ALLOW_FILE_STORE=true" in out.stderr, out.stderr[-3000:]
        assert "Expected a" not in out.stderr and "Traceback" not in out.stderr
    if importlib.util.find_spec("wandb") is None:
        assert main(fit_args("--trainer.logger", "WandbLogger")) == 2
        err = capsys.readouterr().err
        assert 'pip install -e ".[wandb]"' in err and "Expected a" not in err and err.count("error:") == 1, err
    from lightning_utilities.core.imports import RequirementCache

    monkeypatch.setattr("lightning.pytorch.loggers.mlflow._MLFLOW_AVAILABLE", RequirementCache("no-such-package>=1"))
    assert main(fit_args("--trainer.logger", "MLFlowLogger")) == 2
    err = capsys.readouterr().err
    assert 'MLFlowLogger needs the mlflow package, which is not installed: pip install -e ".[mlflow]"' in err
    assert not list(tmp_path.rglob("*.ckpt"))
