"""SegDiff (docs/methods.md §2, Amit et al. 2021, arXiv 2112.00390) on the shared framework.

- The mask is diffused in [-1, 1]: binary tasks use ONE channel, x0 = 2·mask - 1 (the paper); tasks
  with more classes (BraTS) use a one-hot mask, x0 = 2·onehot - 1 with C channels (our extension:
  the same model, a multi-channel ε).
- The network eps_theta(x_t, I, t) = UNet(F(x_t) + G(I), t) (diffseg.nets.segdiff_denoiser) predicts ε;
  loss = squared error on ε averaged over all elements (DDPM eq. 14, "L_simple"; the reference sums
  over pixels, which only rescales the gradient by the patch size).
- The linear DDPM schedule stretched to T steps (``stretched_linear_betas``), "fixed_large" variance,
  ancestral sampling over all T steps from pure noise. ``sampling.steps < T`` (respaced) or
  ``sampling.sampler=ddim`` sample with fewer steps without retraining: the network is always
  conditioned on the ORIGINAL step indices (GaussianDiffusion.respace).
- Multiple generation: N samples of each window are ONE batch of N·B (inference.samples); each sample's
  x̂0 is mapped to [0, 1] and read as class probabilities ([1-p, p] for binary tasks), and the running
  means over 1..N samples are all returned (``samples/k``), the mean of all N being the final output
  (threshold 0.5 = argmax). ``std`` and ``entropy`` (B, 1, *S) are the per-pixel spread over samples
  (``inference.samples.spread_maps``), saved as uncertainty maps next to the predictions.
- EMA of the weights (``ema_decay``) kept in the module, used for validation and test (see below), with
  the decay ramped up over the first updates (``ramped_ema_decay``).
- ``prediction``: what the network predicts, ε (the paper) or x0 / v (for diagnosis; docs/methods.md §2);
  the loss is the squared error on that target.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from diffseg.diffusion.gaussian import PREDICTIONS, SAMPLERS, GaussianDiffusion
from diffseg.diffusion.schedules import beta_schedule
from diffseg.inference.samples import prefix_means, repeat_for_samples, split_samples, spread_maps
from diffseg.models.base import FINAL, SegmentationModule, from_config, plain_tensor

STD = "std"  # the uncertainty map over samples (with "entropy", inference.samples.spread_maps)
SAMPLING_DEFAULTS = {"num_samples": 1, "steps": None, "sampler": "ddpm", "eta": 0.0}


def stretched_linear_betas(num_steps: int) -> torch.Tensor:
    """DDPM's linear schedule (1e-4 .. 0.02 over 1000 steps) stretched to T = ``num_steps``:
    β from (1000/T)·1e-4 to (1000/T)·0.02 (docs/methods.md §2; Nichol & Dhariwal 2021,
    improved-diffusion ``get_named_beta_schedule("linear")``). T = 100 gives β 0.001 .. 0.2."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 20:
        raise ValueError(f"model.num_steps: expected an int > 20 (β_end = 20/T must stay below 1), got {num_steps!r}")
    scale = 1000.0 / num_steps
    return beta_schedule("linear", num_steps, scale * 1e-4, scale * 0.02)


def ramped_ema_decay(decay: float, num_averaged: int) -> float:
    """The EMA decay of the update that follows ``num_averaged`` earlier ones: min(decay, (1 + n)/(10 + n))
    (TensorFlow's ExponentialMovingAverage with num_updates). The first update (n = 0) copies the weights
    (``AveragedModel``); then the decay is 2/11, 3/12, ... until it reaches ``decay``, so a short run
    averages trained weights instead of keeping a fixed share on the initial ones (0.9999 over 10k steps
    leaves 37% of the weight on the first step's weights)."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def ramped_ema_update(decay: float):
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: ema = d·ema + (1 - d)·w with
    d = ramped_ema_decay(decay, n_averaged). ``n_averaged`` is a buffer of the AveragedModel, so the ramp
    resumes exactly from a checkpoint."""

    @torch.no_grad()
    def update(ema_params, current_params, num_averaged):
        d = ramped_ema_decay(decay, int(num_averaged))
        torch._foreach_lerp_(ema_params, current_params, 1.0 - d)  # ema + (1 - d)·(w - ema)

    return update


