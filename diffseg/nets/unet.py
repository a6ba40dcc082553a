"""Time-conditioned UNet shared by every model (docs/methods.md §1, §2, §3).

One network family, parametrised instead of copied (blocks in diffseg.nets.blocks):

* ImgX-DiffSeg (§1): 3D, channels (32, 64, 128, 256), GELU, stride-2 conv down, transposed conv up,
  sinusoidal time embedding; image and noisy mask concatenated at the input.
* SegDiff (§2): improved-diffusion's UNet: ``skips="block"`` (a skip per block, num_res_blocks + 1
  decoder blocks per level), ``time_conditioning="scale_shift"``, ``zero_init``, SiLU, attention at coarse
  levels and in the middle, nearest-upsample + conv up, and ``forward(x, t, input_features=G(I))`` so
  that the network's own first conv is SegDiff's F(x_t).
* SegRefiner (§3): learned time embedding (one vector per step, ``time_embedding="learned"``).
* The non-diffusion baseline: ``time_embedding=None`` is exactly the same network without any time input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from diffseg.nets.blocks import (  # noqa: F401  (re-exported: the UNet's public building blocks)
    TIME_CONDITIONINGS,
    AttentionBlock,
    ResBlock,
    Resample,
    Stage,
    check_spatial_dims,
    conv_nd,
    conv_transpose_nd,
    group_norm,
    make_activation,
    sinusoidal_embedding,
    zero_,
)

DEFAULT_CHANNELS: tuple[int, ...] = (32, 64, 128, 256)
_TIME_EMBEDDINGS = ("sinusoidal", "learned", None)
_UPSAMPLES = ("transpose", "nearest")
SKIPS = ("level", "block")


class TimeUNet(nn.Module):
    """UNet with optional time conditioning, for 2D and 3D inputs.

    ``conv_in`` maps the input to ``channels[0]`` (``forward``'s ``input_features`` are added to its
    output). Encoder level i (i = 0 full resolution) has ``num_res_blocks`` res blocks at width
    ``channels[i]`` (each followed by self-attention when i is in ``attention_levels``); stride-2 3x3 convs
    go down between levels. The deepest level is followed by the middle block (res, optional attention,
    res). Output: GroupNorm -> act -> conv to ``out_channels``.

    ``skips="level"``: one skip per level. The per-level features [level0, ..., level_{L-2}, bottleneck]
    (widths ``level_channels``) go through the optional ``neck``; the decoder goes up (transposed conv or
    nearest + conv, to the level's width), concatenates the level's feature and runs ``num_res_blocks``
    res blocks.
    ``skips="block"`` (improved-diffusion): the down convs keep the width; the output of conv_in, of every
    encoder res(+attention) block and of every down conv is a skip, and each decoder level runs
    ``num_res_blocks + 1`` res blocks, each on cat(h, the last unused skip), followed by the up layer
    (same width) at the end of every level but the first. No neck.
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
        skips: str = "level",
        time_conditioning: str = "add",
        zero_init: bool = False,
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
        if skips not in SKIPS:
            raise ValueError(f"skips must be one of {SKIPS}, got {skips!r}")
        if time_conditioning not in TIME_CONDITIONINGS:
            raise ValueError(f"time_conditioning must be one of {TIME_CONDITIONINGS}, got {time_conditioning!r}")
        if skips == "block" and neck is not None:
            raise ValueError("a neck needs one feature per level: use skips='level' with a neck")
        make_activation(activation)  # validate early
        if mid_attention is None:
            mid_attention = bool(attention_levels)

        self.spatial_dims = dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.level_channels = list(channels)
        self.time_embedding = time_embedding
        self.num_time_steps = num_time_steps
        self.skips = skips
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
            return ResBlock(dims, cin, cout, time_dim, norm_groups, activation, dropout, time_conditioning, zero_init)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(dims, c, num_heads, norm_groups, zero_init)

        def res_attn(level: int, cin: int) -> list[nn.Module]:
            return [res(cin, channels[level]), *([attn(channels[level])] if level in attention_levels else [])]

        # parameters are created in the order conv_in, encoder, middle, decoder, out (same seed, same init)
        self.conv_in = conv_nd(dims, in_channels, c0, 3, padding=1)
        build_encoder, build_decoder = (
            (self._build_level_encoder, self._build_level_decoder)
            if skips == "level"
            else (self._build_block_encoder, self._build_block_decoder)
        )
        build_encoder(dims, channels, num_res_blocks, res_attn)
        cl = channels[-1]
        self.middle = Stage([res(cl, cl), *([attn(cl)] if mid_attention else []), res(cl, cl)])
        build_decoder(dims, channels, num_res_blocks, res_attn, upsample)
        self.out = nn.Sequential(
            group_norm(c0, norm_groups), make_activation(activation), conv_nd(dims, c0, out_channels, 3, padding=1)
        )
        if zero_init:
            zero_(self.out[-1])

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _level_stage(channels, num_res_blocks, res_attn, level: int, cin: int) -> Stage:
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks += res_attn(level, cin)
            cin = channels[level]
        return Stage(blocks)

    def _build_level_encoder(self, dims, channels, num_res_blocks, res_attn) -> None:
        self.encoder = nn.ModuleList(
            self._level_stage(channels, num_res_blocks, res_attn, i, channels[i]) for i in range(len(channels))
        )
        self.down = nn.ModuleList(
            conv_nd(dims, channels[i], channels[i + 1], 3, stride=2, padding=1) for i in range(len(channels) - 1)
        )

    def _build_level_decoder(self, dims, channels, num_res_blocks, res_attn, upsample) -> None:
        def up(cin: int, cout: int) -> nn.Module:
            if upsample == "transpose":
                return conv_transpose_nd(dims, cin, cout, 2, stride=2)
            return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv_nd(dims, cin, cout, 3, padding=1))

        # up[i] goes from level i+1 to level i; decoder[i] merges cat(up, skip_i) (2 * channels[i] wide)
        self.up = nn.ModuleList(up(channels[i + 1], channels[i]) for i in range(len(channels) - 1))
        self.decoder = nn.ModuleList(
            self._level_stage(channels, num_res_blocks, res_attn, i, 2 * channels[i]) for i in range(len(channels) - 1)
        )

    def _build_block_encoder(self, dims, channels, num_res_blocks, res_attn) -> None:
        # the output of input_blocks[k] is skip k + 1 (skip 0: conv_in's output); skip_channels their widths
        blocks: list[nn.Module] = []
        self.skip_channels = [channels[0]]
        cin = channels[0]
        for level in range(len(channels)):
            for _ in range(num_res_blocks):
                blocks.append(Stage(res_attn(level, cin)))
                cin = channels[level]
                self.skip_channels.append(cin)
            if level < len(channels) - 1:
                blocks.append(Resample(dims, cin, cin, "down"))
                self.skip_channels.append(cin)
        self.input_blocks = nn.ModuleList(blocks)

    def _build_block_decoder(self, dims, channels, num_res_blocks, res_attn, upsample) -> None:
        skips = list(self.skip_channels)
        blocks: list[nn.Module] = []
        cin = channels[-1]
        for level in reversed(range(len(channels))):
            for j in range(num_res_blocks + 1):
                layers = res_attn(level, cin + skips.pop())  # res on cat(h, last unused skip)
                cin = channels[level]
                if level > 0 and j == num_res_blocks:
                    layers.append(Resample(dims, cin, cin, upsample))
                blocks.append(Stage(layers))
        self.output_blocks = nn.ModuleList(blocks)

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
                input_features: torch.Tensor | None = None, fixed: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, *S), t (B,) or a scalar -> (B, out_channels, *S).

        ``input_features`` (B, channels[0], *S), if given, are added to conv_in(x) before the encoder (SegDiff:
        conv_in is F, the features are G(I)). With ``fixed = conv_in_fixed(first channels)``, x holds the last
        channels only (the same result as the whole input, up to rounding)."""
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
        if input_features is not None:
            expected = (x.shape[0], self.level_channels[0], *spatial)
            if tuple(input_features.shape) != expected:
                raise ValueError(f"input_features: expected shape {expected}, got {tuple(input_features.shape)}")
            h = h + input_features
        if self.skips == "block":
            return self.out(self._block_skip_body(h, temb))
        return self.out(self._level_skip_body(h, temb))

    def _level_skip_body(self, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
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
        return h

    def _block_skip_body(self, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        skips = [h]
        for block in self.input_blocks:
            h = block(h, temb)
            skips.append(h)
        h = self.middle(h, temb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), temb)
        return h
