"""The resumable training loader (qkv_lightning/data/loading.py) inside a real Lightning fit: a run resumed from any
step's checkpoint, mid-epoch, at the end of an epoch or in a later epoch, sees exactly the batches the uninterrupted
run saw from that step on, with every epoch whole after the one it resumed in."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from qkv_lightning.data.loading import train_loader

SAMPLES, BATCH, EPOCHS = 20, 4, 3
BATCHES_PER_EPOCH = SAMPLES // BATCH  # 5
STEPS = EPOCHS * BATCHES_PER_EPOCH  # 15


class Indexed(Dataset):
    """Sample i is (i, a feature vector of i)."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(index), torch.full((3,), float(index) / SAMPLES)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        return train_loader(Indexed(), batch_size=BATCH, seed=7, shuffle=True)


class Recorder(L.LightningModule):
    """A linear model that records, per optimiser step, the epoch and the sample indices of its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[int, int, tuple[int, ...]]] = []  # (global step, epoch, indices)

    def training_step(self, batch, batch_idx):
        indices, features = batch
        self.seen.append((self.global_step, self.current_epoch, tuple(indices.tolist())))
        return self.layer(features).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(folder: Path, ckpt_path: Path | None = None) -> list[tuple[int, int, tuple[int, ...]]]:
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints], limit_val_batches=0)
    model = Recorder()
    trainer.fit(model, Data(), ckpt_path=ckpt_path)
    return model.seen


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    return folder, fit(folder)


def test_uninterrupted_run_sees_every_sample_once_per_epoch_in_a_new_order(uninterrupted):
    _, seen = uninterrupted
    assert [step for step, _, _ in seen] == list(range(STEPS))
    orders = []
    for epoch in range(EPOCHS):
        batches = [indices for _, e, indices in seen if e == epoch]
        assert len(batches) == BATCHES_PER_EPOCH
        order = [i for batch in batches for i in batch]
        assert sorted(order) == list(range(SAMPLES))
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]  # reshuffled each epoch


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("resume_step", [2, 5, 7], ids=["mid-epoch-0", "end-of-epoch-0", "mid-epoch-1"])
def test_resume_then_cross_an_epoch_boundary_sees_the_uninterrupted_batches(uninterrupted, tmp_path, resume_step):
    """Resumed from the checkpoint after ``resume_step`` steps, the run finishes the epoch it stopped in, then runs
    every later epoch whole (5 batches), each batch the same samples as in the uninterrupted run."""
    folder, reference = uninterrupted
    resumed = fit(tmp_path, folder / f"step={resume_step}.ckpt")
    per_epoch = {epoch: sum(e == epoch for _, e, _ in resumed) for epoch in range(EPOCHS)}
    expected_per_epoch = {epoch: sum(e == epoch for _, e, _ in reference[resume_step:]) for epoch in range(EPOCHS)}
    assert per_epoch == expected_per_epoch, "batches per epoch after resuming"
    assert resumed == reference[resume_step:]
    assert resumed[-1][0] == STEPS - 1
