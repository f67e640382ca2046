"""SemanticKITTI (Behley et al., ICCV 2019) LiDAR scans with per-point semantic labels, read in
the dataset's own on-disk format::

    <data_dir>/sequences/NN/velodyne/NNNNNN.bin   float32 x, y, z, remission per point
    <data_dir>/sequences/NN/labels/NNNNNN.label   uint32 per point: lower 16 bits the semantic
                                                   label, upper 16 the instance

The raw labels go through the learning map of ``semantic-kitti.yaml`` (this package's copy of
semantic-kitti-api's, or ``learning_map=`` a file of your own) to 19 classes and "ignored".
The standard split: sequences 00-10 train, except 08, which is validation (the test split's
labels are not public, so the test split here is 08 as well, as papers report).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from zoo.data.base import SplitDataModule
from zoo.errors import ConfigError, DataError

LEARNING_MAP = Path(__file__).with_name("semantic-kitti.yaml")
IGNORE = -1  # the learned label of points the learning map ignores (raw "unlabeled", ...)
POINT_BYTES = 16  # float32 x, y, z, remission


def read_learning_map(path: str | Path | None = None) -> dict[str, Any]:
    """The label definitions of a ``semantic-kitti.yaml``: ``class_names`` (the learned classes
    1..n, as 0-based names), ``lut`` (raw label -> class, -1 ignored, -2 not in the map),
    ``inverse`` (class -> raw label), ``colors`` (class -> RGB)."""
    path = Path(path) if path else LEARNING_MAP
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read the learning map ({exc})") from None
    for key in ("labels", "learning_map", "learning_map_inv"):
        if not isinstance(spec, dict) or not isinstance(spec.get(key), dict):
            raise DataError(f"{path}: no {key!r} mapping (is it a semantic-kitti.yaml?)")
    learning_map = {int(k): int(v) for k, v in spec["learning_map"].items()}
    inverse = {int(k): int(v) for k, v in spec["learning_map_inv"].items()}
    n = max(inverse)
    if sorted(inverse) != list(range(n + 1)):
        raise DataError(f"{path}: learning_map_inv must map every class 0..{n}")
    lut = np.full(1 << 16, -2, dtype=np.int64)
    for raw, learned in learning_map.items():
        if not 0 <= learned <= n:
            raise DataError(f"{path}: learning_map sends raw label {raw} to {learned}, not 0..{n}")
        lut[raw] = learned - 1  # class 0 is ignored: the rest shift down by one
    names = [str(spec["labels"][inverse[c]]) for c in range(1, n + 1)]
    bgr = spec.get("color_map") or {}
    colors = [list(reversed(bgr.get(inverse[c], [128, 128, 128]))) for c in range(1, n + 1)]
    return {
        "class_names": names,
        "lut": lut,
        "inverse": [inverse[c] for c in range(1, n + 1)],
        "colors": colors,
        "path": str(path),
    }


def class_names(learning_map: str | None = None) -> list[str]:
    """The learned classes of a learning map (default: SemanticKITTI's 19), for the config."""
    return read_learning_map(None if learning_map in (None, "None", "") else learning_map)[
        "class_names"
    ]


def read_scan(path: Path) -> np.ndarray:
    """A ``.bin`` scan as float32 [N, 4] (x, y, z, remission), or a DataError naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read the scan ({exc.strerror})") from None
    if size % POINT_BYTES:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of points (a SemanticKITTI .bin holds "
            f"{POINT_BYTES} bytes per point: float32 x, y, z, remission)"
        )
    if size == 0:
        raise DataError(f"{path}: the scan is empty (0 points)")
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(points).all():
        raise DataError(f"{path}: the scan holds NaN or inf values")
    return points


def read_labels(path: Path, n_points: int, lut: np.ndarray) -> np.ndarray:
    """A ``.label`` file as learned classes int64 [N] (-1 ignored), or a DataError naming it:
    its count must be the scan's, and every raw label must be in the learning map."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint32)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the labels ({exc.strerror})") from None
    if path.stat().st_size % 4:
        raise DataError(f"{path}: {path.stat().st_size} bytes is not a whole number of uint32")
    if len(raw) != n_points:
        raise DataError(
            f"{path}: {len(raw)} labels for a scan of {n_points} points (one uint32 per point)"
        )
    learned = lut[raw & 0xFFFF]
    bad = learned == -2
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: point {first} has semantic label {int(raw[first] & 0xFFFF)}, which is not "
            f"in the learning map ({int(bad.sum())} points are)"
        )
    return learned


def scan_files(data_dir: Path, sequences: Sequence[int], labels: bool) -> list[Path]:
    """The ``.bin`` scans of ``sequences`` in order; a missing sequence or label file is an
    error naming it."""
    files = []
    for seq in sequences:
        folder = data_dir / "sequences" / f"{int(seq):02d}" / "velodyne"
        if not folder.is_dir():
            raise DataError(f"{folder}: sequence {int(seq):02d} not found")
        scans = sorted(folder.glob("*.bin"))
        if not scans:
            raise DataError(f"{folder}: no .bin scans")
        if labels:
            for scan in scans:
                label = label_path(scan)
                if not label.is_file():
                    raise DataError(f"{label}: missing (the labels of {scan})")
        files.extend(scans)
    return files


def label_path(scan: Path) -> Path:
    return scan.parent.parent / "labels" / f"{scan.stem}.label"


