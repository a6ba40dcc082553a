"""Variance schedules and step-index helpers (docs/methods.md §1, §2).

Small pure functions on float64 tensors. Notation: β_t is the per-step noise variance,
α_t = 1 - β_t and ᾱ_t = Π_{s<=t} α_s (the signal fraction kept at step t).
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "quadratic", "cosine", "warmup10", "warmup50")


def _check_num_steps(num_steps, name: str = "num_steps") -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{name} must be a positive int, got {num_steps!r}")
    return num_steps


def _cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2);
    # β_t = 1 - ᾱ(t+1)/ᾱ(t), clipped at 0.999 to avoid the singularity at t = T.
    def f(t: float) -> float:
        return math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1.0 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def beta_schedule(
    name: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """β_0..β_{T-1} as a float64 tensor of shape (num_steps,).

    linear: linspace(β_start, β_end); quadratic: linspace(√β_start, √β_end)²;
    cosine: Nichol & Dhariwal (s = 0.008, β ≤ 0.999; β_start/β_end unused);
    warmup10 / warmup50: quadratic warm-up over the first T/10 (T/2) steps, then constant β_end
    (ImgX reference, docs/methods.md §1).
    """
    _check_num_steps(num_steps)
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {list(BETA_SCHEDULES)}")
    if name == "cosine":
        return _cosine_betas(num_steps)
    if not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError(
            f"expected 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    f64 = torch.float64
    if name == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=f64)
    if name == "quadratic":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=f64) ** 2
    # warmup10 / warmup50: the first T·frac steps ramp up quadratically, the rest stay at β_end.
    frac = 0.1 if name == "warmup10" else 0.5
    n_warm = max(int(num_steps * frac), 1)
    warm = torch.linspace(beta_start**0.5, beta_end**0.5, n_warm, dtype=f64) ** 2
    return torch.cat([warm, torch.full((num_steps - n_warm,), beta_end, dtype=f64)])


def evenly_spaced_indices(num_steps: int, k: int, exact: bool = True) -> torch.Tensor:
    """k indices of 0..num_steps-1, evenly spaced, including the first and the last (long tensor).

    exact=True reproduces the ImgX reference: the spacing (num_steps-1)/(k-1) must be an integer
    (e.g. 1001 -> 5 gives 0, 250, 500, 750, 1000). exact=False rounds linspace(0, num_steps-1, k)
    (identical whenever exact spacing is possible); k=1 then gives [num_steps-1], i.e. one step
    from pure noise.
    """
    _check_num_steps(num_steps)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_steps:
        raise ValueError(f"k must be an int in [1, num_steps={num_steps}], got {k!r}")
    last = num_steps - 1
    if exact:
        if k == 1 or last % (k - 1) != 0:
            valid = [d + 1 for d in range(1, last + 1) if last % d == 0]
            raise ValueError(
                f"cannot place k={k} evenly spaced steps (first and last included) in {num_steps} "
                f"steps: (num_steps-1)={last} must be divisible by (k-1). Valid k: {valid} "
                f"(or pass exact=False for rounded spacing)"
            )
        return torch.arange(k, dtype=torch.long) * (last // (k - 1))
    if k == 1:
        return torch.tensor([last], dtype=torch.long)
    # round half up (floor(x + 0.5)) keeps the indices strictly increasing since the spacing >= 1
    grid = torch.linspace(0, last, k, dtype=torch.float64)
    return torch.floor(grid + 0.5).long()


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Invert ᾱ -> β: β'_0 = 1 - ᾱ'_0, β'_k = 1 - ᾱ'_k / ᾱ'_{k-1} (docs/methods.md §1), float64."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if abar.ndim != 1 or abar.numel() == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(abar.shape)}")
    if bool((abar <= 0).any()) or bool((abar > 1).any()):
        raise ValueError("alphas_cumprod must lie in (0, 1]")
    if bool((abar[1:] > abar[:-1]).any()):
        raise ValueError("alphas_cumprod must be non-increasing (β' would be negative)")
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1.0 - abar / prev


def resample_betas(betas: torch.Tensor, k: int) -> torch.Tensor:
    """ImgX variance-schedule resampling: keep ᾱ at k evenly spaced indices (exact) and
    recompute β' from it (docs/methods.md §1, "Variance-schedule resampling")."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D, got shape {tuple(betas.shape)}")
    abar = torch.cumprod(1.0 - betas, dim=0)
    idx = evenly_spaced_indices(betas.numel(), k, exact=True)
    return betas_from_alphas_cumprod(abar[idx.to(abar.device)])


class Float64BufferModule(torch.nn.Module):
    """Parameter-free base for schedule modules: buffers follow device moves (``.to(device)``),
    but float64 buffers stay float64 under ``.to(dtype)`` / ``.half()`` / Lightning's
    "bf16-true", so schedule coefficients are always gathered at full precision and only the
    gathered values are cast to the data dtype."""

    def _apply(self, fn, recurse=True):
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float64}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float64:
                self._buffers[name] = old.to(new.device)
        return out
