"""The framework's one predictor: whole images/volumes through overlapping windows.

Every model is called through ``predict_fn(window) -> dict[name, probabilities]``; a diffusion
model runs its full reverse process inside each window and may return several named outputs
(per-step estimates, running means over samples, spreads). MONAI's sliding-window inferer stitches
them with its (Gaussian-weighted) overlap averaging, all outputs in ONE pass: they are stacked along
the channel axis, so the weight map, the count map and the per-window bookkeeping are paid once and
each extra output costs one weighted add of its channels per window (an output returned under two
names, e.g. ImgX's last step and ``final``, is stitched once). Stitching is per channel, so every
output equals MONAI's stitching of that output alone (tests/unit/test_window.py).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from monai.inferers import sliding_window_inference


class _Stacked:
    """Predictor wrapper: the outputs of a window as one (B, sum of channels, *S) tensor, and back."""

    def __init__(self, predict_fn: Callable[[torch.Tensor], Mapping[str, torch.Tensor]]):
        self.predict_fn = predict_fn
        self.layout: list[tuple[str, int, torch.dtype]] | None = None  # unique outputs: name, channels, dtype
        self.aliases: dict[str, str] = {}                               # name -> name of the same tensor

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        outputs = dict(self.predict_fn(window))
        seen: dict[int, str] = {}
        layout, aliases, parts = [], {}, []
        for name, tensor in outputs.items():
            if id(tensor) in seen:
                aliases[name] = seen[id(tensor)]
                continue
            seen[id(tensor)] = name
            layout.append((name, tensor.shape[1], tensor.dtype))
            parts.append(tensor.to(window.dtype))
        if self.layout is None:
            self.layout, self.aliases = layout, aliases
        elif (layout, aliases) != (self.layout, self.aliases):
            raise ValueError(f"the predictor returned other outputs for another window: {[n for n, *_ in layout]} "
                             f"vs {[n for n, *_ in self.layout]}")
        return torch.cat(parts, dim=1)

    def unstack(self, stitched: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [channels for _, channels, _ in self.layout]
        out = {name: part.to(dtype) for (name, _, dtype), part in zip(self.layout, stitched.split(sizes, dim=1))}
        out.update({alias: out[name] for alias, name in self.aliases.items()})
        return out


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
    stacked = _Stacked(predict_fn)
    out = sliding_window_inference(image, roi_size, sw_batch_size, stacked, overlap=overlap, mode=mode,
                                   progress=progress, padding_mode="constant")
    return stacked.unstack(out)
