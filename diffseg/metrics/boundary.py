"""Boundary metrics for one 2D binary mask pair: mean boundary accuracy (mBA) and boundary F.

Both take (H, W) masks (bool, or numbers all 0/1) on any device and return a python float; the
morphology runs in numpy/scipy on the CPU. The image border is never a boundary: a mask that
touches the edge of the image has no boundary along that edge (OpenCV's default border handling,
which the reference mBA code relies on).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from diffseg.metrics.overlap import as_binary_mask

__all__ = ["ellipse_kernel", "mba_radii", "mba", "inner_boundary", "boundary_f"]


def ellipse_kernel(radius: int) -> np.ndarray:
    """Bool (2r+1, 2r+1) kernel, identical to ``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2r+1, 2r+1))``.

    OpenCV fills row i over columns [c - dx, c + dx] with dy = i - r and
    dx = round(c * sqrt((r^2 - dy^2) / r^2)) (r = c = radius for a square kernel), so r=1 is the
    3x3 cross and r=2 is the 5x5 block without its four corner 2x1 pieces.
    """
    if not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius: expected a non-negative int, got {radius!r}")
    r = c = int(radius)
    size = 2 * r + 1
    kernel = np.zeros((size, size), dtype=bool)
    inv_r2 = 1.0 / (r * r) if r else 0.0
    for i in range(size):
        dy = i - r
        dx = int(np.rint(c * np.sqrt((r * r - dy * dy) * inv_r2)))  # cvRound: round half to even
        kernel[i, max(c - dx, 0) : min(c + dx + 1, size)] = True
    return kernel


def mba_radii(height: int, width: int, num_steps: int = 5) -> list[int]:
    """The 5 band radii of CascadePSP/SegRefiner's mBA for an (height, width) image.

    r_i = 1 + int((r_max - 1) / 5 * i), i = 0..4, r_max = (w + h) / 300, with Python's int()
    (truncation toward zero, as the reference code): images with w + h < 600 use r = 1 throughout.
    """
    max_radius = (width + height) / 300
    return [1 + int((max_radius - 1) / num_steps * i) for i in range(num_steps)]


def _to_numpy_2d(x: torch.Tensor, name: str) -> np.ndarray:
    x = as_binary_mask(x, name)
    if x.ndim != 2 or x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 2D (H, W) mask, got shape {tuple(x.shape)}")
    return x.detach().cpu().numpy()


def _pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    p, t = _to_numpy_2d(pred, "pred"), _to_numpy_2d(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same (H, W) shape, got {p.shape} and {t.shape}")
    return p, t


def mba(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean boundary accuracy of one (H, W) binary prediction against its ground truth.

    As CascadePSP / SegRefiner (docs/methods.md §3): for each radius r in :func:`mba_radii`, the band is
    the morphological gradient (dilation minus erosion) of the GROUND TRUTH with
    :func:`ellipse_kernel` (r); the accuracy is the fraction of band pixels where pred == target;
    mBA is the mean over the 5 radii (the data-set mBA is the mean of this over images).

    Empty band (the ground truth is all 0 or all 1, so it has no boundary; the reference code divides
    0 by 0 there): we return the pixel accuracy over the whole image, i.e. 1.0 when pred == target
    everywhere and less by the fraction of wrong pixels otherwise.
    """
    p, t = _pair(pred, target)
    correct = p == t
    if t.all() or not t.any():
        return float(correct.mean())
    accs = []
    for r in mba_radii(*t.shape):
        k = ellipse_kernel(r)
        # cv2.morphologyEx(MORPH_GRADIENT): pixels outside the image never win the max/min.
        band = ndimage.binary_dilation(t, k, border_value=0) & ~ndimage.binary_erosion(t, k, border_value=1)
        accs.append(correct[band].sum() / band.sum())
    return float(np.mean(accs))


def inner_boundary(mask: np.ndarray) -> np.ndarray:
    """1-px inner boundary: mask minus its erosion by the 3x3 cross (outside the image counts as mask)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def boundary_f(pred: torch.Tensor, target: torch.Tensor, tolerances: Sequence[float] = (1, 2, 3, 4, 5)) -> float:
    """Boundary F-measure averaged over pixel tolerances (SegDiff's FBound, tolerances 1..5 px).

    Boundaries are the 1-px inner boundaries (:func:`inner_boundary`). For each tolerance d:
    precision = fraction of pred boundary pixels within Euclidean distance <= d of a target boundary
    pixel, recall = the same from target to pred, F = 2PR / (P + R) (0 when P + R = 0).
    A boundary is empty only when the mask is constant (all 0 or all 1). Both boundaries empty ->
    F = 1 if pred == target (both all 0, or both all 1), else 0; exactly one empty -> F = 0.
    """
    tols = [float(d) for d in tolerances]
    if not tols or any(not np.isfinite(d) or d < 0 for d in tols):
        raise ValueError(f"tolerances: expected a non-empty list of non-negative distances, got {tolerances!r}")
    p, t = _pair(pred, target)
    bp, bt = inner_boundary(p), inner_boundary(t)
    if not bp.any() and not bt.any():
        return float(np.array_equal(p, t))
    if not bp.any() or not bt.any():
        return 0.0
    dist_to_t = ndimage.distance_transform_edt(~bt)[bp]  # pred boundary pixel -> nearest target boundary
    dist_to_p = ndimage.distance_transform_edt(~bp)[bt]
    fs = []
    for d in tols:
        prec, rec = (dist_to_t <= d).mean(), (dist_to_p <= d).mean()
        fs.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    return float(np.mean(fs))
