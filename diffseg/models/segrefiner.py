"""SegRefiner (docs/methods.md §3; Wang et al., arXiv 2312.12425): refine a coarse binary mask given the image.

Discrete "coarse -> fine" diffusion (``diffusion.discrete.BinaryRefinementDiffusion``). The denoiser
is a TimeUNet on [image, m_t] (image channels + 1) with one logit channel out and a learned
embedding per step. Training: draw t, m_t = q_sample(gt, coarse, t), predict the fine mask;
loss = BCE(logits, gt) + 5 · texture L1. The coarse mask comes with the batch (``coarse`` key):
generated online from the ground truth (``data.coarse_transforms``) or read from another model's
masks (``data.source.coarse_dir``), so the refiner sits on top of any segmenter.

Evaluation outputs: ``final`` (refined, [1-p, p]) and ``coarse`` (the input mask), scored as
``test/iou`` ... and ``test/coarse_iou`` ...; on images larger than the training size (``refine.local``)
also ``global`` (the global pass alone, ``test/global_*``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from diffseg.diffusion.discrete import BinaryRefinementDiffusion
from diffseg.inference.global_local import RefineSettings, global_local_refine
from diffseg.models.base import FINAL, SegmentationModule, from_config, plain_tensor
from diffseg.utils.errors import ConfigError

# Sobel kernel of the reference's texture loss, divided by 4 (docs/methods.md §3): a unit step gives a total
# gradient of 2 across the edge; d/dy uses its transpose
_SOBEL_X = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """sqrt(gx² + gy² + eps) of (B, 1, H, W) with the Sobel kernels / 4, zero padding (the image border is an
    edge of a non-empty mask), as the reference's SobelOperator."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"sobel_magnitude: expected (B, 1, H, W), got {tuple(x.shape)}")
    kx = _SOBEL_X.to(device=x.device, dtype=x.dtype)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(x, kernels, padding=1)
    return torch.sqrt(g.pow(2).sum(dim=1, keepdim=True) + eps)


