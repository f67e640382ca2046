"""Reading COCO JSON: the one reader of annotation and results files, for training data
(``zoo.data.detection``) and scoring (``zoo.metrics.detection``) alike.

Files are parsed with orjson (several times faster than the standard library on COCO's
hundreds of megabytes); a malformed file is one error naming the file and the position.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any

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


def read_json(path: str | Path, what: str | None = None) -> Any:
    """The parsed JSON of ``path``; ``what`` names the setting it came from in errors
    (``annotations=<path>``), else the path alone."""
    name = f"{what}={path}" if what else str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
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
