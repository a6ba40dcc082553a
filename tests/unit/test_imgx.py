"""ImgX-DiffSeg model: recycling gradients, schedules, sampling outputs, reproducibility, configs.

Oracles: the docs/methods.md §1 reference values of the resampled schedule, DDPM's closed-form posterior
written out here in float64, MONAI's DiceCELoss (+ 0.1 x MSE) on a hand-made second pass, and softmax itself.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from diffseg.inference.samples import SPREAD_MAPS
from diffseg.models.imgx import ImgXDiffSeg, LossSettings, probs_from_x0
from diffseg.nets.slicewise import SliceWise
from diffseg.nets.unet import TimeUNet
from diffseg.utils.errors import ConfigError

C, IN = 3, 2
REGIONS = {"all": [1, 2], "inner": [2]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP oversubscription on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(dims=2, size=16, net_dims=None, roi=None, **kwargs):
    torch.manual_seed(0)
    net = TimeUNet(net_dims or dims, IN + C, C, channels=[4, 8])
    return ImgXDiffSeg(net=net, num_classes=C, spatial_dims=dims, regions=REGIONS,
                       optimizer=partial(torch.optim.AdamW, lr=1e-3), roi_size=roi or [size] * dims,
                       num_plot_cases=0, **kwargs)


def make_batch(dims=2, size=16, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, IN, *[size] * dims, generator=g)
    label = torch.zeros(b, 1, *[size] * dims, dtype=torch.long)
    sl = (slice(None), slice(None)) + (slice(size // 4, 3 * size // 4),) * dims
    label[sl] = 1
    sl = (slice(None), slice(None)) + (slice(size // 3, 2 * size // 3),) * dims
    label[sl] = 2
    return {"image": image, "label": label, "case_id": [f"case{i}" for i in range(b)]}


def record_calls(net):
    """Forward hook: per call, (output requires grad, grad mode, t fed to the net, batch size)."""
    calls = []

    def hook(module, args, output):
        calls.append((output.requires_grad, torch.is_grad_enabled(), args[1].detach().clone(), args[0].shape[0]))

    return calls, net.register_forward_hook(hook)


def draws(model, batch, t):
    shape = (batch["image"].shape[0], C, *batch["image"].shape[2:])
    g = torch.Generator().manual_seed(1)
    return torch.tensor(t), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


REF_ABAR = torch.tensor([0.9999, 0.52175014, 0.07799232, 0.00331891, 3.9952e-5], dtype=torch.float64)
# closed form: ᾱ of linear 1e-4..0.02 over T = 1001 at the kept indices 0, 250, ..., 1000
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1001, dtype=torch.float64), 0)[::250].float()


def test_training_schedule_is_the_reference_resampling():
    model = make_model()
    proc = model.train_process
    assert proc.num_steps == 5
    assert proc.timesteps.tolist() == [0, 250, 500, 750, 1000]
    torch.testing.assert_close(proc.alphas_cumprod, REF_ABAR, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(ABAR, REF_ABAR.float(), rtol=1e-4, atol=1e-9)
    # the default sampling schedule is the same 5 steps (train and sample aligned)
    torch.testing.assert_close(model.sample_process.alphas_cumprod, proc.alphas_cumprod)


def test_gradient_flows_only_through_the_second_pass():
    model = make_model()
    batch = make_batch()
    t, noise, noise_r = draws(model, batch, [0, 3])
    calls, handle = record_calls(model.net)
    loss, _ = model.loss_terms(batch["image"], batch["label"], t, noise, noise_r)
    handle.remove()
    assert [c[0] for c in calls] == [False, True] and [c[1] for c in calls] == [False, True]
    model.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in model.net.parameters()]

    # manual oracle: first pass as a constant, second pass with DiceCE, written from docs/methods.md §1
    abar = ABAR
    x0 = 2 * torch.nn.functional.one_hot(batch["label"][:, 0], C).movedim(-1, 1).float() - 1
    t_r = torch.tensor([1, 4])
    cat = lambda x: torch.cat([batch["image"], x], 1)  # noqa: E731
    q = lambda x, tt, n: abar[tt].sqrt().view(-1, 1, 1, 1) * x + (1 - abar[tt]).sqrt().view(-1, 1, 1, 1) * n  # noqa: E731
    with torch.no_grad():
        x0_hat = 2 * torch.softmax(model.net(cat(q(x0, t_r, noise_r)), 250.0 * t_r), 1) - 1
    model.zero_grad()

    def second_pass(start):
        logits = model.net(cat(q(start, t, noise)), 250.0 * t)
        seg = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)(logits, batch["label"])
        return seg + 0.1 * ((2 * torch.softmax(logits, 1) - 1 - x0) ** 2).mean()  # + mse_weight x MSE on x̂0

    manual = second_pass(x0_hat)
    torch.testing.assert_close(loss, manual)
    manual.backward()

    def rel_diff():  # relative difference of the whole gradient vector (float32 rounding ~1e-7)
        a = torch.cat([g.flatten() for g in grads])
        b = torch.cat([p.grad.flatten() for p in model.net.parameters()])
        return ((a - b).norm() / b.norm()).item()

    assert rel_diff() < 1e-5
    # sensitivity: letting the gradient through the first pass changes the gradients
    model.zero_grad()
    x0_hat_grad = 2 * torch.softmax(model.net(cat(q(x0, t_r, noise_r)), 250.0 * t_r), 1) - 1
    second_pass(x0_hat_grad).backward()
    assert rel_diff() > 1e-3


@pytest.mark.parametrize("mode, expected", [("next", [1, 2, 3, 4]), ("max", [4, 4, 4, 4])])
def test_recycling_modes_pick_t_r(mode, expected):
    model = make_model(recycling=mode)
    t = torch.arange(4)
    assert model.recycle_step(t).tolist() == expected
    with pytest.raises(ValueError, match=r"\[0, K-1\)"):  # t = K-1 has no later step to recycle from
        model.recycle_step(torch.tensor([4]))
    batch = make_batch(b=4)
    calls, handle = record_calls(model.net)
    model.loss_terms(batch["image"], batch["label"], *draws(model, batch, list(range(4))))
    handle.remove()
    # the network is conditioned on the ORIGINAL timestep index (250 per resampled step)
    assert calls[0][2].tolist() == [250.0 * e for e in expected]
    assert calls[1][2].tolist() == [0.0, 250.0, 500.0, 750.0]


@pytest.mark.parametrize("mode, drawn", [("next", {0, 1, 2, 3}), ("max", {0, 1, 2, 3}), ("none", {0, 1, 2, 3, 4})])
def test_training_draws_t_below_k_minus_1_with_recycling(mode, drawn):
    """Reference recycling_step.py: t ~ U[0, K-1) with recycling (t_r is a real step), U[0, K) without."""
    model = make_model(recycling=mode)
    batch = make_batch(b=2, size=8)
    calls, handle = record_calls(model.net)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(40):
            model.training_loss(batch)
    handle.remove()
    seen = {int(v) // 250 for c in calls[(mode != "none")::1 + (mode != "none")] for v in c[2].tolist()}
    assert seen == drawn


class LabelBlindEpsilon(torch.nn.Module):
    """An ε-predictor that ignores the image and "predicts" the all-background mask: ε̂ is the noise that
    would have turned the background mask x0_bg into x_t, ε̂ = (x_t - sqrt(ᾱ)·x0_bg)/sqrt(1-ᾱ)."""

    def __init__(self, alphas_cumprod, mask_from):
        super().__init__()
        self.abar, self.mask_from, self.dummy = alphas_cumprod.float(), mask_from, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t_model):
        x_t = x[:, self.mask_from:]
        x0_bg = -torch.ones_like(x_t)
        x0_bg[:, 0] = 1.0
        abar = self.abar[t_model.long()].view(-1, *[1] * (x_t.dim() - 1))
        return (x_t - abar.sqrt() * x0_bg) / (1 - abar).sqrt() + 0 * self.dummy


def test_label_blind_epsilon_predictor_no_longer_reaches_zero_loss_with_recycling():
    """With recycling, x_t is noised from the network's own x̂0, so the ε target never sees the true mask: an
    always-background predictor has an MSE of ~0. The segmentation loss on its x̂0 against the TRUE mask
    (docs/methods.md §1) is large; a predictor of the true mask scores ~0 on the same loss."""
    model = make_model(diffusion={"prediction": "epsilon"}, recycling="next")
    model.net = LabelBlindEpsilon(model.base.alphas_cumprod, IN)
    batch = make_batch(b=4)
    t, noise, noise_r = draws(model, batch, [0, 1, 2, 3])
    loss, terms = model.loss_terms(batch["image"], batch["label"], t, noise, noise_r)
    assert terms["loss/mse"] < 1e-6                       # the label-blind optimum of an ε-only loss
    # oracle: MONAI's Dice loss of the all-background prediction (p = 1 on background, 1e-7 elsewhere) is ~1;
    # the CE term adds about -log(1e-6) on the foreground voxels (how far from 0 depends on float rounding)
    probs = torch.full((4, C, 16, 16), 1e-7)
    probs[:, 0] = 1.0
    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)(probs.log(), batch["label"])
    assert dice > 0.99 and terms["loss/seg"] > dice + 1.0
    assert loss > 2.0
    # the same construction aimed at the TRUE mask: the loss of a perfect predictor is ~0
    x0 = 2 * torch.nn.functional.one_hot(batch["label"][:, 0], C).movedim(-1, 1).float() - 1
    oracle = model.net
    model.net = type("TrueMask", (torch.nn.Module,), {"forward": lambda self, x, tm: (
        x[:, IN:] - oracle.abar[tm.long()].view(-1, 1, 1, 1).sqrt() * x0)
        / (1 - oracle.abar[tm.long()].view(-1, 1, 1, 1)).sqrt()})()
    perfect, _ = model.loss_terms(batch["image"], batch["label"], t, noise, noise_r)
    assert perfect < 0.05


def test_no_recycling_is_one_pass_on_the_true_mask():
    model = make_model(recycling="none")
    batch = make_batch()
    t, noise, noise_r = draws(model, batch, [2, 4])
    calls, handle = record_calls(model.net)
    loss, _ = model.loss_terms(batch["image"], batch["label"], t, noise, noise_r)
    handle.remove()
    assert len(calls) == 1 and calls[0][0]
    x0 = 2 * torch.nn.functional.one_hot(batch["label"][:, 0], C).movedim(-1, 1).float() - 1
    abar = ABAR[t].view(-1, 1, 1, 1)
    logits = model.net(torch.cat([batch["image"], abar.sqrt() * x0 + (1 - abar).sqrt() * noise], 1), 250.0 * t)
    ref = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)(logits, batch["label"])
    torch.testing.assert_close(loss, ref + 0.1 * ((2 * torch.softmax(logits, 1) - 1 - x0) ** 2).mean())


@pytest.fixture(scope="module")
def trained():
    """One briefly trained model shared by the sampling tests (a few optimiser steps)."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = make_batch()
    torch.manual_seed(0)
    for _ in range(5):
        loss, _ = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("steps", [1, 2, 5, 10])
