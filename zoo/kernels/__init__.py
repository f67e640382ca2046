"""Compiled kernels for the models' compute-heavy layers, with a pure-PyTorch reference.

Public ops (both backends share argument checking and semantics):

- ``group_softmax_cross_entropy(logits, target, group_table, row_group, ignore_index, reduction)``
- ``gumbel_softmax(logits, tau, hard, dim, generator)`` /
  ``gumbel_sigmoid(logits, tau, hard, generator)``
- ``masked_attention(q, k, v, keep_mask, scale)``
- ``soft_masked_attention(q, k, v, mask, scale, keep_mask)``

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

import math
import os
import threading
import warnings

import torch

from zoo.kernels import _ops, _tiles, reference
from zoo.kernels._build import KernelBuildError

__all__ = [
    "BACKENDS",
    "KernelBuildError",
    "KernelFallbackWarning",
    "backend",
    "group_softmax_cross_entropy",
    "gumbel_sigmoid",
    "gumbel_softmax",
    "masked_attention",
    "set_backend",
    "soft_masked_attention",
    "used_backend",
]

BACKENDS = ("auto", "compiled", "reference")
ENV_VAR = "ZOO_KERNELS_BACKEND"


class KernelFallbackWarning(UserWarning):
    """The compiled kernels could not be built; the reference implementation is used."""


class _State:
    def __init__(self) -> None:
        self.requested: str | None = None  # set_backend(); None = environment / auto
        self.loaded: bool | None = None  # None = not tried yet
        self.error: KernelBuildError | None = None
        self.devices: set[str] = set()
        self.warned = False
        self.head_dim_warned = False
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


def _compiled(*tensors: torch.Tensor) -> bool:
    _state.used = True
    if requested_backend() == "reference":
        return False
    device = tensors[0].device.type
    if device == "cpu" and backend() != "compiled":
        return False
    _load()
    return all(t.device.type == device for t in tensors) and device in _state.devices


def _ops_for(impl: str | None, *tensors: torch.Tensor):
    """The op namespace serving these tensors, or None for the reference."""
    if impl == "triton":
        _state.used = True
        return _triton_ops()
    if impl is not None:
        raise ValueError(f"unknown implementation {impl!r}")
    return torch.ops.zoo if _compiled(*tensors) else None


def _checking() -> bool:
    """Value checks need the data (a sync on GPU); skipped while torch.compile traces."""
    return not torch.compiler.is_compiling()


# --------------------------------------------------------------------------- GroupSoftmax CE


def group_softmax_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group_table: torch.Tensor,
    row_group: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    _impl: str | None = None,
) -> torch.Tensor:
    """Cross-entropy where classes merged into one group (per label source) share probability.

    logits [N, C]; target [N] class ids; group_table [G, C] integer group id of each class for
    each of G label sources; row_group [N] the source (row of group_table) of each sample.
    Loss of row n = -log sum_{c: T[r,c] = T[r,y]} softmax(z_n)_c with r = row_group[n],
    y = target[n]. Rows with target == ignore_index give zero loss and gradient; "mean" divides
    by the number of other rows (and returns 0, not NaN, when every row is ignored). With groups
    of size 1 this equals ``F.cross_entropy``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating [N, C] tensor, got {tuple(logits.shape)} {logits.dtype}"
        )
    n, c = logits.shape
    for name, t, shape in (("target", target, (n,)), ("row_group", row_group, (n,))):
        if t.shape != shape or t.is_floating_point():
            raise ValueError(
                f"{name} must be an integer tensor of shape {shape}, got {tuple(t.shape)} {t.dtype}"
            )
    if group_table.dim() != 2 or group_table.shape[1] != c or group_table.is_floating_point():
        raise ValueError(
            f"group_table must be an integer [G, C={c}] tensor, got {tuple(group_table.shape)} "
            f"{group_table.dtype}"
        )
    for name, t in (("target", target), ("group_table", group_table), ("row_group", row_group)):
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    if _checking() and n:
        _check_range("target", target, 0, c, ignore_index)
        _check_range("row_group", row_group, 0, group_table.shape[0])
    ops = _ops_for(_impl, logits)
    if ops is None:
        return reference.group_softmax_cross_entropy(
            logits, target, group_table, row_group, ignore_index, reduction
        )
    loss, _, _ = ops.group_softmax_ce(logits, target, group_table, row_group, ignore_index)
    return reference._reduce(loss, target != ignore_index, reduction).to(logits.dtype)


