"""python -m zoo.kernels [build|info|cuda-check DIR]: build the kernel library ahead of first use
(e.g. in a Docker image) and show what is active."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import zoo.kernels as K
from zoo.kernels import _build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.kernels", description=__doc__)
    parser.add_argument(
        "command", nargs="?", default="build", choices=["build", "info", "cuda-check"]
    )
    parser.add_argument(
        "out_dir", nargs="?", default="build/cuda-check", help="object dir for cuda-check"
    )
    args = parser.parse_args(argv)
    if args.command == "cuda-check":
        start = time.perf_counter()
        objects = _build.compile_cuda_only(Path(args.out_dir))
        print(f"nvcc compiled {len(objects)} CUDA sources in {time.perf_counter() - start:.0f} s")
        return 0
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), CPU capability {_build.cpu_capability()}"
    )
    print(f"compiler flags: {' '.join(_build.cflags())}")
    print(f"CUDA sources: {'built' if _build.cuda_wanted() else 'skipped (no CUDA GPU)'}")
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


if __name__ == "__main__":
    raise SystemExit(main())
