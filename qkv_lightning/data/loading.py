"""Training data loaders that resume mid-epoch at the same position, on one device or many, and the check of the
loader settings every datamodule has (:func:`check_loader_settings`).

:class:`ResumableSampler` fixes each epoch's order from ``(seed, epoch)`` and shards it over ranks, so every run
with the same seed sees the same batches. :class:`ResumableDataLoader` counts the samples it has handed out; Lightning
saves that count in checkpoints (``state_dict``) and, on resume, the sampler skips exactly those samples, so a run
restarted from a mid-epoch checkpoint continues with the batch an uninterrupted run would have seen next.

tests/test_distributed.py checks against uninterrupted runs, also after ``kill -9``, that the count saved is the
count trained on (Lightning's training loop does not hold a fetched-ahead batch when it saves).

Lightning applies the saved count only to a loader it builds after reading the checkpoint, and only when its epoch
counters say the checkpoint's epoch is unfinished, and those counters go wrong when a run is resumed at an epoch's
end: :class:`ResumingFitLoop` (installed on every trainer the CLI builds, :func:`use_resuming_fit_loop`) corrects
both, so a run resumed any number of times, from any checkpoint, trains exactly the batches of an uninterrupted run
(tests/test_loading.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.loop import _Loop
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from qkv_lightning.errors import ConfigError, DataError


def check_loader_settings(batch_size: int, eval_batch_size: int | None, num_workers: int) -> None:
    """The check of the data-loader settings every datamodule has.

    Args:
        batch_size: ``data.batch_size``, at least 1.
        eval_batch_size: ``data.eval_batch_size``, at least 1, or None for ``data.batch_size``.
        num_workers: ``data.num_workers``, at least 0.

    Raises:
        ConfigError: naming the setting.
    """
    if batch_size < 1:
        raise ConfigError(f"data.batch_size={batch_size} must be at least 1.")
    if eval_batch_size is not None and eval_batch_size < 1:
        raise ConfigError(f"data.eval_batch_size={eval_batch_size} must be at least 1 (or null for data.batch_size).")
    if num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers} must be >= 0.")


class ResumableSampler(DistributedSampler):
    """Seeded, rank-sharded order of a map-style data set, able to skip samples already consumed this epoch.

    Kept because torch's ``DataLoader`` saves no position (torchdata's ``StatefulDataLoader`` is one more dependency).

    It subclasses ``DistributedSampler`` so that Lightning keeps it instead of injecting its own sampler. Without
    torch.distributed it behaves as a single replica.

    Args:
        dataset: the data set (only its length is used).
        shuffle: a new seeded permutation each epoch, or the natural order.
        seed: base seed of the permutations.
        drop_last: drop the tail that does not divide evenly over ranks (else pad by repeating).
        num_replicas: ranks; taken from torch.distributed when None.
        rank: this rank; taken from torch.distributed when None.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0

    def order(self) -> list[int]:
        """This rank's indices for the current epoch, before skipping."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        total = self.num_samples * self.num_replicas
        if self.drop_last:
            indices = indices[:total]
        else:
            indices += (indices * math.ceil(total / max(1, n)))[: total - n]
        return indices[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self.order()[self.skip :]
        self.skip = 0  # skipping applies to the first epoch after a restore only
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position is saved in and restored from checkpoints.

    Lightning's loops call :meth:`state_dict` when saving a checkpoint and :meth:`load_state_dict` when resuming.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.samples_yielded = 0
        self._restored_epoch: int | None = None

    @property
    def resumable_sampler(self) -> ResumableSampler | None:
        sampler = self.sampler
        return sampler if isinstance(sampler, ResumableSampler) else None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.resumable_sampler
        if sampler is not None and self._restored_epoch is not None:
            if sampler.epoch == self._restored_epoch:
                sampler.skip = self.samples_yielded
            else:
                self.samples_yielded = 0
            self._restored_epoch = None
        else:
            self.samples_yielded = 0
        for batch in super().__iter__():
            self.samples_yielded += _batch_size(batch)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Epoch and samples handed out so far in it."""
        sampler = self.resumable_sampler
        return {"epoch": sampler.epoch if sampler is not None else 0, "samples_yielded": self.samples_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.samples_yielded = int(state.get("samples_yielded", 0))
        self._restored_epoch = int(state.get("epoch", 0))


def _batch_size(batch: Any) -> int:
    """Samples in a collated batch (the leading size of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, list | tuple):
        return _batch_size(batch[0])
    raise TypeError(f"cannot tell the batch size of {type(batch).__name__}")


def train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = True,
    **kwargs: Any,
) -> ResumableDataLoader:
    """A resumable training loader: seeded order, sharded over ranks, mid-epoch position saved in checkpoints."""
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    n_batches = len(sampler) // batch_size if drop_last else -(-len(sampler) // batch_size)
    if n_batches == 0:
        raise DataError(
            f"the training split holds {len(sampler.dataset)} samples ({len(sampler)} per process over "
            f"{sampler.num_replicas} process(es)), fewer than one batch of data.batch_size={batch_size}: training "
            "would do nothing. Lower data.batch_size, or use a larger training split."
        )
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        **kwargs,
    )


class ResumingFitLoop(_FitLoop):
    """Lightning's fit loop, resuming at an epoch's end as it resumes mid-epoch: the next epoch starts afresh.

    Lightning (2.6) gets two cases wrong, and the second breaks every later resume of the run:

    - a checkpoint saved after an epoch's last batch by an epoch-end save (``on_train_epoch_end`` or the validation
      at the epoch's end) of a ``max_steps`` run: Lightning restarts "mid-epoch" with the finished epoch's counters,
      so it trains one batch of the next epoch and then starts the one after it (batches skipped);
    - a checkpoint saved at the last batch's ``on_train_batch_end`` (``every_n_train_steps``): Lightning counts the
      epoch as finished but leaves its restart stage set, so the next epoch runs without being counted as started
      (nor its ``on_train_epoch_start`` hooks called). Every checkpoint of that epoch then says "epoch not started",
      and a resume from one of them replays the epoch from its first batch, the saved loader position ignored
      (17 optimiser steps instead of 15 in tests/test_loading.py).

    And a third that loses the position of every mid-epoch resume of a ``max_epochs`` run: Lightning hands the
    loader its saved position only when it builds the loader, after the checkpoint is read; the task's
    ``configure_optimizers`` asks ``trainer.estimated_stepping_batches`` (the schedule's length), which builds the
    loader before, so the resumed run started its epoch from the first batch.

    Here a checkpoint whose epoch counters say the epoch is finished (ready = started = processed) is resumed as a
    fresh run of the next epoch, whatever the run's step limit (Lightning does so for ``max_epochs`` runs only); a
    restart whose bookkeeping finished the epoch starts the next one as a new epoch; and the saved position is
    handed to a loader built before the checkpoint was read (the loader reads it when its epoch's iteration starts).
    """

    def setup_data(self) -> None:
        super().setup_data()
        self._load_combined_loader_states()  # once, when restarting; a no-op when Lightning has done it

    @_FitLoop.restarting.setter
    def restarting(self, restarting: bool) -> None:
        progress = self.epoch_progress.current
        finished = progress.ready == progress.started == progress.processed
        _Loop.restarting.fset(self, restarting and not finished)

    def reset(self) -> None:
        super().reset()
        progress = self.epoch_progress.current
        if self.restarted_mid_epoch and progress.ready == progress.processed:  # the epoch's last batch was saved
            self.reset_restart_stage()  # so on_advance_start counts the next epoch as started and calls its hooks


def use_resuming_fit_loop(trainer: Trainer) -> None:
    """Give ``trainer`` a :class:`ResumingFitLoop` (before it runs), keeping its limits and its epoch loop."""
    old = trainer.fit_loop
    if isinstance(old, ResumingFitLoop):
        return
    loop = ResumingFitLoop(trainer, min_epochs=old.min_epochs, max_epochs=old.max_epochs)
    loop.epoch_loop = old.epoch_loop
    trainer.fit_loop = loop
