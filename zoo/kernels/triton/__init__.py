"""Triton implementations of the zoo ops: the CUDA backend of ``torch.ops.zoo.*``.

Two layers:

- op-level launchers with the ``torch.ops.zoo`` schemas (``group_softmax_ce``,
  ``masked_attention_backward``, ...), registered as the CUDA kernels of those ops by
  ``zoo.kernels._ops``;
- the public functions of every registered op (``zoo.kernels.spec``), with ``zoo.kernels``'
  signatures and autograd, for calling the Triton kernels directly: tests run them on CPU
  tensors under ``TRITON_INTERPRET=1`` (set before this module is first imported) against the
  reference.

Importing this module needs Triton (it ships with torch's CUDA builds); CPU-only installs never
import it.
"""

from __future__ import annotations

import torch
import triton

from zoo.kernels.triton import _kernels as kern

MAX_HEAD_DIM = 256  # largest D / Dv the attention kernels hold in one tile
TILE = kern.TILE

try:  # torch >= 2.6: launches that torch.compile can trace
    from torch.library import wrap_triton as _wrap
except ImportError:  # pragma: no cover - older torch launches the kernel directly

    def _wrap(kernel):
        return kernel


def interpreted() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kern.attention_fwd_kernel, InterpretedFunction)


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type == "cpu" and not interpreted():
            raise ValueError(
                "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1, set before "
                "zoo.kernels.triton is imported, to run them on CPU tensors)"
            )


