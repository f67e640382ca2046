"""A disk cache of preprocessed arrays, read back by memory map.

Each entry is one ``.npy`` file plus a ``.json`` record, named ``<name>-<digest>``, where the
digest covers everything the array depends on (the source file's fingerprint, every
preprocessing option, the code's format version). The record is written last and carries the
array's shape, dtype, size and CRC-32, so a reader trusts an entry only when all of them match:
a truncated or corrupt file is detected, reported, and rebuilt.

Concurrent jobs (the folds of a study run in parallel) share a cache safely: the builder of an
entry holds an exclusive ``flock`` on ``<name>-<digest>.lock`` while it works, and writes to a
temporary file renamed into place, so the others wait, then reuse what it wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import DataError

log = logging.getLogger(__name__)

_CRC_CHUNK = 1 << 24  # bytes per crc32 call


def zoo_cache_dir() -> Path:
    """``$ZOO_CACHE_DIR``, by default ``~/.cache/zoo``."""
    return Path(os.environ.get("ZOO_CACHE_DIR") or Path.home() / ".cache" / "zoo")


def cache_folder(setting: str, beside: str | Path, family: str) -> Path | None:
    """Where a data module keeps its cache, from ``data.cache``: ``beside`` its source
    (``<beside>/.zoo-cache``), ``zoo_cache`` (``$ZOO_CACHE_DIR/<family>``), any other value a
    folder, or ``off`` (None: no cache)."""
    if setting == "off":
        return None
    if setting == "beside":
        return Path(beside) / ".zoo-cache"
    if setting == "zoo_cache":
        return zoo_cache_dir() / family
    return Path(setting).expanduser()


def digest(key: Any) -> str:
    """A stable hex digest of a JSON-serialisable key."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a source file's content cheaply: its name, size and mtime."""
    st = Path(path).stat()
    return {"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def crc32(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes, streamed in chunks (a memory map is read page by page)."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, flat.size, _CRC_CHUNK):
        crc = zlib.crc32(flat[start : start + _CRC_CHUNK], crc)
    return crc


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) while the block runs: processes
    that take it wait their turn. The kernel releases it if the holder dies."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ArrayCache:
    """Preprocessed arrays under ``root``; ``config_key`` names the setting that chose the folder
    (errors tell the user which key to change)."""

    def __init__(self, root: str | Path, config_key: str, verify: bool = True):
        self.root = Path(root)
        self.config_key = config_key
        self.verify = verify
        self.hits = 0
        self.misses = 0

    def _writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise DataError(
                f"the cache folder {self.root} cannot be written ({exc.strerror or exc}). "
                f"Point {self.config_key} at a writable folder ({self.config_key}=zoo_cache uses "
                f"$ZOO_CACHE_DIR, now {zoo_cache_dir()}), or set {self.config_key}=off to "
                "preprocess in memory on every job."
            ) from None

    def _locked(self, stem: str):
        return file_lock(self.root / f"{stem}.lock")

    def _file(self, stem: str, field: str) -> Path:
        return self.root / (f"{stem}.npy" if field == "" else f"{stem}.{field}.npy")

    def _read(self, stem: str, key_digest: str) -> tuple[dict[str, np.ndarray], dict] | None:
        """The entry's arrays, or None when it is absent; a damaged entry is reported and
        removed."""
        record = self.root / f"{stem}.json"
        if not record.is_file():
            return None
        problem, meta = None, {}
        try:
            meta = json.loads(record.read_text())
            if meta.get("digest") != key_digest:
                raise ValueError("its record belongs to another key")
            arrays = {}
            for field, info in meta["arrays"].items():
                npy = self._file(stem, field)
                if not npy.is_file():
                    raise ValueError(f"{npy.name} is missing")
                if npy.stat().st_size != info["file_size"]:
                    raise ValueError(
                        f"{npy.name}: {npy.stat().st_size} bytes on disk, {info['file_size']} "
                        "written"
                    )
                array = np.load(npy, mmap_mode="r", allow_pickle=False)
                if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
                    raise ValueError(f"{npy.name} holds {array.dtype}{list(array.shape)}")
                if self.verify and crc32(array) != info["crc32"]:
                    raise ValueError(
                        f"{npy.name}: its checksum does not match (changed or damaged)"
                    )
                arrays[field] = array
            return arrays, meta.get("extra", {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problem = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        log.warning("Cache entry %s is damaged (%s): rebuilding it.", self._file(stem, ""), problem)
        record.unlink(missing_ok=True)
        for field in (meta.get("arrays") or {}) if isinstance(meta, dict) else ():
            self._file(stem, field).unlink(missing_ok=True)
        self._file(stem, "").unlink(missing_ok=True)
        return None

    def load_or_build(
        self, name: str, key: dict[str, Any], build: Callable[[], tuple[np.ndarray, dict]]
    ) -> tuple[np.ndarray, dict]:
        """The cached array for ``key`` as a read-only memory map, with the JSON-able ``extra``
        that ``build`` returned beside it; ``build()`` runs (once, across processes) on a miss."""

        def build_one():
            array, extra = build()
            return {"": array}, extra

        arrays, extra = self.load_or_build_arrays(name, key, build_one)
        return arrays[""], extra

    def load_or_build_arrays(
        self,
        name: str,
        key: dict[str, Any],
        build: Callable[[], tuple[dict[str, np.ndarray], dict]],
    ) -> tuple[dict[str, np.ndarray], dict]:
        """Several arrays in one entry (one lock, one record): e.g. a table's columns."""
        self._writable()
        key_digest = digest(key)
        stem = f"{name}-{key_digest[:16]}"
        entry = self._read(stem, key_digest)
        if entry is None:
            with self._locked(stem):
                entry = self._read(stem, key_digest)  # built by another job while we waited?
                if entry is None:
                    arrays, extra = build()
                    self._write(stem, key_digest, key, arrays, extra)
                    self.misses += 1
                    mapped = {
                        f: np.load(self._file(stem, f), mmap_mode="r", allow_pickle=False)
                        for f in arrays
                    }
                    return mapped, extra
        self.hits += 1
        return entry

    def _write(self, stem: str, key_digest: str, key: dict, arrays: dict, extra: dict):
        record = self.root / f"{stem}.json"
        written = []
        try:
            info = {}
            for field, array in arrays.items():
                array = np.ascontiguousarray(array)
                npy = self._file(stem, field)
                tmp = self.root / f".{npy.name}.{os.getpid()}.tmp"
                written.append(tmp)
                with open(tmp, "wb") as fh:
                    # no fsync: an entry cut short by a crash fails its size or CRC check on
                    # the next read and is rebuilt, so durability costs nothing here
                    np.save(fh, array, allow_pickle=False)
                info[field] = {
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                    "file_size": tmp.stat().st_size,
                    "crc32": crc32(array),
                }
                tmp.replace(npy)
            meta = {"digest": key_digest, "key": key, "arrays": info, "extra": extra}
            tmp_record = record.with_name(f".{record.name}.{os.getpid()}.tmp")
            tmp_record.write_text(json.dumps(meta, indent=1))
            tmp_record.replace(record)  # the record is the commit: written last
        except OSError as exc:
            for tmp in written:
                tmp.unlink(missing_ok=True)
            raise DataError(
                f"could not write the cache entry {self._file(stem, '')} ({exc.strerror or exc}); "
                f"set {self.config_key} to a folder with space, or {self.config_key}=off"
            ) from None
