"""SegRefiner's global-then-local inference for images larger than the training size (docs/methods.md §3),
as the reference's semantic (high-resolution) test does it.

1. Global pass: image and coarse mask resized to the model size with nearest interpolation (mask
   thresholded at 0.5), reverse steps t = K-1 .. 1 (the sigmoid at t = 1 is the result; t = 0 is kept
   for the local pass); the probability resized back (nearest) and binarised at 0.5.
2. Local pass: every model-resolution pixel whose fine probability f (the diffusion's running
   probability that a pixel is fine) is below ``fine_prob_thr`` x max f is a patch centre, scaled to
   full resolution; a model-size patch around it, shifted inside the image, scored 1 - f; patch NMS at
   ``nms_iou``; patches whose global mask is all 0 or all 1 are dropped; all the others are refined at
   t = 0 from the global mask in batches of ``batch_max``, averaged where they overlap, binarised at 0.5
   and pasted over the global mask.

Pure tensor code: ``step_fn(image, mask, start, num_steps) -> (prob, fine_prob)`` runs the reverse steps
t = start .. start - num_steps + 1 (the SegRefiner model supplies it; ``scripts/refine.py`` runs the model).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

StepFn = Callable[[torch.Tensor, torch.Tensor, int, int], "tuple[torch.Tensor, torch.Tensor]"]

try:  # the compiled NMS when torchvision is installed; the loop below gives the same boxes
    from torchvision.ops import nms as _torchvision_nms
except ImportError:  # pragma: no cover - depends on the environment
    _torchvision_nms = None


@dataclass(frozen=True)
class RefineSettings:
    """``model.refine``: how a whole image is refined at validation/test time and by refine.py."""

    steps: int | None = None      # plain refinement (images no larger than the training size, or local: false):
                                  # reverse steps t = K-1 .. K-steps (None: all K, down to t = 0)
    local: bool = True            # global-then-local for images larger than the training size (the
                                  # reference); false: K-step sliding-window refinement at full resolution
    fine_prob_thr: float = 0.9    # patch centres: fine probability < fine_prob_thr x its maximum
    nms_iou: float = 0.2          # patch NMS: drop a patch overlapping a higher-scored one by more IoU
    batch_max: int = 32           # local patches per denoiser call
    min_coarse_pixels: int = 128  # a coarse mask with at most this many foreground pixels -> empty output

    def __post_init__(self):
        problems = []
        if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) != self.steps
                                       or self.steps < 1):
            problems.append(f"steps: expected null or an int >= 1, got {self.steps!r}")
        if not isinstance(self.local, bool):
            problems.append(f"local: expected true or false, got {self.local!r}")
        if not 0.0 < self.fine_prob_thr <= 1.0:
            problems.append(f"fine_prob_thr: expected a fraction in (0, 1], got {self.fine_prob_thr!r}")
        if not 0.0 <= self.nms_iou <= 1.0:
            problems.append(f"nms_iou: expected a value in [0, 1], got {self.nms_iou!r}")
        if isinstance(self.batch_max, bool) or int(self.batch_max) != self.batch_max or self.batch_max < 1:
            problems.append(f"batch_max: expected an int >= 1, got {self.batch_max!r}")
        if (isinstance(self.min_coarse_pixels, bool) or int(self.min_coarse_pixels) != self.min_coarse_pixels
                or self.min_coarse_pixels < 0):
            problems.append(f"min_coarse_pixels: expected an int >= 0, got {self.min_coarse_pixels!r}")
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


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes (N, 4) (x0, y0, x1, y1) kept by greedy NMS, highest score first: a box is
    dropped when its IoU with a kept one exceeds ``iou_threshold`` (torchvision.ops.nms when installed)."""
    boxes, scores = boxes.float(), scores.float()
    if _torchvision_nms is not None:
        return _torchvision_nms(boxes, scores, float(iou_threshold))
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    alive = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(boxes)):  # one pass per kept box: O(N · kept)
        if not alive[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[i + 1:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[i + 1:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        alive[i + 1:] &= inter / (area[i] + area[i + 1:] - inter) <= iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def select_patches(fine_prob: torch.Tensor, full_shape: Sequence[int], patch: Sequence[int],
                   fine_prob_thr: float, nms_iou: float) -> torch.Tensor:
    """Patch boxes (n, 4) (y0, x0, y1, x1) in full-resolution pixels, in NMS order (highest score first).

    ``fine_prob`` (h, w) is the global pass's fine probability at model resolution. Centres: the pixels
    with f < fine_prob_thr · max f, scaled to full resolution (truncated); each patch of size ``patch``
    centred there is shifted inside the image; score 1 - f; NMS at ``nms_iou``.
    """
    if fine_prob.ndim != 2:
        raise ValueError(f"fine_prob: expected (h, w), got shape {tuple(fine_prob.shape)}")
    (h, w), (full_h, full_w), (ph, pw) = fine_prob.shape, full_shape, patch
    if ph > full_h or pw > full_w:
        raise ValueError(f"patch {ph}x{pw} is larger than the image {full_h}x{full_w}")
    low = fine_prob < fine_prob_thr * fine_prob.max()
    ys, xs = torch.nonzero(low, as_tuple=True)
    if len(ys) == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=fine_prob.device)
    cy = (ys.double() * (full_h / h)).long()  # model-resolution pixel -> full resolution (truncated)
    cx = (xs.double() * (full_w / w)).long()
    y0 = (cy - ph // 2).clamp(0, full_h - ph)
    x0 = (cx - pw // 2).clamp(0, full_w - pw)
    keep = nms(torch.stack([x0, y0, x0 + pw, y0 + ph], dim=1), 1.0 - fine_prob[ys, xs], nms_iou)
    return torch.stack([y0[keep], x0[keep], y0[keep] + ph, x0[keep] + pw], dim=1)


def crop_patches(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) -> (n, C, ph, pw), one crop per box (y0, x0, y1, x1)."""
    return torch.cat([x[:, :, int(b[0]):int(b[2]), int(b[1]):int(b[3])] for b in boxes], dim=0)


def paste_patches(mask: torch.Tensor, patches: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Patch probabilities averaged where they overlap and binarised at 0.5, pasted over the binary ``mask``
    (1, 1, H, W) inside the patches; ``mask`` elsewhere."""
    total = torch.zeros_like(mask)
    count = torch.zeros_like(mask)
    for p, b in zip(patches, boxes):
        y0, x0, y1, x1 = (int(v) for v in b)
        total[0, :, y0:y1, x0:x1] += p
        count[0, :, y0:y1, x0:x1] += 1
    local = (total / count.clamp(min=1) >= 0.5).to(mask.dtype)
    return torch.where(count > 0, local, mask)


def resize_nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize (the reference's F.interpolate default), no-op at the same size."""
    size = tuple(int(s) for s in size)
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x.float(), size=size, mode="nearest")


def global_local_refine(step_fn: StepFn, image: torch.Tensor, coarse: torch.Tensor, size: Sequence[int],
                        num_steps: int, settings: RefineSettings) -> dict[str, torch.Tensor]:
    """Refine one image (1, C, H, W) with its coarse mask (1, 1, H, W) in {0, 1}; H >= size[0], W >= size[1];
    ``num_steps`` = K of the diffusion.

    Returns binary masks (1, 1, H, W): ``final`` (global + local) and ``global`` (the global pass alone),
    and ``boxes`` (n, 4) (y0, x0, y1, x1): the local patches refined, in NMS order.
    """
    if image.ndim != 4 or image.shape[0] != 1 or coarse.shape != (1, 1, *image.shape[2:]):
        raise ValueError(f"expected image (1, C, H, W) and coarse (1, 1, H, W), got {tuple(image.shape)} "
                         f"and {tuple(coarse.shape)}")
    full = tuple(image.shape[2:])
    if any(f < s for f, s in zip(full, size)):
        raise ValueError(f"global-local refinement needs an image at least {tuple(size)}, got {full}")
    # global: t = K-1 .. 1 at the model size
    small_mask = (resize_nearest(coarse, size) >= 0.5).float()
    prob, fine_prob = step_fn(resize_nearest(image, size), small_mask, num_steps - 1, num_steps - 1)
    global_mask = (resize_nearest(prob, full) >= 0.5).float()
    # local: t = 0 on full-resolution patches around the pixels least likely to be fine
    boxes = select_patches(fine_prob[0, 0], full, size, settings.fine_prob_thr, settings.nms_iou)
    if len(boxes):
        crops = crop_patches(global_mask, boxes)
        mixed = crops.flatten(1).any(1) & ~crops.flatten(1).all(1)  # the boundary runs through the patch
        boxes, crops = boxes[mixed], crops[mixed]
    if len(boxes) == 0:
        return {"final": global_mask, "global": global_mask, "boxes": boxes}
    local = []
    for i in range(0, len(boxes), settings.batch_max):
        chunk = boxes[i:i + settings.batch_max]
        local.append(step_fn(crop_patches(image, chunk), crops[i:i + settings.batch_max], 0, 1)[0])
    final = paste_patches(global_mask, torch.cat(local, dim=0), boxes)
    return {"final": final, "global": global_mask, "boxes": boxes}