@pytest.mark.parametrize("num_samples", [1, 4])
def test_sampling_outputs_from_one_model(trained, steps, num_samples):
    model = trained
    model.configure_sampling(steps=steps, num_samples=num_samples)
    batch = make_batch()
    calls, handle = record_calls(model.net)
    with torch.no_grad():
        model._case_generator = torch.Generator().manual_seed(0)
        out = model.predict_window(batch["image"])
    handle.remove()
    # one denoiser call per step, all samples in ONE batch
    assert len(calls) == steps and all(c[3] == num_samples * 2 for c in calls)
    expected = {"final", *(f"step/{i}" for i in range(1, steps + 1))}
    if num_samples > 1:
        expected |= {f"samples/{n}" for n in range(1, num_samples + 1)}
    maps = {k: out.pop(k) for k in SPREAD_MAPS}  # std and entropy over the samples (0 and H(p) for one)
    assert all(m.shape == (2, 1, 16, 16) for m in maps.values())
    assert (maps["std"] == 0).all() if num_samples == 1 else (maps["std"] > 0).any()
    assert set(out) == expected == set(model.output_prefixes)
    for p in out.values():
        assert p.shape == (2, C, 16, 16) and p.dtype == torch.float32
        assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(2, 16, 16), atol=1e-5)
    torch.testing.assert_close(out[f"step/{steps}"], out["final"])
    if num_samples > 1:
        torch.testing.assert_close(out[f"samples/{num_samples}"], out["final"])
    assert model.output_prefixes[f"step/{steps}"] == f"step/{steps}/" and model.output_prefixes["final"] == ""


