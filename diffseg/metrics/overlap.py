"""Overlap metrics (Dice, IoU, pooled IoU counts) for one case at a time.

Masks are bool tensors of shape (R, *S): one channel per evaluated region (a class, or a union of
classes such as the BraTS regions), *S the spatial shape (2D or 3D). Any device works; results come
back as float64 tensors of shape (R,) on the input device.

Conventions (docs/methods.md §5):
- Dice = 2|P∩G| / (|P| + |G|), IoU = |P∩G| / |P∪G| (computed by MONAI).
- both P and G empty -> ``empty_score`` (1.0 by default: "nothing to find, nothing found" is a
  perfect answer); exactly one of them empty -> 0.
- Pooled IoU over a data set (SegRefiner's convention) is sum_cases I / sum_cases U, so
  :func:`intersection_union` returns the per-case counts to sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou

__all__ = ["as_binary_mask", "check_mask_pair", "region_masks", "dice_iou", "intersection_union"]


def as_binary_mask(x: torch.Tensor | np.ndarray, name: str = "mask") -> torch.Tensor:
    """Return ``x`` as a bool tensor; accepts a bool or numeric (0/1 only) torch tensor or numpy array."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor (or numpy array), got {type(x).__name__}")
    if x.dtype == torch.bool:
        return x
    if x.is_complex() or not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(
            f"{name}: expected a binary mask (bool, or numbers that are all 0 or 1), "
            f"got dtype {x.dtype} with other values"
        )
    return x != 0


def check_mask_pair(
    pred: torch.Tensor, target: torch.Tensor, spatial_dims: Sequence[int] = (1, 2, 3)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (R, *S) prediction/target pair of binary masks; return them as bool tensors.

    ``spatial_dims`` lists the allowed numbers of spatial axes (len(S)).
    """
    pred = as_binary_mask(pred, "pred")
    target = as_binary_mask(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape (R, *S), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.ndim - 1 not in spatial_dims:
        raise ValueError(
            f"expected masks of shape (R, *S) with {' or '.join(map(str, spatial_dims))} spatial axes, "
            f"got shape {tuple(pred.shape)}"
        )
    if pred.shape[0] < 1 or any(s < 1 for s in pred.shape[1:]):
        raise ValueError(f"expected non-empty masks of shape (R, *S), got shape {tuple(pred.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target are on different devices: {pred.device} and {target.device}")
    return pred, target


def region_masks(labels: torch.Tensor, regions: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """Bool masks (R, *S) of an integer class-index map ``labels`` (*S), one per region, in the
    mapping's order; region r is the union of its listed class indices.

    Example (BraTS 2023 labels): ``{"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}``.
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected an integer class-index tensor (*S), got {got}")
    if labels.ndim not in (1, 2, 3):
        raise ValueError(f"labels: expected a 1D, 2D or 3D class-index map, got shape {tuple(labels.shape)}")
    if not isinstance(regions, Mapping) or len(regions) == 0:
        raise ValueError(f"regions: expected a non-empty mapping name -> list of class indices, got {regions!r}")
    out = []
    for name, classes in regions.items():
        classes = list(classes) if not isinstance(classes, int) else [classes]
        if len(classes) == 0 or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
            raise ValueError(f"region {name!r}: expected a non-empty list of int class indices, got {classes!r}")
        idx = torch.tensor(classes, dtype=labels.dtype, device=labels.device)
        out.append(torch.isin(labels, idx))
    return torch.stack(out)


def dice_iou(
    pred: torch.Tensor, target: torch.Tensor, empty_score: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-region Dice and IoU of bool masks (R, *S) -> two float64 tensors (R,).

    Both empty -> ``empty_score`` (default 1.0); exactly one empty -> 0. Computed by MONAI's
    ``compute_dice`` / ``compute_iou`` with ``ignore_empty=False`` (which scores empty-vs-empty as 1).
    """
    pred, target = check_mask_pair(pred, target)
    # MONAI expects (B, C, *S); B = 1 case, C = regions.
    dice = compute_dice(pred[None], target[None], include_background=True, ignore_empty=False)[0]
    iou = compute_iou(pred[None], target[None], include_background=True, ignore_empty=False)[0]
    dice, iou = dice.double(), iou.double()
    if empty_score != 1.0:
        both_empty = ~(pred.flatten(1).any(1) | target.flatten(1).any(1))
        fill = torch.full_like(dice, float(empty_score))
        dice, iou = torch.where(both_empty, fill, dice), torch.where(both_empty, fill, iou)
    return dice, iou


def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-region |P∩G| and |P∪G| of bool masks (R, *S), as float64 counts (R,).

    Sum them over cases for the pooled IoU = sum I / sum U (SegRefiner's data-set IoU).
    """
    pred, target = check_mask_pair(pred, target)
    inter = (pred & target).flatten(1).sum(1, dtype=torch.float64)
    union = (pred | target).flatten(1).sum(1, dtype=torch.float64)
    return inter, union


def wcov(pred: torch.Tensor, target: torch.Tensor) -> float:
    """SegDiff's WCov as its reference code computes it (docs/methods.md §2): the ratio of the smaller to the
    larger foreground area, min(|P|, |G|) / max(|P|, |G|) (not the instance "weighted coverage" of other
    papers). Both masks empty: 1 (the areas agree; the reference divides 0 by 0 there)."""
    p, t = as_binary_mask(pred, "pred"), as_binary_mask(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    a, b = int(p.sum()), int(t.sum())
    return 1.0 if max(a, b) == 0 else min(a, b) / max(a, b)
