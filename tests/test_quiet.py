"""Quiet runs: a real fit prints no Lightning tips and none of the warnings that ``qkv_lightning.quiet`` knows to be
harmless; and the FSDP2 "returned a view tensor" warning is harmless here: FSDP2 gradients equal one process's."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from qkv_lightning.parallel import shard_network
from qkv_lightning.tasks.sequence_tasks import SequenceTask
from tests.run_fixtures import CONFIGS, synthetic_args

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Tip:", "LeafSpec", "returned a view tensor", "LightningCLI's args parameter")


def test_a_tiny_fsdp2_fit_prints_no_tips_and_no_known_warnings(tmp_path):
    """One CPU process under FSDP2 (the view warning's setting), through ``python cli.py`` as a user runs it."""
    args = [
        *synthetic_args(tmp_path, steps=2), "--config", str(CONFIGS / "strategy" / "fsdp2.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in out.stderr  # a real run, with Lightning's own lines
    printed = out.stdout + out.stderr
    noisy = [line for line in printed.splitlines() if any(word in line for word in NOISE) or "Warning" in line]
    assert not noisy, noisy


def test_fsdp2_gradients_equal_one_process_although_the_output_is_a_view(tmp_path):
    """The sequence encoder's logits are a view (a Linear on (B, T, C)); FSDP2 warns that an in-place op on it would
    skip its pre-backward hook. The task uses it out of place: the FSDP2 network's loss and every gradient equal
    those of the same network without FSDP2."""
    spec = {"vocab_size": 10, "num_classes": 10, "seq_len": 8}
    torch.manual_seed(0)
    task = SequenceTask(network={"n_layer": 2, "d_model": 32, "n_head": 2, "max_seq_len": 8}, data_spec=spec)
    task.network = task.build_network(spec)
    sharded = copy.deepcopy(task)
    batch = task.example_batch(4, torch.Generator().manual_seed(1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        shard_network(sharded.network, init_device_mesh("cpu", (1,)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = sharded.training_loss(batch)
        assert any("returned a view tensor" in str(w.message) for w in caught)  # the case the warning is about
        loss.backward()
        reference = task.training_loss(batch)
        reference.backward()
        assert torch.allclose(loss, reference, rtol=1e-6, atol=1e-7)
        grads = {name: p.grad for name, p in task.network.named_parameters()}
        checked = 0
        for name, param in sharded.network.named_parameters():
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
            checked += 1
        assert checked == len(grads) > 10
    finally:
        dist.destroy_process_group()
