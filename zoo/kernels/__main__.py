"""python -m zoo.kernels [build|info]: build the CPU kernel library ahead of first use (e.g. in a
Docker image) and show what is active."""

from __future__ import annotations

import argparse
import sys
import time

import torch

import zoo.kernels as K
from zoo.kernels import _build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.kernels", description=__doc__)
    parser.add_argument("command", nargs="?", default="build", choices=["build", "info"])
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), CPU capability "
        f"{_build.cpu_capability()}"
    )
    print(f"compiler flags: {' '.join(_build.cflags())}")
    print(f"CUDA tensors: {_triton_status()}")
    print(f"cache: {_build.cache_root()}")
    if args.command == "build":
        K.set_backend("compiled")
        start = time.perf_counter()
        try:
            K.backend()
        except K.KernelBuildError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"compiled kernels ready ({time.perf_counter() - start:.1f} s)")
    else:
        print(f"requested backend: {K.requested_backend()}")
    return 0


def _triton_status() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import triton
    except ImportError:
        return "Triton not installed: the PyTorch reference is used"
    return f"Triton {triton.__version__} kernels"


if __name__ == "__main__":
    raise SystemExit(main())
