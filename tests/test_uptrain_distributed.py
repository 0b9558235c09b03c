"""init_from and distillation under FSDP2 (CPU, gloo, 2 processes) train like one process with the same global batch."""

from __future__ import annotations

import pytest

from qkv_lightning.cli import main
from tests.distributed_support import needs_cpu_fsdp2
from tests.lm_fixtures import write_wikitext
from tests.test_distributed import FSDP2, assert_same_training, fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uptrain-distributed")
    write_wikitext(folder / "data", {"wiki.train.tokens": 20, "wiki.valid.tokens": 2, "wiki.test.tokens": 2})
    return folder


@needs_cpu_fsdp2
def test_init_from_and_distillation_under_fsdp2_match_one_process(workdir):
    fit(workdir, "teacher", 8, "--trainer.devices", "1", timeout=900)  # a QKV model: the source and the teacher
    teacher = workdir / "teacher" / "checkpoints" / "last.ckpt"
    converted = workdir / "q-k=v.ckpt"
    assert main(["convert", str(teacher), str(converted), "--sharing", "Q-K=V", "--method", "mean"]) == 0
    start = ("--model.init_args.attention.sharing", "Q-K=V", "--model.init_args.init_from", str(converted),
             "--model.init_args.distill.teacher", str(teacher))
    single = fit(workdir, "single", 8, "--trainer.devices", "1", *start, timeout=900)
    sharded = fit(workdir, "fsdp2", 4, *FSDP2, *start, timeout=900)
    assert sharded["strategy"] == "FSDP2Strategy" and sharded["world_size"] == 2
    assert_same_training(sharded, single)
    scratch = fit(workdir, "scratch", 8, "--trainer.devices", "1", *start[:2], timeout=900)
    assert abs(scratch["losses"][0] - single["losses"][0]) > 1e-3  # init_from changed the starting point
