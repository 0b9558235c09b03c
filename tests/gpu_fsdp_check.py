"""GPU checks of Lightning's FSDPStrategy (configs/strategy/fsdp.yaml): a script, not collected by pytest.

On one GPU, through the normal CLI (``python cli.py fit`` subprocesses, the runs of tests/test_distributed.py):
FSDP with bf16 mixed precision, one FSDP unit and one activation-checkpointing unit per block, trains; its sharded
step-4 checkpoint resumes and continues as the uninterrupted run did; ``consolidate`` turns its sharded ``last.ckpt``
into one file that loads into a plain model. A single-GPU bf16-mixed run without FSDP is shown beside it.

    python tests/gpu_fsdp_check.py
"""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qkv_lightning.checkpoints import is_sharded_checkpoint  # noqa: E402
from qkv_lightning.cli import main  # noqa: E402
from qkv_lightning.tasks.language_model import LanguageModel  # noqa: E402
from tests.distributed_support import probe_batch  # noqa: E402
from tests.lm_fixtures import write_wikitext  # noqa: E402
from tests.test_distributed import CHECKPOINT_EVERY, CONFIGS, STEPS, fit  # noqa: E402

work = Path(tempfile.mkdtemp(prefix="gpu-fsdp-"))
write_wikitext(work / "data", {"wiki.train.tokens": 20, "wiki.valid.tokens": 2, "wiki.test.tokens": 2})
FSDP = ("--config", str(CONFIGS / "strategy" / "fsdp.yaml"), "--trainer.devices", "1")
GPU = torch.cuda.is_available()
if not GPU:  # a dry run of this script's plumbing on the CPU: FSDP2 in 2 processes stands in (its checks then fail)
    FSDP = ("--config", str(CONFIGS / "strategy" / "fsdp2.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--data.batch_size", "4")
DEVICE = "cuda" if GPU else "cpu"
failures = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{name:58s} {'ok' if ok else 'FAIL'}  {detail}", flush=True)
    if not ok:
        failures.append(name)


single = fit(work, "gpu-single", 8, "--trainer.accelerator", "gpu" if GPU else "cpu", "--trainer.devices", "1",
             "--trainer.precision", "bf16-mixed")
fsdp = fit(work, "gpu-fsdp", 8, *FSDP)
print("single bf16-mixed losses", [round(x, 4) for x in single["losses"]], flush=True)
print("FSDP   bf16-mixed losses", [round(x, 4) for x in fsdp["losses"]], flush=True)
report("FSDPStrategy ran with bf16-mixed", fsdp["strategy"] == "FSDPStrategy" and fsdp["precision"] == "bf16-mixed",
       f"strategy {fsdp['strategy']}, precision {fsdp['precision']}, {fsdp['global_step']} steps")
report("one FSDP unit and one checkpoint wrapper per block (2 blocks)",
       fsdp["checkpoint_wrappers"] == 2 and fsdp["fsdp_units"] >= 2,
       f"FSDP units {fsdp['fsdp_units']}, checkpoint wrappers {fsdp['checkpoint_wrappers']}")
report("it trains", fsdp["losses"][-1] < fsdp["losses"][0], f"loss {fsdp['losses'][0]:.4f} -> {fsdp['losses'][-1]:.4f}")
gap = max(abs(a - b) for a, b in zip(fsdp["losses"], single["losses"], strict=False))
report("FSDP losses close to the single-GPU run's", gap < 0.05, f"max |difference| {gap:.2e} (bf16 numerics differ)")

checkpoint = work / "gpu-fsdp" / "checkpoints" / f"epoch=0-step={CHECKPOINT_EVERY}.ckpt"
report("checkpoints are sharded folders", is_sharded_checkpoint(checkpoint), str(checkpoint.name))
resumed = fit(work, "gpu-fsdp-resumed", 8, *FSDP, "--ckpt_path", str(checkpoint))
gap = max(abs(a - b) for a, b in zip(resumed["losses"], fsdp["losses"][CHECKPOINT_EVERY:], strict=False))
weights = max((resumed["state"][k].float() - fsdp["state"][k].float()).abs().max().item() for k in fsdp["state"])
report("resumed from the step-4 shards = uninterrupted steps 5-8",
       resumed["global_step"] == STEPS and gap < 1e-3 and weights < 1e-3,
       f"max loss difference {gap:.2e}, max weight difference {weights:.2e}")

consolidated = work / "consolidated.ckpt"
code = main(["consolidate", str(work / "gpu-fsdp" / "checkpoints" / "last.ckpt"), str(consolidated)])
model = LanguageModel.load_from_checkpoint(consolidated, map_location=DEVICE).eval()
with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
    logits = model.network(probe_batch(model.data_spec["vocab_size"]).to(DEVICE)).float().cpu()
gap = (logits - fsdp["probe"].float()).abs().max().item()
weights = max((model.state_dict()[k].float().cpu() - v.float()).abs().max().item() for k, v in fsdp["state"].items())
report("consolidated file = FSDP weights, loads into a plain model", code == 0 and weights == 0.0 and gap < 5e-2,
       f"max weight difference {weights:.1e}, probe logits max difference {gap:.2e} (bf16 autocast vs FSDP bf16)")
print(f"FSDP checks: {len(failures)} failed: {failures}", flush=True)
sys.exit(1 if failures else 0)
