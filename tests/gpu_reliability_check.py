"""GPU checks of the reliability features: a script for a machine with a GPU, not collected by pytest (CI has none).

Runs on one GPU, in fp32 and bf16-mixed: a non-finite gradient stops the run and keeps the last good checkpoint; a
skipped step leaves the weights unchanged; a run killed with SIGKILL half-way through writing a checkpoint resumes
with ``fit --ckpt_path last`` and continues exactly as the uninterrupted run (losses and final weights).

    python tests/gpu_reliability_check.py          # ACC=cpu runs the same checks on the CPU
"""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qkv_lightning.cli import main  # noqa: E402
from tests.lm_fixtures import write_wikitext  # noqa: E402
from tests.test_crash_safety import checkpoints, poisoned  # noqa: E402
from tests.test_distributed import CHECKPOINT_EVERY, STEPS, assert_same_training, fit, fit_until_killed  # noqa: E402

ACC = os.environ.get("ACC", "gpu")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), ACC, flush=True)
root = Path("/tmp/gpucheck")
root.mkdir(exist_ok=True)
GPU = ("--trainer.accelerator", ACC, "--trainer.devices", "1")
results = {}


def check(name, fn):
    start = time.time()
    try:
        fn()
        results[name] = f"ok ({time.time() - start:.1f} s)"
    except Exception as error:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        results[name] = f"FAILED: {type(error).__name__}: {str(error)[:300]}"
    print(name, results[name], flush=True)


def nonfinite_stop(precision):
    folder = root / f"stop-{precision}"
    folder.mkdir()
    os.chdir(folder)
    code = main(poisoned(folder, 3, "gradient", *GPU, "--trainer.precision", precision))
    assert code == 2, code
    saved = checkpoints(folder)
    assert sorted(saved) == ["last.ckpt", "step=2.ckpt"], sorted(saved)
    assert saved["last.ckpt"]["global_step"] == 2


def nonfinite_skip(precision):
    folder = root / f"skip-{precision}"
    folder.mkdir()
    os.chdir(folder)
    args = poisoned(folder, 2, "gradient", *GPU, "--trainer.precision", precision, "--nonfinite.max_skipped_steps", "1",
                    every=1, steps=4)
    assert main(args) == 0
    saved = checkpoints(folder)
    before, skipped, after = (saved[f"step={k}.ckpt"] for k in (2, 3, 4))
    for name, tensor in before["state_dict"].items():
        assert torch.equal(skipped["state_dict"][name], tensor), name
    assert any(not torch.equal(after["state_dict"][n], t) for n, t in skipped["state_dict"].items())


def kill_and_resume(precision):
    work = root / f"kill-{precision}"
    write_wikitext(work / "data", {"wiki.train.tokens": 20, "wiki.valid.tokens": 2, "wiki.test.tokens": 2})
    extra = (*GPU, "--trainer.precision", precision)
    reference = fit(work, "straight", 8, *extra)
    kill = ("--trainer.callbacks+=tests.distributed_support.KillAt", f"--trainer.callbacks.step={STEPS}",
            "--trainer.callbacks.during_save=true")
    fit_until_killed(work, "killed", 8, *extra, *kill)
    resumed = fit(work, "killed", 8, *extra, "--ckpt_path", "last")
    assert resumed["global_step"] == STEPS and len(resumed["losses"]) == STEPS - CHECKPOINT_EVERY
    assert_same_training(resumed, reference, start=CHECKPOINT_EVERY)
    print("losses", reference["losses"][CHECKPOINT_EVERY:], resumed["losses"], flush=True)


check("nonfinite stop 32-true", lambda: nonfinite_stop("32-true"))
check("nonfinite stop bf16-mixed", lambda: nonfinite_stop("bf16-mixed"))
check("nonfinite skip bf16-mixed", lambda: nonfinite_skip("bf16-mixed"))
check("kill -9 during save, resume, 32-true", lambda: kill_and_resume("32-true"))
check("kill -9 during save, resume, bf16-mixed", lambda: kill_and_resume("bf16-mixed"))
print("SUMMARY", results, flush=True)
sys.exit(0 if all(v.startswith("ok") for v in results.values()) else 1)
