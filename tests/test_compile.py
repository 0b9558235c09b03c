"""``compile: true`` compiles each block in place: checkpoint keys do not change, compiled outputs and gradients equal
eager ones for every variant, and a checkpoint saved compiled loads into an uncompiled model (and back)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from qkv_lightning.data.synthetic import SyntheticSequenceData
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.blocks import Block
from qkv_lightning.nn.encoder import EncoderConfig
from qkv_lightning.nn.gpt import GPTConfig
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS
from qkv_lightning.nn.vit import ViTConfig
from qkv_lightning.tasks.image_classifier import ImageClassifier
from qkv_lightning.tasks.language_model import LanguageModel
from qkv_lightning.tasks.optim import OptimizerConfig
from qkv_lightning.tasks.sequence_tasks import SequenceTask
from tests.distributed_support import needs_cpu_fsdp2

CASES = [(v, None) for v in CANONICAL_VARIANTS] + [("Q-K=V", 1)]
SPEC = {"vocab_size": 10, "num_classes": 10, "seq_len": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def sequence_task(variant: str = "QKV", n_kv: int | None = None, compile: bool = False) -> SequenceTask:
    network = EncoderConfig(n_layer=2, n_head=2, d_model=16, d_mlp=32, max_seq_len=8)
    optimizer = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant")
    attention = AttentionConfig(sharing=variant, n_kv_heads=n_kv)
    return SequenceTask(attention=attention, network=network, optimizer=optimizer, data_spec=SPEC, compile=compile)


def tasks(variant: str, n_kv: int | None, compile: bool) -> list[L.LightningModule]:
    attention = AttentionConfig(sharing=variant, n_kv_heads=n_kv)
    return [
        sequence_task(variant, n_kv, compile),
        LanguageModel(network=GPTConfig(n_layer=2, n_head=2, d_model=16, max_seq_len=8), attention=attention,
                      data_spec={"vocab_size": 20, "seq_len": 8}, compile=compile),
        ImageClassifier(network=ViTConfig(patch_size=4, n_layer=2, n_head=2, d_model=16), attention=attention,
                        data_spec={"num_classes": 3, "image_size": 8, "in_channels": 3}, compile=compile),
    ]


@pytest.mark.parametrize(("variant", "n_kv"), CASES)
def test_compiling_blocks_keeps_every_checkpoint_key(variant, n_kv):
    for eager, compiled in zip(tasks(variant, n_kv, False), tasks(variant, n_kv, True), strict=True):
        eager.configure_model()
        compiled.configure_model()
        blocks = [m for m in compiled.modules() if isinstance(m, Block)]
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)  # compiled in place
        assert all(m._compiled_call_impl is None for m in eager.modules() if isinstance(m, Block))
        assert list(compiled.state_dict()) == list(eager.state_dict())
        assert not any("_orig_mod" in key for key in compiled.state_dict())


@pytest.mark.slow
def test_compiled_blocks_match_eager_for_every_variant():
    """Outputs and gradients of the compiled model equal those of the eager model with the same weights."""
    tokens = torch.randint(0, 10, (3, 8), generator=torch.Generator().manual_seed(0))
    for variant, n_kv in CASES:
        eager, compiled = sequence_task(variant, n_kv), sequence_task(variant, n_kv, compile=True)
        eager.configure_model()
        compiled.configure_model()
        compiled.load_state_dict(eager.state_dict())
        out_eager, out_compiled = eager(tokens), compiled(tokens)
        assert torch.allclose(out_compiled, out_eager, atol=1e-5), variant
        out_eager.square().sum().backward()
        out_compiled.square().sum().backward()
        grads = dict(compiled.named_parameters())
        for name, param in eager.named_parameters():
            assert torch.allclose(grads[name].grad, param.grad, atol=1e-5), (variant, name)


@pytest.mark.slow
def test_checkpoint_saved_compiled_loads_uncompiled(tmp_path):
    data = SyntheticSequenceData(task="reverse", seq_len=8, train_size=64, val_size=16, test_size=16, batch_size=8)
    task = sequence_task("Q-K=V", compile=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[], default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=data)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert saved["hyper_parameters"]["compile"] is True
    plain = sequence_task("Q-K=V")
    plain.configure_model()
    assert list(saved["state_dict"]) == list(plain.state_dict())
    plain.load_state_dict(saved["state_dict"])  # strict: the same keys
    loaded = SequenceTask.load_from_checkpoint(path, compile=False)
    assert not any(m._compiled_call_impl is not None for m in loaded.modules() if isinstance(m, Block))
    tokens = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(1))
    task.eval()
    loaded.eval()
    with torch.no_grad():
        reference = task(tokens)
        assert torch.allclose(loaded(tokens), reference, atol=1e-5)
        assert torch.allclose(plain(tokens), reference, atol=1e-5)


@pytest.mark.slow
@needs_cpu_fsdp2
def test_compile_with_fsdp2_saves_plain_keys_that_load_uncompiled(tmp_path):
    """FSDP2 shards the compiled blocks (one CPU process, gloo); the gathered checkpoint has the eager keys and loads
    into an uncompiled, unsharded model that computes the same outputs."""
    from qkv_lightning.parallel import FSDP2Strategy

    data = SyntheticSequenceData(task="reverse", seq_len=8, train_size=64, val_size=16, test_size=16, batch_size=8)
    task = sequence_task("Q=K=V", compile=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=FSDP2Strategy(save_distributed_checkpoint=False),
                        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    try:
        trainer.fit(task, datamodule=data)
        path = tmp_path / "fsdp.ckpt"
        trainer.save_checkpoint(path)
    finally:  # leave no process group behind for the tests that follow in this process
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    state = torch.load(path, weights_only=True)["state_dict"]
    plain = sequence_task("Q=K=V")
    plain.configure_model()
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state)
    tokens = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(2))
    task.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(tokens), task(tokens), atol=1e-5)
