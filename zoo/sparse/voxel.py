"""Points to voxels and back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.sparse.tensor import SparseTensor


@dataclass
class Voxels:
    """What :func:`voxelize` gives: the sparse tensor of voxel features, and for each input
    point the row of its voxel (``point_voxel``, -1 for a point outside the range)."""

    tensor: SparseTensor
    point_voxel: torch.Tensor


def voxelize(
    points: torch.Tensor,
    voxel_size,
    point_range,
    batch: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> Voxels:
    """The voxels of point clouds: each voxel's features are the mean of its points' columns.

    points [N, 3 + F]: x, y, z (then e.g. remission); voxel_size (3 floats, or one) in the
    points' unit; point_range (x_min, y_min, z_min, x_max, y_max, z_max): points outside it are
    dropped (their ``point_voxel`` is -1); batch [N]: each point's sample (default: all 0).
    The grid's (z, y, x) axes are the points' (z, y, x); voxels come in the order of their
    first point, so the result repeats exactly for the same points.
    """
    if points.dim() != 2 or points.shape[1] < 3 or not points.is_floating_point():
        raise ValueError(
            f"points must be a floating [N, 3 + F] tensor (x, y, z, ...), got "
            f"{tuple(points.shape)} {points.dtype}"
        )
    size = torch.as_tensor(
        [voxel_size] * 3 if isinstance(voxel_size, int | float) else list(voxel_size),
        dtype=torch.float64,
    )
    lo = torch.as_tensor(list(point_range[:3]), dtype=torch.float64)
    hi = torch.as_tensor(list(point_range[3:]), dtype=torch.float64)
    if size.numel() != 3 or (size <= 0).any() or (hi <= lo).any():
        raise ValueError(
            f"voxel_size must be 3 positive sizes and point_range (min xyz, max xyz) with "
            f"max > min, got {list(size.tolist())} and {list(point_range)}"
        )
    shape_xyz = torch.ceil((hi - lo) / size).to(torch.int64)
    n = points.shape[0]
    if batch is None:
        batch = torch.zeros(n, dtype=torch.int64, device=points.device)
    batch_size = int(batch_size if batch_size is not None else (int(batch.max()) + 1 if n else 1))
    xyz = points[:, :3].to(torch.float64)
    cell = torch.floor((xyz - lo.to(points.device)) / size.to(points.device)).to(torch.int64)
    inside = ((cell >= 0) & (cell < shape_xyz.to(points.device))).all(1)
    cell, kept = cell[inside], inside.nonzero().squeeze(1)
    d, h, w = (int(v) for v in shape_xyz.flip(0))  # grid (z, y, x)
    keys = ((batch[kept].to(torch.int64) * d + cell[:, 2]) * h + cell[:, 1]) * w + cell[:, 0]
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(unique),), len(keys), dtype=torch.int64, device=keys.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(keys), device=keys.device), "amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    row = rank[inverse]  # each kept point's voxel, voxels in first-point order
    m = len(unique)
    feats = points[kept]
    sums = feats.new_zeros(m, feats.shape[1]).index_add_(0, row, feats)
    counts = torch.zeros(m, dtype=feats.dtype, device=feats.device).index_add_(
        0, row, torch.ones_like(row, dtype=feats.dtype)
    )
    c = cell[first[order]]
    indices = torch.stack([batch[kept][first[order]].to(torch.int64), c[:, 2], c[:, 1], c[:, 0]], 1)
    point_voxel = torch.full((n,), -1, dtype=torch.int64, device=points.device)
    point_voxel[kept] = row
    tensor = SparseTensor(
        sums / counts[:, None], indices.to(torch.int32), [d, h, w], batch_size, _checked=True
    )
    return Voxels(tensor, point_voxel)


def devoxelize(voxel_values: torch.Tensor, point_voxel: torch.Tensor, fill=0) -> torch.Tensor:
    """Per-point rows of per-voxel values (``fill`` for points outside the range)."""
    out = voxel_values[point_voxel.clamp(min=0)]
    if (point_voxel < 0).any():
        out = torch.where((point_voxel >= 0).view(-1, *[1] * (out.dim() - 1)), out, fill)
    return out
