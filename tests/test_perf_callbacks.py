"""perf/* throughput, MFU, step time and memory, and attention-map images, in TensorBoard after tiny fits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from qkv_lightning.callbacks.attention_maps import AttentionMaps, head_strip
from qkv_lightning.callbacks.perf import PerfMonitor, peak_memory_bytes
from qkv_lightning.cli import main
from qkv_lightning.nn.attention import Attention, AttentionConfig
from qkv_lightning.nn.encoder import EncoderConfig
from qkv_lightning.nn.vit import ViTConfig
from qkv_lightning.tasks.image_classifier import ImageClassifier
from qkv_lightning.tasks.optim import OptimizerConfig
from qkv_lightning.tasks.sequence_tasks import SequenceTask

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
PEAK = 1e12


pytestmark = pytest.mark.usefixtures("one_thread", "plain_argv")


def events(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in acc.Scalars(tag)}


def fit_synthetic(tmp_path, monkeypatch, *extra: str) -> EventAccumulator:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs/synthetic/reverse.yaml"), "--trainer.max_steps", "8",
            "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
            "--data.seq_len", "12", "--data.train_size", "400", "--data.batch_size", "16", "--perf.window", "3",
            "--model.network.d_model", "32", *QUIET, *extra]
    assert main(args) == 0
    return events(tmp_path / "logs" / "default" / "version_0")


def test_fit_logs_perf_metrics_consistent_with_the_closed_form(tmp_path, monkeypatch):
    time_points = []  # (batches, samples) of every time point the monitor takes, each a device sync on a GPU
    real_update = Throughput.update

    def recording_update(self, *, time, batches, samples, **kwargs):
        time_points.append((batches, samples))
        real_update(self, time=time, batches=batches, samples=samples, **kwargs)

    monkeypatch.setattr(Throughput, "update", recording_update)
    acc = fit_synthetic(tmp_path, monkeypatch, "--perf.available_flops", str(PEAK))
    # one time point per logging step (every 2nd of the 8 batches), yet every batch of 16 sequences is counted
    assert time_points == [(2, 32), (4, 64), (6, 96), (8, 128)]
    tags = set(acc.Tags()["scalars"])
    expected = {"perf/tokens_per_sec", "perf/samples_per_sec", "perf/flops_per_sec", "perf/mfu", "perf/step_time",
                "perf/peak_memory_gb"}
    assert expected <= tags, tags
    samples, tokens = scalars(acc, "perf/samples_per_sec"), scalars(acc, "perf/tokens_per_sec")
    flops, mfu, step = scalars(acc, "perf/flops_per_sec"), scalars(acc, "perf/mfu"), scalars(acc, "perf/step_time")
    assert sorted(samples) == [5, 7]  # logging steps (every 2nd batch) once the window (3 time points) is full
    task = SequenceTask(network=EncoderConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=64))
    cost = task.cost(data_spec={"vocab_size": 10, "num_classes": 10, "seq_len": 12})
    for key in samples:
        assert tokens[key] == pytest.approx(samples[key] * 12, rel=1e-5)
        assert flops[key] == pytest.approx(samples[key] * cost.train_flops_per_sample, rel=1e-5)
        assert mfu[key] == pytest.approx(flops[key] / PEAK, rel=1e-5)
        assert step[key] == pytest.approx(16 / samples[key], rel=1e-5)  # batch of 16, no accumulation
    memory = scalars(acc, "perf/peak_memory_gb")
    # TensorBoard stores scalars as float32, so the logged peak may round up by a few parts in 1e8.
    assert 0.05 < max(memory.values()) <= peak_memory_bytes(torch.device("cpu")) / 1e9 * (1 + 1e-6)


def test_fit_logs_attention_images_at_each_validation(tmp_path, monkeypatch):
    acc = fit_synthetic(tmp_path, monkeypatch, "--config", str(ROOT / "configs/variants/q=k=v.yaml"))
    images = set(acc.Tags()["images"])
    assert images == {f"attention/layer{i}/{kind}" for i in (0, 1) for kind in ("probs", "logits")}
    shown = acc.Images("attention/layer1/logits")
    assert [event.step for event in shown] == [4, 8]  # the two validation runs (not the sanity check)
    assert (shown[0].width, shown[0].height) == (4 * 13 - 1, 12)  # 4 heads of 12 x 12 with 1-pixel gaps
    assert "perf/mfu" not in acc.Tags()["scalars"]  # a CPU has no table entry and none was set


def test_settings_turn_the_callbacks_off_and_choose_layers(tmp_path, monkeypatch):
    acc = fit_synthetic(tmp_path, monkeypatch, "--perf.enabled", "false", "--attention_maps.layers", "[-1]",
                        "--attention_maps.logits", "false", "--attention_maps.every_n_validations", "2")
    assert not any(tag.startswith("perf/") for tag in acc.Tags()["scalars"])
    assert acc.Tags()["images"] == ["attention/layer1/probs"]
    assert [event.step for event in acc.Images("attention/layer1/probs")] == [4]  # validations 1 and 3 only


def test_bad_perf_settings_are_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(ROOT / "configs/synthetic/reverse.yaml"), "--perf.window", "1", *QUIET])
    assert code == 2 and "perf.window=1 must be at least 2" in capsys.readouterr().err


def test_image_task_logs_images_per_second_and_flops_per_batch(tmp_path):
    spec = {"num_classes": 3, "image_size": 16, "in_channels": 3}
    task = ImageClassifier(
        network=ViTConfig(patch_size=8, n_layer=1, n_head=2, d_model=16, d_mlp=32, drop_path=0.0),
        optimizer=OptimizerConfig(warmup_steps=0),
        data_spec=spec,
    )
    data = TensorDataset(torch.randn(40, 3, 16, 16), torch.randint(0, 3, (40,)))
    logger = TensorBoardLogger(str(tmp_path), name="vit", version=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, log_every_n_steps=2, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1,
                        callbacks=[PerfMonitor(window=2, available_flops=PEAK), AttentionMaps(heads=1)])
    trainer.fit(task, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    acc = events(tmp_path / "vit" / "version_0")
    tags = set(acc.Tags()["scalars"])
    assert {"perf/images_per_sec", "perf/mfu", "perf/step_time"} <= tags and "perf/tokens_per_sec" not in tags
    images, flops = scalars(acc, "perf/images_per_sec"), scalars(acc, "perf/flops_per_sec")
    cost = task.cost()
    assert all(flops[k] == pytest.approx(images[k] * cost.train_flops_per_sample, rel=1e-5) for k in images)
    assert {"attention/layer0/probs", "attention/layer0/logits"} == set(acc.Tags()["images"])
    assert (acc.Images("attention/layer0/probs")[0].width, acc.Images("attention/layer0/probs")[0].height) == (5, 5)
    # flops_per_batch: forward plus backward in training, forward only in evaluation, for the current batch
    batch = next(iter(DataLoader(data, batch_size=5)))
    task.on_validation_batch_start(batch, 0)
    task.eval()
    assert task.flops_per_batch == cost.forward_flops(5)
    task.train()
    assert task.flops_per_batch == cost.train_flops(5) == 5 * cost.train_flops_per_sample


def test_logit_maps_are_symmetric_when_q_and_k_share_a_projection():
    spec = {"vocab_size": 10, "num_classes": 10, "seq_len": 8}
    callback = AttentionMaps(heads=2)
    tokens = torch.randint(0, 10, (3, 8), generator=torch.Generator().manual_seed(0))
    for variant, symmetric in (("Q=K-V", True), ("Q=K=V", True), ("QKV", False), ("Q-K=V", False)):
        torch.manual_seed(0)
        task = SequenceTask(attention=AttentionConfig(sharing=variant), data_spec=spec,
                            network=EncoderConfig(n_layer=2, n_head=2, d_model=16, max_seq_len=8, init_std=0.5))
        task.configure_model()
        task.eval()
        images = callback.compute(task, (tokens, tokens))
        assert set(images) == {f"attention/layer{i}/{k}" for i in (0, 1) for k in ("probs", "logits")}
        for layer in (0, 1):
            logits = images[f"attention/layer{layer}/logits"]
            for head in range(2):
                block = logits[:, head * 9 : head * 9 + 8]  # (8, 8)
                assert torch.allclose(block, block.T, atol=1e-5) == symmetric, (variant, layer, head)
            assert torch.all(logits[:, 8] == 1.0)  # the white gap between the heads
        probs = task.network(tokens[:1], need_weights=True)[1][1][0]  # (H, T, T) of the last block
        expected = head_strip(probs, 2, 64)
        assert torch.allclose(images["attention/layer1/probs"], expected)


def test_logit_maps_of_a_layer_that_reuses_k_v_are_its_scores_before_the_softmax():
    """Cross-layer K/V sharing (``attention.kv_share_every: 2``, RoPE): block 1 projects Q only and attends with
    block 0's K/V. Each logit map is an image of the scores the network's own attention maps come from: the encoder
    has no mask, so within a row it equals log(probs) up to a constant, and the image scales it by 1 / (max - min)."""
    spec = {"vocab_size": 10, "num_classes": 10, "seq_len": 8}
    torch.manual_seed(0)
    task = SequenceTask(attention=AttentionConfig(sharing="QKV", kv_share_every=2), data_spec=spec,
                        network=EncoderConfig(n_layer=2, n_head=2, d_model=16, max_seq_len=8, init_std=0.5,
                                              position="rope"))
    task.configure_model()
    task.eval()
    attentions = [m for m in task.network.modules() if isinstance(m, Attention)]
    assert [m.reuses_kv for m in attentions] == [False, True]
    tokens = torch.randint(0, 10, (3, 8), generator=torch.Generator().manual_seed(0))
    images = AttentionMaps(heads=2).compute(task, (tokens, tokens))
    probs = task.network(tokens[:1], need_weights=True)[1]  # per block (1, H, T, T)
    for layer in (0, 1):
        for head in range(2):
            image = images[f"attention/layer{layer}/logits"][:, head * 9 : head * 9 + 8].double()  # (T, T)
            log_probs = probs[layer][0, head].double().log()  # (T, T)
            image, log_probs = image - image.mean(-1, keepdim=True), log_probs - log_probs.mean(-1, keepdim=True)
            scale = (image * log_probs).sum() / (image * image).sum()  # the map's max - min
            assert scale > 0.1, (layer, head)
            torch.testing.assert_close(image * scale, log_probs, rtol=0, atol=1e-4, msg=f"layer {layer} head {head}")


def test_head_strip_scales_each_map_to_its_range():
    maps = torch.stack([torch.arange(4.0).view(2, 2), 10 + 2 * torch.arange(4.0).view(2, 2)])  # (2, 2, 2)
    strip = head_strip(maps, heads=2, max_tokens=8)
    expected = torch.tensor([[0.0, 1 / 3, 1.0, 0.0, 1 / 3], [2 / 3, 1.0, 1.0, 2 / 3, 1.0]])
    assert torch.allclose(strip, expected)


def test_maps_of_a_compiled_model_are_computed_eagerly_and_leave_it_compiled():
    spec = {"vocab_size": 10, "num_classes": 10, "seq_len": 8}
    network = EncoderConfig(n_layer=2, n_head=2, d_model=16, max_seq_len=8)
    compiled = SequenceTask(attention=AttentionConfig(sharing="Q=K-V"), data_spec=spec, network=network, compile=True)
    eager = SequenceTask(attention=AttentionConfig(sharing="Q=K-V"), data_spec=spec, network=network)
    for task in (compiled, eager):
        task.configure_model()
        task.eval()
    compiled.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(0))
    callback = AttentionMaps()
    images, reference = callback.compute(compiled, (tokens,)), callback.compute(eager, (tokens,))
    assert images.keys() == reference.keys() and all(torch.equal(images[k], reference[k]) for k in images)
    blocks = [m for m in compiled.modules() if m._compiled_call_impl is not None]
    assert len(blocks) == 2  # still compiled for training


class SlowValidation(L.Callback):
    """Each validation batch takes 0.3 s more."""

    def on_validation_batch_end(self, *args, **kwargs):
        import time

        time.sleep(0.3)


def fit_sequence_task(
    tmp_path, batch_size: int, validate: bool, **trainer: Any
) -> tuple[SequenceTask, EventAccumulator]:
    """Fit a one-block sequence task on 64 random sequences of 8 tokens, in batches of ``batch_size`` (validating on
    the same batches with ``validate``), with a quiet CPU trainer (``trainer``: its other arguments) logging to
    TensorBoard; returns the task and the run's events."""
    spec = {"vocab_size": 10, "num_classes": 10, "seq_len": 8}
    task = SequenceTask(network=EncoderConfig(n_layer=1, n_head=2, d_model=16, max_seq_len=8), data_spec=spec,
                        optimizer=OptimizerConfig(warmup_steps=0))
    tokens = torch.randint(0, 10, (64, 8))
    data = DataLoader(TensorDataset(tokens, tokens), batch_size=batch_size)
    logger = TensorBoardLogger(str(tmp_path), name="seq", version=0)
    L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, **trainer).fit(task, data, data if validate else None)
    return task, events(tmp_path / "seq" / "version_0")


