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

import json
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from zoo.data.base import SplitDataModule
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


def derive_group_table(label_maps: list[dict[str, str | None]], classes: list[str]) -> torch.Tensor:
    """[S, C + 1] integer group ids: column 0 is background (group 0); class c (1-based in
    ``classes``) is group c for a source whose label map reaches it, else group 0."""
    table = torch.zeros(len(label_maps), len(classes) + 1, dtype=torch.long)
    index = {name: i + 1 for i, name in enumerate(classes)}
    for s, label_map in enumerate(label_maps):
        for src_name, unified in label_map.items():
            if unified is None:
                continue
            if unified not in index:
                raise ConfigError(
                    f"label map of source {s}: {src_name!r} -> {unified!r}, which is not one of "
                    f"the classes {classes}"
                )
            table[s, index[unified]] = index[unified]
    return table


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


@contextmanager
def entry_errors(where: str):
    """A missing key or a wrong type in one annotation entry becomes an error naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = (
            f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        )
        raise DataError(f"{where}: malformed entry ({detail})") from None


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


def load_coco(
    ann_file: str | Path,
    image_dir: str | Path,
    label_map: dict[str, str | None],
    classes: list[str],
    source: int = 0,
    on_bad: str = "error",
) -> tuple[list[Record], LoadReport]:
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    try:
        data = json.loads(ann_file.read_text())
    except FileNotFoundError:
        raise DataError(f"{ann_file}: file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{ann_file}: malformed JSON ({exc})") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise DataError(f"{ann_file}: not COCO JSON (needs images, annotations, categories)")
    check = AnnotationChecker(ann_file.name, on_bad)
    cats = {}
    for k, c in enumerate(data["categories"]):
        with entry_errors(f"{ann_file}: categories[{k}]"):
            cats[c["id"]] = c["name"]
    images, by_image, all_ids = {}, {}, set()
    for k, im in enumerate(data["images"]):
        with entry_errors(f"{ann_file}: images[{k}]"):
            all_ids.add(im["id"])
            path = image_dir / im["file_name"]
            if not path.is_file():
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
    check.report.log()
    return records, check.report


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
    spec: dict, split: str, classes: list[str], source: int, on_bad: str, name: str
) -> tuple[list[Record], LoadReport] | None:
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
        return load_voc(root, split_spec["image_set"], label_map, classes, source, on_bad)
    for key in ("annotations", "images"):
        if key not in split_spec:
            raise ConfigError(f"data.sources.{name}.{split}.{key} is missing")
    loader = load_coco if fmt == "coco" else load_cctsdb
    return loader(
        root / split_spec["annotations"],
        root / split_spec["images"],
        label_map,
        classes,
        source,
        on_bad,
    )


class DetectionDataset(Dataset):
    """Images as float [3, H, W] in [0, 1] and torchvision-style targets: ``boxes`` (xyxy),
    ``labels`` (1..C), ``source`` (row of the group table), ``image_id``, ``iscrowd``,
    ``ignore`` (crowd or VOC-difficult: not trained on, ignored when scoring).

    Training drops ignored boxes from the targets (as Detectron and py-faster-rcnn do) and flips
    horizontally with probability ``flip``."""

    def __init__(self, records: list[Record], train: bool = False, flip: float = 0.5):
        self.records, self.train, self.flip = records, train, flip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        try:
            with Image.open(r.image) as im:
                image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{r.image}: could not decode image ({exc})") from None
        image = image.float().div_(255)
        if image.shape[1:] != (r.height, r.width):
            raise DataError(
                f"{r.image}: image is {image.shape[2]}x{image.shape[1]} but its annotation says "
                f"{r.width}x{r.height}"
            )
        boxes = torch.from_numpy(r.boxes).float().reshape(-1, 4)
        labels = torch.from_numpy(r.labels).long()
        ignore = torch.from_numpy(r.iscrowd | r.difficult)
        if self.train:
            keep = ~ignore
            boxes, labels, ignore = boxes[keep], labels[keep], ignore[keep]
            if self.flip and torch.rand(()) < self.flip:
                image = image.flip(-1)
                boxes = torch.stack(
                    [r.width - boxes[:, 2], boxes[:, 1], r.width - boxes[:, 0], boxes[:, 3]], 1
                )
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
    """Images of different sizes stay a list (Faster R-CNN batches them itself)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


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
        subset: int | None = None,
        demo: Callable[..., object] | None = None,
    ):
        super().__init__()
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

    def records(self, split: str) -> list[Record]:
        out, reports = [], []
        for s, (name, spec) in enumerate(self.sources.items()):
            loaded = load_source(spec, split, self.classes, s, self.on_bad, name)
            if loaded is None:
                continue
            recs, report = loaded
            report.source = f"{name}/{split}"
            reports.append(report)
            out.extend(recs[: int(self.subset)] if self.subset else recs)
        self.load_reports[split] = reports
        if not out:
            raise ConfigError(
                f"no detection source has a '{split}' split (data.sources.<name>.{split})"
            )
        # keep the sources' own ids (e.g. COCO's, so logged results files match the original
        # annotations) unless they repeat between sources: then renumber
        if len({r.image_id for r in out}) < len(out):
            for i, r in enumerate(out):
                r.image_id = i
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
                    self.records(split), train=split == "train", flip=self.flip
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
            per_source = Counter(self.source_names[r.source] for r in ds.records)
            out[f"{split} images"] = (
                f"{len(ds)} ({', '.join(f'{k} {v}' for k, v in per_source.items())})"
            )
        skipped = self.skipped()
        out["skipped annotations"] = (
            ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
        )
        return out
