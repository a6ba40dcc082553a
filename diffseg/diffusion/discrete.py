"""SegRefiner's discrete "coarse -> fine" diffusion for binary masks (docs/methods.md §3;
Wang et al., "SegRefiner", arXiv 2312.12425).

Each pixel is in a fine (ground-truth) or coarse (input-mask) state. β̄_t is the probability
that a pixel is still fine at step t (β̄_{-1} = 1); the last step t = K-1 has β̄ = 0, i.e. the
coarse mask itself. Transition matrix Q_t = [[β_t, 1-β_t], [0, 1]] with β_t = β̄_t / β̄_{t-1}.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .schedules import Float64BufferModule


class Refinement(NamedTuple):
    """What ``BinaryRefinementDiffusion.refine`` returns."""

    prob: torch.Tensor               # sigmoid(logits) of the last step run: the refined foreground probability
    fine_prob: torch.Tensor          # f after the last step: the probability that each pixel is fine
    step_probs: list[torch.Tensor]   # sigmoid(logits) of every step, in order


class BinaryRefinementDiffusion(Float64BufferModule):
    """K-step SegRefiner schedule with β̄ = linspace(start, 0, K) (reference: K=6, start=0.8)."""

    def __init__(self, num_steps: int = 6, start: float = 0.8):
        super().__init__()
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps must be an int >= 2 (the last step is the coarse mask), got {num_steps!r}")
        if not 0.0 < start <= 1.0:
            raise ValueError(f"start (β̄_0) must be in (0, 1], got {start}")
        beta_bar = torch.linspace(start, 0.0, num_steps, dtype=torch.float64)
        self.register_buffer("beta_bar", beta_bar, persistent=False)
        # β̄_{t-1} with β̄_{-1} = 1
        self.register_buffer("beta_bar_prev", torch.cat([beta_bar.new_ones(1), beta_bar[:-1]]), persistent=False)

    @property
    def num_steps(self) -> int:
        return self.beta_bar.numel()

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}, start={self.beta_bar[0].item():.3g}"

    def _t(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Validate t (shape only: no host-device sync) -> long (B,) on the schedule's device."""
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"t must be an integer tensor of step indices, got {type(t).__name__} "
                             f"{getattr(t, 'dtype', '')}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape (B,) matching the batch of {tuple(x.shape)}, got {tuple(t.shape)}")
        return t.to(device=self.beta_bar.device, dtype=torch.long)

    @staticmethod
    def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """float64 (B,) -> x.dtype (B, 1, ..., 1) on x's device."""
        return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))

    @staticmethod
    def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        if a.shape != b.shape:
            raise ValueError(f"{what}: expected shape {tuple(b.shape)}, got {tuple(a.shape)}")

    @staticmethod
    def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)

    def transition_beta(self, t: torch.Tensor) -> torch.Tensor:
        """β_t = β̄_t / β̄_{t-1}, the diagonal entry of Q_t (float64, same shape as t)."""
        t = torch.as_tensor(t, device=self.beta_bar.device).long()
        return self.beta_bar[t] / self.beta_bar_prev[t]

    def q_sample(
        self, fine: torch.Tensor, coarse: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """m_t: per pixel the fine (GT) value where u < β̄_t, the coarse value elsewhere."""
        self._check_same_shape(coarse, fine, "coarse")
        t = self._t(t, fine)
        u = self._uniform(fine, generator)
        return torch.where(u < self._bcast(self.beta_bar[t], u), fine, coarse)

    def transition_prob(self, confidence: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Probability that a coarse pixel turns fine going t -> t-1, given the network confidence c:
        p = c·(β̄_{t-1} - β̄_t) / (1 - c·β̄_t)   (SegRefiner reverse step, docs/methods.md §3)."""
        t = self._t(t, confidence)
        bb = self._bcast(self.beta_bar[t], confidence)
        bb_prev = self._bcast(self.beta_bar_prev[t], confidence)
        # the denominator is > 0 unless c = β̄_t = 1, where the numerator is 0 as well
        return confidence * (bb_prev - bb) / (1.0 - confidence * bb).clamp(min=1e-12)

    def update_fine_prob(self, logits: torch.Tensor, fine_prob: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f <- f + (1 - f)·p with p = transition_prob(c, t) and c = |2·sigmoid(logit) - 1|."""
        conf = (2.0 * torch.sigmoid(logits) - 1.0).abs()
        return fine_prob + (1.0 - fine_prob) * self.transition_prob(conf, t)

    def reverse_step(
        self,
        logits: torch.Tensor,
        m_t: torch.Tensor,
        coarse: torch.Tensor,
        fine_prob: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step t -> t-1. Returns (m_{t-1}, updated fine probability f).

        c = |2·sigmoid(logit) - 1|; f <- f + (1 - f)·p; where u < f the pixel takes the prediction
        (logit >= 0), elsewhere the ORIGINAL coarse value (as the reference does; m_t only fixes
        the output shape and dtype).
        """
        for name, tensor in (("m_t", m_t), ("coarse", coarse), ("fine_prob", fine_prob)):
            self._check_same_shape(tensor, logits, name)
        fine_prob = self.update_fine_prob(logits, fine_prob, t)
        u = self._uniform(logits, generator)
        pred = (logits >= 0).to(m_t.dtype)
        return torch.where(u < fine_prob, pred, coarse.to(m_t.dtype)), fine_prob

    @torch.no_grad()
    def refine(
        self,
        denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        coarse: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        start: int | None = None,
        fine_prob: torch.Tensor | None = None,
    ) -> Refinement:
        """Iteratively refine ``coarse`` (B, 1, H, W) in {0, 1}, the state at step ``start``.

        ``denoise_fn(m_t, t)`` returns fine-mask logits (the image is bound inside denoise_fn); t is long
        (B,). Runs the reverse steps t = start, start - 1, ..., start - n + 1 with n = ``num_steps``
        (defaults: start = K-1, where m_t is exactly the coarse mask, and n = start + 1, i.e. down to
        t = 0), from m = coarse and f = ``fine_prob`` (default 0). SegRefiner's reference uses
        start = K-1, n = K-1 for its global pass (t = K-1 .. 1) and start = 0, n = 1 for its local patches.
        Every step updates f; all but the last sample m_{t-1}; the last returns sigmoid(logits) directly.
        No host-device synchronisation in the loop.
        """
        start = self.num_steps - 1 if start is None else start
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < self.num_steps:
            raise ValueError(f"start must be an int in [0, {self.num_steps - 1}], got {start!r}")
        n = start + 1 if num_steps is None else num_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= start + 1:
            raise ValueError(f"num_steps must be an int in [1, {start + 1}] (steps {start} .. 0), got {num_steps!r}")
        if not coarse.dtype.is_floating_point:
            coarse = coarse.float()
        m = coarse
        f = torch.zeros_like(coarse) if fine_prob is None else fine_prob.to(coarse.dtype)
        self._check_same_shape(f, coarse, "fine_prob")
        steps = torch.arange(start, start - n, -1, device=coarse.device).view(-1, 1).expand(-1, coarse.shape[0])
        step_probs: list[torch.Tensor] = []
        for i in range(n):
            logits = denoise_fn(m, steps[i])
            self._check_same_shape(logits, coarse, "denoise_fn output")
            step_probs.append(torch.sigmoid(logits))
            if i < n - 1:  # python loop index: the last step returns its sigmoid, it is not sampled
                m, f = self.reverse_step(logits, m, coarse, f, steps[i], generator=generator)
            else:  # ... but its fine probability is updated (the reference's local patches start from it)
                f = self.update_fine_prob(logits, f, steps[i])
        return Refinement(step_probs[-1], f, step_probs)
