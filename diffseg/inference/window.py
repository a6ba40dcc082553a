"""The framework's one predictor: whole images/volumes through overlapping windows.

Every model is called through ``predict_fn(window) -> dict[name, probabilities]``; a diffusion
model runs its full reverse process inside each window and may return several named outputs
(per-step estimates, running means over samples, spreads). MONAI's sliding-window inferer stitches
each output with the same (Gaussian-weighted) overlap averaging.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from monai.inferers import sliding_window_inference


def sliding_window_predict(
    predict_fn: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    image: torch.Tensor,
    roi_size: Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``predict_fn`` on overlapping windows of ``image`` (B, C, *S) and stitch every output.

    Windows smaller than the image are visited in a fixed order, so a model that seeds its noise
    once per case gives reproducible results. An image no larger than ``roi_size`` is one window.
    """
    roi_size = tuple(int(r) for r in roi_size)
    if len(roi_size) != image.ndim - 2:
        raise ValueError(f"roi_size {roi_size} has {len(roi_size)} dims but the image is {image.ndim - 2}D")
    if tuple(image.shape[2:]) == roi_size:
        return dict(predict_fn(image))
    out = sliding_window_inference(
        image, roi_size, sw_batch_size, lambda x: dict(predict_fn(x)), overlap=overlap, mode=mode,
        progress=progress, padding_mode="constant",
    )
    return dict(out)
