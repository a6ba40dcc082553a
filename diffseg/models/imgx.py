"""ImgX-DiffSeg: Gaussian diffusion over one-hot masks, x0-prediction, few steps (docs/methods.md §1).

The denoiser is a time-conditioned UNet on ``cat(image, x_t)`` (x_t: the noisy mask, one channel
per class in [-1, 1] one-hot space) that outputs class logits; x̂0 = 2·softmax(logits) - 1.

Training (``model.diffusion``, ``model.loss``), as the reference code trains it (docs/methods.md §1, §6):
the base schedule (T = 1001, linear 1e-4..0.02) is resampled to K = ``train_steps`` steps keeping ᾱ at K
evenly spaced indices. Whatever the network predicts (x0 or ε), its output is turned into class logits
for x̂0 and the segmentation loss (Dice + CE) is taken on them against the TRUE mask; an MSE in
prediction space (x̂0 vs the true x0, or ε̂ vs the noise that made x_t) is an auxiliary term:
loss = seg_weight·seg + mse_weight·mse. With mask recycling the first pass (no gradient) predicts x̂0
from the TRUE mask noised to t_r, the second pass sees x̂0 noised to t and is the only one
back-propagated; t is drawn from [0, K-1) so that t_r (t + 1, or K - 1) is a real step.

Sampling (``model.sampling``): ``base.respace(steps)``. The network is conditioned on the ORIGINAL
timestep index, so a step count other than the training K runs, but it queries timesteps (and noise
levels) that a network trained with K steps has never seen: with K = 5 it was trained on t in
{0, 250, 500, 750, 1000} only. The paper trains and samples with the same K; other counts are an
extrapolation to be measured (``scripts/evaluate.py ... sweep.steps=[..]``), not a free choice.
``num_samples`` samples of a window run as ONE batch and are averaged in probability space. Outputs:
``final``, every step's x̂0 (``step/1`` .. ``step/S``, ``step/S`` == ``final``) and running means over
samples (``samples/n``), and the per-voxel ``std`` and ``entropy`` over the samples
(``inference.samples.spread_maps``).

ε-prediction (the ablation, ``prediction: epsilon``): x̂0 is recovered from ε̂, clipped to [-1, 1] (also
inside the sampler) and mapped to probabilities by p = (x̂0 + 1)/2 normalised over the classes (uniform
where every class is at -1); the logits of the segmentation loss are log p. For x0-prediction this map
returns softmax(logits).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from diffseg.diffusion.gaussian import SAMPLERS, VARIANCES, GaussianDiffusion
from diffseg.diffusion.schedules import BETA_SCHEDULES, beta_schedule, evenly_spaced_indices
from diffseg.inference.samples import prefix_means, repeat_for_samples, split_samples, spread_maps
from diffseg.models.base import FINAL, SegmentationModule, from_config
from diffseg.models.losses import LOSSES, segmentation_loss
from diffseg.nets.slicewise import SliceWise
from diffseg.utils.errors import ConfigError

RECYCLING = ("none", "next", "max")


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """``model.diffusion``: the base schedule and how the network is trained on it."""

    num_steps: int = 1001           # T of the base schedule
    beta_schedule: str = "linear"   # linear | quadratic | cosine | warmup10 | warmup50
    beta_start: float = 1e-4
    beta_end: float = 0.02
    train_steps: int = 5            # K: (T-1) must be divisible by (K-1)
    prediction: str = "x0"          # x0 | epsilon
    variance: str = "fixed_small"   # fixed_small | fixed_large (reverse-process variance)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """``model.sampling``: how validation/test turn a window into probabilities."""

    steps: int = 5                  # respaced from the base schedule (any 1..T)
    sampler: str = "ddpm"           # ddpm | ddim
    num_samples: int = 1            # samples per window, one batch, averaged in probability space
    eta: float = 0.0                # DDIM noise (0 = deterministic)
    step_outputs: int | None = None # per-step outputs: None = every step, k = k evenly spaced incl. the last


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """``model.loss``: seg_weight·segmentation + mse_weight·MSE (docs/methods.md §1)."""

    segmentation: str = "dice_ce"   # dice_ce | dice | ce, on the logits of x̂0 against the TRUE mask
    seg_weight: float = 1.0
    mse_weight: float = 0.1         # MSE in prediction space (x̂0 vs x0, or ε̂ vs ε): auxiliary term


def _settings(cls, values: Mapping[str, Any] | None, key: str):
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; expected some of {names}")
    return cls(**values)


def _choice(value, options, key: str):
    if value not in options:
        raise ConfigError(f"{key}: expected one of {' | '.join(map(str, options))}, got {value!r}")
    return value


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def probs_from_x0(x0: torch.Tensor) -> torch.Tensor:
    """x̂0 in [-1, 1] one-hot space (B, C, *S) -> class probabilities: clip, (x + 1)/2, normalise
    over C (uniform where all classes are at -1). Exact inverse of x̂0 = 2·softmax - 1."""
    p = (x0.float().clamp(-1.0, 1.0) + 1.0) * 0.5
    total = p.sum(1, keepdim=True)
    return torch.where(total > 0, p / total.clamp_min(1e-12), torch.full_like(p, 1.0 / p.shape[1]))


class ImgXDiffSeg(SegmentationModule):
    """ImgX-DiffSeg LightningModule (see the module docstring; the config is experiments/model/imgx.yaml).

    Args:
        net: denoiser with ``in_channels = image channels + num_classes`` and ``out_channels = num_classes``,
            called as ``net(x, t)``; a 2D net on 3D data (``data.patch_size=[P, P, 1]``) runs slice-wise.
        diffusion: ``DiffusionSettings`` keys. sampling: ``SamplingSettings`` keys.
        loss: ``LossSettings`` keys: the segmentation loss on the logits of x̂0 (for x0- AND ε-prediction)
            against the true mask, and the weights of it and of the auxiliary MSE in prediction space.
        recycling: none | next (t_r = t + 1) | max (t_r = K-1); with recycling t is drawn from [0, K-1).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        diffusion: Mapping[str, Any] | None = None,
        sampling: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        recycling: str = "next",
        **kwargs,
    ):
        spatial_dims = int(kwargs.get("spatial_dims", 3))
        network = from_config(net)  # `net` itself stays the config: it is a hyper-parameter
        net_dims = getattr(network, "spatial_dims", spatial_dims)
        if net_dims == 2 and spatial_dims == 3:
            roi = list(kwargs.get("roi_size", []))
            if not roi or int(roi[-1]) != 1:
                raise ConfigError(f"a 2D denoiser on 3D data runs slice by slice and needs 2D patches: set "
                                  f"data.patch_size=[P, P, 1] (got {roi})")
            network = SliceWise(network)
        elif net_dims != spatial_dims:
            raise ConfigError(f"model.net.spatial_dims={net_dims} does not fit {spatial_dims}D data")
        super().__init__(net=network, **kwargs)
        self.settings = _settings(DiffusionSettings, diffusion, "model.diffusion")
        s = self.settings
        _choice(s.prediction, ("x0", "epsilon"), "model.diffusion.prediction")
        _choice(s.beta_schedule, BETA_SCHEDULES, "model.diffusion.beta_schedule")
        _choice(s.variance, VARIANCES, "model.diffusion.variance")
        if isinstance(loss, str):
            raise ConfigError(f"model.loss: expected the mapping {{segmentation, seg_weight, mse_weight}}, got "
                              f"{loss!r} (the segmentation loss is model.loss.segmentation=dice_ce|dice|ce; "
                              "the MSE is weighted by model.loss.mse_weight)")
        self.loss = _settings(LossSettings, loss, "model.loss")
        _choice(self.loss.segmentation, LOSSES, "model.loss.segmentation")
        for key in ("seg_weight", "mse_weight"):
            if not float(getattr(self.loss, key)) >= 0:
                raise ConfigError(f"model.loss.{key}: expected a number >= 0, got {getattr(self.loss, key)!r}")
        if float(self.loss.seg_weight) == 0 and float(self.loss.mse_weight) == 0:
            raise ConfigError("model.loss: seg_weight and mse_weight are both 0: nothing would be trained")
        self.recycling = _choice(recycling, RECYCLING, "model.recycling")
        self.seg_loss = segmentation_loss(self.loss.segmentation)
        try:
            betas = beta_schedule(s.beta_schedule, _positive_int(s.num_steps, "model.diffusion.num_steps"),
                                  s.beta_start, s.beta_end)
        except ValueError as err:
            raise ConfigError(f"model.diffusion: {err}") from err
        # ε-prediction: x̂0 = (x_t - sqrt(1-ᾱ)ε̂)/sqrt(ᾱ) is unbounded, so it is clipped to [-1, 1]
        self.base = GaussianDiffusion(betas, prediction=s.prediction, variance=s.variance,
                                      clip_x0=s.prediction == "epsilon")
        self.train_process = self._respace(s.train_steps, exact=True, key="model.diffusion.train_steps")
        if self.recycling != "none" and self.train_process.num_steps < 2:
            raise ConfigError(f"model.recycling={self.recycling} recycles from a later step and needs "
                              f"model.diffusion.train_steps >= 2 (got {s.train_steps}); or model.recycling=none")
        self.configure_sampling(**(sampling or {}))

    # ------------------------------------------------------------------ schedules
    def _respace(self, k, exact: bool, key: str) -> GaussianDiffusion:
        _positive_int(k, key)
        try:
            return self.base.respace(k, exact=exact)
        except ValueError as err:
            raise ConfigError(f"{key}={k}: {err}") from err

    def configure_sampling(self, **values) -> SamplingSettings:
        """Set (some of) ``model.sampling``; works on a trained model (no retraining needed)."""
        current = dataclasses.asdict(getattr(self, "sampling", SamplingSettings()))
        sampling = _settings(SamplingSettings, {**current, **values}, "model.sampling")
        _choice(sampling.sampler, SAMPLERS, "model.sampling.sampler")
        _positive_int(sampling.num_samples, "model.sampling.num_samples")
        if not float(sampling.eta) >= 0:
            raise ConfigError(f"model.sampling.eta: expected >= 0, got {sampling.eta!r}")
        if sampling.sampler == "ddpm" and float(sampling.eta) != 0:
            raise ConfigError(f"model.sampling.eta={sampling.eta} only applies to sampler=ddim; leave it 0 for "
                              "ddpm (whose noise is the posterior variance, model.diffusion.variance)")
        if sampling.step_outputs is not None:
            _positive_int(sampling.step_outputs, "model.sampling.step_outputs")
        self.sample_process = self._respace(sampling.steps, exact=False, key="model.sampling.steps")
        self.sampling = sampling
        return sampling

    @property
    def recorded_steps(self) -> list[int]:
        """Sampling steps (1-based, in sampling order) returned as ``step/i`` outputs; the last always."""
        s, k = self.sampling.steps, self.sampling.step_outputs
        if k is None or k >= s:
            return list(range(1, s + 1))
        return (evenly_spaced_indices(s, k, exact=False) + 1).tolist()

    @property
    def output_prefixes(self) -> dict[str, str]:
        names = [FINAL] + [f"step/{i}" for i in self.recorded_steps]
        if self.sampling.num_samples > 1:
            names += [f"samples/{n}" for n in range(1, self.sampling.num_samples + 1)]
        return {name: "" if name == FINAL else f"{name}/" for name in names}

    # ------------------------------------------------------------------ network
    def denoise(self, image: torch.Tensor, x_t: torch.Tensor, t_model: torch.Tensor,
                fixed: torch.Tensor | None = None) -> torch.Tensor:
        """Network output in prediction space: x̂0 = 2·softmax(logits) - 1, or ε̂ (float32).

        ``fixed``: the image's share of the network's first convolution (``net.conv_in_fixed(image)``), the
        same at every sampling step: computed once per window, so a step costs one UNet of the image's size."""
        if fixed is None:
            out = self.net(torch.cat([image, x_t.to(image.dtype)], dim=1), t_model).float()
        else:
            out = self.net(x_t.to(image.dtype), t_model, fixed=fixed).float()
        return 2.0 * torch.softmax(out, dim=1) - 1.0 if self.settings.prediction == "x0" else out

    def recycle_step(self, t: torch.Tensor) -> torch.Tensor:
        """t_r of mask recycling: t + 1 (next) or K-1 (max); t must lie in [0, K-1)."""
        k = self.train_process.num_steps
        if bool((t >= k - 1).any()):
            raise ValueError(f"mask recycling draws t from [0, K-1) = [0, {k - 1}), got {t.tolist()}")
        return t + 1 if self.recycling == "next" else torch.full_like(t, k - 1)

    # ------------------------------------------------------------------ training
    def training_loss(self, batch):
        image, label = batch["image"], batch["label"]
        # t ~ U[0, K-1) with recycling (t_r = t + 1 exists, reference recycling_step.py), U[0, K) without
        k = self.train_process.num_steps - (self.recycling != "none")
        t = torch.randint(0, k, (image.shape[0],), device=image.device)
        shape = (image.shape[0], self.num_classes, *image.shape[2:])
        noise, noise_r = (torch.randn(shape, device=image.device) for _ in range(2))
        return self.loss_terms(image, label, t, noise, noise_r)

    def loss_terms(self, image, label, t, noise, noise_r):
        """The training loss for given draws (t (B,), noise for x_t, noise for x_{t_r}) and its two terms."""
        proc = self.train_process
        x0 = 2.0 * F.one_hot(label[:, 0].long(), self.num_classes).movedim(-1, 1).to(noise.dtype) - 1.0
        start = x0
        if self.recycling != "none":
            # mask recycling (docs/methods.md §1): x̂0 from the TRUE mask noised to t_r, without gradient
            t_r = self.recycle_step(t)
            with torch.no_grad():
                x_tr = proc.q_sample(x0, t_r, noise_r)
                out_r = self.denoise(image, x_tr, proc.timesteps[t_r].float())
                start = proc.predict_x0(out_r, x_tr, t_r)
        x_t = proc.q_sample(start, t, noise)  # DDPM eq. 4
        out = self.net(torch.cat([image, x_t.to(image.dtype)], dim=1), proc.timesteps[t].float()).float()
        if self.settings.prediction == "x0":  # the network's output ARE the logits of x̂0
            logits, prediction, target = out, 2.0 * torch.softmax(out, dim=1) - 1.0, x0
        else:  # ε̂ -> x̂0 (DDPM eq. 15, clipped) -> p = (x̂0 + 1)/2 normalised -> logits log p
            x0_hat = proc.predict_x0(out, x_t, t)
            logits = torch.log(probs_from_x0(x0_hat).clamp_min(1e-7))
            prediction, target = out, noise  # the noise that made x_t (from x̂0 when recycling)
        # the segmentation loss is always against the TRUE mask: the label enters every prediction type
        seg = self.seg_loss(logits, label)
        mse = F.mse_loss(prediction, target)
        loss = float(self.loss.seg_weight) * seg + float(self.loss.mse_weight) * mse
        return loss, {"loss/seg": seg.detach(), "loss/mse": mse.detach()}

    # ------------------------------------------------------------------ sampling
    def predict_window(self, image, batch=None):
        s = self.sampling
        n, b = s.num_samples, image.shape[0]
        images = repeat_for_samples(image, n)  # N samples of each window as ONE batch
        shape = (n * b, self.num_classes, *image.shape[2:])
        fixed = self.net.conv_in_fixed(images) if hasattr(self.net, "conv_in_fixed") else None
        _, x0_hats = self.sample_process.sample(
            lambda x_t, t_model: self.denoise(images, x_t, t_model, fixed), shape, sampler=s.sampler,
            eta=float(s.eta), generator=self.sample_generators(n, image.device), device=image.device,
            dtype=torch.float32)
        # running means over samples of the last step; the mean of all N is the prediction
        samples = split_samples(probs_from_x0(x0_hats[-1]), n)  # (N, B, C, *S)
        means = prefix_means(samples)
        maps = spread_maps(samples) if self.spread else {}  # "std" and "entropy" over the samples
        if not self.curves:  # validation (no maps) and predict.py: the prediction alone
            return {FINAL: means[-1], **maps}
        outputs = {f"step/{i}": split_samples(probs_from_x0(x0_hats[i - 1]), n).mean(0)
                   for i in self.recorded_steps[:-1]}
        # the last step is the prediction: one tensor under both names, stitched once
        outputs[f"step/{len(x0_hats)}"] = outputs[FINAL] = means[-1]
        if n > 1:
            outputs.update({f"samples/{j}": mean for j, mean in enumerate(means, start=1)})
        outputs.update(maps)
        return outputs
