"""Sparse convolution layers with spconv's names and arguments.

Weights are in the layout of the dense layer each one generalises, so dense weights load as
they are: ``nn.Conv3d``'s ``[out, in, kz, ky, kx]`` for :class:`SubMConv3d` and
:class:`SparseConv3d`, ``nn.ConvTranspose3d``'s ``[in, out, kz, ky, kx]`` for
:class:`SparseInverseConv3d`. On integer-valued inputs a submanifold or strided convolution equals
``F.conv3d`` at its output sites, and an inverse convolution ``F.conv_transpose3d``, bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import zoo.kernels as K
from zoo.kernels import reference
from zoo.kernels.ops.sparse_conv import invert
from zoo.kernels.ops.sparse_kernel_map import triple
from zoo.sparse.tensor import SparseTensor


class SparseModule(nn.Module):
    """A layer that takes and returns a :class:`SparseTensor` (``SparseSequential`` hands
    other modules the features only)."""


def _kernel_map(x: SparseTensor, ks, stride, padding, dilation, subm: bool):
    """(out indices, nbr, out spatial shape, out coord key) of a convolution over ``x``'s sites,
    from ``x``'s cache of kernel maps."""
    if subm:
        key = ("subm", x.coord_key, tuple(ks), tuple(dilation))
    else:
        key = ("conv", x.coord_key, tuple(ks), tuple(stride), tuple(padding), tuple(dilation))

    def build():
        indices, nbr = K.sparse_kernel_map(
            x.indices, x.spatial_shape, ks, stride, padding, dilation, subm=subm
        )
        if subm:
            return indices, nbr, list(x.spatial_shape), x.coord_key
        shape = reference.conv_output_shape(x.spatial_shape, ks, stride, padding, dilation)
        return indices, nbr, shape, key

    return x.maps.get(key, build)


class _Conv(SparseModule):
    subm = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        indice_key: str | None = None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = triple("kernel_size", kernel_size)
        self.stride, self.padding = triple("stride", stride), triple("padding", padding)
        self.dilation = triple("dilation", dilation)
        self.indice_key = indice_key
        self.weight = nn.Parameter(torch.empty(self._weight_shape()))
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self.reset_parameters()

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def reset_parameters(self) -> None:
        # nn.Conv3d's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _op_weight(self) -> torch.Tensor:
        """[K, in, out] in the kernel map's tap order."""
        return self.weight.permute(2, 3, 4, 1, 0).reshape(-1, self.in_channels, self.out_channels)

    def _check_input(self, x: SparseTensor) -> None:
        if not isinstance(x, SparseTensor):
            raise TypeError(f"{type(self).__name__} takes a SparseTensor, got {type(x).__name__}")
        if x.features.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: the input has {x.features.shape[1]} channels, the layer "
                f"takes {self.in_channels}"
            )

    def forward(self, x: SparseTensor) -> SparseTensor:
        self._check_input(x)
        indices, nbr, shape, coord_key = _kernel_map(
            x, self.kernel_size, self.stride, self.padding, self.dilation, self.subm
        )
        if self.indice_key is not None:  # what a SparseInverseConv3d with this key inverts
            # the input's sites, not the tensor: the cache must not hold features (and their graph)
            # (a later convolution with the same key replaces it, and the inverse made from it)
            x.maps.maps[("indice_key", self.indice_key)] = [
                (x.indices, x.spatial_shape, x.stride, x.coord_key),
                nbr,
                None,  # its inverse, made by the first SparseInverseConv3d that needs it
            ]
        out = K.sparse_conv(x.features, self._op_weight().to(x.features.dtype), nbr)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        stride = [s * t for s, t in zip(x.stride, self.stride)]
        return x.derive(out, indices, shape, x.stride if self.subm else stride, coord_key)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )
        return s + (f", indice_key={self.indice_key!r}" if self.indice_key else "")


