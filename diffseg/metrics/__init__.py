"""Per-case segmentation metrics (pure functions on torch tensors; no Lightning/Hydra/data imports).

overlap: region masks, Dice/IoU, pooled-IoU counts; surface: HD95 and NSD in mm;
boundary: mBA and boundary F (2D); calibration: ECE and its summable bin statistics.
"""

from diffseg.metrics.boundary import boundary_f, ellipse_kernel, inner_boundary, mba, mba_radii
from diffseg.metrics.calibration import calibration_bins, ece, ece_from_bins
from diffseg.metrics.overlap import as_binary_mask, check_mask_pair, dice_iou, intersection_union, region_masks
from diffseg.metrics.surface import hd95, image_diagonal, nsd

__all__ = [
    "as_binary_mask",
    "boundary_f",
    "calibration_bins",
    "check_mask_pair",
    "dice_iou",
    "ece",
    "ece_from_bins",
    "ellipse_kernel",
    "hd95",
    "image_diagonal",
    "inner_boundary",
    "intersection_union",
    "mba",
    "mba_radii",
    "nsd",
    "region_masks",
]