def test_step_outputs_keep_evenly_spaced_steps(trained):
    model = trained
    model.configure_sampling(steps=10, num_samples=1, step_outputs=3)
    assert model.recorded_steps == [1, 6, 10]  # round(linspace(0, 9, 3)) + 1
    with torch.no_grad():
        model._case_generator = torch.Generator().manual_seed(0)
        out = model.predict_window(make_batch(b=1)["image"])
    assert set(out) - set(SPREAD_MAPS) == {"final", "step/1", "step/6", "step/10"} == set(model.output_prefixes)
    model.configure_sampling(step_outputs=None)
    assert model.recorded_steps == list(range(1, 11))


def test_two_step_ddpm_sampling_matches_closed_form(trained):
    """Steps 1000 -> 0 of the base schedule, DDPM posterior (docs/methods.md §1) written out in float64."""
    model = trained
    model.configure_sampling(steps=2, num_samples=1, sampler="ddpm")
    image = make_batch(b=1)["image"]
    with torch.no_grad():
        model.seed_case("case7", torch.device("cpu"))
        seed = model.sample_generators(1, "cpu")[0].initial_seed()  # sample 0's noise stream
        out = model.predict_window(image)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, C, 16, 16, generator=g)
        betas = torch.linspace(1e-4, 0.02, 1001, dtype=torch.float64)
        a0, a1 = torch.cumprod(1 - betas, 0)[[0, 1000]].tolist()
        p1 = torch.softmax(model.net(torch.cat([image, x], 1), torch.tensor([1000.0])), 1)
        beta1 = 1 - a1 / a0
        mean = beta1 * math.sqrt(a0) / (1 - a1) * (2 * p1 - 1) + math.sqrt(1 - beta1) * (1 - a0) / (1 - a1) * x
        var = beta1 * (1 - a0) / (1 - a1)
        x = mean + math.sqrt(var) * torch.randn(1, C, 16, 16, generator=g)
        p0 = torch.softmax(model.net(torch.cat([image, x.float()], 1), torch.tensor([0.0])), 1)
    torch.testing.assert_close(out["step/1"], p1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["final"], p0, rtol=1e-4, atol=1e-5)


