"""ESRGAN Residual-in-Residual Dense Blocks without batch norm: SegDiff's image encoder G(I) (docs/methods.md §2)."""

from __future__ import annotations

import torch
from torch import nn

from diffseg.nets.unet import conv_nd

RESIDUAL_SCALE = 0.2  # ESRGAN residual scaling, used both inside the dense blocks and around each RRDB


class DenseBlock(nn.Module):
    """ESRGAN ResidualDenseBlock_5C: five 3x3 convs, conv k sees [x, x1, ..., x_{k-1}] (``growth`` each),
    LeakyReLU(0.2) after the first four; output x + 0.2 * x5."""

    def __init__(self, spatial_dims: int, features: int = 64, growth: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            conv_nd(spatial_dims, features + k * growth, growth if k < 4 else features, 3, padding=1)
            for k in range(5)
        )
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for conv in self.convs[:-1]:
            outs.append(self.act(conv(torch.cat(outs, dim=1))))
        return x + RESIDUAL_SCALE * self.convs[-1](torch.cat(outs, dim=1))


class RRDB(nn.Module):
    """Residual-in-Residual Dense Block: three dense blocks with an outer residual scaled by 0.2."""

    def __init__(self, spatial_dims: int, features: int = 64, growth: int = 32):
        super().__init__()
        self.blocks = nn.Sequential(*(DenseBlock(spatial_dims, features, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + RESIDUAL_SCALE * self.blocks(x)


class RRDBEncoder(nn.Module):
    """G(I), SegDiff's RRDBNet without upsampling: conv in -> N RRDBs -> trunk conv (+ long skip from conv in,
    as in ESRGAN's trunk) -> HR conv -> LeakyReLU(0.2) -> conv out to ``out_channels``
    (reference: conv_first, RRDB_trunk, trunk_conv, HRconv, lrelu, conv_last). ``num_blocks=0`` leaves the
    conv stack only. Resolution is preserved."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_blocks: int = 10,
        features: int = 64,
        growth: int = 32,
    ):
        super().__init__()
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if features < 1 or growth < 1:
            raise ValueError(f"features and growth must be positive, got features={features}, growth={growth}")
        self.conv_in = conv_nd(spatial_dims, in_channels, features, 3, padding=1)
        self.trunk = nn.Sequential(*(RRDB(spatial_dims, features, growth) for _ in range(num_blocks)))
        self.trunk_conv = conv_nd(spatial_dims, features, features, 3, padding=1)
        self.hr_conv = conv_nd(spatial_dims, features, features, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.conv_out = conv_nd(spatial_dims, features, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_in(x)
        fea = fea + self.trunk_conv(self.trunk(fea))
        return self.conv_out(self.act(self.hr_conv(fea)))
