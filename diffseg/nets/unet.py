"""Time-conditioned UNet shared by every model (docs/methods.md §1, §2, §3).

One network family, parametrised instead of copied:

* ImgX-DiffSeg (§1): 3D, channels (32, 64, 128, 256), GELU, stride-2 conv down, transposed conv up,
  sinusoidal time embedding; image and noisy mask concatenated at the input.
* SegDiff (§2): 2D, GroupNorm-SiLU-conv residual blocks with a Linear-SiLU-Linear time MLP, attention
  at coarse levels and in the middle, nearest-upsample + conv up.
* SegRefiner (§3): learned time embedding (one vector per step, ``time_embedding="learned"``).
* The non-diffusion baseline: ``time_embedding=None`` is exactly the same network without any time input.

Only ``torch.nn``; every block works for ``spatial_dims`` 2 and 3 from the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHANNELS: tuple[int, ...] = (32, 64, 128, 256)
_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}
_TIME_EMBEDDINGS = ("sinusoidal", "learned", None)
_UPSAMPLES = ("transpose", "nearest")


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
    """GroupNorm -> act -> conv (+ Linear(act(t_emb))) -> GroupNorm -> act -> dropout -> conv, + skip."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        time_dim: int | None,
        norm_groups: int = 8,
        activation: str = "gelu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.act = make_activation(activation)
        self.conv1 = conv_nd(spatial_dims, in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels) if time_dim is not None else None
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(spatial_dims, out_channels, out_channels, 3, padding=1)
        self.skip = (
            conv_nd(spatial_dims, in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_proj is not None:
            proj = self.time_proj(self.act(temb))
            h = h + proj.reshape(*proj.shape, *([1] * (h.ndim - 2)))
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions: x + proj(MHA(GroupNorm(x))).

    Projections are 1x1 convs; q, k, v are the three consecutive C-sized chunks of ``qkv`` and head h uses
    channels [h*C/heads, (h+1)*C/heads) of each, i.e. the same layout as ``torch.nn.MultiheadAttention``.
    """

    def __init__(self, spatial_dims: int, channels: int, num_heads: int = 1, norm_groups: int = 8):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads must divide the width: got num_heads={num_heads} for {channels} channels")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = conv_nd(spatial_dims, channels, 3 * channels, 1)
        self.proj = conv_nd(spatial_dims, channels, channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, -1)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, N, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = out.transpose(-1, -2).reshape(b, c, *spatial)
        return x + self.proj(out)


class _Stage(nn.Module):
    """A sequence of res blocks (each optionally followed by attention) sharing the time embedding."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, temb)
        return x


class TimeUNet(nn.Module):
    """UNet with optional time conditioning, for 2D and 3D inputs.

    Encoder level i (i = 0 full resolution) has ``num_res_blocks`` res blocks at width ``channels[i]``
    (each followed by self-attention when i is in ``attention_levels``); stride-2 3x3 convs go down between
    levels. The deepest level is followed by the middle block (res, optional attention, res). The list of
    per-level features [level0, ..., level_{L-2}, bottleneck] (widths ``level_channels``) goes through the
    optional ``neck``; the decoder goes up (transposed conv or nearest + conv), concatenates the level's
    feature and runs ``num_res_blocks`` res blocks; output: GroupNorm -> act -> conv to ``out_channels``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (),
        mid_attention: bool | None = None,
        num_heads: int = 1,
        time_embedding: str | None = "sinusoidal",
        num_time_steps: int | None = None,
        norm_groups: int = 8,
        activation: str = "gelu",
        upsample: str = "transpose",
        dropout: float = 0.0,
        neck: nn.Module | None = None,
    ):
        super().__init__()
        dims = check_spatial_dims(spatial_dims)
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths, got {channels}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        attention_levels = sorted({int(i) for i in attention_levels})
        if any(i < 0 or i >= len(channels) for i in attention_levels):
            raise ValueError(f"attention_levels must lie in [0, {len(channels) - 1}], got {attention_levels}")
        if time_embedding not in _TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {_TIME_EMBEDDINGS}, got {time_embedding!r}")
        if time_embedding == "learned" and (num_time_steps is None or num_time_steps < 1):
            raise ValueError(f"time_embedding='learned' needs num_time_steps >= 1, got {num_time_steps!r}")
        if upsample not in _UPSAMPLES:
            raise ValueError(f"upsample must be one of {_UPSAMPLES}, got {upsample!r}")
        make_activation(activation)  # validate early
        if mid_attention is None:
            mid_attention = bool(attention_levels)

        self.spatial_dims = dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.level_channels = list(channels)
        self.time_embedding = time_embedding
        self.num_time_steps = num_time_steps
        self.neck = neck

        # time embedding -> Linear-SiLU-Linear MLP (DDPM / SegDiff); learned = one vector per step (SegRefiner)
        c0 = channels[0]
        time_dim = 4 * c0 if time_embedding is not None else None
        self.time_table = nn.Embedding(num_time_steps, c0) if time_embedding == "learned" else None
        self.time_mlp = (
            nn.Sequential(nn.Linear(c0, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
            if time_embedding is not None
            else None
        )

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(dims, cin, cout, time_dim, norm_groups, activation, dropout)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(dims, c, num_heads, norm_groups)

        def stage(level: int, cin: int) -> _Stage:
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(res(cin, channels[level]))
                if level in attention_levels:
                    blocks.append(attn(channels[level]))
                cin = channels[level]
            return _Stage(blocks)

        self.conv_in = conv_nd(dims, in_channels, c0, 3, padding=1)
        self.encoder = nn.ModuleList(stage(i, channels[i]) for i in range(len(channels)))
        self.down = nn.ModuleList(
            conv_nd(dims, channels[i], channels[i + 1], 3, stride=2, padding=1) for i in range(len(channels) - 1)
        )
        cl = channels[-1]
        self.middle = _Stage([res(cl, cl), *([attn(cl)] if mid_attention else []), res(cl, cl)])

        def up(cin: int, cout: int) -> nn.Module:
            if upsample == "transpose":
                return conv_transpose_nd(dims, cin, cout, 2, stride=2)
            return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv_nd(dims, cin, cout, 3, padding=1))

        # up[i] goes from level i+1 to level i; decoder[i] merges cat(up, skip_i) (2 * channels[i] wide)
        self.up = nn.ModuleList(up(channels[i + 1], channels[i]) for i in range(len(channels) - 1))
        self.decoder = nn.ModuleList(stage(i, 2 * channels[i]) for i in range(len(channels) - 1))
        self.out = nn.Sequential(
            group_norm(c0, norm_groups), make_activation(activation), conv_nd(dims, c0, out_channels, 3, padding=1)
        )

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.level_channels) - 1)

    def _time(self, t: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.time_embedding is None:
            if t is not None:
                raise ValueError("this TimeUNet has time_embedding=None and takes no t; call forward(x)")
            return None
        if t is None:
            raise ValueError(f"this TimeUNet has time_embedding={self.time_embedding!r}; forward needs t of shape (B,)")
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
        if self.time_embedding == "learned":
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"time_embedding='learned' needs integer timesteps, got dtype {t.dtype}")
            if t.min() < 0 or t.max() >= self.num_time_steps:
                raise ValueError(
                    f"timesteps must lie in [0, {self.num_time_steps}), got min {int(t.min())}, max {int(t.max())}"
                )
            emb = self.time_table(t.long())
        else:
            emb = sinusoidal_embedding(t, self.level_channels[0]).to(self.time_mlp[0].weight.dtype)
        return self.time_mlp(emb)

    def conv_in_fixed(self, fixed: torch.Tensor) -> torch.Tensor:
        """conv_in's response to the FIRST input channels alone, bias included: pass it as ``forward(x, t,
        fixed=...)`` with x holding the remaining channels. conv_in is linear, so the share of inputs that
        stay the same over many calls (ImgX's image, over its sampling steps) is computed once."""
        weight = self.conv_in.weight[:, :fixed.shape[1]]
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        return conv(fixed, weight.to(fixed.dtype), self.conv_in.bias.to(fixed.dtype), padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None,
                fixed: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, *S) -> (B, out_channels, *S); with ``fixed = conv_in_fixed(first channels)``,
        x holds the last channels only (the same result as the whole input, up to rounding)."""
        k = 0 if fixed is None else self.in_channels - x.shape[1]
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels - k or (fixed is not None and k < 1):
            raise ValueError(
                f"expected input (B, {self.in_channels}, {', '.join('S' * self.spatial_dims)}) or its last "
                f"channels with fixed=conv_in_fixed(first channels), got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        m = self.size_multiple
        if any(s % m for s in spatial):
            raise ValueError(
                f"spatial size {spatial} must be divisible by {m} = 2**(len(channels)-1) "
                f"for {len(self.level_channels)} levels"
            )
        temb = self._time(t, x.shape[0], x.device)

        if fixed is None:
            h = self.conv_in(x)
        else:  # conv_in(cat(first, x)) = conv_in_fixed(first) + conv(x, the weights of x's channels)
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
            h = fixed + conv(x, self.conv_in.weight[:, k:].to(x.dtype), padding=1)
        features = []
        for i, stage in enumerate(self.encoder):
            h = stage(h, temb)
            if i < len(self.down):
                features.append(h)
                h = self.down[i](h)
        features.append(self.middle(h, temb))  # bottleneck = deepest level + middle block

        if self.neck is not None:
            shapes = [f.shape for f in features]
            features = list(self.neck(features))
            if [f.shape for f in features] != shapes:
                raise ValueError(
                    f"neck must return features of shapes {[tuple(s) for s in shapes]}, "
                    f"got {[tuple(f.shape) for f in features]}"
                )

        h = features[-1]
        for i in reversed(range(len(self.decoder))):
            h = self.up[i](h)
            h = self.decoder[i](torch.cat([h, features[i]], dim=1), temb)
        return self.out(h)
