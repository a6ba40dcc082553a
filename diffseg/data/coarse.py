"""SegRefiner training coarse masks made online from the ground truth (docs/methods.md §3).

Contour simplification (drop a run of 10% of each contour's vertices, keep a random 10% of the rest,
refill), then dilate or erode random rectangles (square kernel 3-10 px) until IoU with the ground truth
falls below iou_range[1]. An overshoot below iou_range[0] restarts from the simplified mask with smaller
perturbations; as a last resort the difference to the ground truth is partly restored (or, when the
perturbations cannot lower the IoU, part of the mask is removed) in a smooth random order, which always
lands inside the range unless the mask is only a few pixels.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import draw, measure

from diffseg.data.errors import DataError

_SCALES = (1.0, 0.5, 0.25)  # perturbation size of the first try and the restarts


def mask_iou(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two binary masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise DataError(f"mask_iou: expected masks of the same shape, found {a.shape} and {b.shape}")
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def simplify_contours(mask: np.ndarray, rng: np.random.Generator, drop: float = 0.1,
                      keep: float = 0.1) -> np.ndarray:
    """Per contour: drop a cyclic run of ``drop`` of its vertices, keep a random ``keep`` of the rest
    (at least 3) and refill; contours are combined by parity so that holes stay holes."""
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, bool)
    for contour in measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        pts = contour[:-1] - 1 if np.allclose(contour[0], contour[-1]) else contour - 1
        n = len(pts)
        if n >= 10:  # too few vertices to simplify otherwise: keep the contour as is
            n_drop = int(drop * n)
            rest = pts[(int(rng.integers(n)) + n_drop + np.arange(n - n_drop)) % n]
            k = max(3, int(keep * len(rest)))
            pts = rest[np.sort(rng.choice(len(rest), size=k, replace=False))]
        rr, cc = draw.polygon(pts[:, 0], pts[:, 1], shape=mask.shape)
        fill = np.zeros(mask.shape, bool)
        fill[rr, cc] = True
        out ^= fill
    return out


def _perturb(seg, gt, rng, hi: float, max_iter: int, scale: float, anchors, extent: int):
    """Dilate or erode random rectangles near the object boundary until IoU < hi (or max_iter)."""
    h, w = seg.shape
    iou = mask_iou(seg, gt)
    for _ in range(max_iter):
        if iou < hi:
            break
        cy, cx = anchors[rng.integers(len(anchors))] + rng.integers(-2, 3, 2)
        hh, hw = np.maximum(2, np.round(extent * scale * rng.uniform(0.1, 0.4, 2))).astype(int)
        k = 3 + int((int(rng.integers(3, 11)) - 3) * scale)  # square structuring element, 3-10 px
        y0, y1, x0, x1 = max(cy - hh, 0), min(cy + hh + 1, h), max(cx - hw, 0), min(cx + hw + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        py0, py1, px0, px1 = max(y0 - k, 0), min(y1 + k, h), max(x0 - k, 0), min(x1 + k, w)
        sub = seg[py0:py1, px0:px1]
        if rng.random() < 0.5:
            new = ndimage.binary_dilation(sub, np.ones((k, k), bool))
        else:  # the image border does not erode the object
            new = ndimage.binary_erosion(sub, np.ones((k, k), bool), border_value=1)
        seg[y0:y1, x0:x1] = new[y0 - py0:y1 - py0, x0 - px0:x1 - px0]
        iou = mask_iou(seg, gt)
    return seg, iou


def _smooth_order(rng, shape, extent: int, idx: np.ndarray) -> np.ndarray:
    """A spatially coherent random order of the flat pixel indices ``idx`` (blob after blob)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), max(1.0, extent / 8))
    return idx[np.argsort(field.ravel()[idx], kind="stable")]


def _pick(iou: np.ndarray, past_target: np.ndarray, lo: float, hi: float) -> int:
    """Index of the first IoU past the target; if that one is outside [lo, hi) (a few-pixel mask
    moves in big steps), the nearest one inside the range, if any."""
    first = int(np.argmax(past_target)) if past_target.any() else len(iou) - 1
    inside = np.flatnonzero((iou >= lo) & (iou < hi))
    if lo <= iou[first] < hi or len(inside) == 0:
        return first
    return int(inside[np.argmin(np.abs(inside - first))])


def _move_to_target(seg, gt, rng, target: float, lo: float, hi: float, extent: int) -> np.ndarray:
    """Flip pixels in a smooth random order to put the IoU just past ``target``: towards the ground
    truth when IoU < target (each flip raises it), else removing mask pixels (each flip lowers it)."""
    seg, flat_gt = seg.copy(), gt.ravel()
    inter, union = np.count_nonzero(seg & gt), np.count_nonzero(seg | gt)
    if inter / max(union, 1) < target:
        idx = _smooth_order(rng, gt.shape, extent, np.flatnonzero(seg ^ gt))
        gain = flat_gt[idx]  # a missed ground-truth pixel: intersection + 1, else union - 1
        iou = (inter + np.cumsum(gain)) / (union - np.cumsum(~gain))
        n = _pick(iou, iou >= target, lo, hi) + 1
        seg.ravel()[idx[:n]] = flat_gt[idx[:n]]
    else:
        idx = _smooth_order(rng, gt.shape, extent, np.flatnonzero(seg & gt))
        iou = (inter - np.arange(1, len(idx))) / union  # remove a true pixel: intersection - 1
        if len(iou):  # (at least one pixel is kept)
            seg.ravel()[idx[:_pick(iou, iou < target, lo, hi) + 1]] = False
    return seg


def make_coarse_mask(mask, rng: np.random.Generator, iou_range=(0.5, 0.8),
                     max_iter: int = 100) -> np.ndarray:
    """A coarse version of the 2D binary ``mask`` with IoU in [iou_range[0], iou_range[1]) (bool).

    Deterministic given ``rng``; empty input -> empty output, never empty for a non-empty input.
    """
    gt = np.asarray(mask)
    if gt.ndim != 2:
        raise DataError(f"make_coarse_mask: expected a 2D mask, found shape {gt.shape}")
    gt = gt.astype(bool)
    lo, hi = (float(v) for v in iou_range)
    if not 0.0 <= lo < hi <= 1.0:
        raise DataError(f"iou_range: expected 0 <= low < high <= 1, found {tuple(iou_range)}")
    if not gt.any():
        return np.zeros(gt.shape, bool)
    rows, cols = np.nonzero(gt)
    extent = int(max(rows.max() - rows.min(), cols.max() - cols.min())) + 1
    anchors = np.argwhere(gt & ~ndimage.binary_erosion(gt, border_value=1))
    if len(anchors) == 0:  # the mask fills the image: perturb from anywhere
        anchors = np.argwhere(gt)
    simplified = simplify_contours(gt, rng)
    base = simplified if simplified.any() and mask_iou(simplified, gt) >= lo else gt
    over = under = None
    for scale in _SCALES:
        seg, iou = _perturb(base.copy(), gt, rng, hi, max_iter, scale, anchors, extent)
        if lo <= iou < hi and seg.any():
            return seg
        if iou < hi:
            over = seg
        else:
            under = seg
    target = rng.uniform(lo, hi)
    seg = _move_to_target(over if over is not None else under, gt, rng, target, lo, hi, extent)
    if not lo <= mask_iou(seg, gt) < hi:  # a few-pixel mask: grow it, then take pixels back
        grown = ndimage.binary_dilation(gt, np.ones((3, 3), bool))
        alt = _move_to_target(grown, gt, rng, target, lo, hi, extent)
        seg = alt if lo <= mask_iou(alt, gt) < hi else seg
    return seg