def _check_range(name: str, t: torch.Tensor, lo: int, hi: int, ignore: int | None = None) -> None:
    values = t[t != ignore] if ignore is not None else t
    if values.numel() == 0:
        return
    bad = (values < lo) | (values >= hi)
    if bool(bad.any()):
        first = int(values[bad][0])
        raise ValueError(f"{name} has value {first} outside [{lo}, {hi})")


# --------------------------------------------------------------------------- Gumbel


def _check_tau(tau: float) -> float:
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a positive number, got {tau!r}") from None
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a positive finite number, got {tau}")
    return tau


def _draw_seed(generator: torch.Generator | None) -> int:
    """One 62-bit seed per call from the generator (the default CPU generator if None, so
    torch.manual_seed makes runs reproducible); the kernels derive every element's noise from
    it with a counter-based generator."""
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    generator: torch.Generator | None = None,
    _impl: str | None = None,
) -> torch.Tensor:
    """Sample from the Gumbel-Softmax distribution (as ``F.gumbel_softmax``): softmax((logits +
    g) / tau) with g ~ Gumbel(0, 1); ``hard=True`` returns exact one-hot vectors whose gradient is
    the soft sample's (straight-through). Uniform draws lie in [2^-24, 1 - 2^-24], so the result
    is never NaN or inf."""
    tau = _check_tau(tau)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension")
    dim = dim % logits.dim() if -logits.dim() <= dim < logits.dim() else _bad_dim(dim, logits)
    seed = _draw_seed(generator)
    ops = _ops_for(_impl, logits)
    if ops is None:
        return reference.gumbel_softmax(logits, tau, bool(hard), dim, seed)
    x = logits.movedim(dim, -1)
    out, soft = ops.gumbel_softmax(x, tau, bool(hard), seed)
    return (out if hard else soft).movedim(-1, dim)


def gumbel_sigmoid(
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    generator: torch.Generator | None = None,
    _impl: str | None = None,
) -> torch.Tensor:
    """Binary Gumbel-Softmax (the two-class case): sigmoid((logits + l) / tau) with
    l ~ Logistic(0, 1); ``hard=True`` returns exact 0/1 masks with the soft gradient."""
    tau = _check_tau(tau)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    seed = _draw_seed(generator)
    ops = _ops_for(_impl, logits)
    if ops is None:
        return reference.gumbel_sigmoid(logits, tau, bool(hard), seed)
    out, soft = ops.gumbel_sigmoid(logits, tau, bool(hard), seed)
    return out if hard else soft


def _bad_dim(dim: int, t: torch.Tensor) -> int:
    raise ValueError(f"dim {dim} is out of range for a tensor of {t.dim()} dimensions")


# --------------------------------------------------------------------------- attention


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape[:3] != (b, h, lk):
        raise ValueError(
            f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need k [B, H, Lk, D] and v [B, H, Lk, Dv])"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    return b, h, lq, lk


def _check_mask(
    name: str, mask: torch.Tensor, full: tuple[int, ...], q: torch.Tensor
) -> torch.Tensor:
    if mask.device != q.device:
        raise ValueError(f"{name} is on {mask.device}, q, k, v on {q.device}")
    try:
        if torch.broadcast_shapes(mask.shape, full) != full:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to [B, H, Lq, Lk] = "
            f"{list(full)}"
        ) from None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _check_keep(keep_mask: torch.Tensor | None, full, q) -> torch.Tensor | None:
    if keep_mask is None:
        return None
    if keep_mask.dtype != torch.bool:
        raise ValueError(
            f"keep_mask must be a bool tensor (True = may attend), got {keep_mask.dtype}"
        )
    return _check_mask("keep_mask", keep_mask, full, q)


