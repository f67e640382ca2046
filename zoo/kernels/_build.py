"""Build and load the compiled kernel library.

The C++ sources in ``csrc/`` (the CPU kernels; CUDA tensors run on the Triton kernels in
``zoo.kernels.triton``, which need no compiler of ours) are compiled on first use with
``torch.utils.cpp_extension.load`` (ninja) into a per-user cache and loaded as the CPU
implementation of the ``torch.ops.zoo.*`` ops. The cache key hashes the sources, the
compiler flags and the torch/Python versions, so editing a source or upgrading torch
rebuilds, and several torch installs can share one cache. Concurrent first uses (DDP ranks,
parallel tests) are serialised by cpp_extension's lock file in the build directory.

Environment:
  ZOO_KERNELS_CACHE        cache root (default: $XDG_CACHE_HOME/zoo/kernels or ~/.cache/zoo/kernels)
  ZOO_KERNELS_EXTRA_CFLAGS extra C++ compiler flags (e.g. for debugging)
  ZOO_KERNELS_VERBOSE=1    show the compiler output
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"

# what ATen itself compiles each capability's kernels with; never -march=native, so a cached
# build runs on every machine torch itself picks that capability on
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
}


class KernelBuildError(RuntimeError):
    """The compiled kernels could not be built or loaded."""


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def cpu_flags() -> list[str]:
    cap = cpu_capability()
    flags = _CAPABILITY_FLAGS.get(cap)
    if flags is None:  # DEFAULT (and non-x86 capabilities): portable at::vec code
        return ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    return [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}", *flags]


def cflags() -> list[str]:
    extra = shlex.split(os.environ.get("ZOO_KERNELS_EXTRA_CFLAGS", ""))
    return ["-O3", "-fopenmp", "-DNDEBUG", *cpu_flags(), *extra]


def sources() -> list[Path]:
    """ops.cpp and every registered op's C++ file (``OpSpec.cpu_source``)."""
    from zoo.kernels.ops import REGISTRY

    own = dict.fromkeys(spec.cpu_source for spec in REGISTRY)  # in order, once each
    return [CSRC / "ops.cpp", *(CSRC / name for name in own)]


def build_key() -> str:
    h = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(CSRC)).encode())
            h.update(path.read_bytes())
    for part in (
        torch.__version__,
        sys.version,
        sysconfig.get_platform(),
        " ".join(cflags()),
    ):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    if os.environ.get("ZOO_KERNELS_CACHE"):
        return Path(os.environ["ZOO_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zoo" / "kernels"


def _ninja_on_path() -> None:
    """cpp_extension calls `ninja`; a pip-installed ninja lives next to the interpreter, which
    is not on PATH when the venv is not activated."""
    bindir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and (Path(bindir) / "ninja").exists():
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def load_library() -> Path:
    """Build (if needed) and load the op library; returns the build directory.

    Raises KernelBuildError with the tail of the compiler output on failure."""
    from torch.utils import cpp_extension

    key = build_key()
    name = f"zoo_kernels_{key}"
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    _ninja_on_path()
    verbose = os.environ.get("ZOO_KERNELS_VERBOSE", "") not in ("", "0")
    try:
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources()],
            extra_cflags=cflags(),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            with_cuda=False,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError
        detail = str(exc).strip().splitlines()
        tail = "\n".join(detail[-15:])
        raise KernelBuildError(
            f"building the zoo kernels in {build_dir} failed ({type(exc).__name__}):\n{tail}"
        ) from exc
    return build_dir
