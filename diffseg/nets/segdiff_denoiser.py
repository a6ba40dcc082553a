"""SegDiff's denoiser: eps_theta(x_t, I, t) = UNet(F(x_t) + G(I), t) (docs/methods.md §2).

F is a single 3x3 conv on the noisy mask, G an RRDB image encoder; both map to C = channels[0] of the
UNet. Ablations from the paper: ``conditioning="concat"`` feeds [F(x_t), G(I)] (2C channels) and
``conditioning="none"`` feeds cat(x_t, I) straight into the UNet (no F, no G).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffseg.nets.rrdb import RRDBEncoder
from diffseg.nets.unet import DEFAULT_CHANNELS, TimeUNet, conv_nd

CONDITIONINGS = ("sum", "concat", "none")


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
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        unet = dict(unet or {})
        reserved = {"spatial_dims", "in_channels", "out_channels"} & unet.keys()
        if reserved:
            raise ValueError(f"unet kwargs must not set {sorted(reserved)}: SegDiffDenoiser derives them")
        self.conditioning = conditioning
        self.image_channels = image_channels
        self.mask_channels = mask_channels
        c = int(list(unet.get("channels", DEFAULT_CHANNELS))[0])

        if conditioning == "none":
            self.mask_encoder = None
            self.image_encoder = None
            unet_in = mask_channels + image_channels
        else:
            self.mask_encoder = conv_nd(spatial_dims, mask_channels, c, 3, padding=1)  # F(x_t)
            self.image_encoder = RRDBEncoder(  # G(I)
                spatial_dims, image_channels, c, rrdb_blocks, rrdb_features, rrdb_growth
            )
            unet_in = c if conditioning == "sum" else 2 * c
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
        """eps_theta from x_t and ``encode_image(image)``."""
        if x_t.shape[0] != image_features.shape[0] or x_t.shape[2:] != image_features.shape[2:]:
            raise ValueError(
                f"x_t and image must share batch and spatial size, got {tuple(x_t.shape)} and "
                f"{tuple(image_features.shape)}"
            )
        if x_t.shape[1] != self.mask_channels:
            raise ValueError(f"expected {self.mask_channels} mask channels, got {x_t.shape[1]}")
        if self.conditioning == "none":
            h = torch.cat([x_t, image_features], dim=1)
        elif self.conditioning == "sum":
            h = self.mask_encoder(x_t) + image_features  # h = F(x_t) + G(I)
        else:
            h = torch.cat([self.mask_encoder(x_t), image_features], dim=1)
        return self.unet(h, t)
