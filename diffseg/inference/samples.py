"""Several samples of one input as ONE batch, and their running (prefix) means.

Layout: N samples of a batch of B inputs are stacked sample-major, (N*B, ...), so that one
denoiser call per step serves all samples. ``prefix_means`` gives the average of the first
1, 2, ..., N samples in one pass: a single N-sample run yields the metrics of every smaller count.
"""
from __future__ import annotations

import math

import torch


def repeat_for_samples(x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(B, ...) -> (N*B, ...), sample-major (row s*B + b is sample s of input b)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return x.repeat(num_samples, *([1] * (x.ndim - 1)))


def split_samples(x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(N*B, ...) -> (N, B, ...), the inverse of ``repeat_for_samples``'s layout."""
    if x.shape[0] % num_samples:
        raise ValueError(f"batch of {x.shape[0]} is not a multiple of num_samples={num_samples}")
    return x.reshape(num_samples, x.shape[0] // num_samples, *x.shape[1:])


def prefix_means(samples: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, ...) where entry n-1 is the mean of samples 0..n-1."""
    counts = torch.arange(1, samples.shape[0] + 1, device=samples.device, dtype=samples.dtype)
    return samples.cumsum(0) / counts.view(-1, *([1] * (samples.ndim - 1)))


#: names of the per-voxel uncertainty maps over samples (``spread_maps``), written next to the mask
SPREAD_MAPS = ("std", "entropy")


def spread_maps(samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Uncertainty over N samples of class probabilities (N, B, C, *S) -> two (B, 1, *S) maps:

    - ``std``: the population standard deviation over the samples of each class probability, averaged
      over the classes (0 where every sample gives the same probabilities; for a binary task exactly
      the std of the foreground probability);
    - ``entropy``: the entropy of the mean over samples (predictive entropy), -Σ_c p̄_c log p̄_c,
      divided by log C so that it lies in [0, 1] (1: uniform over the classes).
    """
    probs = samples.float()
    std = probs.std(dim=0, correction=0).mean(dim=1, keepdim=True)
    mean = probs.mean(dim=0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(dim=1, keepdim=True) / math.log(probs.shape[2])
    return {"std": std, "entropy": entropy.clamp_min(0.0)}
