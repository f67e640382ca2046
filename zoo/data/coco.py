"""Reading COCO JSON: the one reader of annotation and results files, for training data
(``zoo.data.detection``) and scoring (``zoo.metrics.coco_files``) alike.

Files are parsed with orjson (several times faster than the standard library on COCO's
hundreds of megabytes); a malformed file is one error naming the file and the position.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any

import msgspec
import orjson

from zoo.errors import DataError

COCO_KEYS = ("images", "annotations", "categories")


@contextlib.contextmanager
def no_gc_pauses():
    """The cyclic garbage collector paused: parsing COCO creates millions of small objects,
    and the collections they trigger double the time while finding nothing to free."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_bytes(path: str | Path, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None


def read_json(path: str | Path, what: str | None = None) -> Any:
    """The parsed JSON of ``path``; ``what`` names the setting it came from in errors
    (``annotations=<path>``), else the path alone."""
    name = f"{what}={path}" if what else str(path)
    raw = _read_bytes(path, name)
    try:
        with no_gc_pauses():
            return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DataError(
            f"{name}: malformed JSON ({exc.msg}: line {exc.lineno} column {exc.colno}, "
            f"char {exc.pos})"
        ) from None


def read_coco(path: str | Path, what: str | None = None) -> dict:
    """A COCO ground-truth file: a dict with images, annotations and categories."""
    data = read_json(path, what)
    if not isinstance(data, dict) or not set(COCO_KEYS) <= set(data):
        name = f"{what}={path}" if what else str(path)
        raise DataError(f"{name}: not COCO JSON (needs images, annotations, categories)")
    return data


class _Image(msgspec.Struct):
    id: int
    file_name: str
    width: int
    height: int


class _Annotation(msgspec.Struct):
    image_id: int
    category_id: int
    bbox: list[float]
    iscrowd: int | bool = 0


class _Category(msgspec.Struct):
    id: int
    name: str


class CocoBoxes(msgspec.Struct):
    """What training reads of a COCO file: images, boxes, categories. Every other field
    (segmentations, areas, licences) is skipped by the decoder without being built."""

    images: list[_Image]
    annotations: list[_Annotation]
    categories: list[_Category]


def read_coco_boxes(path: str | Path) -> CocoBoxes | None:
    """The typed, fast decode of a COCO file (msgspec), or None when the file does not fit it
    (a missing key, a string id, malformed JSON): then ``read_coco`` and the entry-by-entry
    checks name what is wrong."""
    raw = _read_bytes(path, str(path))
    try:
        with no_gc_pauses():
            return msgspec.json.decode(raw, type=CocoBoxes)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


class FolderListing:
    """Which files exist under a folder, from one listing per subfolder instead of a stat per
    file (an image folder holds 118k files; on a network filesystem a stat each is minutes)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._names: dict[str, set[str]] = {}

    def _listing(self, folder: str) -> set[str]:
        if folder not in self._names:
            try:
                with os.scandir(self.root / folder) as it:
                    self._names[folder] = {e.name for e in it if not e.is_dir()}
            except (FileNotFoundError, NotADirectoryError):
                self._names[folder] = set()
        return self._names[folder]

    def __contains__(self, relative: str) -> bool:
        folder, _, name = str(relative).rpartition("/")
        return name in self._listing(folder)
