"""Detection annotations from several label sources mapped into one class space.

Loaders: COCO JSON (``iscrowd`` kept as a flag, category ids remapped to the unified contiguous
space), CCTSDB text files (``filename;x1;y1;x2;y2;class`` per line) and Pascal VOC XML
(``difficult`` kept as a flag). Every record carries its source (the row of the group table).

Bad annotations (boxes outside the image, zero area, unknown category, missing image file) are
an error naming the file and the annotation, or, with ``on_bad="skip"``, skipped and counted
(the counts are returned and logged); nothing is dropped silently. Malformed files are always
errors.

``DetectionDataModule`` joins several sources (any mix of the formats) for training and
scoring; ``DetectionDataset`` turns records into torchvision-style (image, target) pairs.

The group table (one row per source, one column per unified class, column 0 = background) is
derived from the label maps: a class a source labels is its own group; every class it does not
label shares group 0 with background, so that source's images never teach "not this class".
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from zoo.boxes import derive_group_table, entry_errors
from zoo.data.base import SplitDataModule
from zoo.data.cache import ArrayCache, cache_folder, file_fingerprint
from zoo.data.coco import CocoBoxes, FolderListing, no_gc_pauses, read_coco, read_coco_boxes
from zoo.data.sampling import GroupedBatchSampler, ResumableRandomSampler
from zoo.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BACKGROUND = "__background__"
COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


def coco_classes() -> list[str]:
    """COCO's 80 category names, in id order (conf/data/coco_cctsdb.yaml)."""
    return list(COCO_CLASSES)


BAD_REASONS = ("outside_image", "zero_area", "unknown_category", "missing_image")


@dataclass
class Record:
    """One image: boxes in absolute xyxy pixels, labels in the unified space (1..C)."""

    image: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [K, 4]
    labels: np.ndarray  # int64 [K]
    source: int = 0
    iscrowd: np.ndarray | None = None  # bool [K]
    difficult: np.ndarray | None = None  # bool [K]
    image_id: int = 0

    def __post_init__(self) -> None:
        k = len(self.labels)
        self.iscrowd = np.zeros(k, bool) if self.iscrowd is None else np.asarray(self.iscrowd, bool)
        self.difficult = (
            np.zeros(k, bool) if self.difficult is None else np.asarray(self.difficult, bool)
        )


def _shift_offsets(offsets: list[np.ndarray]) -> np.ndarray:
    """Offset arrays (each from 0 to its total) of consecutive parts, as one offset array."""
    bases = np.cumsum([0] + [int(o[-1]) for o in offsets])
    return np.concatenate([[0]] + [o[1:] + base for o, base in zip(offsets, bases)]).astype(
        np.int64
    )


