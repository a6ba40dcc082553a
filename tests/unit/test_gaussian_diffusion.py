"""GaussianDiffusion vs diffusers' DDPM/DDIM schedulers (oracle) and closed forms."""

import math

import pytest
import torch

from diffseg.diffusion import GaussianDiffusion, beta_schedule, resample_betas

diffusers = pytest.importorskip("diffusers")

OURS_TO_DIFFUSERS = {"x0": "sample", "epsilon": "epsilon", "v": "v_prediction"}
SHAPE = (2, 3, 6, 5)


def _schedules():
    base = beta_schedule("linear", 1001, 1e-4, 0.02)
    return {
        "base1001": (base, [0, 1, 2, 500, 999, 1000]),
        "resampled5": (resample_betas(base, 5), [0, 1, 2, 3, 4]),
        "segdiff100": (beta_schedule("linear", 100, 1e-3, 0.2), [0, 1, 50, 99]),
    }


SCHEDULES = _schedules()


F64 = torch.float64


def _inputs(diff, t, seed=0):
    """Realistic float64 inputs: x_t = q_sample(x0) and a perturbed true target as model output."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(SHAPE, generator=g, dtype=F64)
    tt = torch.full((SHAPE[0],), t, dtype=torch.long)
    x_t = diff.q_sample(x0, tt, eps)
    out = diff.training_target(x0, eps, tt) + 0.1 * torch.randn(SHAPE, generator=g, dtype=F64)
    return x_t, out, tt


def _float64_oracle(ref, betas):
    """diffusers builds its schedule in float32 (β from trained_betas, then ᾱ = cumprod(1 - β)),
    whose rounding reaches 1e-4 in the coefficients where 1-ᾱ_t ≈ 1e-4. Redo ITS OWN init
    arithmetic in float64 so the comparison is exact to rounding (its step() is dtype-generic)."""
    ref.betas = betas.clone()
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    return ref


def _close(a, b, scale=1.0):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * scale)


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction", ["x0", "epsilon", "v"])
def test_p_sample_matches_diffusers_ddpm(sched, variance, prediction):
    betas, ts = SCHEDULES[sched]
    diff = GaussianDiffusion(betas, prediction=prediction, variance=variance)
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=len(betas), trained_betas=betas.numpy(), clip_sample=False,
        prediction_type=OURS_TO_DIFFUSERS[prediction], variance_type=variance,
    )
    _float64_oracle(ref, betas)
    for t in ts:
        x_t, out, tt = _inputs(diff, t, seed=t)
        # diffusers draws randn(shape, generator) inside step(): reproduce it with the same seed
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + t), dtype=F64)
        x_prev, x0_hat = diff.p_sample(out, x_t, tt, noise)
        r = ref.step(out, t, x_t, generator=torch.Generator().manual_seed(100 + t))
        scale = max(1.0, r.pred_original_sample.abs().max().item())
        _close(x0_hat, r.pred_original_sample, scale)
        _close(x_prev, r.prev_sample, scale)
        # float32 data: float64 coefficients cast to float32 keep the result within float32 rounding
        x_prev32, x0_hat32 = diff.p_sample(out.float(), x_t.float(), tt, noise.float())
        assert x_prev32.dtype == torch.float32
        torch.testing.assert_close(x0_hat32, r.pred_original_sample.float(), rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(x_prev32, r.prev_sample.float(), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("sched", ["base1001", "resampled5"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction", ["x0", "epsilon", "v"])
def test_ddim_step_matches_diffusers(sched, eta, prediction):
    betas, ts = SCHEDULES[sched]
    k = len(betas)
    diff = GaussianDiffusion(betas, prediction=prediction)
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=k, trained_betas=betas.numpy(), set_alpha_to_one=True, clip_sample=False,
        timestep_spacing="leading", steps_offset=0, prediction_type=OURS_TO_DIFFUSERS[prediction],
    )
    _float64_oracle(ref, betas)
    ref.set_timesteps(k)
    assert ref.timesteps.tolist() == list(range(k - 1, -1, -1))  # prev = t - 1
    for t in ts:
        x_t, out, tt = _inputs(diff, t, seed=t)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(200 + t), dtype=F64)
        x_prev, x0_hat = diff.ddim_step(out, x_t, tt, noise=noise, eta=eta)
        r = ref.step(out, t, x_t, eta=eta, variance_noise=noise if eta > 0 else None)
        scale = max(1.0, r.pred_original_sample.abs().max().item())
        _close(x0_hat, r.pred_original_sample, scale)
        _close(x_prev, r.prev_sample, scale)


def test_per_element_t_and_3d_broadcast():
    diff = GaussianDiffusion(SCHEDULES["resampled5"][0], prediction="epsilon", variance="fixed_large")
    g = torch.Generator().manual_seed(0)
    x_t, out, noise = (torch.randn(3, 2, 4, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0, 4, 2])
    x_prev, x0_hat = diff.p_sample(out, x_t, t, noise)
    d_prev, d_x0 = diff.ddim_step(out, x_t, t, noise=noise, eta=0.3)
    for i in range(3):
        s = slice(i, i + 1)
        p, x = diff.p_sample(out[s], x_t[s], t[s], noise[s])
        _close(x_prev[s], p)
        _close(x0_hat[s], x)
        _close(d_prev[s], diff.ddim_step(out[s], x_t[s], t[s], noise=noise[s], eta=0.3)[0])
    # no noise at t = 0: x_prev is the posterior mean, which is x̂0 itself (ᾱ_{-1} = 1)
    _close(x_prev[0], x0_hat[0])
    _close(d_prev[0], d_x0[0])


def test_q_sample_closed_form_and_statistics():
    betas = beta_schedule("linear", 1001)
    diff = GaussianDiffusion(betas)
    abar = [math.prod(1 - b for b in betas.tolist()[: t + 1]) for t in (0, 500, 1000)]
    x0 = torch.full((3, 1, 200, 250), 0.7)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    xt = diff.q_sample(x0, torch.tensor([0, 500, 1000]), noise)
    for i, a in enumerate(abar):
        _close(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])
        assert xt[i].mean().item() == pytest.approx(0.7 * math.sqrt(a), abs=0.01)
        assert xt[i].var().item() == pytest.approx(1 - a, abs=0.01 * max(1 - a, 0.01) + 2e-5)


def test_q_posterior_matches_bayes_closed_form():
    betas = resample_betas(beta_schedule("linear", 1001), 5)
    diff = GaussianDiffusion(betas)
    g = torch.Generator().manual_seed(3)
    x0, x_t = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, 3, generator=g,
                                                                                    dtype=torch.float64)
    mean, var = diff.q_posterior(x0, x_t, torch.arange(5))
    abar = torch.cumprod(1 - betas, 0)
    for t in range(1, 5):
        # product of Gaussians: N(x_t; sqrt(α_t) x, β_t) · N(x; sqrt(ᾱ_{t-1}) x0, 1-ᾱ_{t-1})
        a_t, ab_prev = 1 - betas[t], abar[t - 1]
        prec = a_t / betas[t] + 1 / (1 - ab_prev)
        torch.testing.assert_close(var[t].flatten()[0], 1 / prec)
        bayes_mean = (a_t.sqrt() * x_t[t] / betas[t] + ab_prev.sqrt() * x0[t] / (1 - ab_prev)) / prec
        torch.testing.assert_close(mean[t], bayes_mean)
    torch.testing.assert_close(mean[0], x0[0])  # ᾱ_{-1} = 1: the t=0 posterior is a point mass at x0
    assert var[0].abs().max().item() == 0.0
    # docs/methods.md §1 reference posterior variance for the resampled schedule
    ref = torch.tensor([0.0, 9.9989e-5, 0.44116775, 0.88571183, 0.98472270], dtype=torch.float64)
    torch.testing.assert_close(var.flatten(1)[:, 0], ref, atol=1e-6, rtol=0)
    # fixed_large: β_t with the first entry replaced by β̃_1
    large = GaussianDiffusion(betas, variance="fixed_large").model_variance
    torch.testing.assert_close(large, torch.cat([diff.posterior_variance[1:2], betas[1:]]))


def test_training_target_and_parameterisations_invert():
    betas = beta_schedule("cosine", 50)
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(4, 2, 5, generator=g, dtype=torch.float64), torch.randn(4, 2, 5, generator=g,
                                                                                   dtype=torch.float64)
    t = torch.tensor([0, 10, 30, 49])
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1)
    for pred in ("x0", "epsilon", "v"):
        diff = GaussianDiffusion(betas, prediction=pred)
        x_t = diff.q_sample(x0, t, eps)
        target = diff.training_target(x0, eps, t)
        if pred == "v":
            torch.testing.assert_close(target, abar.sqrt() * eps - (1 - abar).sqrt() * x0)
        torch.testing.assert_close(diff.predict_x0(target, x_t, t), x0)
        torch.testing.assert_close(diff.predict_eps(target, x_t, t), eps)


def _oracle(base, x0, prediction):
    """A perfect network: knows x0; uses the BASE schedule's ᾱ at the original timestep t_model."""

    def fn(x_t, t_model):
        abar = base.alphas_cumprod[t_model.long()].to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return {"x0": x0, "epsilon": eps, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[prediction]

    return fn


@pytest.mark.parametrize("prediction", ["x0", "epsilon", "v"])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
@pytest.mark.parametrize("k", [None, 5, 1])
def test_sample_with_oracle_recovers_x0(prediction, sampler, eta, k):
    base = GaussianDiffusion(beta_schedule("linear", 1001), prediction=prediction)
    diff = base if k is None else base.respace(k, exact=False)
    x0 = (torch.rand(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(5)) > 0.5).float() * 2 - 1
    seen = []

    def fn(x_t, t_model):
        seen.append(t_model)
        return _oracle(base, x0, prediction)(x_t, t_model)

    final, hats = diff.sample(fn, x0.shape, sampler=sampler, eta=eta,
                              generator=torch.Generator().manual_seed(6))
    assert len(hats) == diff.num_steps and final is hats[-1]
    torch.testing.assert_close(final, x0, atol=1e-4, rtol=0)
    # the network sees float original indices, in sampling order
    assert seen[0].dtype == torch.float32 and seen[0].shape == (2,)
    assert [s[0].item() for s in seen] == diff.timesteps.flip(0).float().tolist()


def test_sample_reproducible_and_x_T():
    diff = GaussianDiffusion(beta_schedule("linear", 20), prediction="epsilon")
    fn = lambda x, t: 0.5 * x  # noqa: E731
    a, _ = diff.sample(fn, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    b, _ = diff.sample(fn, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    x_T = torch.randn(2, 1, 4, 4)
    c, _ = diff.sample(fn, (2, 1, 4, 4), sampler="ddim", x_T=x_T)
    d, _ = diff.sample(fn, (2, 1, 4, 4), sampler="ddim", x_T=x_T)
    assert torch.equal(c, d)  # eta = 0: deterministic given x_T


def test_respace_round_trip():
    base = GaussianDiffusion(beta_schedule("linear", 1001), prediction="v", variance="fixed_large", clip_x0=True)
    r = base.respace(5, exact=True)
    assert r.timesteps.tolist() == [0, 250, 500, 750, 1000]
    assert (r.prediction, r.variance, r.clip_x0) == ("v", "fixed_large", True)
    torch.testing.assert_close(r.alphas_cumprod, base.alphas_cumprod[r.timesteps], rtol=1e-12, atol=0)
    torch.testing.assert_close(r.betas, resample_betas(base.betas, 5), rtol=1e-12, atol=0)
    r2 = base.respace(5, exact=False)
    assert torch.equal(r2.timesteps, r.timesteps) and torch.equal(r2.betas, r.betas)
    # composition: 1001 -> 11 -> 3 keeps original indices 0, 500, 1000
    rr = base.respace(11).respace(3)
    assert rr.timesteps.tolist() == [0, 500, 1000]
    torch.testing.assert_close(rr.alphas_cumprod, base.respace(3).alphas_cumprod, rtol=1e-12, atol=0)
    ident = base.respace(1001, exact=True)
    torch.testing.assert_close(ident.betas, base.betas, rtol=1e-9, atol=1e-15)
    assert base.respace(1).timesteps.tolist() == [1000]
    with pytest.raises(ValueError, match="Valid k"):
        base.respace(7, exact=True)


def test_clip_x0_and_dtype_device_handling():
    diff = GaussianDiffusion(beta_schedule("linear", 10), prediction="x0", clip_x0=True)
    out = torch.tensor([[-3.0, 0.2, 5.0]])
    assert torch.equal(diff.predict_x0(out, torch.zeros(1, 3), torch.tensor([3])), torch.tensor([[-1.0, 0.2, 1.0]]))
    diff = diff.to(torch.float16)  # schedule stays float64, results follow x's dtype
    assert diff.alphas_cumprod.dtype == torch.float64
    assert diff.q_sample(torch.zeros(2, 3, dtype=torch.bfloat16), torch.tensor([1, 2])).dtype == torch.bfloat16
    assert len(diff.state_dict()) == 0  # schedule rebuilt from config, not checkpointed


def test_clear_errors():
    betas = beta_schedule("linear", 10)
    with pytest.raises(ValueError, match="prediction must be one of"):
        GaussianDiffusion(betas, prediction="sample")
    with pytest.raises(ValueError, match="variance must be one of"):
        GaussianDiffusion(betas, variance="learned")
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        GaussianDiffusion(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        GaussianDiffusion(betas, timesteps=torch.arange(9))
    diff = GaussianDiffusion(betas, prediction="epsilon")
    x = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match="integer tensor"):
        diff.q_sample(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        diff.q_sample(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="model_output"):
        diff.p_sample(torch.zeros(2, 2, 3, 3), x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="eta must be >= 0"):
        diff.ddim_step(x, x, torch.tensor([1, 2]), eta=-0.1)
    with pytest.raises(ValueError, match="sampler must be one of"):
        diff.sample(lambda a, t: a, x.shape, sampler="euler")
    with pytest.raises(ValueError, match="denoise_fn output"):
        diff.sample(lambda a, t: a[:, :0], x.shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_loop_has_no_host_device_sync():
    diff = GaussianDiffusion(beta_schedule("linear", 100), prediction="epsilon").cuda()
    x0 = torch.ones(2, 1, 8, 8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for sampler, eta in (("ddpm", 0.0), ("ddim", 0.5)):
            diff.sample(_oracle(diff, x0, "epsilon"), x0.shape, sampler=sampler, eta=eta, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
