"""pix2pix networks (Isola et al. 2017), re-implemented after the authors' PyTorch code
(junyanz/pytorch-CycleGAN-and-pix2pix): the U-Net and ResNet generators and the PatchGAN /
pixel discriminators, with the reference's option names, layer order and parameter counts
(unet_256: 54,413,955; unet_128: 41,828,995; PatchGAN basic on 6 channels: 2,768,705).
"""

from __future__ import annotations

import functools
import math
import re

import torch
from torch import nn


def norm_layer(norm: str):
    """`batch` (affine, running stats), `instance` (no affine, no running stats) or `none`."""
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {norm!r}")


def _uses_bias(norm: str) -> bool:
    # batch norm has its own shift; the reference gives convolutions a bias only otherwise
    return norm != "batch"


# --------------------------------------------------------------------------- U-Net


class UnetBlock(nn.Module):
    """One level of the U-Net: down-convolution, the inner levels, up-convolution; the block's
    input is concatenated to its output (the skip connection), except at the outermost level."""

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        norm: str = "batch",
        use_dropout: bool = False,
    ):
        super().__init__()
        self.outermost = outermost
        norm_fn, bias = norm_layer(norm), _uses_bias(norm)
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=bias)
        downrelu, uprelu = nn.LeakyReLU(0.2, True), nn.ReLU(True)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            layers = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, 2, 1, bias=bias)
            layers = [downrelu, downconv, uprelu, upconv, norm_fn(outer_nc)]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=bias)
            layers = [
                downrelu,
                downconv,
                norm_fn(inner_nc),
                submodule,
                uprelu,
                upconv,
                norm_fn(outer_nc),
            ]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """U-Net with `num_downs` downsamplings: an input of size 2**num_downs reaches 1x1 at the
    bottleneck (unet_256: 8, unet_128: 7). Dropout sits in the ngf*8 decoder blocks below the
    four outer levels (the innermost-but-one blocks)."""

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        num_downs: int,
        ngf: int = 64,
        norm: str = "batch",
        use_dropout: bool = True,
    ):
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"a U-Net needs at least 5 downsamplings, got {num_downs}")
        self.num_downs = num_downs
        block = UnetBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
        for _ in range(num_downs - 5):
            block = UnetBlock(ngf * 8, ngf * 8, submodule=block, norm=norm, use_dropout=use_dropout)
        block = UnetBlock(ngf * 4, ngf * 8, submodule=block, norm=norm)
        block = UnetBlock(ngf * 2, ngf * 4, submodule=block, norm=norm)
        block = UnetBlock(ngf, ngf * 2, submodule=block, norm=norm)
        self.model = UnetBlock(
            output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, norm=norm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = 2**self.num_downs
        if x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(
                f"unet with {self.num_downs} downsamplings needs height and width divisible by "
                f"{size}, "
                f"got {tuple(x.shape[-2:])} (use a matching netG, e.g. unet_{x.shape[-1]}, or "
                "crop_size)"
            )
        return self.model(x)


# --------------------------------------------------------------------------- ResNet


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str, use_dropout: bool):
        super().__init__()
        norm_fn, bias = norm_layer(norm), _uses_bias(norm)
        layers = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=bias),
            norm_fn(dim),
            nn.ReLU(True),
        ]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_fn(dim)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """Two stride-2 downsamplings, `n_blocks` residual blocks, two upsamplings (Johnson et al.)."""

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 64,
        norm: str = "batch",
        use_dropout: bool = True,
        n_blocks: int = 9,
    ):
        super().__init__()
        norm_fn, bias = norm_layer(norm), _uses_bias(norm)
        layers = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=bias),
            norm_fn(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
                norm_fn(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(ngf * 4, norm, use_dropout) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=bias
                ),
                norm_fn(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# --------------------------------------------------------------------------- discriminators


class NLayerDiscriminator(nn.Module):
    """PatchGAN: `n_layers` stride-2 4x4 convolutions then two stride-1 ones; each output value
    judges one receptive-field patch (70x70 for n_layers=3). Outputs logits (no sigmoid)."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        norm_fn, bias = norm_layer(norm), _uses_bias(norm)
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=bias),
                norm_fn(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=bias),
            norm_fn(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.model = nn.Sequential(*layers)
        self.n_layers = n_layers

    @property
    def receptive_field(self) -> int:
        rf = 1
        for m in reversed([m for m in self.model if isinstance(m, nn.Conv2d)]):
            rf = (rf - 1) * m.stride[0] + m.kernel_size[0]
        return rf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """1x1 PatchGAN: judges every pixel on its own (colour statistics only)."""

    def __init__(self, input_nc: int, ndf: int = 64, norm: str = "batch"):
        super().__init__()
        norm_fn, bias = norm_layer(norm), _uses_bias(norm)
        self.model = nn.Sequential(
            nn.Conv2d(input_nc, ndf, 1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 1, bias=bias),
            norm_fn(ndf * 2),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, 1, bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# --------------------------------------------------------------------------- factories


def define_generator(
    netG: str, input_nc: int, output_nc: int, ngf: int, norm: str, use_dropout: bool
) -> nn.Module:
    """`unet_256`, `unet_128` (any `unet_<2**k>`, e.g. unet_64 for small demos),
    `resnet_9blocks`, `resnet_6blocks`."""
    if m := re.fullmatch(r"unet_(\d+)", netG):
        size = int(m.group(1))
        if size < 32 or size & (size - 1):
            raise ValueError(f"netG={netG}: the U-Net size must be a power of two >= 32")
        return UnetGenerator(input_nc, output_nc, int(math.log2(size)), ngf, norm, use_dropout)
    if m := re.fullmatch(r"resnet_(\d+)blocks", netG):
        return ResnetGenerator(
            input_nc, output_nc, ngf, norm, use_dropout, n_blocks=int(m.group(1))
        )
    raise ValueError(
        f"netG={netG!r}: choose unet_256, unet_128 (unet_<2**k>) or resnet_9blocks / resnet_6blocks"
    )


def define_discriminator(
    netD: str, input_nc: int, ndf: int, n_layers_D: int, norm: str
) -> nn.Module:
    if netD == "basic":
        return NLayerDiscriminator(input_nc, ndf, n_layers=3, norm=norm)
    if netD == "n_layers":
        return NLayerDiscriminator(input_nc, ndf, n_layers=n_layers_D, norm=norm)
    if netD == "pixel":
        return PixelDiscriminator(input_nc, ndf, norm=norm)
    raise ValueError(
        f"netD={netD!r}: choose basic (70x70 PatchGAN), n_layers (uses n_layers_D) or pixel"
    )


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """The reference's `normal` init: conv weights N(0, gain), biases 0; batch-norm scales
    N(1, gain), shifts 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net