def check_sampling(sampling: Mapping[str, Any] | None, num_steps: int) -> dict[str, Any]:
    """Validate ``model.sampling`` (num_samples, steps, sampler, eta); unknown keys are errors."""
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(f"model.sampling: unknown keys {unknown}; expected {sorted(SAMPLING_DEFAULTS)}")
    s = {**SAMPLING_DEFAULTS, **sampling}
    if isinstance(s["num_samples"], bool) or not isinstance(s["num_samples"], int) or s["num_samples"] < 1:
        raise ValueError(f"model.sampling.num_samples: expected an int >= 1, got {s['num_samples']!r}")
    steps = s["steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_steps):
        raise ValueError(f"model.sampling.steps: expected null or an int in [1, num_steps={num_steps}], got {steps!r}")
    if s["sampler"] not in SAMPLERS:
        raise ValueError(f"model.sampling.sampler: expected one of {list(SAMPLERS)}, got {s['sampler']!r}")
    if not float(s["eta"]) >= 0.0:
        raise ValueError(f"model.sampling.eta: expected a number >= 0, got {s['eta']!r}")
    if s["sampler"] == "ddpm" and float(s["eta"]) != 0.0:
        raise ValueError("model.sampling.eta only applies to sampler=ddim; leave it 0 for ddpm")
    return s


class SegDiff(SegmentationModule):
    """SegDiff LightningModule.

    Args:
        net: a SegDiffDenoiser: ``net(x_t, image, t)`` -> ε̂ with ``mask_channels`` channels (1 for
            binary tasks, ``num_classes`` otherwise), equal to ``net.denoise(x_t, net.encode_image(image), t)``
            (sampling encodes the image once).
        num_steps: T, the number of training diffusion steps.
        variance: reverse-process variance, "fixed_large" (β_t, the paper) or "fixed_small".
        clip_x0: clamp x̂0 to [-1, 1] while sampling.
        ema_decay: the largest decay of the exponential moving average of the weights (ramped up to it,
            ``ramped_ema_decay``); null = no EMA.
        prediction: the network's output and the loss target: "epsilon" (the paper), "x0" or "v".
        sampling: {num_samples, steps (null = T), sampler (ddpm | ddim), eta (ddim only)}.

    EMA: an ``AveragedModel`` copy of ``net`` updated after every optimiser step and used by
    ``predict_window``, so validation, the test of checkpoints/best.ckpt and scripts/evaluate.py
    all see the EMA weights (it is part of the state dict). Lightning's EMAWeightAveraging callback
    is not used: its on_load_checkpoint restores the RAW weights ("current_model_state") into the
    module when trainer.test(ckpt_path=best) runs in the trainer that trained, and it swaps the
    weights for validation only, so the test would not use the EMA weights.

    ``model.compile=true`` compiles the network's forward (training); sampling calls the uncompiled
    ``encode_image``/``denoise`` of the EMA copy (or of the network when there is no EMA).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        num_steps: int = 100,
        variance: str = "fixed_large",
        clip_x0: bool = True,
        ema_decay: float | None = 0.9999,
        sampling: Mapping[str, Any] | None = None,
        prediction: str = "epsilon",
        **kwargs,
    ):
        super().__init__(net=from_config(net), **kwargs)
        self.mask_channels = 1 if self.num_classes == 2 else self.num_classes
        net_mask = getattr(self._raw_net, "mask_channels", self.mask_channels)
        if net_mask != self.mask_channels:
            raise ValueError(
                f"model.net.mask_channels: expected {self.mask_channels} for num_classes={self.num_classes} "
                f"(1 for a binary mask, one channel per class otherwise), got {net_mask}")
        self.sampling = check_sampling(sampling, num_steps)
        if prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction: expected one of {list(PREDICTIONS)}, got {prediction!r}")
        self.diffusion = GaussianDiffusion(stretched_linear_betas(num_steps), prediction=prediction,
                                           variance=variance, clip_x0=clip_x0)
        steps = self.sampling["steps"]
        self.sampler = self.diffusion if steps in (None, num_steps) else self.diffusion.respace(steps, exact=False)
        self.ema: AveragedModel | None = None
        if ema_decay is not None:
            if not 0.0 < float(ema_decay) < 1.0:
                raise ValueError(f"model.ema_decay: expected null or a number in (0, 1), got {ema_decay!r}")
            self.ema = AveragedModel(self._raw_net, multi_avg_fn=ramped_ema_update(float(ema_decay)),
                                     use_buffers=True)
            self.ema.requires_grad_(False)

    # ------------------------------------------------------------------ helpers
    @property
    def _raw_net(self) -> torch.nn.Module:
        return getattr(self.net, "_orig_mod", self.net)  # the module under torch.compile

    @property
    def eval_net(self) -> torch.nn.Module:
        """The weights used for prediction: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.net

    @property
    def num_samples(self) -> int:
        return self.sampling["num_samples"]

    @property
    def output_prefixes(self) -> dict[str, str]:
        prefixes = {FINAL: ""}
        prefixes.update({f"samples/{k}": f"samples/{k}/" for k in range(1, self.num_samples + 1)})
        return prefixes

    def encode_mask(self, label: torch.Tensor) -> torch.Tensor:
        """Class indices (B, 1, *S) -> x0 in {-1, 1}: (B, 1, *S) binary, (B, C, *S) one-hot."""
        if label.ndim != self.spatial_dims + 2 or label.shape[1] != 1:
            raise ValueError(f"label: expected (B, 1, {', '.join('S' * self.spatial_dims)}) class indices, "
                             f"got shape {tuple(label.shape)}")
        label = label[:, 0].long()
        if self.mask_channels == 1:
            mask = (label == 1).unsqueeze(1)
        else:
            mask = F.one_hot(label, self.num_classes).movedim(-1, 1)
        return mask.float() * 2.0 - 1.0

    def class_probabilities(self, x0: torch.Tensor) -> torch.Tensor:
        """x̂0 (B, M, *S) in [-1, 1] -> class probabilities (B, C, *S): q = clamp((x̂0 + 1)/2, 0, 1);
        binary [1 - q, q]; one-hot q normalised over the classes."""
        q = ((x0.float() + 1.0) * 0.5).clamp(0.0, 1.0)
        if self.mask_channels == 1:
            return torch.cat([1.0 - q, q], dim=1)
        q = q + 1e-6  # a pixel where every channel is 0 becomes uniform
        return q / q.sum(dim=1, keepdim=True)

    # ------------------------------------------------------------------ training
    def diffusion_loss(self, x0: torch.Tensor, image: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """mean over all elements of (ε - eps_theta(x_t, I, t))², x_t = q_sample(x0, t, ε) (DDPM eq. 14);
        with ``prediction`` x0 or v, the squared error on that target instead."""
        x_t = self.diffusion.q_sample(x0, t, noise)
        output = self.net(x_t, image, t)
        target = self.diffusion.training_target(x0, noise, t)
        return F.mse_loss(output.float(), target.float())

    def training_loss(self, batch):
        image = plain_tensor(batch["image"])
        x0 = self.encode_mask(plain_tensor(batch["label"])).to(image.dtype)
        t = torch.randint(0, self.diffusion.num_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return self.diffusion_loss(x0, image, t, noise), {}

    def optimizer_step(self, *args, **kwargs):
        """The optimiser step, then one EMA update (once per step, also under gradient accumulation). Done
        here rather than in ``on_train_batch_end``: Lightning runs the callbacks' batch-end hooks (the
        checkpoint writers) before the module's, so a checkpoint would miss the EMA update of its own step
        and a run resumed from it would end one update behind the uninterrupted run."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self._raw_net)

    # ------------------------------------------------------------------ prediction
    def predict_window(self, image, batch=None):
        image = plain_tensor(image)
        n, b = self.num_samples, image.shape[0]
        net = self.eval_net
        # G(I) does not depend on x_t or t: computed once per window, shared by every step and sample;
        # the N samples are one batch of N·B (sample-major), one denoiser call per step serves them all
        features = repeat_for_samples(net.encode_image(image), n)

        def denoise(x_t, t):
            return net.denoise(x_t, features, t)

        x0, _ = self.sampler.sample(
            denoise, (n * b, self.mask_channels, *image.shape[2:]), sampler=self.sampling["sampler"],
            eta=float(self.sampling["eta"]), generator=self.sample_generators(n, image.device),
            device=image.device, dtype=image.dtype)
        probs = split_samples(self.class_probabilities(x0), n)  # (N, B, C, *S)
        means = prefix_means(probs)
        # per-pixel spread of the samples: std (population std; 0 for one sample) mean over the classes (for
        # a binary task exactly the std of the foreground probability), and the entropy of their mean
        maps = spread_maps(probs) if self.spread else {}
        if not self.curves:  # validation (no maps) and predict.py: the prediction alone
            return {FINAL: means[-1], **maps}
        outputs = {f"samples/{k + 1}": means[k] for k in range(n)}
        outputs[FINAL] = means[-1]
        outputs.update(maps)
        return outputs
