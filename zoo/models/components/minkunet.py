"""MinkUNet (Choy et al., "4D Spatio-Temporal ConvNets: Minkowski Convolutional Neural
Networks", CVPR 2019), as mmdetection3d and torchsparse build it for LiDAR segmentation: a stem
of two 3x3x3 submanifold convolutions, four encoder stages (a 2x2x2 stride-2 convolution, then
two residual blocks), four decoder stages (a 2x2x2 inverse convolution back to the matching
encoder's sites, concatenation with that encoder's features, two residual blocks) and a linear
classifier per voxel.

Widths: mmdetection3d's ``minkunet_w16`` / ``w20`` / ``w32`` (conf/model/minkunet_w*.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from zoo.sparse import (
    SparseConv3d,
    SparseInverseConv3d,
    SparseModule,
    SparseSequential,
    SparseTensor,
    SubMConv3d,
)


def conv_bn_relu(c_in: int, c_out: int, conv: nn.Module) -> SparseSequential:
    return SparseSequential(conv, nn.BatchNorm1d(c_out), nn.ReLU(inplace=True))


class ResidualBlock(SparseModule):
    """Two 3x3x3 submanifold convolutions with batch norm, and a 1x1x1 projection of the input
    where the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = SparseSequential(
            SubMConv3d(c_in, c_out, 3, bias=False),
            nn.BatchNorm1d(c_out),
            nn.ReLU(inplace=True),
            SubMConv3d(c_out, c_out, 3, bias=False),
            nn.BatchNorm1d(c_out),
        )
        self.skip = (
            SparseSequential(SubMConv3d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out))
            if c_in != c_out
            else None
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.body(x)
        skip = self.skip(x).features if self.skip is not None else x.features
        return out.replace_feature(torch.relu(out.features + skip))


class MinkUNet(nn.Module):
    """Voxel features [M, in_channels] in a :class:`zoo.sparse.SparseTensor` -> class logits
    [M, num_classes] at the same voxels."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        encoder_channels: Sequence[int] = (32, 64, 128, 256),
        decoder_channels: Sequence[int] = (256, 128, 96, 96),
        blocks_per_stage: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(encoder_channels) != len(decoder_channels):
            raise ValueError(
                f"encoder_channels {list(encoder_channels)} and decoder_channels "
                f"{list(decoder_channels)} must have one width per stage each"
            )
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.stem = SparseSequential(
            *conv_bn_relu(in_channels, base_channels, SubMConv3d(in_channels, base_channels, 3)),
            *conv_bn_relu(
                base_channels, base_channels, SubMConv3d(base_channels, base_channels, 3)
            ),
        )
        self.encoder = nn.ModuleList()
        c = base_channels
        widths = [base_channels]
        for i, width in enumerate(encoder_channels):
            down = SparseConv3d(c, c, 2, stride=2, bias=False, indice_key=f"down{i}")
            blocks = [ResidualBlock(c if j == 0 else width, width) for j in range(blocks_per_stage)]
            self.encoder.append(SparseSequential(*conv_bn_relu(c, c, down), *blocks))
            c = width
            widths.append(width)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i, width in enumerate(decoder_channels):
            key = f"down{len(encoder_channels) - 1 - i}"
            self.up.append(
                SparseSequential(
                    *conv_bn_relu(c, width, SparseInverseConv3d(c, width, 2, key, bias=False))
                )
            )
            skip = widths[len(encoder_channels) - 1 - i]
            self.decoder.append(
                SparseSequential(
                    *[
                        ResidualBlock(width + skip if j == 0 else width, width)
                        for j in range(blocks_per_stage)
                    ]
                )
            )
            c = width
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: SparseTensor) -> torch.Tensor:
        x = self.stem(x)
        skips = [x]
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        skips.pop()  # the deepest stage is the decoder's input, not a skip
        for up, decoder in zip(self.up, self.decoder):
            x = up(x)
            skip = skips.pop()
            x = decoder(x.replace_feature(torch.cat([x.features, skip.features], 1)))
        return self.classifier(self.dropout(x.features))
