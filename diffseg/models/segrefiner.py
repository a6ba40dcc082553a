"""SegRefiner (docs/methods.md §3; Wang et al., arXiv 2312.12425): refine a coarse binary mask given the image.

Discrete "coarse -> fine" diffusion (``diffusion.discrete.BinaryRefinementDiffusion``). The denoiser
is a TimeUNet on [image, m_t] (image channels + 1) with one logit channel out and a learned
embedding per step. Training: draw t, m_t = q_sample(gt, coarse, t), predict the fine mask;
loss = BCE(logits, gt) + 5 · texture L1. The coarse mask comes with the batch (``coarse`` key):
generated online from the ground truth (``data.coarse_transforms``) or read from another model's
masks (``data.source.coarse_dir``), so the refiner sits on top of any segmenter.

Evaluation outputs: ``final`` (refined, [1-p, p]) and ``coarse`` (the input mask), scored as
``test/iou`` ... and ``test/coarse_iou`` ...; with ``refine.local`` on images larger than the
training size also ``global`` (the global pass alone, ``test/global_*``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from diffseg.diffusion.discrete import BinaryRefinementDiffusion
from diffseg.inference.global_local import RefineSettings, global_local_refine
from diffseg.models.base import FINAL, SegmentationModule
from diffseg.utils.errors import ConfigError

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sqrt(gx² + gy² + eps) of (B, 1, H, W) with the plain 3×3 Sobel kernels ([-1, 0, 1] ⊗ [1, 2, 1],
    a unit step gives a total gradient of 8 across the edge) and replicate padding (no border edges)."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"sobel_magnitude: expected (B, 1, H, W), got {tuple(x.shape)}")
    kx = _SOBEL_X.to(device=x.device, dtype=x.dtype)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)
    return torch.sqrt(g.pow(2).sum(dim=1, keepdim=True) + eps)


def texture_l1(prob: torch.Tensor, target: torch.Tensor, pool: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """SegRefiner's texture loss (docs/methods.md §3): mean |S(A(prob)) - S(A(target))| where A is a
    ``pool``×``pool`` average pool (stride 1, replicate padding) and S the Sobel gradient magnitude."""
    if prob.shape != target.shape:
        raise ValueError(f"texture_l1: prob {tuple(prob.shape)} and target {tuple(target.shape)} differ")
    if pool < 1 or pool % 2 == 0:
        raise ValueError(f"texture_l1: pool must be an odd size >= 1, got {pool}")
    r = pool // 2

    def smooth(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), pool, stride=1) if r else x

    return (sobel_magnitude(smooth(prob), eps) - sobel_magnitude(smooth(target.to(prob.dtype)), eps)).abs().mean()


def two_class(p: torch.Tensor) -> torch.Tensor:
    """Foreground probability (B, 1, *S) -> class probabilities [1 - p, p] (B, 2, *S)."""
    return torch.cat([1.0 - p, p], dim=1)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (faster ops, no metadata propagation)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


class SegRefiner(SegmentationModule):
    output_prefixes = {FINAL: "", "coarse": "coarse_", "global": "global_"}

    def __init__(
        self,
        net: nn.Module,
        num_steps: int = 6,
        beta_start: float = 0.8,
        texture_weight: float = 5.0,
        texture_pool: int = 3,
        refine: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        """``net``: a TimeUNet on [image, m_t] (in_channels = image channels + 1) with one output channel
        and a learned embedding per step (time_embedding="learned", num_time_steps = num_steps)."""
        if kwargs.get("num_classes") != 2 or kwargs.get("spatial_dims") != 2:
            raise ConfigError(f"SegRefiner refines 2D binary masks: expected data.num_classes=2 and "
                              f"data.spatial_dims=2, got {kwargs.get('num_classes')} and {kwargs.get('spatial_dims')}")
        layout = {k: getattr(net, k, None) for k in ("in_channels", "out_channels", "time_embedding", "num_time_steps")}
        expected = {"out_channels": 1, "time_embedding": "learned", "num_time_steps": int(num_steps)}
        wrong = [f"model.net.{k}={layout[k]!r} (expected {v!r})" for k, v in expected.items() if layout[k] != v]
        if not isinstance(layout["in_channels"], int) or layout["in_channels"] < 2:
            wrong.append(f"model.net.in_channels={layout['in_channels']!r} (expected image channels + 1)")
        if wrong:
            raise ConfigError("SegRefiner's denoiser takes [image, m_t] and returns one logit per pixel with a "
                              "learned embedding per step: " + ", ".join(wrong))
        try:
            settings = RefineSettings.from_mapping(refine)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        super().__init__(net=net, **kwargs)
        self.image_channels = layout["in_channels"] - 1
        self.diffusion = BinaryRefinementDiffusion(int(num_steps), float(beta_start))
        self.texture_weight, self.texture_pool = float(texture_weight), int(texture_pool)
        self.refine_settings = settings
        if settings.steps is not None and settings.steps > self.diffusion.num_steps:
            raise ConfigError(f"model.refine.steps: expected at most model.num_steps={num_steps}, "
                              f"got {settings.steps}")

    # ------------------------------------------------------------------ training
    def _coarse(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if batch is None or "coarse" not in batch:
            raise ConfigError(
                "SegRefiner needs a coarse mask per image (batch key 'coarse'): generate them online with "
                "data.train_transforms / data.eval_transforms (diffseg.data.coarse_transforms, as "
                "experiment=segrefiner_folder2d does) or read another model's masks with data.source.coarse_dir=DIR")
        return (_plain(batch["coarse"]) > 0).float()

    def denoise(self, image: torch.Tensor, m_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Fine-mask logits (B, 1, H, W) from the image and the current mask m_t at step t."""
        return self.net(torch.cat([image, m_t.to(image.dtype)], dim=1), t)

    def training_loss(self, batch):
        image = _plain(batch["image"]).float()
        gt = (_plain(batch["label"]) > 0).float()
        coarse = self._coarse(batch)
        t = torch.randint(0, self.diffusion.num_steps, (image.shape[0],), device=image.device)
        m_t = self.diffusion.q_sample(gt, coarse, t)  # fine where u < β̄_t, coarse elsewhere
        logits = self.denoise(image, m_t, t).float()
        bce = F.binary_cross_entropy_with_logits(logits, gt)
        texture = texture_l1(torch.sigmoid(logits), gt, self.texture_pool)
        return bce + self.texture_weight * texture, {"bce": bce.detach(), "texture": texture.detach()}

    # ------------------------------------------------------------------ prediction
    def refine_mask(self, image: torch.Tensor, coarse: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
        """Foreground probability (B, 1, H, W) after ``num_steps`` reverse steps (default: refine.steps or K)."""
        n = num_steps or self.refine_settings.steps or self.diffusion.num_steps
        prob, _ = self.diffusion.refine(lambda m, t: self.denoise(image, m, t), coarse.float(),
                                        generator=self.case_generator(), num_steps=int(n))
        return prob.float()

    def predict_window(self, image, batch=None):
        """``image`` carries the coarse mask as its last channel (windowed together by predict_case)."""
        if image.shape[1] != self.image_channels + 1:
            raise ValueError(f"SegRefiner.predict_window: expected {self.image_channels} image channels + 1 "
                             f"coarse channel, got {image.shape[1]} channels")
        img, coarse = image[:, :-1], (image[:, -1:] > 0.5).float()
        out = {FINAL: two_class(self.refine_mask(img, coarse))}
        if self.curves:  # the coarse mask's own scores, at test
            out["coarse"] = two_class(coarse)
        return out

    @torch.no_grad()
    def predict_case(self, image, case_id, batch=None):
        """Images no larger than the training size (or with ``refine.local: false``): K-step refinement
        through the sliding-window predictor, the coarse mask windowed with the image as an extra
        channel. Larger images with ``refine.local: true``: global pass + local patches."""
        image = _plain(image).float()
        coarse = self._coarse(batch).to(image.device)
        if coarse.shape != (image.shape[0], 1, *image.shape[2:]):
            raise ValueError(f"coarse mask {tuple(coarse.shape)} does not match image {tuple(image.shape)}")
        size = tuple(image.shape[2:])
        larger = any(s > r for s, r in zip(size, self.roi_size))
        fits = all(s >= r for s, r in zip(size, self.roi_size))
        if not (self.refine_settings.local and larger and fits):
            return super().predict_case(torch.cat([image, coarse], dim=1), case_id, batch)
        self.seed_case(case_id, image.device)
        steps = self.refine_settings.steps or self.diffusion.num_steps
        out = global_local_refine(self.refine_mask, image, coarse, self.roi_size, self.refine_settings, steps)
        return {FINAL: two_class(out["final"]), "global": two_class(out["global"]), "coarse": two_class(coarse)}
