"""Compiled kernels for the models' compute-heavy layers, with a pure-PyTorch reference.

Public ops: one function per registered op (``zoo.kernels.ops``, one module each; see
``zoo.kernels.spec``), e.g. ``group_softmax_cross_entropy``, ``gumbel_softmax``,
``gumbel_sigmoid``, ``masked_attention``, ``soft_masked_attention``. Every implementation shares
the op's argument checking and semantics; ``ops()`` lists them.

Implementations: C++ for CPU tensors (``csrc/cpu``, built on first use), Triton for CUDA tensors
(``zoo.kernels.triton``; Triton ships with torch's CUDA builds, no nvcc needed), and the
pure-PyTorch ``reference`` (the oracle and the fallback). ``zoo.kernels.triton.<op>`` calls the
Triton kernels directly (on CPU tensors under ``TRITON_INTERPRET=1``).

Backend: ``auto`` (default; compiled, or the reference with one warning if the build fails),
``compiled`` (a build failure is an error) or ``reference``. Choose it with
``set_backend(name)``, the Hydra key ``kernels.backend`` or ``ZOO_KERNELS_BACKEND``;
``backend()`` says which one is active (building the library on first call if needed).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from zoo.kernels import _ops, _tiles, reference  # noqa: F401  (K._tiles, K.reference)
from zoo.kernels._build import KernelBuildError
from zoo.kernels.ops import REGISTRY
from zoo.kernels.spec import KernelFallbackWarning

BACKENDS = ("auto", "compiled", "reference")
ENV_VAR = "ZOO_KERNELS_BACKEND"


class _State:
    def __init__(self) -> None:
        self.requested: str | None = None  # set_backend(); None = environment / auto
        self.loaded: bool | None = None  # None = not tried yet
        self.error: KernelBuildError | None = None
        self.devices: set[str] = set()
        self.warned = False
        self.used = False  # an op has been called in this process
        self.lock = threading.Lock()


_state = _State()


def _validate(name: str, source: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(
            f"{source}: unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}"
        )
    return name


def requested_backend() -> str:
    if _state.requested is not None:
        return _state.requested
    return _validate(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def set_backend(name: str) -> None:
    """Select ``auto``, ``compiled`` or ``reference`` for this process."""
    _state.requested = _validate(name, "kernels.backend")


def _load() -> bool:
    """Build/load the C++ library (CPU) and register the Triton kernels (CUDA, where Triton and a
    GPU are present); True if the C++ library loaded."""
    if _state.loaded is not None:  # no lock once loaded: torch.compile traces this path
        return _state.loaded
    with _state.lock:
        if _state.loaded is None:
            from zoo.kernels import _build

            _ops.define("zoo")
            try:
                _build.load_library()
                _state.loaded = True
                _state.devices.add("cpu")
            except KernelBuildError as exc:
                _state.loaded, _state.error = False, exc
            if _triton_for_cuda():
                _ops.register_triton("zoo", ("CUDA",))
                _state.devices.add("cuda")
            elif torch.cuda.is_available():
                warnings.warn(
                    "zoo kernels: Triton is not installed, so CUDA tensors use the PyTorch "
                    "reference implementation (torch's CUDA wheels ship Triton)",
                    KernelFallbackWarning,
                    stacklevel=3,
                )
        return _state.loaded


def _triton_for_cuda() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_triton_ops_ready = False


def _triton_ops():
    """torch.ops.zoo_triton: the Triton kernels on every device (CPU needs TRITON_INTERPRET=1)."""
    global _triton_ops_ready
    if not _triton_ops_ready and not torch.compiler.is_compiling():
        with _state.lock:
            _ops.register_triton("zoo_triton", ("CPU", "CUDA"))
            _triton_ops_ready = True
    return torch.ops.zoo_triton


def backend() -> str:
    """The active backend, ``"compiled"`` or ``"reference"`` (builds the library if needed)."""
    requested = requested_backend()
    if requested == "reference":
        return "reference"
    if _load():
        return "compiled"
    if requested == "compiled":
        raise KernelBuildError(f"kernels.backend=compiled but {_state.error}")
    if not _state.warned:
        _state.warned = True
        warnings.warn(
            f"zoo kernels: falling back to the PyTorch reference implementation: {_state.error}",
            KernelFallbackWarning,
            stacklevel=3,
        )
    return "reference"


def used_backend() -> str | None:
    """The backend the ops called so far ran on, or None if no op has been called."""
    return backend() if _state.used else None


class _Backend:
    """The backend's choice (``zoo.kernels.<op>``): the compiled kernels for the tensors'
    device when they are loaded and the backend allows, else the reference."""

    direct = False

    def ops(self, *tensors: torch.Tensor):
        _state.used = True
        if requested_backend() == "reference":
            return None
        device = tensors[0].device.type
        if device == "cpu" and backend() != "compiled":
            return None
        _load()
        same = all(t.device.type == device for t in tensors)
        return torch.ops.zoo if same and device in _state.devices else None


class _Triton:
    """The Triton kernels on any device (``zoo.kernels.triton.<op>``; CPU tensors need
    TRITON_INTERPRET=1)."""

    direct = True

    def ops(self, *tensors: torch.Tensor):
        _state.used = True
        return _triton_ops()


class _Reference:
    """The pure-PyTorch reference on any device (the oracle the tests and benchmarks compare
    every implementation with)."""

    direct = True

    def ops(self, *tensors: torch.Tensor):
        return None


BACKEND, TRITON, REFERENCE = _Backend(), _Triton(), _Reference()


@contextmanager
def backend_as(name: str) -> Iterator[None]:
    """``set_backend(name)`` while the block runs, then what was chosen before."""
    before = _state.requested
    set_backend(name)
    try:
        yield
    finally:
        _state.requested = before


def ops() -> list[str]:
    """The names of the public ops."""
    return REGISTRY.names()


for _spec in REGISTRY:
    globals()[_spec.name] = _spec.bind(BACKEND)

__all__ = [
    "BACKENDS",
    "KernelBuildError",
    "KernelFallbackWarning",
    "backend",
    "ops",
    "set_backend",
    "used_backend",
    *REGISTRY.names(),
]
