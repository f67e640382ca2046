"""Compiled kernels for the models' compute-heavy layers, with a pure-PyTorch reference.

Public ops (both backends share argument checking and semantics):

- ``group_softmax_cross_entropy(logits, target, group_table, row_group, ignore_index, reduction)``
- ``gumbel_softmax(logits, tau, hard, dim, generator)`` / ``gumbel_sigmoid(logits, tau, hard, generator)``
- ``masked_attention(q, k, v, keep_mask, scale)``

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

from zoo.kernels import reference
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
    with _state.lock:
        if _state.loaded is None:
            from zoo.kernels import _build, _ops

            try:
                _build.load_library()
                _ops.register()
                _state.loaded = True
                _state.devices = {"cpu"} | ({"cuda"} if _build.cuda_wanted() else set())
            except KernelBuildError as exc:
                _state.loaded, _state.error = False, exc
        return _state.loaded


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
    if backend() != "compiled":
        return False
    return all(t.device.type in _state.devices for t in tensors)


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
            f"group_table must be an integer [G, C={c}] tensor, got {tuple(group_table.shape)} {group_table.dtype}"
        )
    if _checking() and n:
        _check_range("target", target, 0, c, ignore_index)
        _check_range("row_group", row_group, 0, group_table.shape[0])
    if not _compiled(logits):
        return reference.group_softmax_cross_entropy(
            logits, target, group_table, row_group, ignore_index, reduction
        )
    loss, _, _ = torch.ops.zoo.group_softmax_ce(
        logits, target, group_table, row_group, ignore_index
    )
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
    if not _compiled(logits):
        return reference.gumbel_softmax(logits, tau, bool(hard), dim, seed)
    x = logits.movedim(dim, -1)
    out, soft = torch.ops.zoo.gumbel_softmax(x, tau, bool(hard), seed)
    return (out if hard else soft).movedim(-1, dim)


def gumbel_sigmoid(
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Binary Gumbel-Softmax (the two-class case): sigmoid((logits + l) / tau) with
    l ~ Logistic(0, 1); ``hard=True`` returns exact 0/1 masks with the soft gradient."""
    tau = _check_tau(tau)
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    seed = _draw_seed(generator)
    if not _compiled(logits):
        return reference.gumbel_sigmoid(logits, tau, bool(hard), seed)
    out, soft = torch.ops.zoo.gumbel_sigmoid(logits, tau, bool(hard), seed)
    return out if hard else soft


def _bad_dim(dim: int, t: torch.Tensor) -> int:
    raise ValueError(f"dim {dim} is out of range for a tensor of {t.dim()} dimensions")


# --------------------------------------------------------------------------- attention


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys keep_mask allows.

    q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]; keep_mask boolean, broadcastable to
    [B, H, Lq, Lk] (True = may attend) or None for dense attention; scale defaults to
    1/sqrt(D). Rows with no allowed key return zeros. The compiled kernel never materialises the
    [Lq, Lk] matrix and skips key tiles the mask removes entirely.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
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
    if keep_mask is not None:
        if keep_mask.dtype != torch.bool:
            raise ValueError(
                f"keep_mask must be a bool tensor (True = may attend), got {keep_mask.dtype}"
            )
        try:
            if torch.broadcast_shapes(keep_mask.shape, (b, h, lq, lk)) != (b, h, lq, lk):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"keep_mask of shape {tuple(keep_mask.shape)} does not broadcast to [B, H, Lq, Lk] = {[b, h, lq, lk]}"
            ) from None
        while keep_mask.dim() < 4:
            keep_mask = keep_mask.unsqueeze(0)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not _compiled(q, k, v):
        return reference.masked_attention(q, k, v, keep_mask, scale)
    out, _ = torch.ops.zoo.masked_attention(q, k, v, keep_mask, scale)
    return out