class RecordTable:
    """Many images' records as a few flat arrays: paths in one UTF-8 buffer with offsets;
    width, height, id and source per image; boxes, labels and flags concatenated with per-image
    offsets. DataLoader workers read it without writing a reference count per record, so a
    forked worker does not copy the pages it reads (the copy-on-read problem of lists of Python
    objects). Indexing gives a ``Record``; slicing and ``take`` give a table."""

    def __init__(
        self,
        paths,
        path_offsets,
        width,
        height,
        image_id,
        source,
        box_offsets,
        boxes,
        labels,
        iscrowd,
        difficult,
    ):
        self.paths, self.path_offsets = paths, path_offsets
        self.width, self.height, self.image_id, self.source = width, height, image_id, source
        self.box_offsets, self.boxes, self.labels = box_offsets, boxes, labels
        self.iscrowd, self.difficult = iscrowd, difficult

    @classmethod
    def build(
        cls,
        paths: list[str],
        width,
        height,
        image_id,
        source,
        counts,
        boxes,
        labels,
        iscrowd,
        difficult=None,
    ) -> RecordTable:
        """From per-image columns and the per-image box ``counts`` of the flat box arrays."""
        encoded = [p.encode() for p in paths]
        path_offsets = np.zeros(len(paths) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=path_offsets[1:])
        box_offsets = np.zeros(len(paths) + 1, np.int64)
        np.cumsum(np.asarray(counts, np.int64), out=box_offsets[1:])
        n = int(box_offsets[-1])
        return cls(
            np.frombuffer(b"".join(encoded), np.uint8).copy(),
            path_offsets,
            np.asarray(width, np.int64),
            np.asarray(height, np.int64),
            np.asarray(image_id, np.int64),
            np.broadcast_to(np.asarray(source, np.int64), (len(paths),)).copy(),
            box_offsets,
            np.asarray(boxes, np.float32).reshape(n, 4),
            np.asarray(labels, np.int64).reshape(n),
            np.asarray(iscrowd, bool).reshape(n),
            np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool).reshape(n),
        )

    @classmethod
    def from_records(cls, records) -> RecordTable:
        records = list(records)
        cat = lambda key, dtype, shape: (  # noqa: E731
            np.concatenate([getattr(r, key) for r in records]).astype(dtype)
            if records
            else np.zeros(shape, dtype)
        )
        return cls.build(
            [str(r.image) for r in records],
            [r.width for r in records],
            [r.height for r in records],
            [r.image_id for r in records],
            [r.source for r in records],
            [len(r.labels) for r in records],
            cat("boxes", np.float32, (0, 4)).reshape(-1, 4),
            cat("labels", np.int64, (0,)),
            cat("iscrowd", bool, (0,)),
            cat("difficult", bool, (0,)),
        )

    @classmethod
    def concat(cls, tables: list[RecordTable]) -> RecordTable:
        if len(tables) == 1:
            return tables[0]
        shift = _shift_offsets
        return cls(
            np.concatenate([t.paths for t in tables]),
            shift([t.path_offsets for t in tables]),
            *(
                np.concatenate([getattr(t, k) for t in tables])
                for k in ("width", "height", "image_id", "source")
            ),
            shift([t.box_offsets for t in tables]),
            *(
                np.concatenate([getattr(t, k) for t in tables])
                for k in ("boxes", "labels", "iscrowd", "difficult")
            ),
        )

    def __len__(self) -> int:
        return len(self.width)

    def path(self, i: int) -> str:
        return bytes(self.paths[self.path_offsets[i] : self.path_offsets[i + 1]]).decode()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        a, b = self.box_offsets[i], self.box_offsets[i + 1]
        return Record(
            Path(self.path(i)),
            int(self.width[i]),
            int(self.height[i]),
            self.boxes[a:b],
            self.labels[a:b],
            int(self.source[i]),
            iscrowd=self.iscrowd[a:b],
            difficult=self.difficult[a:b],
            image_id=int(self.image_id[i]),
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, index) -> RecordTable:
        """The images ``index`` (in that order), as a table."""
        index = np.asarray(index, np.int64)

        def ranges(offsets):
            starts, ends = offsets[index], offsets[index + 1]
            counts = ends - starts
            flat = np.repeat(starts - np.cumsum(np.r_[0, counts[:-1]]), counts)
            return (flat + np.arange(counts.sum())).astype(np.int64), counts

        chars, path_counts = ranges(self.path_offsets)
        boxes, box_counts = ranges(self.box_offsets)
        cumsum = lambda c: np.r_[0, np.cumsum(c)].astype(np.int64)  # noqa: E731
        return RecordTable(
            self.paths[chars],
            cumsum(path_counts),
            self.width[index],
            self.height[index],
            self.image_id[index],
            self.source[index],
            cumsum(box_counts),
            self.boxes[boxes],
            self.labels[boxes],
            self.iscrowd[boxes],
            self.difficult[boxes],
        )

    COLUMNS = (
        "paths",
        "path_offsets",
        "width",
        "height",
        "image_id",
        "source",
        "box_offsets",
        "boxes",
        "labels",
        "iscrowd",
        "difficult",
    )

    def columns(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.COLUMNS}

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in self.COLUMNS)


@dataclass
class LoadReport:
    """What a loader skipped (on_bad="skip"), by reason."""

    source: str
    skipped: Counter = field(default_factory=Counter)

    def log(self) -> None:
        if self.skipped:
            log.warning(
                "%s: skipped %d bad annotation(s): %s",
                self.source,
                sum(self.skipped.values()),
                ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())),
            )


class AnnotationChecker:
    """Validates one source's annotations: a bad one raises a DataError naming it (on_bad=error)
    or is skipped and counted in the source's LoadReport (on_bad=skip)."""

    def __init__(self, source: str, on_bad: str):
        if on_bad not in ("error", "skip"):
            raise ConfigError(f"on_bad={on_bad!r}: expected 'error' or 'skip'")
        self.on_bad, self.report = on_bad, LoadReport(source)

    def bad(self, reason: str, where: str) -> None:
        if self.on_bad == "error":
            raise DataError(
                f"{where}: {reason.replace('_', ' ')} (set data.on_bad=skip to skip and count such "
                "annotations)"
            )
        self.report.skipped[reason] += 1

    def box_ok(
        self, box: list[float], width: int, height: int, where: str, tol: float = 1.0
    ) -> bool:
        x1, y1, x2, y2 = box
        if x2 <= x1 or y2 <= y1:
            self.bad("zero_area", f"{where} box {box}")
            return False
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            self.bad("outside_image", f"{where} box {box} in a {width}x{height} image")
            return False
        return True


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        return None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def _map_label(
    name: str, label_map: dict[str, str | None], classes: list[str], where: str
) -> int | None:
    """Unified 1-based id; None when the source's class is mapped to null (ignored on purpose)."""
    if name not in label_map:
        raise ConfigError(
            f"{where}: category {name!r} has no entry in this source's label map "
            f"{sorted(label_map)}"
        )
    unified = label_map[name]
    return None if unified is None else classes.index(unified) + 1


