"""What every zoo data module shares: datasets per split and their loaders."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.data.sampling import GroupedBatchSampler, ResumableRandomSampler
from zoo.outputs import DatasetInfo

MAX_DIGEST_FILES = 20_000  # a listing digest stops here (huge image folders)


def worker_seed_generator() -> torch.Generator:
    """The generator a loader draws its workers' base seed from: its own, seeded from the job's
    seed, not torch's global RNG. A loader with persistent workers draws once per job, so a
    resumed job (which begins its loaders anew) would otherwise shift the global RNG that
    dropout draws from, and its metrics would part from the uninterrupted job's."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    generator = torch.Generator()
    generator.manual_seed(
        int(seed) if seed is not None else int.from_bytes(os.urandom(7), "little")
    )
    return generator


@dataclass
class FoldPlan:
    """How a data module splits into cross-validation folds, for ``zoo.studies.cv``: the config
    key that picks a fold (``data.test_subject``), its value for every fold, overrides every
    fold shares, and the folds that cannot run, each with why and the overrides that make its
    job fail with that reason named (so the fold's failure is a real, tracked run)."""

    key: str
    values: list[Any]
    shared: list[str] = field(default_factory=list)
    unavailable: dict[Any, tuple[str, list[str]]] = field(default_factory=dict)


class SplitDataModule(L.LightningDataModule):
    """Subclasses fill ``self.datasets`` ({"train", "val", "test"} -> Dataset) in ``setup`` and
    set ``batch_size`` / ``num_workers``; the loaders come from here (training shuffled)."""

    batch_size: int
    num_workers: int
    datasets: dict[str, Dataset]
    collate_fn: Callable | None = None  # e.g. padding to the longest sequence of a batch

    demo: Callable[..., object] | None = None
    sample_unit = "samples"  # what reports count: "evaluated on 128 of 472 test windows"

    def cross_validation(self) -> FoldPlan:
        """The folds of this data module's protocol (a module without folds refuses)."""
        from zoo.errors import ConfigError

        raise ConfigError(f"{type(self).__name__} has no cross-validation folds")

    def write_demo(self, **options) -> None:
        """Write the offline demo dataset into ``data_dir`` when the config injects a writer
        (``data.demo``: a ``_partial_`` of a ``zoo.data.demo`` function); the writers reuse
        what a previous job wrote."""
        if self.demo is not None:
            self.demo(self.data_dir, **options)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
            generator=worker_seed_generator(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled and resumable mid-epoch: torchdata's ``StatefulDataLoader`` over a
        ``ResumableRandomSampler`` in batches (``zoo.data.sampling``); Lightning keeps its state
        in every checkpoint, so a job stopped mid-epoch resumes with the rest of that epoch's
        order, under DDP too."""
        sampler = ResumableRandomSampler(self.datasets["train"])
        return self.resumable_loader(
            batch_sampler=GroupedBatchSampler(
                sampler, None, self.batch_size, epoch=self.current_epoch()
            )
        )

    def current_epoch(self) -> int:
        """The epoch the trainer is about to run (a resumed job's too): a loader with workers
        draws its first indices before the trainer calls ``set_epoch``."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.fit_loop.epoch_progress.current.processed) if trainer else 0

    def resumable_loader(self, **kwargs) -> DataLoader:
        """A ``StatefulDataLoader`` over the training split (``sampler``/``batch_sampler`` and
        the rest as for a DataLoader), with the module's workers and collate function."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(
            self.datasets["train"],
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
            generator=worker_seed_generator(),
            **kwargs,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # ------------------------------------------------------------------ what it serves

    def dataset_name(self) -> str:
        """The datasets' name in mlflow (default: the data folder's name)."""
        data_dir = getattr(self, "data_dir", None)
        return Path(data_dir).name if data_dir else type(self).__name__

    def dataset_files(self, split: str) -> list[Path]:
        """The files a split is read from (default: every file under ``data_dir``)."""
        data_dir = getattr(self, "data_dir", None)
        if not data_dir or not Path(data_dir).is_dir():
            return []
        files = []
        for path in sorted(Path(data_dir).rglob("*")):
            if path.is_file():
                files.append(path)
                if len(files) >= MAX_DIGEST_FILES:
                    break
        return files

    def dataset_inputs(self) -> list[DatasetInfo]:
        """Each split set up so far: name, digest (of its files' names and sizes, the split
        and its sample count) and source, for mlflow's run inputs."""
        out = []
        for split, dataset in getattr(self, "datasets", {}).items():
            files = self.dataset_files(split)
            data_dir = getattr(self, "data_dir", None)
            source = Path(data_dir) if data_dir else (files[0].parent if files else Path("."))
            digest = hashlib.sha256(f"{split}:{len(dataset)}".encode())
            for path in files:
                digest.update(
                    f"{path.relative_to(source) if path.is_relative_to(source) else path}"
                    f":{path.stat().st_size};".encode()
                )
            out.append(
                DatasetInfo(
                    context=split,
                    name=f"{self.dataset_name()}-{split}",
                    digest=digest.hexdigest()[:12],
                    source=str(source.resolve()),
                    num_samples=len(dataset),
                )
            )
        return out
