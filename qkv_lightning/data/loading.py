"""Training data loaders that resume mid-epoch at the same position, on one device or many, and the check of the
loader settings every datamodule has (:func:`check_loader_settings`).

:class:`ResumableSampler` fixes each epoch's order from ``(seed, epoch)`` and shards it over ranks, so every run
with the same seed sees the same batches. :class:`ResumableDataLoader` counts the samples it has handed out; Lightning
saves that count in checkpoints (``state_dict``) and, on resume, the sampler skips exactly those samples, so a run
restarted from a mid-epoch checkpoint continues with the batch an uninterrupted run would have seen next.

tests/test_distributed.py checks against uninterrupted runs, also after ``kill -9``, that the count saved is the
count trained on (Lightning's training loop does not hold a fetched-ahead batch when it saves).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
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