def texture_l1(prob: torch.Tensor, target: torch.Tensor, pool: int = 3, eps: float = 1e-4) -> torch.Tensor:
    """SegRefiner's texture loss (docs/methods.md §3): mean |S(A(prob)) - S(A(target))| where A is a
    ``pool``×``pool`` mean (stride 1, zero padding counted in the mean: ``avg_pool2d(padding=pool//2)``) and
    S the Sobel gradient magnitude above; ``prob`` is sigmoid(logits)."""
    if prob.shape != target.shape:
        raise ValueError(f"texture_l1: prob {tuple(prob.shape)} and target {tuple(target.shape)} differ")
    if pool < 1 or pool % 2 == 0:
        raise ValueError(f"texture_l1: pool must be an odd size >= 1, got {pool}")

    def smooth(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, pool, stride=1, padding=pool // 2) if pool > 1 else x

    return (sobel_magnitude(smooth(prob), eps) - sobel_magnitude(smooth(target.to(prob.dtype)), eps)).abs().mean()


def two_class(p: torch.Tensor) -> torch.Tensor:
    """Foreground probability (B, 1, *S) -> class probabilities [1 - p, p] (B, 2, *S)."""
    return torch.cat([1.0 - p, p], dim=1)


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
        network = from_config(net)  # `net` itself stays the config: it is a hyper-parameter
        layout = {k: getattr(network, k, None) for k in ("in_channels", "out_channels", "time_embedding", "num_time_steps")}
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
        super().__init__(net=network, **kwargs)
        self.image_channels = layout["in_channels"] - 1
        self.diffusion = BinaryRefinementDiffusion(int(num_steps), float(beta_start))
        self.texture_weight, self.texture_pool = float(texture_weight), int(texture_pool)
        self.refine_settings = settings
        self.last_local_patches: int | None = None
        if settings.steps is not None and settings.steps > self.diffusion.num_steps:
            raise ConfigError(f"model.refine.steps: expected at most model.num_steps={num_steps} (the reverse "
                              f"steps t = K-1 .. K-steps), got {settings.steps}")

    # ------------------------------------------------------------------ training
    def _coarse(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if batch is None or "coarse" not in batch:
            raise ConfigError(
                "SegRefiner needs a coarse mask per image (batch key 'coarse'): generate them online with "
                "data.train_transforms / data.eval_transforms (diffseg.data.coarse_transforms, as "
                "experiment=segrefiner_folder2d does) or read another model's masks with data.source.coarse_dir=DIR")
        return (plain_tensor(batch["coarse"]) > 0).float()

    def denoise(self, image: torch.Tensor, m_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Fine-mask logits (B, 1, H, W) from the image and the current mask m_t at step t."""
        return self.net(torch.cat([image, m_t.to(image.dtype)], dim=1), t)

    def training_loss(self, batch):
        image = plain_tensor(batch["image"]).float()
        gt = (plain_tensor(batch["label"]) > 0).float()
        coarse = self._coarse(batch)
        t = torch.randint(0, self.diffusion.num_steps, (image.shape[0],), device=image.device)
        m_t = self.diffusion.q_sample(gt, coarse, t)  # fine where u < β̄_t, coarse elsewhere
        logits = self.denoise(image, m_t, t).float()
        bce = F.binary_cross_entropy_with_logits(logits, gt)
        texture = texture_l1(torch.sigmoid(logits), gt, self.texture_pool)
        return bce + self.texture_weight * texture, {"bce": bce.detach(), "texture": texture.detach()}

    # ------------------------------------------------------------------ prediction
    def run_steps(self, image: torch.Tensor, mask: torch.Tensor, start: int, num_steps: int):
        """Reverse steps t = start .. start - num_steps + 1 from ``mask`` (the state at ``start``):
        (foreground probability of the last step, fine probability f), both (B, 1, H, W)."""
        out = self.diffusion.refine(lambda m, t: self.denoise(image, m, t), mask.float(),
                                    generator=self.case_generator(), num_steps=num_steps, start=start)
        return out.prob.float(), out.fine_prob.float()

    def refine_mask(self, image: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Plain refinement: foreground probability (B, 1, H, W) after the reverse steps t = K-1 .. K-n from
        the coarse mask (n = refine.steps, default K)."""
        k = self.diffusion.num_steps
        return self.run_steps(image, coarse, k - 1, self.refine_settings.steps or k)[0]

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
        """A coarse mask with at most ``refine.min_coarse_pixels`` foreground pixels: empty output (the
        reference). Images no larger than the training size (or with ``refine.local: false``): plain
        refinement through the sliding-window predictor, the coarse mask windowed with the image as an
        extra channel. Larger images: global pass + local patches (``inference.global_local``)."""
        image = plain_tensor(image).float()
        coarse = self._coarse(batch).to(image.device)
        if coarse.shape != (image.shape[0], 1, *image.shape[2:]):
            raise ValueError(f"coarse mask {tuple(coarse.shape)} does not match image {tuple(image.shape)}")
        settings = self.refine_settings
        size = tuple(image.shape[2:])
        larger = any(s > r for s, r in zip(size, self.roi_size))
        fits = all(s >= r for s, r in zip(size, self.roi_size))
        global_local = settings.local and larger and fits
        self.last_local_patches = None  # how many local patches the last global-local case refined
        if global_local:
            self.seed_case(case_id, image.device)
            out = global_local_refine(self.run_steps, image, coarse, self.roi_size, self.diffusion.num_steps,
                                      settings)
            result = {FINAL: two_class(out["final"])}
            if self.curves:  # the global pass alone and the coarse mask's own scores, at test
                result.update({"global": two_class(out["global"]), "coarse": two_class(coarse)})
            self.last_local_patches = len(out["boxes"])
        else:
            result = super().predict_case(torch.cat([image, coarse], dim=1), case_id, batch)
        # too small to refine: the reference returns an empty mask (per image of the batch)
        tiny = coarse.flatten(1).sum(1) <= settings.min_coarse_pixels
        if bool(tiny.any()):
            empty = two_class(torch.zeros_like(coarse[:1]))
            for name in [n for n in result if n != "coarse"]:
                result[name] = torch.where(tiny.view(-1, 1, 1, 1), empty, result[name])
        return result
