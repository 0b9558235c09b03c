"""Synthetic sequence tasks: targets against their definitions, disjoint seeded splits, the encoder and the task."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from qkv_lightning.data.synthetic import TASKS, SyntheticSequenceData, make_targets, rows_in
from qkv_lightning.errors import ConfigError
from qkv_lightning.lightning_cli import QKVLightningCLI
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.encoder import EncoderConfig, SequenceEncoder
from qkv_lightning.tasks.sequence_tasks import SequenceTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "synthetic"


def definition(task: str, digits: list[int]) -> list[int]:
    """Each task written per list, from its definition in the paper."""
    n = len(digits)
    if task == "reverse":
        return digits[::-1]
    if task == "sort":
        return sorted(digits)
    if task == "sub":
        return [9 - d for d in digits]
    if task == "swap":  # second half, then (for odd n) the middle digit, then the first half
        half = n // 2
        return digits[n - half :] + digits[half : n - half] + digits[:half]
    if task == "copy":
        return list(digits)
    raise AssertionError(task)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1, 6, 7])
def test_targets_follow_the_definitions(task: str, length: int) -> None:
    inputs = torch.randint(0, 10, (50, length), generator=torch.Generator().manual_seed(length))
    targets = make_targets(task, inputs)
    assert targets.shape == inputs.shape
    for row, target in zip(inputs.tolist(), targets.tolist(), strict=True):
        assert target == definition(task, row)


def test_swap_and_reverse_on_a_hand_made_list() -> None:
    digits = torch.tensor([[1, 2, 3, 4, 5]])
    assert make_targets("swap", digits).tolist() == [[4, 5, 3, 1, 2]]
    assert make_targets("reverse", digits).tolist() == [[5, 4, 3, 2, 1]]
    assert make_targets("sub", digits).tolist() == [[8, 7, 6, 5, 4]]


def test_rows_in_is_exact() -> None:
    reference = torch.tensor([[1, 2, 3], [3, 2, 1]])
    candidates = torch.tensor([[1, 2, 3], [1, 2, 4], [3, 2, 1], [2, 1, 3]])
    assert rows_in(candidates, reference).tolist() == [True, False, True, False]
    assert rows_in(candidates, reference[:0]).tolist() == [False] * 4


def _split_sets(dm: SyntheticSequenceData) -> dict[str, set[tuple[int, ...]]]:
    dm.setup()
    return {split: {tuple(row) for row in ds.tensors[0].tolist()} for split, ds in dm.splits.items()}


def test_held_out_sets_are_distinct_disjoint_and_fixed_by_the_seed() -> None:
    # 10^3 possible lists: a training set of 3000 would hit the 400 held-out ones often if they were not excluded
    dm = SyntheticSequenceData(task="sort", seq_len=3, train_size=3000, val_size=200, test_size=200, seed=5)
    sets = _split_sets(dm)
    assert len(dm.splits["val"]) == 200 and len(sets["val"]) == 200  # distinct
    assert len(dm.splits["test"]) == 200 and len(sets["test"]) == 200
    assert len(dm.splits["train"]) == 3000
    assert not sets["val"] & sets["test"]
    assert not sets["train"] & (sets["val"] | sets["test"])
    for split, ds in dm.splits.items():  # targets belong to their inputs
        assert torch.equal(ds.tensors[1], make_targets("sort", ds.tensors[0])), split

    def sets_of(train_size: int, seed: int) -> dict[str, set[tuple[int, ...]]]:
        return _split_sets(SyntheticSequenceData("sort", 3, train_size, val_size=200, test_size=200, seed=seed))

    assert sets_of(3000, 5) == sets
    smaller_train = sets_of(500, 5)
    assert smaller_train["val"] == sets["val"] and smaller_train["test"] == sets["test"]
    other = sets_of(3000, 6)
    assert other["val"] != sets["val"]


def test_bad_settings_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="data.task"):
        SyntheticSequenceData(task="rotate")
    with pytest.raises(ConfigError, match="data.seq_len=2"):
        SyntheticSequenceData(seq_len=2, val_size=40, test_size=20)
    with pytest.raises(ConfigError, match="data.batch_size"):
        SyntheticSequenceData(batch_size=0)


def test_encoder_is_bidirectional_and_positions_matter() -> None:
    torch.manual_seed(0)
    config = EncoderConfig(n_layer=2, n_head=2, d_model=16, vocab_size=10, num_classes=10, init_std=0.5)
    model = SequenceEncoder(config, AttentionConfig()).eval()
    x = torch.randint(0, 10, (2, 6))
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 10
    # the first position sees the last token (a causal encoder would not)
    assert not torch.allclose(model(x)[0][:, 0], model(changed)[0][:, 0])

    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    without = SequenceEncoder(EncoderConfig(**{**config.__dict__, "position": "none"}), AttentionConfig()).eval()
    torch.testing.assert_close(without(x[:, perm])[0], without(x)[0][:, perm])  # permutation-equivariant
    with_rope = SequenceEncoder(EncoderConfig(**{**config.__dict__, "position": "rope"}), AttentionConfig()).eval()
    assert not torch.allclose(with_rope(x[:, perm])[0], with_rope(x)[0][:, perm], atol=1e-4)
    assert not torch.allclose(model(x[:, perm])[0], model(x)[0][:, perm], atol=1e-4)


def test_task_learns_sub_and_reports_exact_accuracies(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = SyntheticSequenceData(task="sub", seq_len=5, train_size=2000, val_size=200, test_size=200, batch_size=50)
    model = SequenceTask(
        attention=AttentionConfig(sharing="Q-K=V"),
        network=EncoderConfig(n_layer=1, n_head=2, d_model=32),
        optimizer={"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0},
    )
    trainer = L.Trainer(
        max_steps=80,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    inputs, targets = dm.splits["val"].tensors
    with torch.no_grad():
        predictions = model(inputs).argmax(dim=-1)
    correct = predictions == targets
    assert metrics["val/acc"] == pytest.approx(correct.float().mean().item(), abs=1e-6)
    assert metrics["val/seq_acc"] == pytest.approx(correct.all(dim=-1).float().mean().item(), abs=1e-6)
    assert metrics["val/acc"] > 0.9  # far above chance (0.1): the per-position map is learnt


@pytest.mark.parametrize("task", TASKS)
def test_task_configs_build_their_task(task: str, tmp_path: Path) -> None:
    cli = QKVLightningCLI(
        args=[
            "--config",
            str(CONFIGS / f"{task}.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
        ],
        run=False,
    )
    assert isinstance(cli.model, SequenceTask)
    assert cli.datamodule.task == task
    assert cli.trainer.max_steps > 0
