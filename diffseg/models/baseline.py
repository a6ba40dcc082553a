"""Non-diffusion comparator: the same UNet family as the denoisers, without time input.

Trained with Dice + CE on patches and evaluated through the same sliding-window predictor and
metrics as every diffusion model, so the comparison is fair (ImgX paper: the 3D UNet roughly
matches the diffusion model). An SDN neck (docs/methods.md §4) plugs into the network's ``neck``.
"""
from __future__ import annotations

import torch

from diffseg.models.base import FINAL, SegmentationModule
from diffseg.models.losses import segmentation_loss


class UNetSegmenter(SegmentationModule):
    def __init__(self, net: torch.nn.Module, loss: str = "dice_ce", **kwargs):
        super().__init__(net=net, **kwargs)
        self.loss_fn = segmentation_loss(loss)

    def training_loss(self, batch):
        logits = self.net(batch["image"])
        return self.loss_fn(logits, batch["label"]), {}

    def predict_window(self, image, batch=None):
        return {FINAL: torch.softmax(self.net(image).float(), dim=1)}
