"""The paper's synthetic sequence tasks, generated on the fly from a seed: lists of digits 0-9 and, for every
position, the digit the output list holds there.

* ``reverse``: the list reversed;
* ``sort``: the list sorted in ascending order;
* ``sub``: each digit x becomes 9 - x;
* ``swap``: the two halves exchanged (for an odd length the middle digit stays in place);
* ``copy``: the list unchanged.

The validation and test sets are drawn first from the data seed, as distinct sequences; the training set is drawn
from a second stream of the same seed and every sequence that occurs in a held-out set is replaced, so training
never sees a validation or test list. Changing ``train_size`` therefore leaves the held-out sets unchanged.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from qkv_lightning.data.loading import check_loader_settings, train_loader
from qkv_lightning.errors import ConfigError

NUM_DIGITS = 10
"""Tokens and output classes: the digits 0-9."""

TASKS = ("reverse", "sort", "sub", "swap", "copy")
"""The synthetic tasks, named as in the paper (lower case)."""

Task = Literal["reverse", "sort", "sub", "swap", "copy"]


def make_targets(task: str, inputs: Tensor) -> Tensor:
    """Output digits (N, L) of ``task`` for input lists ``inputs`` (N, L) of digits 0-9."""
    length = inputs.shape[-1]
    if task == "reverse":
        return inputs.flip(-1)
    if task == "sort":
        return inputs.sort(dim=-1).values
    if task == "sub":
        return (NUM_DIGITS - 1) - inputs
    if task == "swap":
        half = length // 2  # for odd lengths the middle digit stays in place
        return torch.cat([inputs[:, length - half :], inputs[:, half : length - half], inputs[:, :half]], dim=1)
    if task == "copy":
        return inputs.clone()
    raise ConfigError(f"data.task={task!r} is not a synthetic task; allowed: {', '.join(TASKS)}.")


def rows_in(candidates: Tensor, reference: Tensor) -> Tensor:
    """Boolean (N,): whether each row of ``candidates`` (N, L) equals some row of ``reference`` (M, L). Exact."""
    if reference.numel() == 0 or candidates.numel() == 0:
        return torch.zeros(candidates.shape[0], dtype=torch.bool)
    _, ids = torch.unique(torch.cat([reference, candidates]), dim=0, return_inverse=True)  # one id per distinct row
    return torch.isin(ids[reference.shape[0] :], ids[: reference.shape[0]])


def distinct_sequences(count: int, length: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct random digit lists (count, length), in random order."""
    found = torch.empty(0, length, dtype=torch.long)
    while found.shape[0] < count:
        fresh = torch.randint(0, NUM_DIGITS, (2 * (count - found.shape[0]) + 16, length), generator=generator)
        fresh = fresh[~rows_in(fresh, found)]
        unique = torch.unique(fresh, dim=0)  # sorted: shuffle below
        unique = unique[torch.randperm(unique.shape[0], generator=generator)]
        found = torch.cat([found, unique[: count - found.shape[0]]])
    return found


def sequences_avoiding(count: int, length: int, held_out: Tensor, generator: torch.Generator) -> Tensor:
    """``count`` random digit lists (count, length), none of which occurs in ``held_out`` (repeats allowed)."""
    kept = torch.empty(0, length, dtype=torch.long)
    while kept.shape[0] < count:
        fresh = torch.randint(0, NUM_DIGITS, (count - kept.shape[0], length), generator=generator)
        kept = torch.cat([kept, fresh[~rows_in(fresh, held_out)]])
    return kept


class SyntheticSequenceData(L.LightningDataModule):
    """Synthetic sequence tasks (REVERSE, SORT, SUB, SWAP, COPY) on digit lists, generated from a seed.

    Args:
        task: which output to learn: reverse, sort, sub, swap or copy.
        seq_len: length of every list.
        train_size: training lists (drawn with repeats, never one of the held-out lists).
        val_size: validation lists (distinct, disjoint from test and training).
        test_size: test lists (distinct, disjoint from validation and training).
        seed: data seed; the same seed gives the same three sets whatever the run's seed.
        batch_size: lists per batch.
        num_workers: DataLoader worker processes.
        drop_last: drop the last, incomplete training batch of each epoch (False keeps it, as the paper does: 10,000
            lists at batch 128 are 79 steps per epoch).
        train_seed: ``data`` (our default): the training lists come from ``seed``, the same for every run seed;
            ``run``: from the run's seed (``seed_everything``), so every run seed trains on new lists, as the authors'
            synthetic_tasks.py draws them. The held-out lists come from ``seed`` either way (and stay disjoint).
    """

    def __init__(
        self,
        task: Task = "sort",
        seq_len: int = 8,
        train_size: int = 20000,
        val_size: int = 1000,
        test_size: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        drop_last: bool = True,
        train_seed: Literal["data", "run"] = "data",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"data.task={task!r} is not a synthetic task; allowed: {', '.join(TASKS)}.")
        for name, value in (("seq_len", seq_len), ("train_size", train_size), ("val_size", val_size),
                            ("test_size", test_size)):
            if value < 1:
                raise ConfigError(f"data.{name}={value} must be at least 1.")
        if train_seed not in ("data", "run"):
            raise ConfigError(f"data.train_seed={train_seed!r} must be 'data' or 'run'.")
        check_loader_settings(batch_size, None, num_workers)
        possible = NUM_DIGITS**seq_len
        if 2 * (val_size + test_size) > possible:
            raise ConfigError(
                f"data.seq_len={seq_len} allows only {possible} distinct lists, too few for val_size + test_size = "
                f"{val_size + test_size} held-out lists and a training set disjoint from them (at most half of them "
                "may be held out): raise data.seq_len or lower data.val_size / data.test_size."
            )
        self.task = task
        self.seq_len = seq_len
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = test_size
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.train_seed = train_seed
        self.splits: dict[str, TensorDataset] = {}

    def spec(self) -> dict:
        """What the data decides for the model: vocabulary, classes and sequence length."""
        return {"vocab_size": NUM_DIGITS, "num_classes": NUM_DIGITS, "seq_len": self.seq_len, "task": self.task}

    def settings_spec(self) -> dict:
        """What the settings alone decide for the model: everything (the data is generated from them)."""
        return self.spec()

    def generate(self) -> dict[str, Tensor]:
        """The input lists of each split, ``{"train": (N, L), "val": ..., "test": ...}``, from the data seed (the
        training lists from the run's seed with ``train_seed: run``)."""
        held_gen = torch.Generator().manual_seed(2 * self.seed)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if self.train_seed == "run" else self.seed
        train_gen = torch.Generator().manual_seed(2 * seed + 1)
        held = distinct_sequences(self.val_size + self.test_size, self.seq_len, held_gen)  # (V+T, L)
        train = sequences_avoiding(self.train_size, self.seq_len, held, train_gen)  # (N, L)
        return {"train": train, "val": held[: self.val_size], "test": held[self.val_size :]}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, inputs in self.generate().items():
            self.splits[split] = TensorDataset(inputs, make_targets(self.task, inputs))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(self.splits[split]) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled in a seeded order (``seed_everything``'s seed), resumable mid-epoch from checkpoints."""
        self.setup()
        return train_loader(
            self.splits["train"],
            self.batch_size,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            drop_last=self.drop_last and len(self.splits["train"]) >= self.batch_size,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
