"""What every zoo data module shares: datasets per split and their loaders."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader, Dataset


class SplitDataModule(L.LightningDataModule):
    """Subclasses fill ``self.datasets`` ({"train", "val", "test"} -> Dataset) in ``setup`` and
    set ``batch_size`` / ``num_workers``; the loaders come from here (training shuffled)."""

    batch_size: int
    num_workers: int
    datasets: dict[str, Dataset]
    collate_fn: Callable | None = None  # e.g. padding to the longest sequence of a batch

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
