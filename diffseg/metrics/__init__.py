"""Per-case segmentation metrics (pure functions on torch tensors; no Lightning/Hydra/data imports).

overlap: region masks, Dice/IoU, pooled-IoU counts; surface: HD95 and NSD in mm;
boundary: mBA and SegDiff's FBound (2D); overlap also SegDiff's WCov; calibration: ECE and its summable bin statistics.
"""

from diffseg.metrics.boundary import disk, ellipse_kernel, fbound, mba, mba_radii, seg2bmap
from diffseg.metrics.calibration import calibration_bins, ece, ece_from_bins
from diffseg.metrics.overlap import as_binary_mask, check_mask_pair, dice_iou, intersection_union, region_masks, wcov
from diffseg.metrics.surface import hd95, image_diagonal, nsd

__all__ = [
    "as_binary_mask",
    "calibration_bins",
    "check_mask_pair",
    "dice_iou",
    "disk",
    "ece",
    "ece_from_bins",
    "ellipse_kernel",
    "fbound",
    "hd95",
    "image_diagonal",
    "intersection_union",
    "mba",
    "mba_radii",
    "nsd",
    "region_masks",
    "seg2bmap",
    "wcov",
]
