"""The resumable training loader (qkv_lightning/data/loading.py) inside a real Lightning fit: a run resumed from any
step's checkpoint, mid-epoch, at the end of an epoch or in a later epoch, sees exactly the batches the uninterrupted
run saw from that step on, with every epoch whole after the one it resumed in; and so does a run resumed again from
a checkpoint of a resumed run (issue 26), with every checkpoint storing the loader position the uninterrupted run
stored at that step. The runs use the fit loop that the CLI gives every trainer (ResumingFitLoop)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from qkv_lightning.data.loading import train_loader, use_resuming_fit_loop

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

    def val_dataloader(self):
        return DataLoader(Indexed(), batch_size=BATCH)


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

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[1]).square().mean())

    def configure_optimizers(self):
        """SGD, with a schedule over the run's steps that a ``max_epochs`` run asks Lightning to estimate, as the
        tasks do (TaskModule.total_steps): that builds the training loader before the checkpoint is read."""
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        assert steps == STEPS
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (2 * steps))]


SAVES = {
    "every-step": dict(every_n_train_steps=1),  # on_train_batch_end, the epoch's last batch included
    "train-epoch-end": dict(every_n_epochs=1, save_on_train_epoch_end=True),
    "validation-epoch-end": dict(every_n_epochs=1),  # after the validation that ends each epoch
    "validation-mid-epoch": dict(every_n_epochs=1),  # after a validation every 3 steps, across epoch ends
}
"""When a run saves its checkpoints (ModelCheckpoint settings), each a way Lightning restarts differently."""
LIMITS = {"max_epochs": dict(max_epochs=EPOCHS), "max_steps": dict(max_steps=STEPS, max_epochs=-1)}


def fit(folder: Path, ckpt_path: Path | None = None, save: str = "every-step",
        limit: str = "max_epochs") -> list[tuple[int, int, tuple[int, ...]]]:
    """Train, or resume from ``ckpt_path``, saving ``step=K.ckpt`` into ``folder`` as ``save`` says: the batches."""
    checkpoints = ModelCheckpoint(dirpath=folder, save_top_k=-1, filename="{step}", **SAVES[save])
    validation = {"limit_val_batches": 0}
    if save.startswith("validation"):
        validation = {"limit_val_batches": 1, "num_sanity_val_steps": 0}
    if save == "validation-mid-epoch":
        validation.update(val_check_interval=3, check_val_every_n_epoch=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoints], **LIMITS[limit], **validation)
    use_resuming_fit_loop(trainer)  # as the CLI does for every trainer (lightning_cli.py)
    model = Recorder()
    trainer.fit(model, Data(), ckpt_path=ckpt_path)
    return model.seen


def saved(folder: Path) -> dict[int, dict]:
    """Each checkpoint in ``folder`` by its global step: the loader position it stores."""
    found = {}
    for path in folder.glob("step=*.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        found[checkpoint["global_step"]] = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return found


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


def check_resumed(reference_folder: Path, reference: list, folder: Path, seen: list, after: int) -> None:
    """A run resumed from a step-``after`` checkpoint (its checkpoints in ``folder``, its batches ``seen``) trained
    exactly the reference's batches from that step on (so the same number of optimiser steps), and each of its
    checkpoints stores the loader position the reference stored at that step."""
    assert [step for step, _, _ in seen] == list(range(after, STEPS)), f"optimiser steps after resuming at {after}"
    assert seen == reference[after:]
    positions = {step: p for step, p in saved(reference_folder).items() if step > after}
    assert saved(folder) == positions, f"loader positions saved after resuming at {after}"


def resumed_twice(reference_folder: Path, reference: list, tmp_path: Path, first: int, second: int, save: str,
                  limit: str) -> None:
    """Resume the reference run from its step-``first`` checkpoint, then that run from its step-``second`` one; both
    resumed runs as :func:`check_resumed` says."""
    once = fit(tmp_path / "once", reference_folder / f"step={first}.ckpt", save, limit)
    check_resumed(reference_folder, reference, tmp_path / "once", once, first)
    twice = fit(tmp_path / "twice", tmp_path / "once" / f"step={second}.ckpt", save, limit)
    check_resumed(reference_folder, reference, tmp_path / "twice", twice, second)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize(("first", "second"), [(5, 7), (5, 10), (5, 12), (10, 12), (2, 7), (7, 11)],
                         ids=["epoch-0-end-then-mid-1", "epoch-0-end-then-epoch-1-end", "epoch-0-end-then-mid-2",
                              "epoch-1-end-then-mid-2", "mid-0-then-mid-1", "mid-1-then-mid-2"])
def test_a_run_resumed_twice_across_epoch_ends_trains_the_uninterrupted_batches(uninterrupted, tmp_path, first,
                                                                                second):
    """Issue 26: resumed at step 5 (the end of epoch 0), then from that run's step-7 checkpoint, Lightning replayed
    epoch 1's first two batches (17 steps instead of 15): the step-7 checkpoint marked epoch 1 as not started."""
    folder, reference = uninterrupted
    resumed_twice(folder, reference, tmp_path, first, second, "every-step", "max_epochs")


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("limit", sorted(LIMITS))
@pytest.mark.parametrize("save", sorted(SAVES))
def test_resumed_twice_from_epoch_end_checkpoints_whatever_saves_them_and_whatever_ends_the_run(
    tmp_path, save, limit
):
    """For each way of saving and each run limit, the run resumed from the end of epoch 0 and then from its first
    checkpoint in epoch 1 or later (a ``max_steps`` run resumed from an epoch-end save trained one batch of the next
    epoch and skipped the rest)."""
    reference = fit(tmp_path / "reference", save=save, limit=limit)
    steps = sorted(saved(tmp_path / "reference"))
    first = BATCHES_PER_EPOCH if BATCHES_PER_EPOCH in steps else min(s for s in steps if s > BATCHES_PER_EPOCH)
    second = min(s for s in steps if s > first)
    resumed_twice(tmp_path / "reference", reference, tmp_path, first, second, save, limit)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("limit", sorted(LIMITS))
@pytest.mark.parametrize("save", sorted(SAVES))
def test_every_checkpoint_of_every_resumed_run_resumes_exactly(tmp_path, save, limit):
    """Each checkpoint of the reference run, then from that resumed run: every later checkpoint where there are few
    (epoch-end and validation saves), and where every step is saved the next step, each later epoch's last step and
    the step after it (37 twice-resumed runs)."""
    folder = tmp_path / "reference"
    reference = fit(folder, save=save, limit=limit)
    steps = [s for s in sorted(saved(folder)) if s < STEPS]
    ends = {e * BATCHES_PER_EPOCH + k for e in range(1, EPOCHS) for k in (0, 1)}
    for first in steps:
        once = fit(tmp_path / f"{first}", folder / f"step={first}.ckpt", save, limit)
        check_resumed(folder, reference, tmp_path / f"{first}", once, first)
        seconds = [s for s in steps if s > first and (save != "every-step" or s == first + 1 or s in ends)]
        for second in seconds:
            twice = fit(tmp_path / f"{first}-{second}", tmp_path / f"{first}" / f"step={second}.ckpt", save, limit)
            check_resumed(folder, reference, tmp_path / f"{first}-{second}", twice, second)

