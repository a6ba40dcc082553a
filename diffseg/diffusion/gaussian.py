"""Gaussian diffusion (DDPM / DDIM) for ImgX-DiffSeg and SegDiff (docs/methods.md §1, §2).

Equations refer to Ho et al. 2020 ("DDPM", arXiv 2006.11239), Song et al. 2021 ("DDIM",
arXiv 2010.02502) and Salimans & Ho 2022 (v-prediction, arXiv 2202.00512).
Notation: ᾱ_t = Π_{s<=t}(1 - β_s), ᾱ_{-1} = 1.

All schedule tensors are float64 buffers; per-step coefficients are computed in float64,
gathered per batch element with a long tensor ``t`` (B,) and only then cast to the data dtype
and broadcast over any number of trailing dims (2D and 3D masks alike).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .schedules import Float64BufferModule, betas_from_alphas_cumprod, evenly_spaced_indices

PREDICTIONS = ("x0", "epsilon", "v")
VARIANCES = ("fixed_small", "fixed_large")
SAMPLERS = ("ddpm", "ddim")

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_per_sample(shape, generator: Generators, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape``. With a SEQUENCE of N generators the batch is N equal,
    sample-major chunks (see inference.samples) and chunk s is drawn from generator s only, so
    sample s of an input gets the same noise whatever N is: the first k of N samples are exactly a
    k-sample run (evaluation sweeps read every sample count from one N-sample pass)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    gens = list(generator)
    if not gens or shape[0] % len(gens):
        raise ValueError(f"a batch of {shape[0]} cannot be split into {len(gens)} per-sample chunks")
    chunk = (shape[0] // len(gens), *shape[1:])
    return torch.cat([torch.randn(chunk, generator=g, device=device, dtype=dtype) for g in gens])


class GaussianDiffusion(Float64BufferModule):
    """Discrete-time Gaussian diffusion over K steps t = 0..K-1.

    Args:
        betas: β_0..β_{K-1} in (0, 1).
        prediction: what the network outputs: "x0", "epsilon" or "v".
        variance: reverse-process variance, "fixed_small" (posterior β̃_t) or "fixed_large" (β_t).
        timesteps: long (K,), the index of each step in the ORIGINAL base schedule; the network is
            conditioned on these so a model trained with one step count can be sampled with another
            (identity when None).
        clip_x0: clamp the x0 estimate to [-1, 1].

    The schedule buffers are non-persistent (they are rebuilt from the config, not checkpointed).
    """

    def __init__(
        self,
        betas,
        prediction: str = "x0",
        variance: str = "fixed_small",
        timesteps: torch.Tensor | None = None,
        clip_x0: bool = False,
    ):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if bool((betas <= 0).any()) or bool((betas >= 1).any()):
            raise ValueError(
                f"betas must lie in (0, 1), got min={betas.min().item():.3g}, max={betas.max().item():.3g}"
            )
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {list(VARIANCES)}, got {variance!r}")
        k = betas.numel()
        if timesteps is None:
            timesteps = torch.arange(k, dtype=torch.long, device=betas.device)
        timesteps = torch.as_tensor(timesteps, device=betas.device)
        if timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool or timesteps.shape != (k,):
            raise ValueError(
                f"timesteps must be an integer tensor of shape ({k},) (one original index per step), "
                f"got dtype={timesteps.dtype}, shape={tuple(timesteps.shape)}"
            )
        self.prediction = prediction
        self.variance = variance
        self.clip_x0 = bool(clip_x0)

        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])  # ᾱ_{-1} = 1
        # DDPM eq. 7: posterior q(x_{t-1} | x_t, x0) = N(c0·x0 + ct·x_t, β̃_t)
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # "fixed_large": β_t, with the first entry replaced by β̃_1 (improved-diffusion convention;
        # it only matters for reporting since no noise is added at t = 0)
        large_var = torch.cat([post_var[1:2], betas[1:]]) if k > 1 else betas.clone()
        buffers = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "posterior_variance": post_var,
            "posterior_mean_coef_x0": betas * abar_prev.sqrt() / (1.0 - abar),  # c0
            "posterior_mean_coef_xt": (1.0 - betas).sqrt() * (1.0 - abar_prev) / (1.0 - abar),  # ct
            "model_variance": post_var if variance == "fixed_small" else large_var,
            "timesteps": timesteps.long(),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    # ------------------------------------------------------------------ schedule helpers
    @property
    def num_steps(self) -> int:
        return self.betas.numel()

    def extra_repr(self) -> str:
        return (
            f"num_steps={self.num_steps}, prediction={self.prediction!r}, "
            f"variance={self.variance!r}, clip_x0={self.clip_x0}"
        )

    def respace(self, k: int, exact: bool = False) -> "GaussianDiffusion":
        """Keep ᾱ at ``evenly_spaced_indices(self.num_steps, k, exact)`` of THIS schedule and
        recompute β' (docs/methods.md §1); ``timesteps`` compose so they still index the original."""
        idx = evenly_spaced_indices(self.num_steps, k, exact=exact).to(self.betas.device)
        return GaussianDiffusion(
            betas_from_alphas_cumprod(self.alphas_cumprod[idx]),
            prediction=self.prediction,
            variance=self.variance,
            timesteps=self.timesteps[idx],
            clip_x0=self.clip_x0,
        )

    def _t(self, t, x: torch.Tensor) -> torch.Tensor:
        """Validate t (shape only: no host-device sync) and return it as long (B,) on x's device."""
        if isinstance(t, int) and not isinstance(t, bool):
            t = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"t must be an integer tensor of step indices, got {type(t).__name__} "
                             f"{getattr(t, 'dtype', '')}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.ndim != 1 or x.ndim < 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"t must have shape (B,) matching the batch of x {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        return t.to(device=self.betas.device, dtype=torch.long)

    @staticmethod
    def _bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """float64 (B,) -> x.dtype (B, 1, ..., 1) on x's device."""
        return coef.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))

    @staticmethod
    def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{what}: expected shape {tuple(b.shape)}, got {tuple(a.shape)}")

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε (DDPM eq. 4)."""
        t = self._t(t, x0)
        noise = torch.randn_like(x0) if noise is None else noise
        self._check_same_shape(noise, x0, "noise")
        abar = self.alphas_cumprod[t]
        return self._bcast(abar.sqrt(), x0) * x0 + self._bcast((1.0 - abar).sqrt(), x0) * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Regression target in prediction space: x0, ε, or v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0."""
        self._check_same_shape(noise, x0, "noise")
        if self.prediction == "x0":
            return x0
        if self.prediction == "epsilon":
            return noise
        abar = self.alphas_cumprod[self._t(t, x0)]
        # Salimans & Ho 2022, §4: v ≡ α_t·ε - σ_t·x
        return self._bcast(abar.sqrt(), x0) * noise - self._bcast((1.0 - abar).sqrt(), x0) * x0

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean c0·x0 + ct·x_t and variance β̃_t of q(x_{t-1} | x_t, x0) (DDPM eqs. 6-7)."""
        t = self._t(t, x_t)
        self._check_same_shape(x0, x_t, "x0")
        mean = (self._bcast(self.posterior_mean_coef_x0[t], x_t) * x0
                + self._bcast(self.posterior_mean_coef_xt[t], x_t) * x_t)
        return mean, self._bcast(self.posterior_variance[t], x_t)

    # ------------------------------------------------------------------ parameterisations
    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """x̂0 from the model output (clamped to [-1, 1] when clip_x0)."""
        self._check_same_shape(model_output, x_t, "model_output")
        if self.prediction == "x0":
            x0 = model_output
        else:
            abar = self.alphas_cumprod[self._t(t, x_t)]
            if self.prediction == "epsilon":
                # DDPM eq. 15: x0 = (x_t - sqrt(1-ᾱ_t)·ε) / sqrt(ᾱ_t)
                a, b = 1.0 / abar.sqrt(), ((1.0 - abar) / abar).sqrt()
            else:
                # v-prediction: x0 = sqrt(ᾱ_t)·x_t - sqrt(1-ᾱ_t)·v
                a, b = abar.sqrt(), (1.0 - abar).sqrt()
            x0 = self._bcast(a, x_t) * x_t - self._bcast(b, x_t) * model_output
        return x0.clamp(-1.0, 1.0) if self.clip_x0 else x0

    def _eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # ε = (x_t - sqrt(ᾱ_t)·x0) / sqrt(1-ᾱ_t)
        abar = self.alphas_cumprod[t]
        return (self._bcast(1.0 / (1.0 - abar).sqrt(), x_t) * x_t
                - self._bcast((abar / (1.0 - abar)).sqrt(), x_t) * x0)

    def predict_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """ε̂ from the model output (no clipping)."""
        self._check_same_shape(model_output, x_t, "model_output")
        if self.prediction == "epsilon":
            return model_output
        t = self._t(t, x_t)
        if self.prediction == "x0":
            return self._eps_from_x0(model_output, x_t, t)
        # v-prediction: ε = sqrt(ᾱ_t)·v + sqrt(1-ᾱ_t)·x_t
        abar = self.alphas_cumprod[t]
        return self._bcast(abar.sqrt(), x_t) * model_output + self._bcast((1.0 - abar).sqrt(), x_t) * x_t

    # ------------------------------------------------------------------ reverse steps
    def p_sample(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral DDPM step t -> t-1 (DDPM Alg. 2): x_{t-1} = μ̃(x̂0, x_t) + σ_t·z, no noise
        where t == 0 (per element). Returns (x_prev, x̂0)."""
        t = self._t(t, x_t)
        x0_hat = self.predict_x0(model_output, x_t, t)
        mean, _ = self.q_posterior(x0_hat, x_t, t)
        noise = torch.randn_like(x_t) if noise is None else noise
        self._check_same_shape(noise, x_t, "noise")
        sigma = self.model_variance[t].sqrt() * (t != 0).to(torch.float64)  # mask, not a branch
        return mean + self._bcast(sigma, x_t) * noise, x0_hat

    def ddim_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t,
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM step t -> t-1 of THIS schedule (DDIM eq. 12, σ from eq. 16; ᾱ_{-1} = 1).
        Returns (x_prev, x̂0)."""
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        t = self._t(t, x_t)
        x0_hat = self.predict_x0(model_output, x_t, t)
        # with clipping, ε is re-derived from the clipped x̂0 so both stay consistent
        eps = self._eps_from_x0(x0_hat, x_t, t) if self.clip_x0 else self.predict_eps(model_output, x_t, t)
        abar, abar_prev = self.alphas_cumprod[t], self.alphas_cumprod_prev[t]
        # eq. 16: σ_t = η·sqrt((1-ᾱ_{t-1})/(1-ᾱ_t))·sqrt(1 - ᾱ_t/ᾱ_{t-1})
        sigma = eta * ((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)).sqrt()
        # eq. 12: x_{t-1} = sqrt(ᾱ_{t-1})·x̂0 + sqrt(1-ᾱ_{t-1}-σ²)·ε̂ + σ·z
        dir_coef = (1.0 - abar_prev - sigma**2).clamp(min=0.0).sqrt()
        x_prev = self._bcast(abar_prev.sqrt(), x_t) * x0_hat + self._bcast(dir_coef, x_t) * eps
        if eta > 0:
            noise = torch.randn_like(x_t) if noise is None else noise
            self._check_same_shape(noise, x_t, "noise")
            x_prev = x_prev + self._bcast(sigma, x_t) * noise
        return x_prev, x0_hat

    # ------------------------------------------------------------------ sampling loop
    @torch.no_grad()
    def sample(
        self,
        denoise_fn: DenoiseFn,
        shape,
        *,
        sampler: str = "ddpm",
        eta: float = 0.0,
        generator: Generators = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        x_T: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the reverse chain from x_{K-1} ~ N(0, I) (or ``x_T``) down to t = 0.

        ``denoise_fn(x_t, t_model)`` returns the model output in prediction space; ``t_model`` is
        float32 (B,) holding the ORIGINAL timestep index ``self.timesteps[t]``. Returns
        (x0_final, x0_hats): the x̂0 of every step in sampling order (K entries), the last being
        the final prediction (for DDPM/DDIM the t = 0 step returns exactly x̂0). The loop does no
        host-device synchronisation. ``generator``: one generator, or one per sample chunk
        (``randn_per_sample``).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        device = torch.device(device) if device is not None else self.betas.device
        if x_T is None:
            shape = tuple(shape)
            x = randn_per_sample(shape, generator, device, dtype)
        else:
            if tuple(x_T.shape) != tuple(shape):
                raise ValueError(f"x_T: expected shape {tuple(shape)}, got {tuple(x_T.shape)}")
            x = x_T.to(device=device, dtype=dtype)
        b = x.shape[0]
        # precompute per-step index tensors on the device (sampling order K-1 .. 0)
        steps = torch.arange(self.num_steps - 1, -1, -1, device=self.betas.device)
        t_idx = steps.to(device).view(-1, 1).expand(-1, b)  # (K, B) long
        t_model = self.timesteps[steps].to(device=device, dtype=torch.float32).view(-1, 1).expand(-1, b)

        x0_hats: list[torch.Tensor] = []
        for i in range(self.num_steps):
            out = denoise_fn(x, t_model[i])
            self._check_same_shape(out, x, "denoise_fn output")
            last = i == self.num_steps - 1  # python loop index, not a tensor value
            if sampler == "ddpm":
                noise = torch.zeros_like(x) if last else randn_per_sample(x.shape, generator, device, dtype)
                x, x0_hat = self.p_sample(out, x, t_idx[i], noise)
            else:
                noise = None
                if eta > 0 and not last:
                    noise = randn_per_sample(x.shape, generator, device, dtype)
                x, x0_hat = self.ddim_step(out, x, t_idx[i], noise=noise, eta=eta if not last else 0.0)
            x0_hats.append(x0_hat)
        return x0_hats[-1], x0_hats
