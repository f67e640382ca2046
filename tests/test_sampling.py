"""Training loaders resume mid-epoch: a Lightning job saved at any step and resumed sees exactly
the samples the uninterrupted job saw, with or without DataLoader workers, grouped or not."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from zoo.data.base import SplitDataModule
from zoo.data.sampling import GroupedBatchSampler, ResumableRandomSampler


class Indices(Dataset):
    def __len__(self) -> int:
        return 42

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)])


class Data(SplitDataModule):
    def __init__(self, num_workers: int, grouped: bool):
        super().__init__()
        self.batch_size, self.num_workers, self.grouped = 4, num_workers, grouped
        self.datasets = {"train": Indices()}

    def train_dataloader(self):
        if not self.grouped:
            return super().train_dataloader()
        groups = np.arange(42) % 3  # three "aspect-ratio" groups
        sampler = ResumableRandomSampler(self.datasets["train"])
        sampler = GroupedBatchSampler(sampler, groups, 4, epoch=self.current_epoch())
        return self.resumable_loader(batch_sampler=sampler)


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch.flatten().int().tolist()))
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class SaveAt(L.Callback):
    """Saves after global step ``step``; at an epoch's last step, where ModelCheckpoint saves
    (the end of the epoch)."""

    def __init__(self, step: int, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not trainer.is_last_batch:
            trainer.save_checkpoint(self.path)

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit(data, callbacks=(), ckpt_path=None) -> Recorder:
    L.seed_everything(3)
    model = Recorder()
    L.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    ).fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "grouped"])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("at_step", [13, 11], ids=["mid-epoch", "epoch-end"])
def test_a_job_resumed_from_any_step_sees_what_the_uninterrupted_one_saw(
    tmp_path, num_workers, grouped, at_step
):
    ckpt = tmp_path / "at.ckpt"
    whole = _fit(Data(num_workers, grouped), [SaveAt(at_step, ckpt)])
    assert len(whole.seen) == 33  # 11 batches (42 / 4, rounded up) x 3 epochs
    for epoch in range(3):
        indices = [i for e, b in whole.seen if e == epoch for i in b]
        assert sorted(indices) == list(range(42))  # every sample once per epoch
    assert whole.seen[:11] != whole.seen[11:22]  # a new order every epoch
    if grouped:  # all but the left-over batches share a group
        assert sum(len({i % 3 for i in b}) > 1 for _, b in whole.seen) <= 3 * 3
    resumed = _fit(Data(num_workers, grouped), ckpt_path=ckpt)
    assert resumed.seen == whole.seen[at_step:]


def test_the_sampler_state_round_trips_without_lightning():
    data = list(range(10))
    sampler = ResumableRandomSampler(data, seed=0)
    first = iter(sampler)
    head = [next(first) for _ in range(4)]
    state = first.state_dict()
    rest = list(first)
    resumed = ResumableRandomSampler(data)  # another job: another seed, restored from the state
    again = iter(resumed)
    again.load_state_dict(state)
    assert list(again) == rest and sorted(head + rest) == data
    assert list(iter(resumed)) == head + rest  # the same epoch, the same order
    sampler.set_epoch(1)
    assert list(iter(sampler)) != head + rest  # a new epoch, a new order
