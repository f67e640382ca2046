"""Builders for the offline demo datasets (written in the real datasets' on-disk formats).

Shared plumbing: a dataset is reused when its ``demo.json`` manifest equals the requested spec,
and a new one is written into a staging folder that is swapped in atomically, so concurrent
ranks or jobs never read a half-written dataset."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def manifest_matches(out_dir: Path, spec: dict, ignore: tuple[str, ...] = ()) -> bool:
    """Whether ``out_dir`` holds the dataset ``spec`` describes (``ignore``: manifest keys that
    only record where it was written)."""
    manifest = out_dir / "demo.json"
    if not manifest.is_file():
        return False
    written = {k: v for k, v in json.loads(manifest.read_text()).items() if k not in ignore}
    return written == spec


def staging_dir(out_dir: Path) -> Path:
    """An empty folder next to ``out_dir`` (same file system, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".demo-", dir=out_dir.parent))


def publish(tmp: Path, out_dir: Path, spec: dict) -> Path:
    """Write the manifest into ``tmp`` and swap it in as ``out_dir``."""
    (tmp / "demo.json").write_text(json.dumps(spec, indent=1))
    if out_dir.exists():
        old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
        out_dir.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process published the same spec first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
