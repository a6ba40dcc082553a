"""Semantic Diffusion Network neck (docs/methods.md §4): one learnable anisotropic-diffusion step on features.

Semantic difference convolution:  y(p) = sum_{q in N(p)} w_q * s(v_q, v_p) * (u_q - u_p)
with w a per-channel kernel over the k^d neighbourhood and s(v_q, v_p) = exp(-mean_c (A v_q - A v_p)^2)
in (0, 1] (A a learned 1x1 conv on the guidance feature v): near 1 inside a region, near 0 across a
semantic boundary, so features are smoothed within regions but not across them. Neighbours outside the
image contribute nothing (no-flux boundary).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffseg.nets.unet import check_spatial_dims, conv_nd

SDN_MODES = ("single", "multi")


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear (2D) / trilinear (3D) resize to ``size``; no-op when the size already matches."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class SemanticDifferenceConv(nn.Module):
    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        guide_channels: int,
        kernel_size: int = 3,
        embed_channels: int | None = None,
    ):
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        n = kernel_size**spatial_dims
        # w: one weight per channel and neighbour, laid out like a depthwise conv kernel (C, 1, k, ..., k)
        bound = 1.0 / math.sqrt(n)
        self.weight = nn.Parameter(torch.empty(channels, n).uniform_(-bound, bound))
        self.similarity = conv_nd(spatial_dims, guide_channels, embed_channels or guide_channels, 1)  # A
        r = kernel_size // 2
        self.offsets = list(itertools.product(range(-r, r + 1), repeat=spatial_dims))

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if u.ndim != self.spatial_dims + 2 or u.shape[1] != self.channels:
            raise ValueError(
                f"u must be (B, {self.channels}, *S) with {self.spatial_dims} spatial dims, got {tuple(u.shape)}"
            )
        if v.ndim != u.ndim or v.shape[0] != u.shape[0]:
            raise ValueError(f"guidance v must match u's batch and rank, got u {tuple(u.shape)}, v {tuple(v.shape)}")
        size = u.shape[2:]
        e = self.similarity(resize_to(v, size))  # A v at u's resolution
        r = self.kernel_size // 2
        pad = (r, r) * self.spatial_dims
        u_pad = F.pad(u, pad)
        e_pad = F.pad(e, pad, mode="replicate")
        valid = F.pad(torch.ones((1, 1, *size), dtype=u.dtype, device=u.device), pad)  # 1 inside, 0 outside

        y = torch.zeros_like(u)
        for idx, off in enumerate(self.offsets):  # vectorised over pixels; loop over the k^d offsets only
            window = tuple(slice(r + o, r + o + s) for o, s in zip(off, size))
            u_q, e_q, m_q = (t[(..., *window)] for t in (u_pad, e_pad, valid))
            s = torch.exp(-(e_q - e).pow(2).mean(dim=1, keepdim=True))  # s(v_q, v_p) in (0, 1]
            w = self.weight[:, idx].reshape(1, -1, *([1] * self.spatial_dims))
            y = y + w * s * m_q * (u_q - u)  # SDN: y(p) += w_q s(v_q, v_p) (u_q - u_p)
        return y


class SDNFusion(nn.Module):
    """Fusion of the diffused response with the input: 1x1 conv of [u, y] back to u's width."""

    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.conv = conv_nd(spatial_dims, 2 * channels, channels, 1)

    def forward(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([u, resize_to(y, u.shape[2:])], dim=1))


class _SDNUnit(nn.Module):
    def __init__(self, spatial_dims: int, channels: int, guide_channels: int, own_guide: bool):
        super().__init__()
        # single-scale guidance: a stride-2 3x3 conv of the feature itself
        self.guide = conv_nd(spatial_dims, channels, channels, 3, stride=2, padding=1) if own_guide else None
        self.sdc = SemanticDifferenceConv(spatial_dims, channels, guide_channels)
        self.fusion = SDNFusion(spatial_dims, channels)

    def forward(self, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        if self.guide is not None:
            v = self.guide(u)
        return self.fusion(u, self.sdc(u, v))


class SDNNeck(nn.Module):
    """Neck for ``TimeUNet(neck=...)``: takes the per-level features [level0, ..., deepest] and returns
    a list of the same shapes.

    single: only the deepest feature is diffused, guided by a stride-2 conv of itself.
    multi: level i < deepest is guided by level i+1 (the deeper, more semantic one, upsampled; the
    un-diffused encoder feature), the deepest by its own stride-2 conv.
    """

    def __init__(self, spatial_dims: int, level_channels: Sequence[int], mode: str = "single"):
        super().__init__()
        if mode not in SDN_MODES:
            raise ValueError(f"mode must be one of {SDN_MODES}, got {mode!r}")
        self.level_channels = [int(c) for c in level_channels]
        if not self.level_channels:
            raise ValueError("level_channels must list at least one width")
        self.mode = mode
        last = len(self.level_channels) - 1
        levels = range(len(self.level_channels)) if mode == "multi" else [last]
        self.units = nn.ModuleDict(
            {
                str(i): _SDNUnit(
                    spatial_dims,
                    self.level_channels[i],
                    self.level_channels[i] if i == last else self.level_channels[i + 1],
                    own_guide=i == last,
                )
                for i in levels
            }
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        widths = [f.shape[1] for f in features]
        if widths != self.level_channels:
            raise ValueError(f"expected features of widths {self.level_channels}, got {widths}")
        out = list(features)
        for key, unit in self.units.items():
            i = int(key)
            out[i] = unit(features[i], features[i + 1] if i + 1 < len(features) else None)
        return out
