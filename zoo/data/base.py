"""What every zoo data module shares: datasets per split and their loaders."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from zoo.outputs import DatasetInfo

MAX_DIGEST_FILES = 20_000  # a listing digest stops here (huge image folders)


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
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

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
