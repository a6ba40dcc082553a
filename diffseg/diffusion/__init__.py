"""Diffusion processes: variance schedules, Gaussian DDPM/DDIM, SegRefiner's discrete refinement."""

from .discrete import BinaryRefinementDiffusion
from .gaussian import PREDICTIONS, SAMPLERS, VARIANCES, GaussianDiffusion
from .schedules import (
    BETA_SCHEDULES,
    Float64BufferModule,
    beta_schedule,
    betas_from_alphas_cumprod,
    evenly_spaced_indices,
    resample_betas,
)

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTIONS",
    "SAMPLERS",
    "VARIANCES",
    "BinaryRefinementDiffusion",
    "Float64BufferModule",
    "GaussianDiffusion",
    "beta_schedule",
    "betas_from_alphas_cumprod",
    "evenly_spaced_indices",
    "resample_betas",
]
