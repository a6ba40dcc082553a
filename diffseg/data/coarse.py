"""SegRefiner training coarse masks made online from the ground truth (docs/methods.md §3), as the reference's
``modify_boundary`` + ``perturb_seg`` (inherited from CascadePSP) make them.

1. Contour simplification (``simplify_contours``): per contour of at least 10 vertices, drop a run of 10%
   of its vertices starting among the 10% of positions whose run endpoints are closest together, keep a
   random 10% of the rest, and fill every contour (holes included: they are filled; shorter contours vanish).
2. Perturbation (``perturb``): rounds of 4 operations, each on a rectangle drawn anywhere in the image:
   with probability 1/4 set its centre pixel to a random 0/1 (a seed that the next morphology grows into a
   hole or an island), then dilate or erode the rectangle with one of four structuring elements (square,
   ellipse, flat and tall half-ellipse) of size 3-9; stop after the first round whose IoU with the
   simplified mask falls below ``iou_target`` (at most 250 rounds). No lower IoU bound.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage import draw, measure

from diffseg.data.errors import DataError

KERNEL_SHAPES = ("square", "ellipse", "flat_ellipse", "tall_ellipse")


def mask_iou(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two binary masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise DataError(f"mask_iou: expected masks of the same shape, found {a.shape} and {b.shape}")
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def ellipse_element(width: int, height: int) -> np.ndarray:
    """OpenCV's MORPH_ELLIPSE structuring element (height, width): row i = r + dy (|dy| <= r = height // 2)
    spans the columns c ± round(c·sqrt(1 - dy²/r²)), c = width // 2 (one centre pixel per row when r = 0)."""
    r, c = height // 2, width // 2
    k = np.zeros((height, width), bool)
    for i in range(height):
        dy = i - r
        if abs(dy) <= r:
            dx = int(np.rint(c * math.sqrt((r * r - dy * dy) / (r * r)))) if r else 0
            k[i, max(c - dx, 0):min(c + dx + 1, width)] = True
    return k


def structuring_element(shape: str, size: int) -> np.ndarray:
    """One of the reference's four kernels of ``size``: square, ellipse, flat (size x size//2) or tall
    (size//2 x size) ellipse (width x height)."""
    if shape == "square":
        return np.ones((size, size), bool)
    width, height = {"ellipse": (size, size), "flat_ellipse": (size, size // 2),
                     "tall_ellipse": (size // 2, size)}[shape]
    return ellipse_element(width, height)


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed (row, col) contours of every region and hole (the last vertex is not repeated)."""
    out = []
    for contour in measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        out.append((contour[:-1] if np.allclose(contour[0], contour[-1]) else contour) - 1)
    return out


def drop_closest_run(pts: np.ndarray, rng: np.random.Generator, drop: float = 0.1) -> np.ndarray:
    """Remove a run of int(drop·n) consecutive vertices [i, i + run) of the contour ``pts`` (n, 2), i drawn
    uniformly among the ceil(10%) of the start positions 0 .. n - run - 1 whose run endpoints pts[i] and
    pts[i + run] are closest (a run that cuts a short chord: a protrusion, a narrow end)."""
    n = len(pts)
    run = int(n * drop)
    dist = ((pts[:n - run] - pts[run:]) ** 2).sum(1)
    order = np.argsort(dist, kind="stable")
    start = int(order[rng.integers(math.ceil(0.1 * len(order)))])
    return np.concatenate([pts[:start], pts[start + run:]])


def simplify_contours(mask: np.ndarray, rng: np.random.Generator, drop: float = 0.1, keep: float = 0.1,
                      min_vertices: int = 10) -> np.ndarray:
    """``modify_boundary`` without vertex moves: per contour with >= ``min_vertices`` vertices, remove a
    run of int(drop·n) consecutive vertices starting at a random one of the ceil(10%) start positions whose
    run endpoints are closest, keep a random int(keep·rest) of the rest in order, fill. All contours are
    filled (holes of the mask too); with no contour left the mask is returned unchanged."""
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, bool)
    drawn = False
    for pts in _contours(mask):
        n = len(pts)
        if n < min_vertices:
            continue
        rest = drop_closest_run(pts, rng, drop)
        k = int(len(rest) * keep)
        if k == 0:
            continue
        kept = rest[np.sort(rng.choice(len(rest), size=k, replace=False))]
        corners = np.clip(np.rint(kept), 0, np.array(mask.shape) - 1).astype(int)
        for (r0, c0), (r1, c1) in zip(corners, np.roll(corners, -1, axis=0)):  # the outline (a filled cv2
            out[draw.line(r0, c0, r1, c1)] = True                              # contour includes its edges)
        if k >= 3:
            rr, cc = draw.polygon(kept[:, 0], kept[:, 1], shape=mask.shape)
            out[rr, cc] = True
        drawn = True
    return out if drawn else mask.copy()


def perturb(seg: np.ndarray, rng: np.random.Generator, iou_target: float = 0.8, max_rounds: int = 250,
            ops_per_round: int = 4, kernel_sizes: tuple[int, int] = (3, 9)) -> np.ndarray:
    """``perturb_seg``: dilate/erode random rectangles (with random centre-pixel flips) until the IoU with
    the input drops below ``iou_target`` (checked after each round of ``ops_per_round`` operations)."""
    ref = np.asarray(seg, bool)
    seg = ref.copy()
    h, w = seg.shape
    if h <= 2 or w <= 2:
        return seg
    for _ in range(max_rounds):
        for _ in range(ops_per_round):
            x0, y0 = int(rng.integers(w)), int(rng.integers(h))
            x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
            if rng.random() < 0.25:  # a seed pixel: the morphology below grows it into an island or a hole
                seg[(y0 + y1) // 2, (x0 + x1) // 2] = bool(rng.integers(2))
            kernel = structuring_element(KERNEL_SHAPES[rng.integers(4)],
                                         int(rng.integers(kernel_sizes[0], kernel_sizes[1] + 1)))
            region = seg[y0:y1, x0:x1]
            if rng.random() < 0.5:  # outside the rectangle counts as background for dilation ...
                seg[y0:y1, x0:x1] = ndimage.maximum_filter(region, footprint=kernel, mode="constant", cval=0)
            else:  # ... and as foreground for erosion (OpenCV's default border values)
                seg[y0:y1, x0:x1] = ndimage.minimum_filter(region, footprint=kernel, mode="constant", cval=1)
        if mask_iou(seg, ref) < iou_target:
            break
    return seg


def make_coarse_mask(mask, rng: np.random.Generator, iou_target: float = 0.8, max_rounds: int = 250) -> np.ndarray:
    """A coarse version of the 2D binary ``mask`` (bool): ``simplify_contours`` then ``perturb`` until the
    IoU with the simplified mask is below ``iou_target``. Deterministic given ``rng``; empty in, empty out."""
    gt = np.asarray(mask)
    if gt.ndim != 2:
        raise DataError(f"make_coarse_mask: expected a 2D mask, found shape {gt.shape}")
    if not 0.0 < float(iou_target) <= 1.0:
        raise DataError(f"iou_target: expected a value in (0, 1], found {iou_target!r}")
    gt = gt.astype(bool)
    if not gt.any():
        return np.zeros(gt.shape, bool)
    return perturb(simplify_contours(gt, rng), rng, float(iou_target), int(max_rounds))
