"""Variance schedules and index helpers vs closed forms, diffusers and docs/methods.md §1 reference values."""

import math

import numpy as np
import pytest
import torch

from diffseg.diffusion import (
    BETA_SCHEDULES,
    Float64BufferModule,
    beta_schedule,
    betas_from_alphas_cumprod,
    evenly_spaced_indices,
    resample_betas,
)

# docs/methods.md §1: linear 1e-4..0.02, T=1001 resampled to K=5 (float64)
REF_ABAR = [0.9999, 0.52175014, 0.07799232, 0.00331891, 3.9952e-5]
REF_BETA = [1.0e-4, 0.47819768, 0.85051787, 0.95744564, 0.98796232]
REF_POST_VAR = [0.0, 9.9989e-5, 0.44116775, 0.88571183, 0.98472270]


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_beta_schedule_shape_dtype_range(name):
    b = beta_schedule(name, 50)
    assert b.dtype == torch.float64 and b.shape == (50,)
    assert bool((b > 0).all()) and bool((b < 1).all())


def test_linear_and_quadratic_closed_form():
    t = 11
    lin = beta_schedule("linear", t, 1e-4, 0.02)
    expected = [1e-4 + (0.02 - 1e-4) * i / (t - 1) for i in range(t)]
    np.testing.assert_allclose(lin.numpy(), expected, rtol=1e-12)
    quad = beta_schedule("quadratic", t, 1e-4, 0.02)
    expected = [(0.01 + (math.sqrt(0.02) - 0.01) * i / (t - 1)) ** 2 for i in range(t)]
    np.testing.assert_allclose(quad.numpy(), expected, rtol=1e-12)


def test_schedules_match_diffusers():
    from diffusers import DDPMScheduler

    for ours, theirs in (("linear", "linear"), ("quadratic", "scaled_linear"), ("cosine", "squaredcos_cap_v2")):
        ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).betas.double()
        torch.testing.assert_close(beta_schedule(ours, 1000), ref, rtol=1e-5, atol=1e-7)


def test_cosine_alpha_bar_closed_form():
    t, s = 100, 0.008
    abar = torch.cumprod(1 - beta_schedule("cosine", t), 0)
    f = lambda u: math.cos((u / t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = [f(i + 1) / f(0) for i in range(t)]
    # the last β is clipped at 0.999, so compare all but the last
    np.testing.assert_allclose(abar[:-1].numpy(), expected[:-1], rtol=1e-10)
    assert beta_schedule("cosine", t)[-1].item() == pytest.approx(0.999)


@pytest.mark.parametrize("name,n_warm", [("warmup10", 100), ("warmup50", 500)])
def test_warmup_quadratic_then_constant(name, n_warm):
    b = beta_schedule(name, 1000, 1e-4, 0.02)
    warm = np.linspace(0.01, math.sqrt(0.02), n_warm) ** 2
    np.testing.assert_allclose(b[:n_warm].numpy(), warm, rtol=1e-12)
    assert bool((b[n_warm:] == 0.02).all())


def test_beta_schedule_errors():
    with pytest.raises(ValueError, match="linear"):
        beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="num_steps"):
        beta_schedule("linear", 0)
    with pytest.raises(ValueError, match="beta_start"):
        beta_schedule("linear", 10, beta_start=0.1, beta_end=0.01)


def test_evenly_spaced_exact_reference():
    assert evenly_spaced_indices(1001, 5).tolist() == [0, 250, 500, 750, 1000]
    assert evenly_spaced_indices(1001, 1001).tolist() == list(range(1001))
    assert evenly_spaced_indices(10, 2).tolist() == [0, 9]
    assert evenly_spaced_indices(1001, 5).dtype == torch.long


def test_evenly_spaced_exact_errors_name_valid_k():
    with pytest.raises(ValueError, match=r"Valid k: \[2, 3, 5, 6, 9, 11"):
        evenly_spaced_indices(1001, 7)
    with pytest.raises(ValueError, match="k=1"):
        evenly_spaced_indices(1001, 1)
    for bad in (0, 1002, -3):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, num_steps=1001\]"):
            evenly_spaced_indices(1001, bad, exact=False)


@pytest.mark.parametrize("n", [2, 7, 100, 1001])
def test_evenly_spaced_inexact(n):
    for k in range(1, min(n, 40) + 1):
        idx = evenly_spaced_indices(n, k, exact=False)
        assert idx.shape == (k,)
        assert idx[-1].item() == n - 1
        if k > 1:
            assert idx[0].item() == 0
            assert bool((idx[1:] > idx[:-1]).all())  # strictly increasing
            assert (idx - torch.tensor(np.linspace(0, n - 1, k))).abs().max() <= 0.5
            if (n - 1) % (k - 1) == 0:  # equals the exact result whenever exact is possible
                assert torch.equal(idx, evenly_spaced_indices(n, k, exact=True))
    assert evenly_spaced_indices(1001, 1, exact=False).tolist() == [1000]
    assert evenly_spaced_indices(1001, 7, exact=False).tolist() == [0, 167, 333, 500, 667, 833, 1000]


def test_betas_from_alphas_cumprod_round_trip():
    b = beta_schedule("cosine", 200)
    abar = torch.cumprod(1 - b, 0)
    torch.testing.assert_close(betas_from_alphas_cumprod(abar), b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="non-increasing"):
        betas_from_alphas_cumprod(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        betas_from_alphas_cumprod(torch.tensor([0.9, 0.0]))


def test_resample_betas_reference_values():
    betas = resample_betas(beta_schedule("linear", 1001, 1e-4, 0.02), 5)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(betas.numpy(), REF_BETA, atol=1e-6, rtol=0)
    np.testing.assert_allclose(abar.numpy(), REF_ABAR, atol=1e-6, rtol=0)
    np.testing.assert_allclose(post_var.numpy(), REF_POST_VAR, atol=1e-6, rtol=0)
    # ᾱ' is literally ᾱ at the kept indices
    full = torch.cumprod(1 - beta_schedule("linear", 1001), 0)
    torch.testing.assert_close(abar, full[[0, 250, 500, 750, 1000]], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="divisible"):
        resample_betas(beta_schedule("linear", 1001), 4)


def test_float64_buffers_survive_dtype_casts():
    class M(Float64BufferModule):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", torch.tensor([1e-4, 0.3], dtype=torch.float64))
            self.register_buffer("w", torch.ones(2))

    m = M().to(torch.bfloat16)
    assert m.a.dtype == torch.float64 and m.a[0].item() == 1e-4
    assert m.w.dtype == torch.bfloat16  # other buffers are cast as usual
    assert M().half().a.dtype == torch.float64