class ScanDataset(Dataset):
    """Scans with their learned labels; training scans are augmented (a rotation about z, a
    flip of y, a scale), drawn from a generator seeded by ``seed``, ``epoch`` (the epoch the
    training loader was made in, so one draw per scan for a job's epochs) and the scan's
    index."""

    def __init__(self, files: list[Path], lut: np.ndarray, augment: bool, seed: int = 0):
        self.files, self.lut, self.augment, self.seed = files, lut, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        points = read_scan(path)
        labels = read_labels(label_path(path), len(points), self.lut)
        if self.augment:
            points = augment(points, np.random.default_rng([self.seed, self.epoch, i]))
        return {
            "points": torch.from_numpy(points),
            "labels": torch.from_numpy(labels),
            "name": f"{path.parent.parent.name}/{path.stem}",
        }


def augment(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmdetection3d's SemanticKITTI training augmentation: rotation about z in [-pi, pi),
    a flip of y with probability 0.5, a scale in [0.95, 1.05]."""
    angle = rng.uniform(-np.pi, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    out = points.copy()
    x, y = points[:, 0], points[:, 1]
    out[:, 0], out[:, 1] = c * x - s * y, s * x + c * y
    if rng.random() < 0.5:
        out[:, 1] = -out[:, 1]
    out[:, :3] *= rng.uniform(0.95, 1.05)
    return out


def collate_scans(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Scans one after the other: points [P, 4], labels [P], each point's sample in ``batch``."""
    return {
        "points": torch.cat([it["points"] for it in items]),
        "labels": torch.cat([it["labels"] for it in items]),
        "batch": torch.cat(
            [torch.full((len(it["points"]),), b, dtype=torch.int64) for b, it in enumerate(items)]
        ),
        "batch_size": len(items),
        "names": [it["name"] for it in items],
    }


class SemanticKITTIDataModule(SplitDataModule):
    """SemanticKITTI scans and labels (the module docstring has the format), voxelised by the
    model with ``voxel_size`` and ``point_range``, which travel with it (``preprocessing_spec``).

    ``sequences``: {train, val, test} -> sequence numbers. ``subset``: the first N scans of each
    split (debug runs). ``demo``: a writer of generated scenes in this format (the offline demo).
    """

    sample_unit = "scans"
    digest_keys = ("data.voxel_size", "data.point_range")
    collate_fn = staticmethod(collate_scans)

    def __init__(
        self,
        data_dir: str,
        sequences: dict[str, Sequence[int]],
        voxel_size: float | Sequence[float] = 0.05,
        point_range: Sequence[float] = (-51.2, -51.2, -4.0, 51.2, 51.2, 2.4),
        learning_map: str | None = None,
        augment: bool = True,
        batch_size: int = 2,
        num_workers: int = 0,
        subset: int | None = None,
        seed: int = 0,
        demo: Callable[..., object] | None = None,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.data_dir = Path(data_dir)
        missing = {"train", "val", "test"} - set(sequences or {})
        if missing:
            raise ConfigError(
                f"data.sequences needs train, val and test; {sorted(missing)} missing"
            )
        self.sequences = {k: [int(s) for s in v] for k, v in sequences.items()}
        sizes = [float(voxel_size)] * 3 if isinstance(voxel_size, int | float) else voxel_size
        self.voxel_size = [float(v) for v in sizes]
        self.point_range = [float(v) for v in point_range]
        if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise ConfigError(f"data.voxel_size={voxel_size}: one or 3 positive sizes (metres)")
        lo, hi = self.point_range[:3], self.point_range[3:]
        if len(self.point_range) != 6 or any(h <= low for low, h in zip(lo, hi)):
            raise ConfigError(
                f"data.point_range={list(point_range)}: x, y, z min then x, y, z max, max > min"
            )
        self.learning_map = learning_map
        self.labels = read_learning_map(learning_map)
        self.class_names = self.labels["class_names"]
        for key, given, derived in (
            ("class_names", class_names, self.class_names),
            ("num_classes", num_classes, len(self.class_names)),
        ):
            if given is not None and (list(given) if key == "class_names" else given) != derived:
                raise ConfigError(
                    f"data.{key}={given} but the learning map {self.labels['path']} gives {derived}"
                )
        self.augment, self.seed = augment, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.subset, self.demo = subset, demo
        self.datasets: dict[str, ScanDataset] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare_data(self) -> None:
        self.write_demo()

    def _dataset(self, split: str) -> ScanDataset:
        files = scan_files(self.data_dir, self.sequences[split], labels=True)
        if self.subset:
            files = files[: int(self.subset)]
        return ScanDataset(files, self.labels["lut"], self.augment and split == "train", self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.demo:
            self.prepare_data()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")):
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    def train_dataloader(self):
        self.datasets["train"].epoch = self.current_epoch()
        return super().train_dataloader()

    def dataset_files(self, split: str) -> list[Path]:
        dataset = self.datasets.get(split)
        if dataset is None:
            return []
        return [f for scan in dataset.files for f in (scan, label_path(scan))]

    def preprocessing_spec(self) -> dict[str, Any]:
        """What turns raw points into the network's input, and its classes back into
        SemanticKITTI's raw labels."""
        return {
            "voxel_size": self.voxel_size,
            "point_range": self.point_range,
            "class_names": list(self.class_names),
            "raw_labels": [int(v) for v in self.labels["inverse"]],
            "colors": self.labels["colors"],
        }

    def raw_example(self) -> np.ndarray:
        """The first 2,048 points of the first test scan, float32 [2048, 4]."""
        self.setup("test")
        return read_scan(self.datasets["test"].files[0])[:2048]

    def summary(self) -> dict[str, str]:
        return {
            "data_dir": str(self.data_dir),
            "sequences": ", ".join(f"{k} {v}" for k, v in self.sequences.items()),
            "voxels": f"{self.voxel_size} m in {self.point_range}",
            "learning map": self.labels["path"],
        }
