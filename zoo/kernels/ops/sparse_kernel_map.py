"""Kernel maps of sparse 3-D convolution: which input feeds each output through each kernel tap.
CPU: csrc/cpu/sparse_kernel_map.cpp (a hash table of the input coordinates); Triton:
``_sparse.sparse_kernel_map`` (the input keys sorted, then a binary search per output and tap).
No gradient: the outputs are integers."""

from __future__ import annotations

import torch

from zoo.kernels import reference
from zoo.kernels.ops._common import checking, gen
from zoo.kernels.spec import OpSpec, register


def triple(name: str, value) -> list[int]:
    """An int or 3 ints (z, y, x) as a list of 3 ints."""
    values = [value] * 3 if isinstance(value, int) else list(value)
    if len(values) != 3 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or 3 ints (z, y, x), got {value!r}")
    return values


def sparse_kernel_map(
    dispatch,
    coords: torch.Tensor,
    spatial_shape,
    kernel_size=3,
    stride=1,
    padding=0,
    dilation=1,
    subm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel map of a sparse 3-D convolution over the active sites ``coords``.

    coords: int32 [N, 4] rows (batch, z, y, x), unique, inside ``spatial_shape`` (D, H, W).
    Returns (out_coords int32 [M, 4], nbr int32 [M, K]) with K = kz * ky * kx taps in
    ``nn.Conv3d``'s weight order: ``nbr[o, k]`` is the row of ``coords`` at
    ``out_coords[o] * stride - padding + tap_k * dilation``, or -1 where that site is empty.

    - ``subm=True`` (submanifold convolution): the outputs are the inputs, in their order; the
      kernel must be odd, the stride 1, and the padding is ``(kernel_size - 1) // 2 * dilation``
      (the ``padding`` argument is ignored, as in spconv's ``SubMConv3d``).
    - Otherwise (strided convolution): every site of the output grid
      (``(D + 2p - d(k - 1) - 1) // s + 1`` per axis) that some input reaches, sorted by
      (batch, z, y, x).

    The order of both outputs is fixed by the inputs alone: every implementation gives the same
    tensors, run after run.
    """
    ks = triple("kernel_size", kernel_size)
    st, pad, dil = (
        triple("stride", stride),
        triple("padding", padding),
        triple("dilation", dilation),
    )
    shape = triple("spatial_shape", spatial_shape)
    for name, values, lo in (("kernel_size", ks, 1), ("stride", st, 1), ("dilation", dil, 1)):
        if min(values) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {values}")
    if min(pad) < 0 or min(shape) < 1:
        raise ValueError(f"padding must be >= 0 and spatial_shape >= 1, got {pad}, {shape}")
    if subm:
        if any(k % 2 == 0 for k in ks):
            raise ValueError(
                f"submanifold convolution needs an odd kernel_size (its outputs are its inputs, "
                f"so the kernel must have a centre), got kernel_size={ks}"
            )
        if st != [1, 1, 1]:
            raise ValueError(f"submanifold convolution has stride 1, got stride={st}")
        pad = [(k - 1) // 2 * d for k, d in zip(ks, dil)]
    if coords.dim() != 2 or coords.shape[1] != 4 or coords.dtype != torch.int32:
        raise ValueError(
            f"coords must be an int32 [N, 4] tensor (batch, z, y, x), got "
            f"{tuple(coords.shape)} {coords.dtype}"
        )
    if checking() and coords.shape[0]:
        check_coords(coords, shape)
    ops = dispatch.ops(coords)
    if ops is None:
        return reference.sparse_kernel_map(coords, shape, ks, st, pad, dil, subm)
    return ops.sparse_kernel_map(coords.contiguous(), shape, ks, st, pad, dil, subm)


def check_coords(coords: torch.Tensor, spatial_shape) -> None:
    """A clear error for the first row outside (batch >= 0, 0 <= z, y, x < spatial_shape)."""
    hi = torch.tensor([2**31 - 1, *spatial_shape], device=coords.device)
    bad = ((coords < 0) | (coords >= hi)).any(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"coordinate row {row} (batch, z, y, x) = {coords[row].tolist()} is outside the "
            f"spatial shape {list(spatial_shape)} ({int(bad.sum())} rows are)"
        )


def _fake(coords, spatial_shape, kernel_size, stride, padding, dilation, subm):
    k = kernel_size[0] * kernel_size[1] * kernel_size[2]
    m = coords.shape[0] if subm else torch.library.get_ctx().new_dynamic_size()
    return coords.new_empty((m, 4)), coords.new_empty((m, k))


def random_coords(n: int, shape, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """``n`` unique random sites per sample of a ``batch``-sample grid, int32 [<= n*batch, 4]."""
    g = gen(seed)
    d, h, w = shape
    rows = []
    for b in range(batch):
        flat = torch.randint(0, d * h * w, (2 * n,), generator=g).unique()
        flat = flat[torch.randperm(len(flat), generator=g)[:n]]
        z, rest = flat // (h * w), flat % (h * w)
        rows.append(torch.stack([torch.full_like(z, b), z, rest // w, rest % w], 1))
    return torch.cat(rows).to(torch.int32)


# (kernel_size, stride, padding, dilation, subm): the convolutions MinkUNet and spconv's nets use
CONFIGS = (
    (3, 1, 0, 1, True),
    (3, 2, 1, 1, False),
    (2, 2, 0, 1, False),
    ((3, 1, 3), (2, 1, 2), (1, 0, 0), 1, False),
    (3, 1, 0, 2, True),
)


def _cases():
    cases = []
    for i, (ks, st, pad, dil, subm) in enumerate(CONFIGS):
        coords = random_coords(60, (7, 9, 8), seed=i)
        cases.append(((coords, (7, 9, 8), ks, st, pad, dil, subm), {}))
    empty = torch.zeros(0, 4, dtype=torch.int32)
    cases.append(((empty, (4, 4, 4), 3, 2, 1, 1, False), {}))
    return cases


def _opcheck(ops, put):
    coords = put(random_coords(20, (5, 6, 7)))  # put gives one tensor as itself, not a 1-tuple
    return [
        (
            ops.sparse_kernel_map,
            (coords, [5, 6, 7], [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1], True),
        )
    ]


SPEC = register(
    OpSpec(
        name="sparse_kernel_map",
        call=sparse_kernel_map,
        op="sparse_kernel_map",
        schema="(Tensor coords, int[] spatial_shape, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, bool subm) -> (Tensor, Tensor)",
        fake=_fake,
        cpu_source="cpu/sparse_kernel_map.cpp",
        triton=("_sparse.sparse_kernel_map",),
        cases=_cases,
        opcheck=_opcheck,
        bench=lambda quick: [
            (f"N={2 * n} {ks}x s{st} subm={subm}", (coords, shape, ks, st, pad, 1, subm), {})
            for n, shape in ([(5000, (41, 200, 200))] if quick else [(50000, (41, 1600, 1408))])
            for coords in [random_coords(n, shape)]
            for ks, st, pad, subm in ((3, 1, 0, True), (3, 2, 1, False))
        ],
    )
)
