"""Sparse 3-D convolution on point clouds, with spconv's names so that users can switch.

- :class:`SparseTensor`: features ``[N, C]`` at int32 coordinates ``[N, 4]`` (batch, z, y, x) of
  a ``spatial_shape`` grid, with ``.dense()``; the kernel maps its layers build are cached and
  shared by every tensor derived from it.
- Layers: :class:`SubMConv3d`, :class:`SparseConv3d`, :class:`SparseInverseConv3d`,
  :class:`SparseMaxPool3d`; :class:`SparseSequential` applies plain modules (``nn.BatchNorm1d``,
  ``nn.ReLU``) to the features, as spconv's does.
- :func:`voxelize` (the mean of the points in each voxel) and :func:`devoxelize` (per-point
  values back from the voxels); :func:`global_avg_pool` / :func:`global_max_pool` per sample.

The layers run on ``zoo.kernels``' ops (``sparse_kernel_map``, ``sparse_conv``,
``sparse_max_pool``): C++ on CPU, Triton on GPU, deterministic on both.
"""

from zoo.sparse.modules import (
    SparseConv3d,
    SparseInverseConv3d,
    SparseMaxPool3d,
    SparseModule,
    SparseSequential,
    SubMConv3d,
)
from zoo.sparse.tensor import SparseTensor, global_avg_pool, global_max_pool
from zoo.sparse.voxel import Voxels, devoxelize, voxelize

__all__ = [
    "SparseConv3d",
    "SparseInverseConv3d",
    "SparseMaxPool3d",
    "SparseModule",
    "SparseSequential",
    "SparseTensor",
    "SubMConv3d",
    "Voxels",
    "devoxelize",
    "global_avg_pool",
    "global_max_pool",
    "voxelize",
]
