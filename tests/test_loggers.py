"""Hyper-parameters logged once with the final and best validation metrics, and images, hparams and metrics through
the logger API: TensorBoard's HParams plugin, and an MLflow local file store read back with MLflow's client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