COCO_CACHE_FORMAT = 1  # bump when what _parse_coco returns changes


def load_coco(
    ann_file: str | Path,
    image_dir: str | Path,
    label_map: dict[str, str | None],
    classes: list[str],
    source: int = 0,
    on_bad: str = "error",
    cache: ArrayCache | None = None,
) -> tuple[RecordTable, LoadReport]:
    """Records of a COCO file whose images live in ``image_dir``. With ``cache``, the parsed
    table's columns are kept as memory-mapped arrays, keyed by the annotation file (path, size,
    mtime), the image folder (path, mtime: a file added or removed changes it), the label map,
    the classes, the source row and on_bad."""
    if cache is None:
        return _parse_coco(ann_file, image_dir, label_map, classes, source, on_bad)
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: file not found")
    try:
        folder_mtime = image_dir.stat().st_mtime_ns
    except OSError:
        folder_mtime = None
    key = {
        "format_version": COCO_CACHE_FORMAT,
        "annotations": {**file_fingerprint(ann_file), "path": str(ann_file.resolve())},
        "images": {"path": str(image_dir.resolve()), "mtime_ns": folder_mtime},
        "label_map": label_map,
        "classes": list(classes),
        "source": int(source),
        "on_bad": on_bad,
    }

    def build():
        table, report = _parse_coco(ann_file, image_dir, label_map, classes, source, on_bad)
        return table.columns(), {"skipped": dict(report.skipped)}

    arrays, extra = cache.load_or_build_arrays(ann_file.stem, key, build)
    report = LoadReport(ann_file.name, Counter(extra.get("skipped", {})))
    report.log()
    return RecordTable(**arrays), report


