"""Boundary metrics for one 2D binary mask pair: mean boundary accuracy (mBA, CascadePSP/SegRefiner) and
SegDiff's FBound (docs/methods.md §2, §5).

Both take (H, W) masks (bool, or numbers all 0/1) on any device and return a python float; the
morphology runs in numpy/scipy on the CPU. For mBA the image border is never a boundary (OpenCV's default
border handling, which the reference mBA code relies on); FBound's seg2bmap has its own border rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from diffseg.metrics.overlap import as_binary_mask

__all__ = ["ellipse_kernel", "mba_radii", "mba", "seg2bmap", "disk", "fbound"]


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


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """1-px boundary map of a binary mask, as the DAVIS ``seg2bmap`` that SegDiff's metrics use: a pixel is
    a boundary pixel when it differs from its right (e), lower (s) or lower-right (se) neighbour; in the
    last row only the right neighbour counts, in the last column only the lower one, and the bottom-right
    pixel is never a boundary."""
    seg = np.asarray(mask, dtype=bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: int) -> np.ndarray:
    """Bool (2r+1, 2r+1) disk x² + y² <= r² (``skimage.morphology.disk``)."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def fbound(pred: torch.Tensor, target: torch.Tensor, radii: Sequence[int] = (1, 2, 3, 4, 5)) -> float:
    """SegDiff's boundary F-measure (FBound), averaged over the disk radii d = 1..5 px.

    For each d (the reference's ``db_eval_boundary``): the boundaries are :func:`seg2bmap` of each mask;
    each is dilated by :func:`disk` (d) (outside the image counts as background); precision = predicted
    boundary pixels inside the dilated true boundary / predicted boundary pixels, recall = true boundary
    pixels inside the dilated predicted boundary / true boundary pixels, F = 2PR/(P + R) (0 when P + R = 0).
    Empty boundaries as the reference: both empty P = R = 1 (F = 1, whatever the masks); only the predicted
    one empty P = 1, R = 0; only the true one empty P = 0, R = 1 (F = 0 for either).
    """
    radii = list(radii)
    if not radii or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in radii):
        raise ValueError(f"radii: expected a non-empty list of non-negative ints, got {radii!r}")
    p, t = _pair(pred, target)
    bp, bt = seg2bmap(p), seg2bmap(t)
    n_p, n_t = int(bp.sum()), int(bt.sum())
    fs = []
    for d in radii:
        if n_p == 0 or n_t == 0:
            precision, recall = (1.0 if n_p == 0 else 0.0), (1.0 if n_t == 0 else 0.0)
        else:
            k = disk(int(d))
            precision = (bp & ndimage.binary_dilation(bt, k)).sum() / n_p
            recall = (bt & ndimage.binary_dilation(bp, k)).sum() / n_t
        fs.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(fs))
