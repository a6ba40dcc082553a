"""Surface-distance metrics in physical units (mm): HD95 and normalised surface Dice (NSD).

Both take bool masks (R, *S) of one case (2D or 3D) and a voxel ``spacing`` (one value per spatial
axis, or one number for isotropic voxels) and return float64 tensors (R,) on the input device.
The distances are computed by MONAI on the CPU (its exact KD-tree path; the masks are moved there).

Surfaces are the masks' inner boundaries (mask XOR its erosion, MONAI's edges); distances are
Euclidean between voxel centres, scaled by ``spacing``.

Conventions for empty masks (no NaN ever comes out):
- both empty: hd95 = 0, nsd = 1 (nothing to find, nothing found);
- exactly one empty: hd95 = the diagonal of the image in mm, sqrt(sum_i (S_i * spacing_i)^2), an
  upper bound on any distance inside the image, so a missed or hallucinated structure scores worst
  instead of being silently dropped from the mean; nsd = 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from diffseg.metrics.overlap import check_mask_pair

__all__ = ["hd95", "nsd", "image_diagonal"]


def _spacing(spacing: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        sp = (float(spacing),) * ndim
    else:
        try:
            sp = tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            raise ValueError(f"spacing: expected a number or one number per spatial axis, got {spacing!r}") from None
    if len(sp) != ndim:
        raise ValueError(f"spacing: expected {ndim} values (one per spatial axis), got {len(sp)}: {spacing!r}")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing: expected finite positive values (mm), got {spacing!r}")
    return sp


def image_diagonal(shape: Sequence[int], spacing: float | Sequence[float]) -> float:
    """Diagonal of an image of spatial ``shape`` in mm: sqrt(sum_i (S_i * spacing_i)^2)."""
    sp = _spacing(spacing, len(shape))
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp)))


def _surface_metric(pred, target, spacing, both_empty_value, one_empty_value, monai_fn):
    """Shared empty-case handling: MONAI only sees the regions where both masks are non-empty."""
    pred, target = check_mask_pair(pred, target, spatial_dims=(2, 3))
    sp = _spacing(spacing, pred.ndim - 1)
    p_any, t_any = pred.flatten(1).any(1).cpu(), target.flatten(1).any(1).cpu()
    out = torch.where(p_any | t_any, one_empty_value, both_empty_value).double()
    both = torch.nonzero(p_any & t_any).flatten()
    if both.numel():
        # MONAI wants (B, C, *S); B = 1 case, C = regions where both masks have a surface.
        with warnings.catch_warnings():  # MONAI 1.5-1.6 warns about its own internal call, every case
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            vals = monai_fn(pred[both].cpu()[None], target[both].cpu()[None], list(sp))[0]
        out[both] = vals.double()
    return out.to(pred.device)


def hd95(pred: torch.Tensor, target: torch.Tensor, spacing: float | Sequence[float]) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance in mm per region, (R,) float64.

    HD95 = max(P95 of pred->target surface distances, P95 of target->pred) (docs/methods.md §1), as
    MONAI's ``compute_hausdorff_distance(percentile=95)``. Both empty -> 0; one empty -> the image
    diagonal in mm (see module docstring).
    """
    pred, target = check_mask_pair(pred, target, spatial_dims=(2, 3))
    diag = image_diagonal(pred.shape[1:], spacing)

    def fn(p, t, sp):
        return compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=sp)

    return _surface_metric(pred, target, spacing, torch.tensor(0.0), torch.tensor(diag), fn)


def nsd(
    pred: torch.Tensor, target: torch.Tensor, spacing: float | Sequence[float], tolerance: float = 1.0
) -> torch.Tensor:
    """Normalised surface Dice per region at ``tolerance`` mm, (R,) float64.

    NSD = (#pred surface voxels within tol of the target surface + #target surface voxels within tol
    of the pred surface) / (#pred surface voxels + #target surface voxels), as MONAI's
    ``compute_surface_dice``. Both empty -> 1; one empty -> 0.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance: expected a finite non-negative distance in mm, got {tolerance!r}")

    def fn(p, t, sp):
        thresholds = [float(tolerance)] * p.shape[1]
        return compute_surface_dice(p, t, thresholds, include_background=True, spacing=sp)

    return _surface_metric(pred, target, spacing, torch.tensor(1.0), torch.tensor(0.0), fn)
