"""SegRefiner's global-then-local inference for images larger than the training size (docs/methods.md §3).

1. Global pass: the whole image and coarse mask resized to the training size, K reverse steps,
   the refined probability resized back to full resolution.
2. Local pass: full-resolution patches of the training size centred on low-confidence pixels
   (confidence |2p - 1| below ``threshold``), chosen greedily with patch NMS (at most
   ``max_patches``), each refined in ``local_steps`` (reference: 1) reverse steps starting from the
   global mask, and merged by averaging where patches overlap (the global result elsewhere).

Pure tensor code: ``refine_fn(image, coarse, num_steps) -> probability`` is supplied by the caller
(the SegRefiner model, which is also what ``scripts/refine.py`` runs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

RefineFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class RefineSettings:
    """``model.refine``: how a whole image is refined at validation/test time and by refine.py."""

    steps: int | None = None      # reverse steps of the plain / global pass (None: all K steps)
    local: bool = False           # global-then-local for images larger than the training size
    threshold: float = 0.8        # a pixel is uncertain where |2p - 1| < threshold
    max_patches: int = 16         # local patches per image at most
    nms_iou: float = 0.3          # a candidate patch overlapping a chosen one by more IoU is dropped
    local_steps: int = 1          # reverse steps of each local patch (reference: 1)
    batch_size: int = 4           # local patches per denoiser call

    def __post_init__(self):
        problems = []
        if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) != self.steps
                                       or self.steps < 1):
            problems.append(f"steps: expected null or an int >= 1, got {self.steps!r}")
        if not isinstance(self.local, bool):
            problems.append(f"local: expected true or false, got {self.local!r}")
        if not 0.0 < self.threshold <= 1.0:
            problems.append(f"threshold: expected a confidence in (0, 1], got {self.threshold!r}")
        if not 0.0 <= self.nms_iou <= 1.0:
            problems.append(f"nms_iou: expected a value in [0, 1], got {self.nms_iou!r}")
        for key in ("max_patches", "local_steps", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or int(value) != value or value < 1:
                problems.append(f"{key}: expected an int >= 1, got {value!r}")
        if problems:
            raise ValueError("model.refine: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, mapping: Mapping | None) -> "RefineSettings":
        mapping = dict(mapping or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            raise ValueError(f"model.refine: unknown key(s) {unknown}; expected some of {allowed}")
        return cls(**mapping)

    def as_dict(self) -> dict:
        return asdict(self)


def patch_boxes(centres: torch.Tensor, patch: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """(N, 2) centres (y, x) -> (N, 4) boxes (y0, x0, y1, x1) of size ``patch``, shifted inside ``shape``."""
    ph, pw = (int(p) for p in patch)
    h, w = (int(s) for s in shape)
    if ph > h or pw > w:
        raise ValueError(f"patch {ph}x{pw} is larger than the image {h}x{w}")
    y0 = (centres[:, 0] - ph // 2).clamp(0, h - ph)
    x0 = (centres[:, 1] - pw // 2).clamp(0, w - pw)
    return torch.stack([y0, x0, y0 + ph, x0 + pw], dim=1)


def box_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one (4,) box with (N, 4) boxes (y0, x0, y1, x1), half-open pixel ranges."""
    dy = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
    dx = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
    inter = (dy * dx).double()
    area = lambda b: ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).double()  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def select_patches(confidence: torch.Tensor, patch: Sequence[int], threshold: float, max_patches: int,
                   nms_iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy patch NMS over low-confidence pixels. Returns (centres (n, 2), boxes (n, 4)), n <= max_patches.

    Every pixel with confidence < ``threshold`` is a candidate centre; its score is the number of
    low-confidence pixels its patch covers (ties: the less confident pixel first, then raster order).
    Candidates are taken in score order, skipping those whose patch overlaps an already chosen one
    with IoU > ``nms_iou``.
    """
    if confidence.ndim != 2:
        raise ValueError(f"confidence: expected (H, W), got shape {tuple(confidence.shape)}")
    low = confidence < threshold
    cand = low.nonzero()
    if len(cand) == 0:
        empty = torch.zeros(0, 2, dtype=torch.long, device=confidence.device)
        return empty, torch.zeros(0, 4, dtype=torch.long, device=confidence.device)
    boxes = patch_boxes(cand, patch, confidence.shape)
    # integral image: number of low-confidence pixels inside each candidate's box
    integral = F.pad(low.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    y0, x0, y1, x1 = boxes.unbind(1)
    score = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    conf = confidence[cand[:, 0], cand[:, 1]].double()
    order = torch.argsort(conf, stable=True)                  # secondary key: lower confidence first
    order = order[torch.argsort(-score[order], stable=True)]  # primary key: more uncertain pixels covered
    cand, boxes = cand[order], boxes[order]
    keep = []
    alive = torch.ones(len(cand), dtype=torch.bool, device=cand.device)
    while len(keep) < max_patches and bool(alive.any()):
        i = int(alive.nonzero()[0])
        keep.append(i)
        alive &= box_iou(boxes[i], boxes) <= nms_iou
        alive[i] = False
    idx = torch.as_tensor(keep, dtype=torch.long, device=cand.device)
    return cand[idx], boxes[idx]


def crop_patches(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) -> (n, C, ph, pw), one crop per box."""
    return torch.cat([x[:, :, int(b[0]):int(b[2]), int(b[1]):int(b[3])] for b in boxes], dim=0)


def merge_patches(base: torch.Tensor, patches: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Patch predictions averaged where they overlap; ``base`` (1, C, H, W) where no patch lies."""
    total = torch.zeros_like(base)
    count = torch.zeros_like(base[:, :1])
    for p, b in zip(patches, boxes):
        y0, x0, y1, x1 = (int(v) for v in b)
        total[0, :, y0:y1, x0:x1] += p
        count[0, :, y0:y1, x0:x1] += 1
    return torch.where(count > 0, total / count.clamp(min=1), base)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with antialiasing when shrinking (no aliasing of thin structures)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = any(s < t for s, t in zip(size, x.shape[-2:]))
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)


def global_local_refine(refine_fn: RefineFn, image: torch.Tensor, coarse: torch.Tensor, size: Sequence[int],
                        settings: RefineSettings, num_steps: int) -> dict[str, torch.Tensor]:
    """Refine one image (1, C, H, W) with its coarse mask (1, 1, H, W) in {0, 1}; H >= size[0], W >= size[1].

    Returns foreground probabilities (1, 1, H, W): ``final`` (global + local), ``global`` (the
    global pass alone), and the local patches: ``centres`` (n, 2) (y, x) and ``boxes`` (n, 4) (y0, x0, y1, x1).
    """
    if image.ndim != 4 or image.shape[0] != 1 or coarse.shape != (1, 1, *image.shape[2:]):
        raise ValueError(f"expected image (1, C, H, W) and coarse (1, 1, H, W), got {tuple(image.shape)} "
                         f"and {tuple(coarse.shape)}")
    full = tuple(image.shape[2:])
    if any(f < s for f, s in zip(full, size)):
        raise ValueError(f"global-local refinement needs an image at least {tuple(size)}, got {full}")
    small = refine_fn(resize(image, size), (resize(coarse, size) >= 0.5).float(), num_steps)
    p_global = resize(small, full).clamp(0, 1)
    centres, boxes = select_patches((2 * p_global[0, 0] - 1).abs(), size, settings.threshold,
                                    settings.max_patches, settings.nms_iou)
    if len(boxes) == 0:
        return {"final": p_global, "global": p_global, "centres": centres, "boxes": boxes}
    mask = (p_global >= 0.5).float()
    local = []
    for start in range(0, len(boxes), settings.batch_size):
        chunk = boxes[start:start + settings.batch_size]
        local.append(refine_fn(crop_patches(image, chunk), crop_patches(mask, chunk), settings.local_steps))
    merged = merge_patches(p_global, torch.cat(local, dim=0), boxes)
    return {"final": merged, "global": p_global, "centres": centres, "boxes": boxes}
