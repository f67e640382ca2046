"""The sparse tensor: features at the active sites of a 3-D grid, and the kernel maps its
layers share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from zoo.kernels import reference
from zoo.kernels.ops._common import checking
from zoo.kernels.ops.sparse_kernel_map import check_coords, triple

DUPLICATES = ("error", "mean")


@dataclass
class KernelMaps:
    """The kernel maps built for one input and everything derived from it, by key: a layer
    whose map is already here (the same coordinates, kernel, stride and dilation, or the same
    ``indice_key``) reuses it, as spconv's ``indice_key`` and MinkowskiEngine's coordinate
    manager do."""

    maps: dict[Any, Any] = field(default_factory=dict)
    built: int = 0  # how many were computed (the rest were found here)

    def nbytes(self) -> int:
        """The bytes of the maps held: each map's output sites and neighbour table, and the
        inverses made for transposed convolutions."""
        total = 0
        for value in self.maps.values():
            if isinstance(value, tuple):  # (out indices, nbr, out shape, coord key)
                total += value[0].nbytes + value[1].nbytes
            elif value[2] is not None:  # an indice_key entry with its inverse
                total += value[2].nbytes
        return total

    def get(self, key, build):
        if key not in self.maps:
            self.maps[key] = build()
            self.built += 1
        return self.maps[key]


class SparseTensor:
    """Features ``[N, C]`` at the sites ``indices`` (int32 ``[N, 4]``: batch, z, y, x) of a
    ``spatial_shape`` (D, H, W) grid holding ``batch_size`` samples.

    ``duplicates``: what to do with rows of ``indices`` that name one site twice: ``"error"``
    (the default: a ``ValueError`` naming the site) or ``"mean"`` (merged, their features
    averaged). ``stride`` is the tensor stride (how many input voxels one site spans per axis).
    """

    def __init__(
        self,
        features: torch.Tensor,
        indices: torch.Tensor,
        spatial_shape,
        batch_size: int,
        *,
        duplicates: str = "error",
        stride=1,
        maps: KernelMaps | None = None,
        _coord_key: Any = None,
        _checked: bool = False,
    ):
        self.spatial_shape = triple("spatial_shape", [int(s) for s in spatial_shape])
        self.batch_size = int(batch_size)
        self.stride = triple("stride", stride)
        if not _checked:
            features, indices = _check(
                features, indices, self.spatial_shape, batch_size, duplicates
            )
        self.features, self.indices = features, indices
        self.maps = maps if maps is not None else KernelMaps()
        # what identifies this tensor's coordinates among those sharing ``maps``: "input", or
        # how they were made from another's (a strided convolution or pooling)
        self.coord_key = _coord_key if _coord_key is not None else "input"

    # ------------------------------------------------------------------ spconv's API

    def replace_feature(self, features: torch.Tensor) -> SparseTensor:
        """The same sites with new features (one row per site)."""
        if features.shape[0] != self.features.shape[0]:
            raise ValueError(
                f"replace_feature: {features.shape[0]} rows for {self.features.shape[0]} sites"
            )
        return self.derive(features, self.indices, self.spatial_shape, self.stride, self.coord_key)

    def derive(self, features, indices, spatial_shape, stride, coord_key) -> SparseTensor:
        """A tensor that shares this one's kernel maps (what the layers return)."""
        return SparseTensor(
            features,
            indices,
            spatial_shape,
            self.batch_size,
            stride=stride,
            maps=self.maps,
            _coord_key=coord_key,
            _checked=True,
        )

    def dense(self, channels_first: bool = True) -> torch.Tensor:
        """``[B, C, D, H, W]`` (``[B, D, H, W, C]`` with ``channels_first=False``), zero at the
        empty sites."""
        c = self.features.shape[1]
        out = self.features.new_zeros(self.batch_size, *self.spatial_shape, c)
        i = self.indices.long()
        out[i[:, 0], i[:, 1], i[:, 2], i[:, 3]] = self.features
        return out.permute(0, 4, 1, 2, 3).contiguous() if channels_first else out

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> SparseTensor:
        """The non-zero sites (any channel) of a ``[B, C, D, H, W]`` tensor."""
        b, c, *shape = x.shape
        cl = x.permute(0, 2, 3, 4, 1)
        idx = cl.ne(0).any(-1).nonzero()
        return cls(cl[tuple(idx.T)], idx.to(torch.int32), shape, b, _checked=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch_size, self.features.shape[1], *self.spatial_shape)

    def __repr__(self) -> str:
        return (
            f"SparseTensor({self.features.shape[0]} sites x {self.features.shape[1]} channels, "
            f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, "
            f"stride={self.stride})"
        )


def _check(features, indices, spatial_shape, batch_size, duplicates):
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
    if indices.dim() != 2 or indices.shape[1] != 4 or indices.is_floating_point():
        raise ValueError(
            f"indices must be an integer [N, 4] tensor (batch, z, y, x), got "
            f"{tuple(indices.shape)} {indices.dtype}"
        )
    if features.dim() != 2 or features.shape[0] != indices.shape[0]:
        raise ValueError(
            f"features must be [N={indices.shape[0]}, C] (one row per index), got "
            f"{tuple(features.shape)}"
        )
    indices = indices.to(torch.int32)
    if not checking() or not len(indices):
        return features, indices
    check_coords(indices, spatial_shape)
    if int(indices[:, 0].max()) >= batch_size:
        row = int((indices[:, 0] >= batch_size).nonzero()[0, 0])
        raise ValueError(
            f"index row {row} has batch {int(indices[row, 0])}, but batch_size={batch_size}"
        )
    keys = reference.coordinate_keys(indices, spatial_shape)
    unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    if len(unique) == len(keys):
        return features, indices
    rows = torch.arange(len(keys), device=keys.device)
    first = torch.full((len(unique),), len(keys), dtype=torch.int64, device=keys.device)
    first = first.scatter_reduce(0, inverse, rows, "amin")
    if duplicates == "error":
        row = int((first[inverse] != rows).nonzero()[0, 0])
        raise ValueError(
            f"index row {row} (batch, z, y, x) = {indices[row].tolist()} names the site row "
            f"{int(first[inverse[row]])} names ({len(keys) - len(unique)} duplicate rows); "
            f"merge them with duplicates='mean'"
        )
    merged = features.new_zeros(len(unique), features.shape[1]).index_add(0, inverse, features)
    merged = merged / counts.to(features.dtype)[:, None]
    order = torch.argsort(first)  # the merged sites in the order their first row came
    return merged[order], indices[first[order]]


def _per_sample(x: SparseTensor, reduce: str) -> torch.Tensor:
    b = x.indices[:, 0].long()
    index = b[:, None].expand_as(x.features)
    out = x.features.new_zeros(x.batch_size, x.features.shape[1])
    return out.scatter_reduce(0, index, x.features, reduce, include_self=False)


def global_avg_pool(x: SparseTensor) -> torch.Tensor:
    """``[B, C]``: the mean of each sample's features (0 for a sample with no sites)."""
    return _per_sample(x, "mean")


def global_max_pool(x: SparseTensor) -> torch.Tensor:
    """``[B, C]``: the channel-wise max of each sample's features (0 for a sample with none)."""
    return _per_sample(x, "amax")
