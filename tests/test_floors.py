"""What broke at a dependency floor, checked fast enough for the floors environment of ``.ci/floors.sh``: FSDP2 on
CPUs needs torch 2.7 (tests/test_quiet.py), and jsonargparse 4.48 names a bad Literal value and lets ``convert`` take
``--config``."""

from __future__ import annotations

import copy

import pytest
import torch

from qkv_lightning.cli import main
from tests.run_fixtures import CONFIGS


def test_a_bad_choice_is_named_in_a_one_paragraph_error(capsys):
    """jsonargparse < 4.43 says "Cannot take a Union of no types" for a string Literal's unknown value."""
    code = main(["fit", "--config", str(CONFIGS / "synthetic" / "sort.yaml"), "--data.init_args.task", "reverso"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Got value: reverso" in errors[0], err[-2000:]
    assert "Union of no types" not in err


def test_convert_takes_its_config_option(capsys):
    """jsonargparse < 4.48 refuses a command function with a parameter named ``config`` (``convert --config``)."""
    from qkv_lightning.uptrain.convert import main as convert

    with pytest.raises(SystemExit) as exit_:
        convert(["--help"])
    assert exit_.value.code == 0
    assert "--config CONFIG" in capsys.readouterr().out


def _fsdp2_gradients(rank: int, rendezvous: str, out: str) -> None:
    """One of 2 gloo processes: a tiny MLP under ``fully_shard``, half of a batch each; rank 0 saves the full
    gradients of FSDP2 and of the same MLP on the whole batch in one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        sharded = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        plain = copy.deepcopy(sharded)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))  # (B, 4)
        fully_shard(sharded, mesh=init_device_mesh("cpu", (2,)))
        sharded(x[rank * 4 : (rank + 1) * 4]).pow(2).mean().backward()  # this rank's half: (4, 4)
        plain(x).pow(2).mean().backward()
        grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
        if rank == 0:
            torch.save({"fsdp2": grads, "plain": {n: p.grad for n, p in plain.named_parameters()}}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_on_cpus_averages_the_gradients_as_one_process(tmp_path):
    """torch 2.7 and 2.8 sum FSDP2's gradients over gloo ranks instead of averaging them (2x here; AdamW hides a
    constant factor, so the fit comparisons with AdamW pass there). Below ``CPU_FSDP2_TORCH`` FSDP2Strategy refuses
    CPUs with a one-paragraph error instead."""
    import torch.multiprocessing as mp
    from torch.torch_version import TorchVersion

    from qkv_lightning.errors import ConfigError
    from qkv_lightning.parallel import CPU_FSDP2_TORCH, check_cpu_fsdp2_torch

    check_cpu_fsdp2_torch("cuda", "2.6.0")  # GPUs (NCCL) are not refused
    with pytest.raises(ConfigError, match=f"trainer.strategy=FSDP2Strategy on CPUs needs torch >= {CPU_FSDP2_TORCH}"):
        check_cpu_fsdp2_torch("cpu", "2.8.0")
    if TorchVersion(torch.__version__) < CPU_FSDP2_TORCH:
        with pytest.raises(ConfigError):
            check_cpu_fsdp2_torch("cpu")
        return

    out = tmp_path / "grads.pt"
    mp.spawn(_fsdp2_gradients, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=2)
    grads = torch.load(out, weights_only=True)
    assert len(grads["fsdp2"]) == 4
    for name, grad in grads["fsdp2"].items():
        torch.testing.assert_close(grad, grads["plain"][name], rtol=1e-5, atol=1e-7, msg=name)