def test_validation_time_is_left_out_of_the_training_rates(tmp_path):
    _, acc = fit_sequence_task(tmp_path, 8, True, max_steps=8, log_every_n_steps=2, val_check_interval=3,
                               limit_val_batches=2, num_sanity_val_steps=0,
                               callbacks=[PerfMonitor(window=2), SlowValidation()])
    step_time = scalars(acc, "perf/step_time")
    # time points at batches 2, 4, 6, 8; validations (0.6 s each) after batches 3 and 6 fall inside intervals 2-4, 6-8
    assert sorted(step_time) == [3, 5, 7]
    assert max(step_time.values()) < 0.15, step_time  # 0.3 s or more per step if the validations were counted


def test_time_points_only_after_optimizer_steps_that_are_logging_steps(tmp_path, monkeypatch):
    """With gradient accumulation a time point (a device sync on a GPU) is taken only after an optimiser step whose
    number is a multiple of log_every_n_steps; rates are logged there through LightningModule.log."""
    time_points = []
    real_update = Throughput.update

    def recording_update(self, *, time, batches, samples, **kwargs):
        time_points.append((batches, samples, kwargs["lengths"], kwargs["flops"]))
        real_update(self, time=time, batches=batches, samples=samples, **kwargs)

    monkeypatch.setattr(Throughput, "update", recording_update)
    task, acc = fit_sequence_task(tmp_path, 4, False, max_steps=6, accumulate_grad_batches=2, log_every_n_steps=2,
                                  limit_val_batches=0, callbacks=[PerfMonitor(window=2, available_flops=PEAK)])
    per_batch = task.cost().train_flops(4)
    # optimiser steps 2, 4, 6 end after batches 4, 8, 12; each time point carries the FLOPs of 4 batches
    assert time_points == [(4, 16, 128, 4 * per_batch), (8, 32, 256, 4 * per_batch), (12, 48, 384, 4 * per_batch)]
    samples, step = scalars(acc, "perf/samples_per_sec"), scalars(acc, "perf/step_time")
    assert sorted(samples) == sorted(scalars(acc, "train/loss"))[1:]  # train/loss's logging steps, once 2 points exist
    assert all(step[k] == pytest.approx(2 * 4 / samples[k], rel=1e-5) for k in samples)  # 2 batches of 4 per step