class SubMConv3d(_Conv):
    """Submanifold convolution: outputs at the input sites only (odd kernel; the padding is
    ``(kernel_size - 1) // 2 * dilation``, whatever ``padding`` says, as in spconv)."""

    subm = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(
                f"SubMConv3d needs an odd kernel_size (its outputs are its inputs, so the kernel "
                f"must have a centre), got kernel_size={self.kernel_size}"
            )
        if self.stride != [1, 1, 1]:
            raise ValueError(f"SubMConv3d has stride 1, got stride={self.stride}")


class SparseConv3d(_Conv):
    """Regular (strided) sparse convolution: outputs at every site of the output grid
    (``nn.Conv3d``'s size) that some input reaches. Give it an ``indice_key`` for a
    :class:`SparseInverseConv3d` to invert it."""


class SparseInverseConv3d(_Conv):
    """The inverse of the :class:`SparseConv3d` with the same ``indice_key``: back to that
    convolution's input sites, through the transpose of its kernel map (its kernel size is
    the convolution's). Weight in ``nn.ConvTranspose3d``'s layout ``[in, out, kz, ky, kx]``."""

    def __init__(self, in_channels, out_channels, kernel_size, indice_key: str, bias=True):
        if not indice_key:
            raise ValueError("SparseInverseConv3d needs the indice_key of the conv it inverts")
        super().__init__(in_channels, out_channels, kernel_size, bias=bias, indice_key=indice_key)

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.out_channels, *self.kernel_size)

    def _op_weight(self) -> torch.Tensor:
        return self.weight.permute(2, 3, 4, 0, 1).reshape(-1, self.in_channels, self.out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        self._check_input(x)
        found = x.maps.maps.get(("indice_key", self.indice_key))
        if found is None:
            raise ValueError(
                f"SparseInverseConv3d(indice_key={self.indice_key!r}): no convolution with that "
                f"indice_key ran on this input's sites"
            )
        (indices, shape, stride, coord_key), nbr, inv = found
        if nbr.shape[0] != x.features.shape[0] or nbr.shape[1] != math.prod(self.kernel_size):
            raise ValueError(
                f"SparseInverseConv3d(indice_key={self.indice_key!r}): the input has "
                f"{x.features.shape[0]} sites and a {math.prod(self.kernel_size)}-tap kernel, "
                f"the convolution it inverts gave {nbr.shape[0]} sites with {nbr.shape[1]} taps"
            )
        if inv is None:
            inv = found[2] = invert(nbr, indices.shape[0])
            x.maps.built += 1
        out = K.sparse_conv(x.features, self._op_weight().to(x.features.dtype), inv)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return x.derive(out, indices, shape, stride, coord_key)


class SparseMaxPool3d(SparseModule):
    """Max-pooling over the active sites (``stride`` defaults to ``kernel_size``); ``subm=True``
    pools at the input sites."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, subm: bool = False):
        super().__init__()
        self.kernel_size = triple("kernel_size", kernel_size)
        self.stride = triple("stride", stride if stride is not None else kernel_size)
        self.padding, self.dilation = triple("padding", padding), triple("dilation", dilation)
        self.subm = subm
        if subm:
            self.stride = [1, 1, 1]

    def forward(self, x: SparseTensor) -> SparseTensor:
        indices, nbr, shape, coord_key = _kernel_map(
            x, self.kernel_size, self.stride, self.padding, self.dilation, self.subm
        )
        out = K.sparse_max_pool(x.features, nbr)
        stride = [s * t for s, t in zip(x.stride, self.stride)]
        return x.derive(out, indices, shape, stride, coord_key)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class SparseSequential(nn.Sequential):
    """``nn.Sequential`` over sparse tensors: sparse layers get the tensor, other modules
    (``nn.BatchNorm1d``, ``nn.ReLU``, ``nn.Linear``, ``nn.Dropout``) its features."""

    def forward(self, x):
        for module in self:
            if isinstance(module, SparseModule) or not isinstance(x, SparseTensor):
                x = module(x)
            else:
                x = x.replace_feature(module(x.features))
        return x
