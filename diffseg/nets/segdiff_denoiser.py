"""SegDiff's denoiser: eps_theta(x_t, I, t) = UNet(F(x_t) + G(I), t) (docs/methods.md §2).

F is a single 3x3 conv on the noisy mask, G an RRDB image encoder; both map to C = channels[0] of the
UNet. As in the reference, F IS the UNet's first conv (``unet.conv_in``): the UNet runs
``unet(x_t, t, input_features=G(I))``, i.e. conv_in(x_t) + G(I) enters the first block and is the first
skip. Ablations from the paper: ``conditioning="concat"`` feeds [F(x_t), G(I)] (2C channels; F is then a
conv of its own and the UNet's conv_in maps 2C to C) and ``conditioning="none"`` feeds cat(x_t, I)
straight into the UNet (no F, no G).

Time: with ``num_train_steps`` = T the UNet's sinusoidal embedding gets t·1000/T (the reference's
``rescale_timesteps=True``), so that T = 50 or 100 spans the embedding's frequencies as a 1000-step model
does; the caller always passes the step index t in [0, T).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffseg.nets.rrdb import RRDBEncoder
from diffseg.nets.unet import DEFAULT_CHANNELS, TimeUNet, conv_nd

CONDITIONINGS = ("sum", "concat", "none")
RESCALED_STEPS = 1000.0  # improved-diffusion: the network sees t·1000/T


class SegDiffDenoiser(nn.Module):
    def __init__(
        self,
        spatial_dims: int,
        image_channels: int,
        mask_channels: int = 1,
        conditioning: str = "sum",
        rrdb_blocks: int = 10,
        rrdb_features: int = 64,
        rrdb_growth: int = 32,
        unet: Mapping[str, Any] | None = None,
        num_train_steps: int | None = None,
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        unet = dict(unet or {})
        reserved = {"spatial_dims", "in_channels", "out_channels"} & unet.keys()
        if reserved:
            raise ValueError(f"unet kwargs must not set {sorted(reserved)}: SegDiffDenoiser derives them")
        if num_train_steps is not None and (isinstance(num_train_steps, bool) or int(num_train_steps) < 1):
            raise ValueError(f"num_train_steps: expected null or an int >= 1 (T), got {num_train_steps!r}")
        self.time_scale = 1.0 if num_train_steps is None else RESCALED_STEPS / int(num_train_steps)
        self.conditioning = conditioning
        self.image_channels = image_channels
        self.mask_channels = mask_channels
        c = int(list(unet.get("channels", DEFAULT_CHANNELS))[0])

        if conditioning == "none":
            self.mask_encoder = None
            self.image_encoder = None
            unet_in = mask_channels + image_channels
        elif conditioning == "sum":
            self.mask_encoder = None  # F(x_t) = unet.conv_in(x_t)
            self.image_encoder = RRDBEncoder(spatial_dims, image_channels, c, rrdb_blocks, rrdb_features, rrdb_growth)
            unet_in = mask_channels
        else:
            self.mask_encoder = conv_nd(spatial_dims, mask_channels, c, 3, padding=1)  # F(x_t)
            self.image_encoder = RRDBEncoder(  # G(I)
                spatial_dims, image_channels, c, rrdb_blocks, rrdb_features, rrdb_growth
            )
            unet_in = 2 * c
        self.unet = TimeUNet(spatial_dims, unet_in, mask_channels, **unet)

    def forward(self, x_t: torch.Tensor, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoise(x_t, self.encode_image(image), t)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """G(I) (the image itself for ``conditioning="none"``). It does not depend on x_t or t, so a
        sampler computes it once per image and reuses it at every step and for every sample."""
        if image.ndim < 3 or image.shape[1] != self.image_channels:
            raise ValueError(f"expected {self.image_channels} image channels, got image of shape {tuple(image.shape)}")
        return image if self.image_encoder is None else self.image_encoder(image)

    def denoise(self, x_t: torch.Tensor, image_features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta from x_t, ``encode_image(image)`` and the step index t (B,)."""
        if x_t.shape[0] != image_features.shape[0] or x_t.shape[2:] != image_features.shape[2:]:
            raise ValueError(
                f"x_t and image must share batch and spatial size, got {tuple(x_t.shape)} and "
                f"{tuple(image_features.shape)}"
            )
        if x_t.shape[1] != self.mask_channels:
            raise ValueError(f"expected {self.mask_channels} mask channels, got {x_t.shape[1]}")
        t = torch.as_tensor(t, device=x_t.device).float() * self.time_scale  # t·1000/T
        if self.conditioning == "sum":
            return self.unet(x_t, t, input_features=image_features)  # h = conv_in(x_t) + G(I) = F(x_t) + G(I)
        if self.conditioning == "none":
            h = torch.cat([x_t, image_features], dim=1)
        else:
            h = torch.cat([self.mask_encoder(x_t), image_features], dim=1)
        return self.unet(h, t)
