"""Samplers whose place in an epoch survives a checkpoint, so a job stopped mid-epoch resumes
with exactly the samples the uninterrupted epoch would have given.

Training loaders are torchdata's ``StatefulDataLoader``: Lightning stores its ``state_dict`` in
every checkpoint and restores it on resume; the loader asks its sampler's iterator for its state
(and its DataLoader workers for theirs). The samplers here give it one:

- ``ResumableRandomSampler``: torch's ``RandomSampler`` (so Lightning sees a shuffled loader and
  gives it a shuffled ``DistributedSampler`` under DDP) whose epoch order is a pure function of
  its seed and the epoch, and whose iterator records them and how many indices it gave. (An
  order drawn from a running generator would depend on how many iterators the trainer began,
  which differs between a job and its resumption.)
- ``GroupedBatchSampler``: batches whose indices share a group (detection: the aspect-ratio bin);
  its iterator records where its inner sampler's epoch began and how many batches it gave, and
  replays the grouping up to there on resume.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, RandomSampler


class _RandomIterator:
    """One epoch of a ``ResumableRandomSampler``: the permutation of (seed, epoch), of which
    ``yielded`` indices were given. The permutation is drawn at the first ``next`` (as
    ``DistributedSampler``'s is), so an iterator begun before the trainer sets the epoch still
    takes that epoch."""

    def __init__(self, sampler: ResumableRandomSampler):
        self.sampler = sampler
        self.order: list[int] | None = None
        self.yielded = 0

    def _start(self, seed: int, epoch: int, yielded: int) -> None:
        self.seed, self.epoch, self.yielded = seed, epoch, yielded
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        self.order = torch.randperm(len(self.sampler.data_source), generator=generator).tolist()

    def __iter__(self) -> _RandomIterator:
        return self

    def __next__(self) -> int:
        if self.order is None:
            self._start(self.sampler.seed, self.sampler.epoch, 0)
        if self.yielded >= len(self.order):
            raise StopIteration
        self.yielded += 1
        return self.order[self.yielded - 1]

    def state_dict(self) -> dict[str, Any]:
        if self.order is None:
            return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "yielded": 0}
        return {"seed": self.seed, "epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the seed is the saved job's (this job may have drawn another)
        self.sampler.seed = int(state["seed"])
        self._start(int(state["seed"]), int(state["epoch"]), int(state["yielded"]))


class ResumableRandomSampler(RandomSampler):
    """A shuffling sampler (without replacement) whose iterator can be saved and restored.

    Each epoch's order is a permutation drawn from ``seed + epoch`` (as ``DistributedSampler``
    does), so it does not depend on how many iterators were begun; ``set_epoch`` (which
    Lightning calls at every epoch) chooses the epoch. ``seed`` defaults to the job's seed
    (``seed=``, which ``seed_everything`` puts in ``PL_GLOBAL_SEED``), so a seeded job resumed
    from an epoch's end shuffles the next epochs as the uninterrupted job did; an unseeded job
    draws one from torch's RNG (a resumed mid-epoch iterator carries it in its state)."""

    def __init__(self, data_source, seed: int | None = None, epoch: int = 0):
        super().__init__(data_source)
        if seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            seed = int(env) if env is not None else int(torch.randint(0, 2**62, ()).item())
        self.seed, self.epoch = int(seed), int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return _RandomIterator(self)


class _BatchIterator:
    """One epoch of a ``GroupedBatchSampler``. Its state: the inner sampler's epoch, where that
    epoch's indices began (``None`` for a sampler without state, such as ``DistributedSampler``,
    whose order follows from its epoch) and how many batches were given. A restored iterator
    puts the sampler back at that epoch (the next one, if the saved epoch had ended: a loader
    with workers draws its first indices before the trainer sets the epoch) and replays the
    grouping up to where it was at its first ``next``."""

    def __init__(self, owner: GroupedBatchSampler):
        self.owner = owner
        self.epoch: int | None = None
        self.inner_state: Any = None
        self.batches = 0
        self._batches: Iterator[list[int]] | None = None

    def _begin(self) -> None:
        inner = iter(self.owner.sampler)
        if self.inner_state is not None:
            inner.load_state_dict(self.inner_state)
        self._batches = self.owner.group(inner)
        for _ in range(self.batches):
            next(self._batches, None)
        if self.epoch is None:
            self.epoch = getattr(self.owner.sampler, "epoch", None)
        if hasattr(inner, "state_dict"):  # after the first draw: seed and epoch are fixed
            self.inner_state = {**inner.state_dict(), "yielded": 0}

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> list[int]:
        if self._batches is None:
            self._begin()
        batch = next(self._batches)
        self.batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._batches is None and self.inner_state is None:  # not begun: a fresh epoch
            return {"inner": None, "epoch": None, "batches": 0}
        return {"inner": self.inner_state, "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner_state, self.epoch = state["inner"], state["epoch"]
        self.batches, self._batches = int(state["batches"]), None
        if self.epoch is not None and hasattr(self.owner.sampler, "set_epoch"):
            ended = self.batches >= len(self.owner)
            self.owner.sampler.set_epoch(self.epoch + 1 if ended else self.epoch)


class GroupedBatchSampler(BatchSampler):
    """Batches whose indices share a group, e.g. an aspect-ratio bin, so that a batch does not
    pad portrait images to landscape (torchvision's reference ``GroupedBatchSampler``, written
    anew, resumable); ``group_ids=None`` puts every index in one group (a plain, resumable
    ``BatchSampler``).

    Indices come from ``sampler`` (a ``ResumableRandomSampler``, or the ``DistributedSampler``
    Lightning puts in its place under DDP: Lightning re-creates this class with it through the
    ``sampler`` argument); each is held in its group's buffer until the buffer holds
    ``batch_size``. What is left in the buffers at the end is batched buffer by buffer, so an
    epoch has exactly ``ceil(len(sampler) / batch_size)`` batches (``floor`` with
    ``drop_last``) on every rank, and no index is repeated or lost. Only those left-over batches
    (at most one per group) may mix groups.

    ``epoch``: the epoch the trainer is about to run, given to the sampler at once (a loader
    with workers draws its first indices before the trainer calls ``set_epoch``, so a resumed
    job would otherwise begin with epoch 0's order); it is an argument, not a call on the
    sampler, so that it reaches the ``DistributedSampler`` Lightning substitutes too."""

    def __init__(
        self,
        sampler,
        group_ids=None,
        batch_size: int = 1,
        drop_last: bool = False,
        epoch: int | None = None,
    ):
        super().__init__(sampler, batch_size, drop_last)
        self.group_ids = None if group_ids is None else np.asarray(group_ids)
        if epoch is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def group(self, indices) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = {}
        for idx in indices:
            group = 0 if self.group_ids is None else int(self.group_ids[idx])
            buffer = buffers.setdefault(group, [])
            buffer.append(int(idx))
            if len(buffer) == self.batch_size:
                yield buffer
                del buffers[group]
        rest = [i for b in buffers.values() for i in b]
        for start in range(0, len(rest), self.batch_size):
            batch = rest[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __iter__(self) -> Iterator[list[int]]:
        return _BatchIterator(self)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