def _head_dim_ok(q: torch.Tensor, v: torch.Tensor, impl: str | None) -> bool:
    """CUDA tensors run on Triton, which holds a head in one tile: larger head dims fall back to
    the reference with one warning (zoo.kernels.triton itself raises a clear error)."""
    if impl is not None or q.device.type != "cuda":
        return True
    from zoo.kernels.triton import MAX_HEAD_DIM

    if max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM:
        return True
    if not _state.head_dim_warned:
        _state.head_dim_warned = True
        warnings.warn(
            f"zoo kernels: head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM} is not "
            "supported by the Triton attention kernels; using the PyTorch reference",
            KernelFallbackWarning,
            stacklevel=3,
        )
    return False


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep_mask: torch.Tensor | None = None,
    scale: float | None = None,
    _impl: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys keep_mask allows.

    q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]; keep_mask boolean, broadcastable to
    [B, H, Lq, Lk] (True = may attend) or None for dense attention; scale defaults to
    1/sqrt(D). Rows with no allowed key return zeros. The kernels never materialise the
    [Lq, Lk] matrix and skip key tiles the mask removes entirely; the mask's tile map is
    computed once and reused while the same mask tensor is passed unchanged.
    """
    b, h, lq, lk = _check_qkv(q, k, v)
    keep_mask = _check_keep(keep_mask, (b, h, lq, lk), q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    ops = _ops_for(_impl, q, k, v) if _head_dim_ok(q, v, _impl) else None
    if ops is None:
        return reference.masked_attention(q, k, v, keep_mask, scale)
    tiles = None if keep_mask is None else _tiles.tile_map(keep_mask, (b, h, lq, lk))
    out, _ = ops.masked_attention(q, k, v, keep_mask, tiles, scale)
    return out


def soft_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    keep_mask: torch.Tensor | None = None,
    _impl: str | None = None,
) -> torch.Tensor:
    """Attention weighted by a float mask: P_ij = M_ij exp(S_ij) / sum_k M_ik exp(S_ik).

    mask: float, >= 0, broadcastable to [B, H, Lq, Lk]; differentiable, including where it is 0
    (dL/dM_ij = exp(S_ij - lse_i) (dP_ij - <dO_i, O_i>)), which a mask search with
    straight-through samples needs. Its gradient is reduced over the dimensions it broadcasts
    along inside the op, so [B, H, Lq, Lk] is never held in memory. keep_mask (bool, optional)
    removes keys outright, e.g. padding; rows whose weights are all zero return zeros (and zero
    gradients). For a 0/1 mask the forward equals ``masked_attention(q, k, v, mask.bool())``.
    """
    b, h, lq, lk = _check_qkv(q, k, v)
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        raise ValueError(
            f"mask must be a float tensor (the weight of each key), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}; use masked_attention for bool masks"
        )
    mask = _check_mask("mask", mask, (b, h, lq, lk), q)
    keep_mask = _check_keep(keep_mask, (b, h, lq, lk), q)
    if _checking() and mask.numel() and bool((mask.detach() < 0).any()):
        raise ValueError("mask must be >= 0 (P is proportional to mask * exp(S))")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    ops = _ops_for(_impl, q, k, v) if _head_dim_ok(q, v, _impl) else None
    if ops is None:
        return reference.soft_masked_attention(q, k, v, mask, keep_mask, scale)
    tiles = None if keep_mask is None else _tiles.tile_map(keep_mask, (b, h, lq, lk))
    out, _ = ops.soft_masked_attention(q, k, v, mask, keep_mask, tiles, scale)
    return out
