"""Attention over a boolean keep mask, and attention weighted by a float mask. The kernels never
materialise the [Lq, Lk] matrix and skip key tiles a keep mask removes entirely (its tile map is
computed once per mask, ``zoo.kernels._tiles``). CPU: csrc/cpu/attention.cpp; Triton:
``*masked_attention*`` launchers. Both ops output (out, lse); lse has no gradient."""

from __future__ import annotations

import math
import warnings

import torch

from zoo.kernels import _tiles, reference
from zoo.kernels.ops._common import acc_dtype, checking, gen
from zoo.kernels.spec import KernelFallbackWarning, OpSpec, register


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
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


def check_mask(
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


def check_keep(keep_mask: torch.Tensor | None, full, q) -> torch.Tensor | None:
    if keep_mask is None:
        return None
    if keep_mask.dtype != torch.bool:
        raise ValueError(
            f"keep_mask must be a bool tensor (True = may attend), got {keep_mask.dtype}"
        )
    return check_mask("keep_mask", keep_mask, full, q)


def _serving(dispatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The op namespace for q, k, v. CUDA tensors the backend sends to Triton, which holds a
    head in one tile: larger head dims fall back to the reference with one warning
    (``zoo.kernels.triton`` called directly raises a clear error instead)."""
    if not dispatch.direct and q.device.type == "cuda":
        from zoo.kernels.triton import MAX_HEAD_DIM

        if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
            warnings.warn(
                f"zoo kernels: head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM} is not "
                "supported by the Triton attention kernels; using the PyTorch reference",
                KernelFallbackWarning,
                stacklevel=4,
            )
            return None
    return dispatch.ops(q, k, v)


def masked_attention(
    dispatch,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys keep_mask allows.

    q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]; keep_mask boolean, broadcastable to
    [B, H, Lq, Lk] (True = may attend) or None for dense attention; scale defaults to
    1/sqrt(D). Rows with no allowed key return zeros. The kernels never materialise the
    [Lq, Lk] matrix and skip key tiles the mask removes entirely; the mask's tile map is
    computed once and reused while the same mask tensor is passed unchanged.
    """
    b, h, lq, lk = check_qkv(q, k, v)
    keep_mask = check_keep(keep_mask, (b, h, lq, lk), q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    ops = _serving(dispatch, q, k, v)
    if ops is None:
        return reference.masked_attention(q, k, v, keep_mask, scale)
    tiles = None if keep_mask is None else _tiles.tile_map(keep_mask, (b, h, lq, lk))
    out, _ = ops.masked_attention(q, k, v, keep_mask, tiles, scale)
    return out


def soft_masked_attention(
    dispatch,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention weighted by a float mask: P_ij = M_ij exp(S_ij) / sum_k M_ik exp(S_ik).

    mask: float, >= 0, broadcastable to [B, H, Lq, Lk]; differentiable, including where it is 0
    (dL/dM_ij = exp(S_ij - lse_i) (dP_ij - <dO_i, O_i>)), which a mask search with
    straight-through samples needs. Its gradient is reduced over the dimensions it broadcasts
    along inside the op, so [B, H, Lq, Lk] is never held in memory. keep_mask (bool, optional)
    removes keys outright, e.g. padding; rows whose weights are all zero return zeros (and zero
    gradients). For a 0/1 mask the forward equals ``masked_attention(q, k, v, mask.bool())``.
    """
    b, h, lq, lk = check_qkv(q, k, v)
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        raise ValueError(
            f"mask must be a float tensor (the weight of each key), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}; use masked_attention for bool masks"
        )
    mask = check_mask("mask", mask, (b, h, lq, lk), q)
    keep_mask = check_keep(keep_mask, (b, h, lq, lk), q)
    if checking() and mask.numel() and bool((mask.detach() < 0).any()):
        raise ValueError("mask must be >= 0 (P is proportional to mask * exp(S))")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    ops = _serving(dispatch, q, k, v)
    if ops is None:
        return reference.soft_masked_attention(q, k, v, mask, keep_mask, scale)
    tiles = None if keep_mask is None else _tiles.tile_map(keep_mask, (b, h, lq, lk))
    out, _ = ops.soft_masked_attention(q, k, v, mask, keep_mask, tiles, scale)
    return out


# --------------------------------------------------------------------------- op registration


def _fake(q, k, v, *_masks_and_scale):
    b, h, lq, _ = q.shape
    out = q.new_empty((b, h, lq, v.shape[-1]))
    return out, q.new_empty((b, h, lq), dtype=acc_dtype(q.dtype))


def _masked_backward_fake(grad_out, q, k, v, keep_mask, tile_map, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _soft_backward_fake(grad_out, q, k, v, mask, keep_mask, tile_map, out, lse, scale):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        mask.new_empty(mask.shape),
    )


def _masked_setup(ctx, inputs, output):
    q, k, v, keep_mask, tile_map, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, keep_mask, tile_map, out, lse)
    ctx.scale = scale


def _masked_backward(backward_op, ctx, grad_out, _grad_lse):
    q, k, v, keep_mask, tile_map, out, lse = ctx.saved_tensors
    dq, dk, dv = backward_op(grad_out, q, k, v, keep_mask, tile_map, out, lse, ctx.scale)
    return dq, dk, dv, None, None, None


def _soft_setup(ctx, inputs, output):
    q, k, v, mask, keep_mask, tile_map, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, keep_mask, tile_map, out, lse)
    ctx.scale = scale


def _soft_backward(backward_op, ctx, grad_out, _grad_lse):
    q, k, v, mask, keep_mask, tile_map, out, lse = ctx.saved_tensors
    dq, dk, dv, dmask = backward_op(
        grad_out, q, k, v, mask, keep_mask, tile_map, out, lse, ctx.scale
    )
    return dq, dk, dv, dmask, None, None, None


def qkv(b, h, lq, lk, d, dv=None, seed=0):
    g = gen(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h, lk, d, generator=g)
    v = torch.randn(b, h, lk, dv or d, generator=g)
    return q, k, v


def band(lq: int, lk: int, half_width: int) -> torch.Tensor:
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    return (i - j).abs() <= half_width


def _grad(*tensors):
    return tuple(t.requires_grad_() for t in tensors)


def _masked_cases():
    return [
        (_grad(*qkv(2, 3, 40, 40, 16)), {}),
        (
            _grad(*qkv(1, 2, 70, 33, 8, dv=12)),
            {"keep_mask": torch.rand(70, 33, generator=gen(1)) > 0.6},
        ),
        (_grad(*qkv(1, 2, 64, 64, 16)), {"keep_mask": band(64, 64, 5)[None, None], "scale": 0.2}),
    ]


def _soft_cases():
    weight = torch.rand(2, 1, 40, 40, generator=gen(2)) * (torch.rand(2, 1, 40, 40) > 0.3)
    return [
        ((*_grad(*qkv(2, 3, 40, 40, 16)), weight.requires_grad_()), {}),
        (
            (*_grad(*qkv(1, 2, 48, 48, 8)), torch.rand(48, 48, generator=gen(3)).requires_grad_()),
            {"keep_mask": band(48, 48, 6)},
        ),
    ]


def _attention_opcheck(soft: bool):
    def opcheck(ops, put):
        q, k, v = (put(t).requires_grad_() for t in qkv(1, 2, 20, 20, 8))
        grad = put(torch.randn(1, 2, 20, 8))
        weight = put(torch.rand(1, 2, 20, 20)).requires_grad_()
        detached = (q.detach(), k.detach(), v.detach())
        checks = []
        for mask in (None, put(band(20, 20, 3)[None, None])):
            tiles = None if mask is None else _tiles.tile_map(mask, (1, 2, 20, 20))
            if soft:
                checks.append((ops.soft_masked_attention, (q, k, v, weight, mask, tiles, 0.35)))
                out, lse = ops.soft_masked_attention(q, k, v, weight, mask, tiles, 0.35)
                back = (grad, *detached, weight.detach(), mask, tiles, out.detach(), lse, 0.35)
                checks.append((ops.soft_masked_attention_backward, back))
            else:
                checks.append((ops.masked_attention, (q, k, v, mask, tiles, 0.35)))
                out, lse = ops.masked_attention(q, k, v, mask, tiles, 0.35)
                back = (grad, *detached, mask, tiles, out.detach(), lse, 0.35)
                checks.append((ops.masked_attention_backward, back))
        return checks

    return opcheck


def _bench(soft: bool):
    """BERT-base heads (B=4, H=12, D=64) with a band mask keeping ~14 % of the keys."""

    def bench(quick: bool):
        runs = []
        for length in [256] if quick else [512, 1024]:
            q, k, v = _grad(*qkv(4, 12, length, length, 64))
            keep = band(length, length, length // 14)
            if soft:
                weight = keep.float().requires_grad_()
                runs.append((f"L={length} band", (q, k, v, weight), {}))
            else:
                runs.append((f"L={length} band", (q, k, v), {"keep_mask": keep}))
        return runs

    return bench


register(
    OpSpec(
        name="masked_attention",
        call=masked_attention,
        op="masked_attention",
        schema="(Tensor q, Tensor k, Tensor v, Tensor? keep_mask, Tensor? tile_map, "
        "float scale) -> (Tensor, Tensor)",
        fake=_fake,
        backward_schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? keep_mask, "
        "Tensor? tile_map, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)",
        backward_fake=_masked_backward_fake,
        setup_context=_masked_setup,
        backward=_masked_backward,
        cpu_source="cpu/attention.cpp",
        triton=("masked_attention_op", "masked_attention_backward"),
        cases=_masked_cases,
        opcheck=_attention_opcheck(soft=False),
        bench=_bench(soft=False),
    )
)
register(
    OpSpec(
        name="soft_masked_attention",
        call=soft_masked_attention,
        op="soft_masked_attention",
        schema="(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor? keep_mask, "
        "Tensor? tile_map, float scale) -> (Tensor, Tensor)",
        fake=_fake,
        backward_schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor mask, "
        "Tensor? keep_mask, Tensor? tile_map, Tensor out, Tensor lse, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        backward_fake=_soft_backward_fake,
        setup_context=_soft_setup,
        backward=_soft_backward,
        cpu_source="cpu/attention.cpp",
        triton=("soft_masked_attention_op", "soft_masked_attention_backward"),
        cases=_soft_cases,
        opcheck=_attention_opcheck(soft=True),
        bench=_bench(soft=True),
    )
)
