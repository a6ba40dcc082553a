"""SegRefiner discrete diffusion (docs/methods.md §3) vs hand-computed values and sampling statistics."""

import pytest
import torch

from diffseg.diffusion import BinaryRefinementDiffusion


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_schedule_values_and_transition_beta():
    d = BinaryRefinementDiffusion()
    torch.testing.assert_close(d.beta_bar, torch.tensor([0.8, 0.64, 0.48, 0.32, 0.16, 0.0], dtype=torch.float64))
    assert d.num_steps == 6
    # β_t = β̄_t / β̄_{t-1}, β̄_{-1} = 1
    expected = torch.tensor([0.8, 0.8, 0.75, 2 / 3, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(d.transition_beta(torch.arange(6)), expected)
    # Q_t = [[β_t, 1-β_t], [0, 1]] composes to Q̄_t = [[β̄_t, 1-β̄_t], [0, 1]]
    q_bar = torch.eye(2, dtype=torch.float64)
    for t, b in enumerate(expected.tolist()):
        q_bar = q_bar @ torch.tensor([[b, 1 - b], [0.0, 1.0]], dtype=torch.float64)
        assert q_bar[0, 0].item() == pytest.approx(d.beta_bar[t].item())


def test_q_sample_marginal_matches_beta_bar():
    d = BinaryRefinementDiffusion()
    fine = torch.ones(6, 1, 400, 500)  # 200k pixels per step
    coarse = torch.zeros_like(fine)
    m = d.q_sample(fine, coarse, torch.arange(6), generator=_gen(1))
    frac_fine = m.flatten(1).mean(1).double()
    torch.testing.assert_close(frac_fine, d.beta_bar, atol=0.01, rtol=0)
    assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_q_sample_endpoints_exact():
    g = _gen(2)
    fine = (torch.rand(3, 1, 16, 16, generator=g) > 0.5).float()
    coarse = (torch.rand(3, 1, 16, 16, generator=g) > 0.5).float()
    d = BinaryRefinementDiffusion()
    assert torch.equal(d.q_sample(fine, coarse, torch.full((3,), 5), generator=g), coarse)
    # β̄ = 1 (start=1 puts it at t=0): every pixel is fine
    all_fine = BinaryRefinementDiffusion(6, start=1.0)
    assert torch.equal(all_fine.q_sample(fine, coarse, torch.zeros(3, dtype=torch.long)), fine)
    # per-element t: element 0 fully coarse, element 1 mixes
    mixed = d.q_sample(torch.ones(2, 1, 64, 64), torch.zeros(2, 1, 64, 64), torch.tensor([5, 0]), generator=g)
    assert mixed[0].sum().item() == 0 and 0.7 < mixed[1].mean().item() < 0.9


def test_transition_prob_by_hand():
    d = BinaryRefinementDiffusion()
    conf = torch.tensor([[0.5], [1.0], [0.25], [0.0]])
    t = torch.tensor([2, 5, 0, 3])
    # p = c (β̄_{t-1} - β̄_t) / (1 - c β̄_t)
    expected = torch.tensor([
        [0.5 * (0.64 - 0.48) / (1 - 0.5 * 0.48)],
        [1.0 * (0.16 - 0.0) / 1.0],
        [0.25 * (1.0 - 0.8) / (1 - 0.25 * 0.8)],
        [0.0],
    ])
    torch.testing.assert_close(d.transition_prob(conf, t), expected)


def test_reverse_step_keeps_coarse_where_f0_and_takes_prediction_where_f1():
    d = BinaryRefinementDiffusion()
    logits = torch.zeros(2, 1, 8, 8)  # confidence 0: f is not updated; prediction (logit >= 0) = 1
    coarse = torch.zeros_like(logits)
    f = torch.zeros_like(logits)
    f[..., 4:] = 1.0
    m_prev, f_new = d.reverse_step(logits, coarse.clone(), coarse, f, torch.tensor([5, 3]), generator=_gen(3))
    assert torch.equal(f_new, f)
    assert torch.equal(m_prev[..., :4], coarse[..., :4])
    assert bool((m_prev[..., 4:] == 1).all())
    # the kept value is the ORIGINAL coarse one, not m_t
    m_t = torch.ones_like(coarse)
    m_prev, _ = d.reverse_step(-torch.ones_like(logits) * 1e-3, m_t, coarse, torch.zeros_like(f),
                               torch.tensor([1, 1]), generator=_gen(3))
    assert torch.equal(m_prev, coarse)  # prediction (logit < 0) and coarse are both 0; m_t = 1 is never kept


def test_reverse_step_fine_probability_tracks_beta_bar():
    # with a fully confident network (c = 1) the running fine probability after the step t -> t-1 is
    # β̄_{t-1}, and that fraction of pixels takes the prediction
    d = BinaryRefinementDiffusion()
    logits = torch.full((1, 1, 300, 300), 30.0)
    coarse = torch.zeros_like(logits)
    f, m, g = torch.zeros_like(logits), coarse, _gen(4)
    for t in range(5, 0, -1):
        m, f = d.reverse_step(logits, m, coarse, f, torch.tensor([t]), generator=g)
        torch.testing.assert_close(f, torch.full_like(f, d.beta_bar[t - 1].item()), atol=1e-6, rtol=0)
        assert m.mean().item() == pytest.approx(d.beta_bar[t - 1].item(), abs=0.01)


@pytest.mark.parametrize("num_steps,start", [(None, None), (5, None), (1, None), (1, 0), (3, 2)])
def test_refine_with_oracle_returns_true_mask(num_steps, start):
    """Steps t = start .. start - n + 1 (default start K-1, n = start + 1), the coarse mask as the state at
    ``start``; f after the last step as the reference's p_sample: 1 - Π(1 - p_t) with c = 1."""
    d = BinaryRefinementDiffusion()
    g = _gen(5)
    truth = (torch.rand(2, 1, 200, 200, generator=g) > 0.5).float()
    coarse = 1.0 - truth  # every pixel wrong
    seen = []

    def oracle(m_t, t):
        seen.append((m_t.clone(), t.clone()))
        return (truth * 2 - 1) * 30.0

    prob, fine_prob, step_probs = d.refine(oracle, coarse, generator=g, num_steps=num_steps, start=start)
    first = 5 if start is None else start
    n = first + 1 if num_steps is None else num_steps
    ts = list(range(first, first - n, -1))
    assert len(step_probs) == n and prob is step_probs[-1]
    assert torch.equal((prob > 0.5).float(), truth)
    torch.testing.assert_close(prob, truth, atol=1e-6, rtol=0)
    assert [s[1].tolist() for s in seen] == [[t, t] for t in ts]
    assert seen[0][1].dtype == torch.long and torch.equal(seen[0][0], coarse)
    bb = d.beta_bar.tolist()
    bb_prev = [1.0] + bb[:-1]
    keep = 1.0
    for t in ts:  # c = 1: p_t = (β̄_{t-1} - β̄_t) / (1 - β̄_t)
        keep *= 1 - (bb_prev[t] - bb[t]) / (1 - bb[t])
    torch.testing.assert_close(fine_prob, torch.full_like(fine_prob, 1 - keep), atol=1e-6, rtol=0)
    if n > 1:  # after the first step (c = 1) a fraction p = (β̄_{t-1} - β̄_t) / (1 - β̄_t) is corrected
        t = ts[0]
        frac_fixed = (seen[1][0] == truth).float().mean().item()
        assert frac_fixed == pytest.approx((bb_prev[t] - bb[t]) / (1 - bb[t]), abs=0.01)


def test_float64_schedule_survives_casts():
    d = BinaryRefinementDiffusion().to(torch.bfloat16)
    assert d.beta_bar.dtype == torch.float64 and len(d.state_dict()) == 0


def test_clear_errors():
    with pytest.raises(ValueError, match="num_steps must be an int >= 2"):
        BinaryRefinementDiffusion(1)
    with pytest.raises(ValueError, match=r"start .* must be in \(0, 1\]"):
        BinaryRefinementDiffusion(6, start=1.5)
    d = BinaryRefinementDiffusion()
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="integer tensor"):
        d.q_sample(x, x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="coarse"):
        d.q_sample(x, torch.zeros(2, 1, 4, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 6\]"):
        d.refine(lambda m, t: m, x, num_steps=7)
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 2\]"):
        d.refine(lambda m, t: m, x, num_steps=3, start=1)
    with pytest.raises(ValueError, match=r"start must be an int in \[0, 5\]"):
        d.refine(lambda m, t: m, x, start=6)
    with pytest.raises(ValueError, match="denoise_fn output"):
        d.refine(lambda m, t: m[:, :, :2], x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refine_loop_has_no_host_device_sync():
    d = BinaryRefinementDiffusion().cuda()
    coarse = torch.zeros(2, 1, 32, 32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        d.refine(lambda m, t: m * 2 - 1 + t.view(-1, 1, 1, 1), coarse, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
