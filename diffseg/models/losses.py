"""Segmentation losses on class logits, from MONAI (docs/methods.md §1: Dice without background + CE)."""
from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss

from diffseg.utils.errors import ConfigError

LOSSES = ("dice_ce", "dice", "ce")


def segmentation_loss(name: str = "dice_ce", dice_weight: float = 1.0, ce_weight: float = 1.0) -> torch.nn.Module:
    """Loss on logits (B, C, *S) against class indices (B, 1, *S).

    dice_ce: soft Dice over the softmax, background excluded, plus cross-entropy (ImgX reference);
    dice / ce: one term alone (the loss ablation).
    """
    if name == "dice_ce":
        return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True,
                          lambda_dice=dice_weight, lambda_ce=ce_weight)
    if name == "dice":
        return DiceLoss(include_background=False, to_onehot_y=True, softmax=True)
    if name == "ce":
        return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, lambda_dice=0.0,
                          lambda_ce=1.0)
    raise ConfigError(f"model.loss: expected one of {LOSSES}, got {name!r}")