def _acc(dtype: torch.dtype):
    return triton.language.float64 if dtype == torch.float64 else triton.language.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(n: int, lo: int = 16, hi: int = 1024) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _row_blocks(rows: int, cols: int, elements: int = 4096) -> tuple[int, int, int]:
    """(grid, BLOCK_R, BLOCK_C) for row-wise kernels: short rows are packed several to a
    program so every program works on about ``elements`` values."""
    block_c = _block(cols, hi=elements)
    block_r = max(1, min(64, elements // block_c, triton.next_power_of_2(max(rows, 1))))
    return triton.cdiv(rows, block_r), block_r, block_c


# =========================================================================== op launchers


def group_softmax_ce(logits, target, group_table, row_group, ignore_index: int):
    _check_device(logits)
    logits = logits.contiguous()
    n, c = logits.shape
    acc = _acc_torch(logits.dtype)
    loss, lse, lse_g = (logits.new_empty((n,), dtype=acc) for _ in range(3))
    if n:
        table = group_table.to(torch.int32).contiguous()
        grid, block_r, block_c = _row_blocks(n, c)
        _wrap(kern.group_softmax_ce_fwd_kernel)[(grid,)](
            logits,
            target.to(torch.int64).contiguous(),
            table,
            row_group.to(torch.int64).contiguous(),
            loss,
            lse,
            lse_g,
            n,
            c,
            logits.stride(0),
            table.stride(0),
            int(ignore_index),
            ACC=_acc(logits.dtype),
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
    return loss, lse, lse_g


def group_softmax_ce_backward(
    grad_loss, logits, target, group_table, row_group, lse, lse_group, ignore_index: int
):
    _check_device(logits)
    logits = logits.contiguous()
    n, c = logits.shape
    grad = torch.empty_like(logits)
    if n:
        table = group_table.to(torch.int32).contiguous()
        grid, block_r, block_c = _row_blocks(n, c)
        _wrap(kern.group_softmax_ce_bwd_kernel)[(grid,)](
            grad_loss.contiguous(),
            logits,
            target.to(torch.int64).contiguous(),
            table,
            row_group.to(torch.int64).contiguous(),
            lse.contiguous(),
            lse_group.contiguous(),
            grad,
            n,
            c,
            logits.stride(0),
            table.stride(0),
            int(ignore_index),
            ACC=_acc(logits.dtype),
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
    return grad


def gumbel_softmax_op(logits, tau: float, hard: bool, seed: int):
    """Softmax over the last dim; returns (out, soft), out the one-hot (empty unless hard)."""
    _check_device(logits)
    x = logits.contiguous()
    k = x.shape[-1] if x.dim() else 1
    rows = x.numel() // k if k else 0
    soft = torch.empty_like(x)
    out = torch.empty_like(x) if hard else x.new_empty((0,))
    if rows:
        grid, block_r, block_k = _row_blocks(rows, k, 2048)
        _wrap(kern.gumbel_softmax_fwd_kernel)[(grid,)](
            x,
            out if hard else soft,
            soft,
            rows,
            k,
            int(seed),
            1.0 / float(tau),
            HARD=bool(hard),
            ACC=_acc(x.dtype),
            BLOCK_R=block_r,
            BLOCK_K=block_k,
        )
    return out, soft


def gumbel_softmax_backward(grad, soft, tau: float):
    _check_device(soft)
    soft = soft.contiguous()
    k = soft.shape[-1]
    rows = soft.numel() // k if k else 0
    dz = torch.empty_like(soft)
    if rows:
        grid, block_r, block_k = _row_blocks(rows, k, 2048)
        _wrap(kern.gumbel_softmax_bwd_kernel)[(grid,)](
            grad.contiguous(),
            soft,
            dz,
            rows,
            k,
            1.0 / float(tau),
            ACC=_acc(soft.dtype),
            BLOCK_R=block_r,
            BLOCK_K=block_k,
        )
    return dz


_ELEMENTWISE_BLOCK = 1024


def gumbel_sigmoid_op(logits, tau: float, hard: bool, seed: int):
    _check_device(logits)
    x = logits.contiguous()
    soft = torch.empty_like(x)
    out = torch.empty_like(x) if hard else x.new_empty((0,))
    n = x.numel()
    if n:
        _wrap(kern.gumbel_sigmoid_fwd_kernel)[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
            x,
            out if hard else soft,
            soft,
            n,
            int(seed),
            1.0 / float(tau),
            HARD=bool(hard),
            ACC=_acc(x.dtype),
            BLOCK=_ELEMENTWISE_BLOCK,
        )
    return out, soft


def gumbel_sigmoid_backward(grad, soft, tau: float):
    _check_device(soft)
    soft = soft.contiguous()
    dz = torch.empty_like(soft)
    n = soft.numel()
    if n:
        _wrap(kern.gumbel_sigmoid_bwd_kernel)[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
            grad.contiguous(),
            soft,
            dz,
            n,
            1.0 / float(tau),
            ACC=_acc(soft.dtype),
            BLOCK=_ELEMENTWISE_BLOCK,
        )
    return dz


class _Attention:
    """Shapes, masks (as strided views over [B, H, Lq, Lk]) and launch options of one call."""

    def __init__(self, q, k, v, keep_mask, weight, tile_map, scale):
        _check_device(q, k, v)
        self.b, self.h, self.lq, self.d = q.shape
        self.lk, self.dv = k.shape[2], v.shape[3]
        if max(self.d, self.dv) > MAX_HEAD_DIM:
            raise ValueError(
                f"head dim {max(self.d, self.dv)} exceeds {MAX_HEAD_DIM}, the largest the "
                "Triton attention kernels support"
            )
        full = (self.b, self.h, self.lq, self.lk)
        self.dummy = q.new_empty((1,), dtype=torch.uint8)
        self.keep = None if keep_mask is None else _expand4(keep_mask, full).view(torch.uint8)
        self.weight = None if weight is None else _expand4(weight, full)
        self.tiles = tile_map
        if self.keep is not None and self.tiles is None:
            from zoo.kernels._tiles import tile_map as make_tiles

            self.tiles = make_tiles(keep_mask, full, TILE)
        self.scale = float(scale)
        self.acc = _acc(q.dtype)
        self.acc_torch = _acc_torch(q.dtype)
        self.meta = dict(
            HAS_KEEP=self.keep is not None,
            HAS_WEIGHT=self.weight is not None,
            HAS_TILES=self.tiles is not None,
            ACC=self.acc,
            PRECISION="ieee",
            UPCAST=q.dtype == torch.bfloat16 and interpreted(),
            BLOCK_M=TILE,
            BLOCK_N=TILE,
            BLOCK_D=_block(self.d),
            BLOCK_DV=_block(self.dv),
        )

    def common(self):
        return (self.h, self.lq, self.lk, self.d, self.dv, self.scale)

    def masks(self):
        keep = self.keep if self.keep is not None else self.dummy
        weight = self.weight if self.weight is not None else self.dummy
        return keep, weight, _strides(self.keep), _strides(self.weight)

    def tile_args(self):
        if self.tiles is None:
            return self.dummy, (0, 0, 0, 0)
        tiles = _expand4(self.tiles, (self.b, self.h, *self.tiles.shape[-2:]))
        return tiles, _strides(tiles)


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def _expand4(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return _as4d(t).expand(shape)


def _strides(t: torch.Tensor | None) -> tuple[int, ...]:
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride()))


def _attention_forward(q, k, v, keep_mask, weight, tile_map, scale):
    a = _Attention(q, k, v, keep_mask, weight, tile_map, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = q.new_empty((a.b, a.h, a.lq, a.dv))
    lse = q.new_empty((a.b, a.h, a.lq), dtype=a.acc_torch)
    if a.b * a.h * a.lq == 0:
        return out, lse
    if a.lk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    keep, wt, sk, sw = a.masks()
    tiles, st = a.tile_args()
    _wrap(kern.attention_fwd_kernel)[(a.b * a.h, triton.cdiv(a.lq, TILE))](
        q, k, v, out, lse, keep, wt, tiles, *a.common(), *sk, *sw, *st, **a.meta
    )
    return out, lse


def _attention_backward(grad_out, q, k, v, keep_mask, weight, tile_map, out, lse, scale):
    a = _Attention(q, k, v, keep_mask, weight, tile_map, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    do = grad_out.to(q.dtype).contiguous()
    lse = lse.to(a.acc_torch).contiguous()
    delta = (do.to(a.acc_torch) * out.to(a.acc_torch)).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dweight = None
    if weight is not None:  # in weight's own (un-broadcast) shape: the kernel reduces into it
        dweight = torch.zeros(_as4d(weight).shape, dtype=a.acc_torch, device=q.device)
    if a.b * a.h * a.lq * a.lk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, dweight
    keep, wt, sk, sw = a.masks()
    tiles, st = a.tile_args()
    _wrap(kern.attention_bwd_dkdv_kernel)[(a.b * a.h, triton.cdiv(a.lk, TILE))](
        q, k, v, do, lse, delta, dk, dv, keep, wt, tiles, *a.common(), *sk, *sw, *st, **a.meta
    )
    dw = dweight if dweight is not None else a.dummy.float()
    sd = _strides(None if dweight is None else _expand4(dweight, (a.b, a.h, a.lq, a.lk)))
    _wrap(kern.attention_bwd_dq_kernel)[(a.b * a.h, triton.cdiv(a.lq, TILE))](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        dw,
        keep,
        wt,
        tiles,
        *a.common(),
        *sk,
        *sw,
        *sd,
        *st,
        **a.meta,
    )
    return dq, dk, dv, dweight


def masked_attention_op(q, k, v, keep_mask, tile_map, scale: float):
    return _attention_forward(q, k, v, keep_mask, None, tile_map, scale)


def masked_attention_backward(grad_out, q, k, v, keep_mask, tile_map, out, lse, scale: float):
    dq, dk, dv, _ = _attention_backward(
        grad_out, q, k, v, keep_mask, None, tile_map, out, lse, scale
    )
    return dq, dk, dv


def soft_masked_attention_op(q, k, v, mask, keep_mask, tile_map, scale: float):
    return _attention_forward(q, k, v, keep_mask, mask, tile_map, scale)


def soft_masked_attention_backward(
    grad_out, q, k, v, mask, keep_mask, tile_map, out, lse, scale: float
):
    dq, dk, dv, dmask = _attention_backward(
        grad_out, q, k, v, keep_mask, mask, tile_map, out, lse, scale
    )
    return dq, dk, dv, dmask.reshape(mask.shape).to(mask.dtype)


# =========================================================================== public functions
# zoo.kernels' public functions served by the Triton kernels on any device, from the registry


def _public_functions() -> list[str]:
    from zoo.kernels import TRITON
    from zoo.kernels.ops import REGISTRY

    for spec in REGISTRY:
        globals()[spec.name] = spec.bind(TRITON)
    return REGISTRY.names()


__all__ = ["MAX_HEAD_DIM", "interpreted", *_public_functions()]