def _parse_coco(
    ann_file: str | Path,
    image_dir: str | Path,
    label_map: dict[str, str | None],
    classes: list[str],
    source: int = 0,
    on_bad: str = "error",
) -> tuple[RecordTable, LoadReport]:
    """The parse behind ``load_coco``: image files are checked against one listing of each
    folder, not a stat each; the annotations are checked in bulk (numpy), and only a file with
    a bad or malformed entry goes through the entry-by-entry reader, which names it."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    data = read_coco_boxes(ann_file) or read_coco(ann_file)  # typed when the file fits
    check = AnnotationChecker(ann_file.name, on_bad)
    listing = FolderListing(image_dir)
    try:
        with no_gc_pauses():
            records = _coco_records_bulk(
                data, ann_file, image_dir, listing, label_map, classes, source, check
            )
    except _NeedsEntryByEntry:
        check.report.skipped.clear()
        if not isinstance(data, dict):
            data = read_coco(ann_file)
        records = RecordTable.from_records(
            _coco_records(data, ann_file, image_dir, listing, label_map, classes, source, check)
        )
    check.report.log()
    return records, check.report


class _NeedsEntryByEntry(Exception):
    """The bulk reader met something only the entry-by-entry reader reports exactly."""


def _columns_from_dicts(data: dict):
    """The columns the bulk reader checks, from parsed JSON (dicts)."""
    try:
        cats = {c["id"]: c["name"] for c in data["categories"]}
        images = data["images"]
        ids = np.array([im["id"] for im in images], dtype=np.int64)
        names = [im["file_name"] for im in images]
        widths = np.array([int(im["width"]) for im in images], dtype=np.int64)
        heights = np.array([int(im["height"]) for im in images], dtype=np.int64)
        anns = data["annotations"]
        ann_image = np.array([a["image_id"] for a in anns], dtype=np.int64)
        ann_cat = [a["category_id"] for a in anns]
        bbox = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _NeedsEntryByEntry from exc
    return cats, ids, names, widths, heights, ann_image, ann_cat, bbox, crowd


def _columns_from_boxes(data: CocoBoxes):
    """The same columns from the typed decode (``zoo.data.coco.read_coco_boxes``)."""
    images, anns = data.images, data.annotations
    try:
        bbox = np.array([a.bbox for a in anns], dtype=np.float64).reshape(-1, 4)
    except ValueError as exc:  # a bbox of another length than 4
        raise _NeedsEntryByEntry from exc
    return (
        {c.id: c.name for c in data.categories},
        np.array([im.id for im in images], dtype=np.int64),
        [im.file_name for im in images],
        np.array([im.width for im in images], dtype=np.int64),
        np.array([im.height for im in images], dtype=np.int64),
        np.array([a.image_id for a in anns], dtype=np.int64),
        [a.category_id for a in anns],
        bbox,
        np.array([bool(a.iscrowd) for a in anns], dtype=bool),
    )


def _coco_records_bulk(data, ann_file, image_dir, listing, label_map, classes, source, check=None):
    """All-good files, fast: every check of ``_coco_records`` at once in numpy; anything it
    would report (a bad, skipped or malformed entry) hands over to it."""
    columns = _columns_from_dicts(data) if isinstance(data, dict) else _columns_from_boxes(data)
    cats, ids, names, widths, heights, ann_image, ann_cat, bbox, crowd = columns
    if len(bbox) != len(ann_image):
        raise _NeedsEntryByEntry  # boxes that are not [x, y, w, h]
    if len(set(ids.tolist())) != len(ids) or not all(n in listing for n in names):
        raise _NeedsEntryByEntry  # repeated ids, missing images
    used = set(ann_cat)
    if any(c not in cats for c in used):
        raise _NeedsEntryByEntry  # unknown categories
    unified = {}
    for cat_id in used:
        name = cats[cat_id]
        if name not in label_map:
            raise _NeedsEntryByEntry  # the label-map error names it
        unified[cat_id] = 0 if label_map[name] is None else classes.index(label_map[name]) + 1
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids, ann_image, sorter=order)
    pos = np.clip(pos, 0, max(len(ids) - 1, 0))
    row = order[pos] if len(ids) else pos
    if len(ann_image) and (not len(ids) or (ids[row] != ann_image).any()):
        raise _NeedsEntryByEntry  # an annotation of an unknown image
    labels = np.array([unified[c] for c in ann_cat], dtype=np.int64)
    x1, y1 = bbox[:, 0], bbox[:, 1]
    x2, y2 = x1 + bbox[:, 2], y1 + bbox[:, 3]
    w, h, tol = widths[row], heights[row], 1.0
    zero = (x2 <= x1) | (y2 <= y1)
    outside = ~zero & ((x1 < -tol) | (y1 < -tol) | (x2 > w + tol) | (y2 > h + tol))
    bad = (zero | outside) & (labels > 0)
    if bad.any():
        if check is None or check.on_bad != "skip":
            raise _NeedsEntryByEntry  # the entry-by-entry reader names the first one
        check.report.skipped["zero_area"] += int((zero & bad).sum())
        check.report.skipped["outside_image"] += int((outside & bad).sum())
    keep = (labels > 0) & ~bad
    row, labels, crowd = row[keep], labels[keep], crowd[keep]
    boxes = np.stack([x1, y1, x2, y2], axis=1)[keep].astype(np.float32)
    by_row = np.argsort(row, kind="stable")  # each image's annotations in file order
    prefix = str(image_dir)
    return RecordTable.build(
        [f"{prefix}/{name}" for name in names],
        widths,
        heights,
        ids,
        source,
        np.bincount(row, minlength=len(ids)),
        boxes[by_row],
        labels[by_row],
        crowd[by_row],
    )


def _coco_records(data, ann_file, image_dir, listing, label_map, classes, source, check):
    """Entry by entry: every bad entry named (on_bad=error) or counted (on_bad=skip)."""
    cats = {}
    for k, c in enumerate(data["categories"]):
        with entry_errors(f"{ann_file}: categories[{k}]"):
            cats[c["id"]] = c["name"]
    images, by_image, all_ids = {}, {}, set()
    for k, im in enumerate(data["images"]):
        with entry_errors(f"{ann_file}: images[{k}]"):
            all_ids.add(im["id"])
            path = image_dir / im["file_name"]
            if im["file_name"] not in listing:
                check.bad("missing_image", f"{ann_file}: image id {im['id']} ({path})")
                continue
            images[im["id"]] = (path, int(im["width"]), int(im["height"]))
            by_image[im["id"]] = []
    for k, a in enumerate(data["annotations"]):
        ann_id = a.get("id") if isinstance(a, dict) else None
        where = f"{ann_file}: annotation id {ann_id} (annotations[{k}])"
        with entry_errors(where):
            if a["image_id"] not in images:
                if a["image_id"] not in all_ids:
                    raise DataError(f"{where}: image_id {a['image_id']} is not in images")
                continue  # its image was skipped (missing)
            if a["category_id"] not in cats:
                check.bad("unknown_category", f"{where}: category_id {a['category_id']}")
                continue
            label = _map_label(cats[a["category_id"]], label_map, classes, f"{ann_file}")
            if label is None:
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            _, width, height = images[a["image_id"]]
            box = [x, y, x + w, y + h]
            if not check.box_ok(box, width, height, where):
                continue
            by_image[a["image_id"]].append((box, label, bool(a.get("iscrowd", 0))))
    records = []
    for image_id, (path, width, height) in images.items():
        anns = by_image[image_id]
        records.append(
            Record(
                path,
                width,
                height,
                np.array([b for b, _, _ in anns], np.float32).reshape(-1, 4),
                np.array([lab for _, lab, _ in anns], np.int64),
                source,
                iscrowd=np.array([c for _, _, c in anns], bool),
                image_id=int(image_id),
            )
        )
    return records


def load_cctsdb(
    ann_file: str | Path,
    image_dir: str | Path,
    label_map: dict[str, str | None],
    classes: list[str],
    source: int = 0,
    on_bad: str = "error",
) -> tuple[list[Record], LoadReport]:
    """CCTSDB's text format: one ``filename;x1;y1;x2;y2;class`` line per box."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: file not found")
    check = AnnotationChecker(ann_file.name, on_bad)
    per_image: dict[str, list] = {}
    sizes: dict[str, tuple[int, int] | None] = {}
    for lineno, line in enumerate(ann_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(";")
        where = f"{ann_file}:{lineno}"
        if len(parts) != 6:
            raise DataError(f"{where}: expected 'filename;x1;y1;x2;y2;class', got {line.strip()!r}")
        name, coords, cls = parts[0], parts[1:5], parts[5]
        try:
            box = [float(v) for v in coords]
        except ValueError:
            raise DataError(f"{where}: coordinates {coords} are not numbers") from None
        if name not in sizes:
            sizes[name] = _image_size(image_dir / name)
            if sizes[name] is None:
                check.bad("missing_image", f"{where}: image {image_dir / name}")
        if sizes[name] is None:
            continue
        per_image.setdefault(name, [])
        if cls not in label_map:
            check.bad("unknown_category", f"{where}: class {cls!r}")
            continue
        label = _map_label(cls, label_map, classes, where)
        if label is None or not check.box_ok(box, *sizes[name], where):
            continue
        per_image[name].append((box, label))
    records = [
        Record(
            image_dir / name,
            *sizes[name],
            np.array([b for b, _ in anns], np.float32).reshape(-1, 4),
            np.array([lab for _, lab in anns], np.int64),
            source,
            image_id=i,
        )
        for i, (name, anns) in enumerate(sorted(per_image.items()))
    ]
    check.report.log()
    return records, check.report


def load_voc(
    root: str | Path,
    image_set: str,
    label_map: dict[str, str | None],
    classes: list[str],
    source: int = 0,
    on_bad: str = "error",
) -> tuple[list[Record], LoadReport]:
    """Pascal VOC: ``root/ImageSets/Main/<image_set>.txt``, ``root/Annotations/<id>.xml``,
    ``root/JPEGImages/<id>.jpg``. Boxes become 0-based continuous xyxy (xmin - 1, ymin - 1,
    xmax, ymax); ``difficult`` is kept as a flag."""
    root = Path(root)
    ids_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    if not ids_file.is_file():
        raise DataError(f"{ids_file}: file not found")
    check = AnnotationChecker(f"VOC {image_set}", on_bad)
    records = []
    for i, image_id in enumerate(x.strip() for x in ids_file.read_text().splitlines() if x.strip()):
        xml_path = root / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(xml_path)
        except FileNotFoundError:
            raise DataError(f"{xml_path}: file not found") from None
        except ET.ParseError as exc:
            raise DataError(f"{xml_path}: malformed XML ({exc})") from None
        node = tree.getroot()
        image = root / "JPEGImages" / (node.findtext("filename") or f"{image_id}.jpg")
        if not image.is_file():
            check.bad("missing_image", f"{xml_path}: image {image}")
            continue
        with entry_errors(f"{xml_path}: size"):
            width, height = int(node.findtext("size/width")), int(node.findtext("size/height"))
        boxes, labels, difficult = [], [], []
        for k, obj in enumerate(node.findall("object")):
            where = f"{xml_path}: object {k}"
            name = obj.findtext("name", "").strip()
            if name not in label_map:
                check.bad("unknown_category", f"{where}: class {name!r}")
                continue
            label = _map_label(name, label_map, classes, where)
            with entry_errors(f"{where}: bndbox"):
                bb = obj.find("bndbox")
                box = [
                    float(bb.findtext("xmin")) - 1,
                    float(bb.findtext("ymin")) - 1,
                    float(bb.findtext("xmax")),
                    float(bb.findtext("ymax")),
                ]
            if label is None or not check.box_ok(box, width, height, where):
                continue
            boxes.append(box)
            labels.append(label)
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
        records.append(
            Record(
                image,
                width,
                height,
                np.array(boxes, np.float32).reshape(-1, 4),
                np.array(labels, np.int64),
                source,
                difficult=np.array(difficult, bool),
                image_id=i,
            )
        )
    check.report.log()
    return records, check.report


# --------------------------------------------------------------------------- joint data module

FORMATS = ("coco", "cctsdb", "voc")


def load_source(
    spec: dict,
    split: str,
    classes: list[str],
    source: int,
    on_bad: str,
    name: str,
    cache: Callable[[Path], ArrayCache | None] | None = None,
) -> tuple[RecordTable, LoadReport] | None:
    """Records of one source's split, or None when the source has no such split.

    ``spec``: ``format`` (coco | cctsdb | voc), ``root`` (folder the other paths are relative
    to), ``label_map`` ({source class name: unified class name or null}) and, per split,
    ``{annotations: <json or txt>, images: <folder>}`` (coco, cctsdb) or ``{image_set: <name>}``
    (voc: ``root`` is the VOCdevkit/VOC20xx folder)."""
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise ConfigError(f"data.sources.{name}.format={fmt!r}: expected one of {list(FORMATS)}")
    if not spec.get("label_map"):
        raise ConfigError(
            f"data.sources.{name}.label_map is missing: map each of its classes to one of "
            f"{classes} (or null)"
        )
    split_spec = spec.get(split)
    if not split_spec:
        return None
    root = Path(spec.get("root") or ".")
    label_map = dict(spec["label_map"])
    if fmt == "voc":
        if "image_set" not in split_spec:
            raise ConfigError(
                f"data.sources.{name}.{split}.image_set is missing (e.g. trainval, test)"
            )
        records, report = load_voc(
            root, split_spec["image_set"], label_map, classes, source, on_bad
        )
        return RecordTable.from_records(records), report
    for key in ("annotations", "images"):
        if key not in split_spec:
            raise ConfigError(f"data.sources.{name}.{split}.{key} is missing")
    ann_file, image_dir = root / split_spec["annotations"], root / split_spec["images"]
    if fmt == "coco":
        store = cache(ann_file) if cache is not None else None
        return load_coco(ann_file, image_dir, label_map, classes, source, on_bad, store)
    records, report = load_cctsdb(ann_file, image_dir, label_map, classes, source, on_bad)
    if not isinstance(records, RecordTable):
        records = RecordTable.from_records(records)
    return records, report


def decode_rgb(path: str | Path) -> torch.Tensor:
    """An image file as uint8 [3, H, W] (``torchvision.io.decode_image``: libjpeg-turbo for JPEG,
    libpng for PNG); a file that cannot be read or decoded is a DataError naming it."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(f"{path}: could not decode image ({str(exc).strip()[:200]})") from None


class DetectionDataset(Dataset):
    """Images as uint8 [3, H, W] (converted to float and normalised once, on the model's device,
    by the detector's transform) and torchvision-style targets: ``boxes`` (xyxy), ``labels``
    (1..C), ``source`` (row of the group table), ``image_id``, ``iscrowd``, ``ignore`` (crowd or
    VOC-difficult: not trained on, ignored when scoring).

    Training drops ignored boxes from the targets (as Detectron and py-faster-rcnn do) and
    augments through ``torchvision.transforms.v2`` with the boxes as ``tv_tensors.BoundingBoxes``
    (a horizontal flip with probability ``flip``). An image that cannot be decoded is an error
    naming the file, or with ``on_bad="skip"`` a warning, and the sample is left out of its batch
    (``detection_collate`` lists it, the model counts it)."""

    def __init__(
        self, records: RecordTable, train: bool = False, flip: float = 0.5, on_bad: str = "error"
    ):
        self.records, self.train, self.flip, self.on_bad = records, train, flip, on_bad
        self.transform = None
        if train and flip:
            from torchvision.transforms import v2

            self.transform = v2.RandomHorizontalFlip(p=flip)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        try:
            image = decode_rgb(r.image)
        except DataError as exc:
            if self.on_bad != "skip":
                raise
            log.warning("%s (data.on_bad=skip: left out)", exc)
            return None, {"file_name": str(r.image), "unreadable": str(exc)}
        if image.shape[1:] != (r.height, r.width):
            raise DataError(
                f"{r.image}: image is {image.shape[2]}x{image.shape[1]} but its annotation says "
                f"{r.width}x{r.height}"
            )
        boxes = torch.from_numpy(np.array(r.boxes, np.float32)).reshape(-1, 4)
        labels = torch.from_numpy(np.array(r.labels, np.int64))
        ignore = torch.from_numpy(r.iscrowd | r.difficult)
        if self.train:
            keep = ~ignore
            boxes, labels, ignore = boxes[keep], labels[keep], ignore[keep]
            if self.transform is not None:
                from torchvision import tv_tensors

                image, boxes = self.transform(
                    tv_tensors.Image(image),
                    tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(r.height, r.width)),
                )
                image, boxes = image.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor)
        target = {
            "boxes": boxes,
            "labels": labels,
            "source": torch.tensor(r.source),
            "image_id": torch.tensor(r.image_id),
            "iscrowd": ignore,
            "file_name": str(r.image),
        }
        return image, target


def detection_collate(batch):
    """Images of different sizes stay a list (Faster R-CNN batches them itself). The third
    element lists the files of samples left out (``on_bad=skip``: an image that could not be
    decoded)."""
    images, targets, unreadable = [], [], []
    for image, target in batch:
        if image is None:
            unreadable.append(target["file_name"])
        else:
            images.append(image)
            targets.append(target)
    return images, targets, unreadable


def aspect_ratio_groups(widths, heights, factor: int = 3) -> np.ndarray:
    """Each image's aspect-ratio bin, as torchvision's detection reference computes it
    (``--aspect-ratio-group-factor``): ``2 * factor + 1`` edges spaced evenly in log2 between
    1/2 and 2, so ``factor=3`` gives 8 groups."""
    bins = 2 ** np.linspace(-1, 1, 2 * factor + 1)
    ratios = np.asarray(widths, np.float64) / np.asarray(heights, np.float64)
    return np.searchsorted(bins, ratios, side="right")


class DetectionDataModule(SplitDataModule):
    """Several detection sources with their own label sets, trained jointly in one class space.

    ``classes``: the unified class names (ids 1..C; 0 is background). ``sources``: name ->
    source spec (see :func:`load_source`); the group table (one row per source, in the order
    given) is derived from the label maps, and every sample carries its source row. A source
    without a split (e.g. a dataset only used for training) contributes nothing to it.
    ``on_bad``: ``error`` (default) or ``skip`` (skip and count, logged per file and kept in
    ``load_reports``). ``demo`` (a writer such as
    ``zoo.data.demo.detection.write_demo_detection``, injected)
    first writes the offline two-source demo into ``data_dir``.
    """

    sample_unit = "images"

    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        classes: list[str],
        sources: dict[str, dict],
        data_dir: str | None = None,
        on_bad: str = "error",
        batch_size: int = 4,
        num_workers: int = 0,
        flip: float = 0.5,
        aspect_ratio_group_factor: int = 3,
        subset: int | None = None,
        cache: str = "beside",
        cache_verify: bool = True,
        demo: Callable[..., object] | None = None,
    ):
        super().__init__()
        self.cache, self.cache_verify = str(cache), bool(cache_verify)
        if not classes or len(set(classes)) != len(classes):
            raise ConfigError(
                f"data.classes={list(classes or [])}: give each unified class name once"
            )
        if not sources:
            raise ConfigError("data.sources is empty: list at least one detection source")
        if on_bad not in ("error", "skip"):
            raise ConfigError(f"data.on_bad={on_bad!r}: expected 'error' or 'skip'")
        self.classes = list(classes)
        self.sources = {str(k): dict(v) for k, v in sources.items()}
        self.data_dir = Path(data_dir) if data_dir else None
        self.on_bad, self.flip, self.subset, self.demo = on_bad, flip, subset, demo
        self.aspect_ratio_group_factor = int(aspect_ratio_group_factor)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.group_table = derive_group_table(
            [dict(s.get("label_map") or {}) for s in self.sources.values()], self.classes
        )
        self.datasets: dict[str, DetectionDataset] = {}
        self.load_reports: dict[str, list[LoadReport]] = {}

    @property
    def source_names(self) -> list[str]:
        return list(self.sources)

    def prepare_data(self) -> None:
        self.write_demo()

    def _cache(self, ann_file: Path) -> ArrayCache | None:
        """Where the parsed records of ``ann_file`` are kept (``data.cache``): ``beside`` it
        (``.zoo-cache/``), under ``zoo_cache`` (``$ZOO_CACHE_DIR/detection``), in a folder, or
        ``off``."""
        root = cache_folder(self.cache, Path(ann_file).parent, "detection")
        return None if root is None else ArrayCache(root, "data.cache", verify=self.cache_verify)

    def records(self, split: str) -> RecordTable:
        parts, reports = [], []
        for s, (name, spec) in enumerate(self.sources.items()):
            loaded = load_source(spec, split, self.classes, s, self.on_bad, name, self._cache)
            if loaded is None:
                continue
            recs, report = loaded
            report.source = f"{name}/{split}"
            reports.append(report)
            parts.append(recs[: int(self.subset)] if self.subset else recs)
        self.load_reports[split] = reports
        if not sum(len(p) for p in parts):
            raise ConfigError(
                f"no detection source has a '{split}' split (data.sources.<name>.{split})"
            )
        out = RecordTable.concat(parts)
        # keep the sources' own ids (e.g. COCO's, so logged results files match the original
        # annotations) unless they repeat between sources: then renumber
        if len(np.unique(out.image_id)) < len(out):
            out.image_id = np.arange(len(out), dtype=np.int64)
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.demo:  # single-process runs without prepare_data (e.g. evaluate.py)
            self.prepare_data()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(
            stage, ("train", "val", "test")
        )
        for split in wanted:
            if split not in self.datasets:
                self.datasets[split] = DetectionDataset(
                    self.records(split), train=split == "train", flip=self.flip, on_bad=self.on_bad
                )

    def preprocessing_spec(self) -> dict[str, Any]:
        """Raw images need no preprocessing besides decoding (the detector resizes and
        normalises them itself): the spec names the classes the boxes are labelled with."""
        return {"class_names": list(self.classes), "sources": self.source_names}

    def raw_example(self) -> np.ndarray:
        """The first test image, uint8 (H, W, 3)."""
        records = self.records("test")
        return decode_rgb(records[0].image).permute(1, 2, 0).numpy()

    def train_dataloader(self):
        """Shuffled, in aspect-ratio grouped batches (``data.aspect_ratio_group_factor``, as
        torchvision's reference; -1 turns grouping off)."""
        if self.aspect_ratio_group_factor < 0:
            return super().train_dataloader()
        dataset = self.datasets["train"]
        groups = aspect_ratio_groups(
            dataset.records.width, dataset.records.height, self.aspect_ratio_group_factor
        )
        sampler = ResumableRandomSampler(dataset)
        return self.resumable_loader(
            batch_sampler=GroupedBatchSampler(
                sampler, groups, self.batch_size, epoch=self.current_epoch()
            )
        )

    def dataset_files(self, split: str) -> list[Path]:
        """The annotation files of the sources that have ``split`` (image folders can hold
        a hundred thousand files; the annotations name them all)."""
        files = []
        for spec in self.sources.values():
            split_spec = spec.get(split) or {}
            root = Path(spec.get("root") or ".")
            if split_spec.get("annotations"):
                files.append(root / split_spec["annotations"])
            elif split_spec.get("image_set"):  # VOC: the image-set list
                files.append(root / "ImageSets" / "Main" / f"{split_spec['image_set']}.txt")
        return [f for f in files if f.is_file()]

    def skipped(self) -> dict[str, int]:
        """Skipped annotations per split and reason (the model emits them as ``data/skipped/...``
        counts)."""
        out: Counter = Counter()
        for split, reports in self.load_reports.items():
            for rep in reports:
                for reason, n in rep.skipped.items():
                    out[f"{split}/{reason}"] += n
        return dict(out)

    def summary(self) -> dict[str, str]:
        out = {
            "classes": ", ".join(self.classes),
            "group table": "; ".join(
                f"{n}: {row}" for n, row in zip(self.sources, self.group_table.tolist())
            ),
            "on_bad": self.on_bad,
        }
        for split, ds in self.datasets.items():
            per_source = Counter(self.source_names[int(k)] for k in ds.records.source)
            out[f"{split} images"] = (
                f"{len(ds)} ({', '.join(f'{k} {v}' for k, v in per_source.items())})"
            )
        skipped = self.skipped()
        out["skipped annotations"] = (
            ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
        )
        return out