def test_ddim_and_samples_are_means(trained):
    model = trained
    model.configure_sampling(steps=3, num_samples=3, sampler="ddim", eta=0.0)
    image = make_batch(b=1)["image"]
    with torch.no_grad():
        model.seed_case("case3", torch.device("cpu"))
        seeds = [g.initial_seed() for g in model.sample_generators(3, "cpu")]  # one noise stream per sample
        out = model.predict_window(image)
        singles = []
        model.configure_sampling(num_samples=1)
        noise = torch.cat([torch.randn(1, C, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
        for s in range(3):
            _, hats = model.sample_process.sample(lambda x, t: model.denoise(image, x, t), (1, C, 16, 16),
                                                  sampler="ddim", x_T=noise[s:s + 1])
            singles.append(probs_from_x0(hats[-1]))
    torch.testing.assert_close(out["samples/1"], singles[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["samples/2"], (singles[0] + singles[1]) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["final"], sum(singles) / 3, rtol=1e-4, atol=1e-5)


def test_first_k_of_n_samples_equal_a_k_sample_run(trained):
    """Each sample has its own noise stream (per case, kept across windows): the running mean of the
    first k of N samples is a k-sample run, so evaluate.py's sweep reads every count from one pass."""
    model = trained
    image = make_batch(size=24, b=1)["image"]  # several windows
    model.configure_sampling(steps=3, num_samples=4, sampler="ddpm")
    four = model.predict_case(image, "case_k")
    for k in (1, 2):
        model.configure_sampling(num_samples=k)
        alone = model.predict_case(image, "case_k")
        torch.testing.assert_close(four[f"samples/{k}"], alone["final"],
                                   rtol=1e-4, atol=1e-5)


def test_whole_volume_prediction_is_reproducible_per_case(trained):
    model = trained
    model.configure_sampling(steps=3, num_samples=2, sampler="ddpm")
    image = make_batch(size=24, b=1)["image"]  # 24x24 > roi 16x16: several windows, one generator
    a = model.predict_case(image, "case_a")
    b = model.predict_case(image, "case_a")
    c = model.predict_case(image, "case_b")
    assert a.keys() == b.keys() and a["final"].shape == (1, C, 24, 24)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.allclose(a["final"], c["final"])


def test_metric_keys_of_every_step_and_sample(trained, tmp_path):
    model = trained
    model.configure_sampling(steps=2, num_samples=2, sampler="ddpm")
    batch = make_batch(b=1)
    loader = torch.utils.data.DataLoader([{k: v[0] for k, v in batch.items()}], batch_size=1,
                                         collate_fn=lambda items: {"image": items[0]["image"][None],
                                                                   "label": items[0]["label"][None],
                                                                   "case_id": [items[0]["case_id"]]})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.test(model, dataloaders=loader, verbose=False)
    res = model.test_results
    for prefix in ("", "step/1/", "step/2/", "samples/1/", "samples/2/"):
        assert f"test/{prefix}dice/all" in res and f"test/{prefix}dice" in res, prefix
    assert res["test/step/2/dice"] == res["test/dice"] == res["test/samples/2/dice"]
    assert "test/hd95" in res and "test/step/1/hd95" not in res  # surface metrics: final only
    # validation predicts and scores the final output only, with the same prediction as the test
    trainer.validate(model, dataloaders=loader, verbose=False)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert val and not any(k.startswith(("val/step/", "val/samples/")) for k in val), sorted(val)
    assert val["val/dice"] == pytest.approx(res["test/dice"]) and model.curves


def test_epsilon_prediction_loss_is_segmentation_on_the_derived_x0_plus_mse():
    model = make_model(diffusion={"prediction": "epsilon"}, recycling="none")
    assert model.sample_process.clip_x0 and model.sample_process.prediction == "epsilon"
    batch = make_batch()
    t, noise, noise_r = draws(model, batch, [1, 4])
    loss, terms = model.loss_terms(batch["image"], batch["label"], t, noise, noise_r)
    x0 = 2 * torch.nn.functional.one_hot(batch["label"][:, 0], C).movedim(-1, 1).float() - 1
    abar = ABAR[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = model.net(torch.cat([batch["image"], x_t], 1), 250.0 * t)
    # oracle written from docs/methods.md §1: x̂0 = (x_t - sqrt(1-ᾱ)ε̂)/sqrt(ᾱ), clipped; p = (x̂0+1)/2 normalised
    p = (((x_t - (1 - abar).sqrt() * out) / abar.sqrt()).clamp(-1, 1) + 1) / 2
    p = torch.where(p.sum(1, keepdim=True) > 0, p / p.sum(1, keepdim=True), torch.full_like(p, 1 / C))
    seg = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True)(p.clamp_min(1e-7).log(), batch["label"])
    mse = ((out - noise) ** 2).mean()  # MSE on ε
    torch.testing.assert_close(terms["loss/seg"], seg)
    torch.testing.assert_close(terms["loss/mse"], mse)
    torch.testing.assert_close(loss, seg + 0.1 * mse)
    weighted = make_model(diffusion={"prediction": "epsilon"}, recycling="none",
                          loss={"seg_weight": 0.5, "mse_weight": 2.0})
    torch.testing.assert_close(weighted.loss_terms(batch["image"], batch["label"], t, noise, noise_r)[0],
                               0.5 * seg + 2.0 * mse)
    with torch.no_grad():
        model._case_generator = torch.Generator().manual_seed(0)
        probs = model.predict_window(batch["image"])["final"]
    assert (probs >= 0).all() and torch.allclose(probs.sum(1), torch.ones(2, 16, 16), atol=1e-5)


def test_probs_from_x0():
    logits = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(probs_from_x0(2 * torch.softmax(logits, 1) - 1), torch.softmax(logits, 1))
    x0 = torch.tensor([3.0, 0.0, -5.0, -1.0]).view(1, 4, 1)  # clip -> [1, 0, -1, -1] -> p [1, .5, 0, 0]
    torch.testing.assert_close(probs_from_x0(x0).flatten(), torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    torch.testing.assert_close(probs_from_x0(-torch.ones(1, 4, 2)), torch.full((1, 4, 2), 0.25))


def test_slice_wise_2d_model_on_3d_data():
    model = make_model(dims=3, net_dims=2, roi=[16, 16, 1])
    assert isinstance(model.net, SliceWise)
    image = torch.randn(1, IN, 16, 16, 1)
    with torch.no_grad():
        model._case_generator = torch.Generator().manual_seed(0)
        out = model.predict_window(image)
    assert out["final"].shape == (1, C, 16, 16, 1)
    batch = make_batch(dims=2, b=2)
    loss, _ = model.training_loss({"image": batch["image"][..., None], "label": batch["label"][..., None]})
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match=r"data.patch_size=\[P, P, 1\]"):
        make_model(dims=3, net_dims=2, roi=[16, 16, 16])


def test_sampling_under_bf16_autocast(trained):
    model = trained
    model.configure_sampling(steps=2, num_samples=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model._case_generator = torch.Generator().manual_seed(0)
        out = model.predict_window(make_batch(b=1)["image"])
    p = out["final"]
    assert p.dtype == torch.float32 and torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"diffusion": {"train_steps": 7}}, r"model.diffusion.train_steps=7.*divisible.*Valid k"),
    ({"diffusion": {"num_steps": 10}}, r"train_steps=5: cannot place.*in 10 steps.*Valid k: \[2, 4, 10\]"),
    ({"diffusion": {"train_step": 5}}, r"model.diffusion: unknown key\(s\) \['train_step'\]"),
    ({"diffusion": {"prediction": "v"}}, r"model.diffusion.prediction: expected one of x0 \| epsilon"),
    ({"diffusion": {"beta_schedule": "sigmoid"}}, r"model.diffusion.beta_schedule"),
    ({"diffusion": {"beta_start": 0.5, "beta_end": 0.1}}, r"model.diffusion: .*beta_start"),
    ({"sampling": {"steps": 2000}}, r"model.sampling.steps=2000"),
    ({"sampling": {"steps": 0}}, r"model.sampling.steps: expected a positive integer"),
    ({"sampling": {"num_samples": 0}}, r"model.sampling.num_samples"),
    ({"sampling": {"sampler": "euler"}}, r"model.sampling.sampler: expected one of ddpm \| ddim"),
    ({"sampling": {"eta": -1}}, r"model.sampling.eta"),
    ({"sampling": {"step_outputs": 0}}, r"model.sampling.step_outputs: expected a positive integer"),
    ({"recycling": "always"}, r"model.recycling: expected one of none \| next \| max"),
    ({"loss": {"segmentation": "focal"}}, r"model.loss.segmentation: expected one of dice_ce \| dice \| ce"),
    ({"loss": "mse"}, r"model.loss: expected the mapping"),
    ({"loss": {"mse": 1.0}}, r"model.loss: unknown key\(s\) \['mse'\]"),
    ({"loss": {"seg_weight": 0, "mse_weight": 0}}, r"model.loss: seg_weight and mse_weight are both 0"),
    ({"loss": {"mse_weight": -1}}, r"model.loss.mse_weight: expected a number >= 0"),
    ({"sampling": {"eta": 0.5}}, r"model.sampling.eta=0.5 only applies to sampler=ddim"),
])
def test_clear_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_model(**kwargs)


# ---------------------------------------------------------------------- configs
CONFIGS = Path(__file__).resolve().parents[2] / "experiments"


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import diffseg.drivers.cli  # noqa: F401 - registers the ${sum:...} resolver

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = hydra_compose("fit", ["experiment=imgx_brats", "data=brats_synthetic", "paths.output_dir=unused",
                                    *overrides])
    for key, value in dict(spatial_dims=3, in_channels=4, num_classes=4,
                           regions={"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}).items():
        cfg.data[key] = value  # what build_datamodule reads from the files
    return cfg


@pytest.mark.parametrize("scale", ["paper", "tiny"])
@pytest.mark.parametrize("ablation, check", [
    (None, lambda m: m.settings.train_steps == 5 and m.recycling == "next" and m.loss == LossSettings("dice_ce", 1, 0.1)),
    ("imgx_eps", lambda m: m.settings.prediction == "epsilon" and m.loss == LossSettings()),  # one idea
    ("imgx_no_recycling", lambda m: m.recycling == "none"),
    ("imgx_1001_steps", lambda m: m.train_process.num_steps == 1001 and m.sample_process.num_steps == 5),
    ("imgx_loss_dice", lambda m: m.loss.segmentation == "dice"),
    ("imgx_loss_ce", lambda m: m.loss.segmentation == "ce"),
    ("imgx_2d", lambda m: isinstance(m.net, SliceWise) and m.roi_size[2] == 1 and m.net.net.spatial_dims == 2),
])
def test_configs_and_ablations_compose_and_build(scale, ablation, check):
    from hydra.utils import instantiate

    cfg = compose(f"scale={scale}", *([f"+ablation={ablation}"] if ablation else []))
    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, ImgXDiffSeg) and check(model)
    net = model.net.net if isinstance(model.net, SliceWise) else model.net
    assert net.in_channels == 4 + 4 and net.out_channels == 4
    assert net.level_channels == ([8, 16, 32] if scale == "tiny" else [32, 64, 128, 256])
    assert model.roi_size == {("tiny", True): (32, 32, 1), ("paper", True): (128, 128, 1),
                              ("tiny", False): (32, 32, 32), ("paper", False): (128, 128, 128)}[scale, ablation == "imgx_2d"]
    opt = model.optimizer_factory(params=model.parameters())
    assert opt.defaults["weight_decay"] == 1e-8 and cfg.trainer.gradient_clip_val == 1.0
    assert opt.defaults["lr"] == (3e-3 if scale == "tiny" else 1e-4)
