"""Building blocks of the TimeUNet (docs/methods.md §1-§3): convs for 2D/3D, GroupNorm, the sinusoidal
time embedding, the time-conditioned residual block, self-attention, and the resampling layers.

Only ``torch.nn``; every block works for ``spatial_dims`` 2 and 3 from the same code. Blocks take
``(x, temb)`` so that a stage can run any sequence of them with one time embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}
TIME_CONDITIONINGS = ("add", "scale_shift")


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return getattr(nn, f"Conv{check_spatial_dims(spatial_dims)}d")(*args, **kwargs)


def conv_transpose_nd(spatial_dims: int, *args, **kwargs) -> nn.Module:
    return getattr(nn, f"ConvTranspose{check_spatial_dims(spatial_dims)}d")(*args, **kwargs)


def group_norm(channels: int, norm_groups: int) -> nn.GroupNorm:
    """GroupNorm with gcd(norm_groups, channels) groups so that any width works (e.g. 8 or 12)."""
    return nn.GroupNorm(math.gcd(norm_groups, channels), channels)


def make_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias in place (improved-diffusion's ``zero_module``): a residual branch
    that ends in it starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer/DDPM sinusoidal features of (possibly non-integer) timesteps, (B,) -> (B, dim).

    emb = [cos(t * f_i), sin(t * f_i)], f_i = max_period^(-i / (dim/2)), i = 0..dim/2-1
    (same convention as guided-diffusion and diffusers' get_timestep_embedding(flip_sin_to_cos=True,
    downscale_freq_shift=0)); an odd ``dim`` is zero-padded by one column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm -> act -> conv1 -> [time] -> GroupNorm -> act -> dropout -> conv2, + skip (1x1 conv when
    the width changes).

    ``time_conditioning="add"``: h = conv1(...) + Linear(act(t_emb)) before the second GroupNorm (DDPM).
    ``"scale_shift"``: [scale, shift] = Linear(act(t_emb)) (2 x width) and the second GroupNorm's output
    becomes GroupNorm(h)·(1 + scale) + shift (improved-diffusion's ``use_scale_shift_norm``).
    ``zero_init``: conv2 starts at zero, so the block starts as its skip path (improved-diffusion).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        time_dim: int | None,
        norm_groups: int = 8,
        activation: str = "gelu",
        dropout: float = 0.0,
        time_conditioning: str = "add",
        zero_init: bool = False,
    ):
        super().__init__()
        if time_conditioning not in TIME_CONDITIONINGS:
            raise ValueError(f"time_conditioning must be one of {TIME_CONDITIONINGS}, got {time_conditioning!r}")
        self.scale_shift = time_conditioning == "scale_shift"
        self.norm1 = group_norm(in_channels, norm_groups)
        self.act = make_activation(activation)
        self.conv1 = conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)
        proj_width = 2 * out_channels if self.scale_shift else out_channels
        self.time_proj = nn.Linear(time_dim, proj_width) if time_dim is not None else None
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(spatial_dims, out_channels, out_channels, 3, padding=1)
        if zero_init:
            zero_(self.conv2)
        self.skip = (
            conv_nd(spatial_dims, in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_proj is None:
            h = self.norm2(h)
        else:
            proj = self.time_proj(self.act(temb))
            proj = proj.reshape(*proj.shape, *([1] * (h.ndim - 2)))
            if self.scale_shift:
                scale, shift = proj.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + proj)
        h = self.conv2(self.dropout(self.act(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions: x + proj(MHA(GroupNorm(x))).

    Projections are 1x1 convs; q, k, v are the three consecutive C-sized chunks of ``qkv`` and head h uses
    channels [h*C/heads, (h+1)*C/heads) of each, i.e. the same layout as ``torch.nn.MultiheadAttention``.
    ``zero_init``: ``proj`` starts at zero (improved-diffusion), so the block starts as the identity.
    """

    def __init__(
        self, spatial_dims: int, channels: int, num_heads: int = 1, norm_groups: int = 8, zero_init: bool = False
    ):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads must divide the width: got num_heads={num_heads} for {channels} channels")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = conv_nd(spatial_dims, channels, 3 * channels, 1)
        self.proj = conv_nd(spatial_dims, channels, channels, 1)
        if zero_init:
            zero_(self.proj)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, -1)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, N, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = out.transpose(-1, -2).reshape(b, c, *spatial)
        return x + self.proj(out)


class Resample(nn.Module):
    """A resampling layer run inside a stage (it ignores the time embedding): ``down`` is a stride-2 3x3 conv,
    ``transpose`` a stride-2 transposed conv, ``nearest`` nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, mode: str):
        super().__init__()
        if mode == "down":
            self.layer = conv_nd(spatial_dims, in_channels, out_channels, 3, stride=2, padding=1)
        elif mode == "transpose":
            self.layer = conv_transpose_nd(spatial_dims, in_channels, out_channels, 2, stride=2)
        elif mode == "nearest":
            self.layer = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1),
            )
        else:
            raise ValueError(f"resample mode must be 'down', 'transpose' or 'nearest', got {mode!r}")

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.layer(x)


class Stage(nn.Module):
    """A sequence of blocks (res, attention, resample) sharing the time embedding."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, temb)
        return x
