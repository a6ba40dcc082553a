"""SegDiff LightningModule: schedule, ε-loss, batched multiple generation, EMA, saved uncertainty.

Oracles: diffusers' DDPMScheduler (schedule), closed forms written out here with their own
float64 arithmetic (loss, ε oracle), explicit Python averages (prefix means).
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffseg.models.lr_schedules import constant
from diffseg.models.base import FINAL
from diffseg.models.segdiff import STD, SegDiff, stretched_linear_betas
from diffseg.nets.segdiff_denoiser import SegDiffDenoiser

T = 30  # training steps in these tests (> 20 so that β_end = 20/T < 1)


def manual_alphas_cumprod(num_steps: int) -> torch.Tensor:
    """ᾱ_t = Π (1 - β_s), β linear from (1000/T)·1e-4 to (1000/T)·0.02, written out independently."""
    s = 1000.0 / num_steps
    betas = np.linspace(s * 1e-4, s * 0.02, num_steps)
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float64)


class EpsOracle(nn.Module):
    """The perfect ε for a known x0: ε = (x_t - sqrt(ᾱ_t)·x0) / sqrt(1 - ᾱ_t), ᾱ of the ORIGINAL
    schedule at the ORIGINAL step index the model is conditioned on.

    x0 comes from ``targets`` (rows of the N·B sample batch, sample-major) or, when None, from the
    image: the first ``mask_channels`` image channels hold the mask in [0, 1]."""

    def __init__(self, num_steps: int = T, mask_channels: int = 1, targets: torch.Tensor | None = None):
        super().__init__()
        self.mask_channels = mask_channels
        self.abar = manual_alphas_cumprod(num_steps)
        self.targets = targets
        self.calls: list[tuple[int, int, int]] = []
        self.image_calls: list[int] = []

    def encode_image(self, image):
        self.image_calls.append(image.shape[0])
        return image

    def forward(self, x_t, image, t):
        return self.denoise(x_t, self.encode_image(image), t)

    def denoise(self, x_t, image, t):
        self.calls.append((x_t.shape[0], image.shape[0], t.shape[0]))
        x0 = self.targets if self.targets is not None else 2.0 * image[:, : self.mask_channels] - 1.0
        a = self.abar[t.long()].view(-1, *([1] * (x_t.ndim - 1)))
        return ((x_t.double() - a.sqrt() * x0.double()) / (1.0 - a).sqrt()).to(x_t.dtype)


def make_model(net, num_classes=2, spatial_dims=2, roi=(16, 16), **kwargs) -> SegDiff:
    regions = {"fg": [1]} if num_classes == 2 else {f"c{i}": [i] for i in range(1, num_classes)}
    kwargs.setdefault("ema_decay", None)
    kwargs.setdefault("num_steps", T)
    return SegDiff(net=net, num_classes=num_classes, spatial_dims=spatial_dims, regions=regions,
                   optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), roi_size=roi, **kwargs)


def binary_image(b=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, 1, size, size, generator=g) > 0.5).float()
    return torch.cat([mask, torch.rand(b, 2, size, size, generator=g)], dim=1), mask


# ---------------------------------------------------------------------------- schedule and loss
def test_stretched_schedule_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    betas = stretched_linear_betas(100)
    ref = diffusers.DDPMScheduler(num_train_timesteps=100, beta_start=0.001, beta_end=0.2, beta_schedule="linear")
    torch.testing.assert_close(betas.float(), ref.betas, rtol=1e-6, atol=1e-7)
    assert betas[0].item() == pytest.approx(0.001) and betas[-1].item() == pytest.approx(0.2)
    torch.testing.assert_close(stretched_linear_betas(1000), torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps"):
        stretched_linear_betas(20)  # β_end would be 1


class Affine(nn.Module):
    mask_channels = 1

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def encode_image(self, image):
        return image

    def forward(self, x_t, image, t):
        return self.denoise(x_t, image, t)

    def denoise(self, x_t, image, t):
        return self.c * x_t + image[:, :1] * t.view(-1, 1, 1, 1) / 100.0


def test_eps_loss_closed_form():
    model = make_model(Affine(0.3))
    image, mask = binary_image(b=3, size=8)
    label = mask.long()
    x0 = model.encode_mask(label)
    torch.testing.assert_close(x0, 2 * mask - 1)
    t = torch.tensor([0, 7, T - 1])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    a = manual_alphas_cumprod(T)[t].view(-1, 1, 1, 1).float()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = 0.3 * x_t + image[:, :1] * t.view(-1, 1, 1, 1) / 100.0
    expected = ((noise - pred) ** 2).mean()  # mean over all elements (batch, channel, pixels)
    torch.testing.assert_close(model.diffusion_loss(x0, image, t, noise), expected, rtol=1e-5, atol=1e-6)
    # the perfect ε has zero loss
    oracle = make_model(EpsOracle())
    assert oracle.diffusion_loss(x0, image, t, noise).item() < 1e-8
    # zero prediction: E[loss] = E[ε²] = 1
    big = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    zero = make_model(Affine(0.0))
    loss = zero.diffusion_loss(torch.zeros_like(big), torch.zeros(4, 3, 64, 64), torch.zeros(4, dtype=torch.long), big)
    assert loss.item() == pytest.approx(1.0, abs=0.03)


def test_training_loss_runs_with_real_denoiser():
    net = SegDiffDenoiser(2, 3, 1, rrdb_blocks=1, rrdb_features=8, rrdb_growth=4,
                          unet=dict(channels=[8, 8], norm_groups=4, activation="silu", upsample="nearest"))
    model = make_model(net)
    image, mask = binary_image(b=2, size=8)
    loss, _ = model.training_loss({"image": image, "label": mask.long()})
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    # the sampler's split call (image encoded once) is the same function as forward
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 17.0])
    with torch.no_grad():
        torch.testing.assert_close(net.denoise(x_t, net.encode_image(image), t), net(x_t, image, t))


# ---------------------------------------------------------------------------- sampling
def test_samples_are_one_batch_one_call_per_step():
    n, b = 4, 2
    oracle = EpsOracle()
    model = make_model(oracle, sampling={"num_samples": n})
    image, _ = binary_image(b=b)
    model.predict_window(image)
    assert len(oracle.calls) == T  # one denoiser call per step serves all N samples
    assert set(oracle.calls) == {(n * b, n * b, n * b)}
    assert oracle.image_calls == [b]  # the image is encoded once per window


@pytest.mark.parametrize("sampling", [
    {"num_samples": 2},                                     # ancestral DDPM over all T steps
    {"num_samples": 2, "steps": 7},                         # respaced (original indices to the net)
    {"num_samples": 1, "sampler": "ddim", "steps": 5},      # DDIM with few steps
    {"num_samples": 1, "sampler": "ddim", "steps": 5, "eta": 1.0},
])
def test_perfect_eps_oracle_recovers_the_mask(sampling):
    model = make_model(EpsOracle(), sampling=sampling)
    image, mask = binary_image()
    out = model.predict_window(image)
    assert torch.equal(out[FINAL].argmax(1, keepdim=True).float(), mask)
    torch.testing.assert_close(out[FINAL][:, 1:], mask, atol=1e-4, rtol=0)
    torch.testing.assert_close(out[FINAL].sum(1), torch.ones_like(mask[:, 0]))
    assert out[STD].abs().max().item() < 1e-4  # every sample lands on the same mask


def test_one_hot_oracle_recovers_multiclass_labels():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (1, 1, 8, 8), generator=g)
    onehot = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float()
    model = make_model(EpsOracle(mask_channels=3), num_classes=3, sampling={"num_samples": 2})
    torch.testing.assert_close(model.encode_mask(label), 2 * onehot - 1)
    out = model.predict_window(torch.cat([onehot, torch.rand(1, 1, 8, 8)], 1))
    assert torch.equal(out[FINAL].argmax(1, keepdim=True), label)
    torch.testing.assert_close(out[FINAL].sum(1), torch.ones(1, 8, 8))


def test_prefix_mean_outputs_equal_separate_averages():
    """Sample s of input b (row s·B + b) converges to its own soft target x0_{s,b}, so each
    sample's foreground probability is known: q = (x0 + 1)/2. samples/k must be the plain average
    of the first k samples, and std their population standard deviation."""
    n, b = 3, 2
    g = torch.Generator().manual_seed(3)
    targets = torch.rand(n * b, 1, 8, 8, generator=g) * 1.8 - 0.9  # soft values in (-1, 1)
    model = make_model(EpsOracle(targets=targets), sampling={"num_samples": n})
    out = model.predict_window(torch.rand(b, 3, 8, 8, generator=g))
    q = [(targets[s * b:(s + 1) * b] + 1) / 2 for s in range(n)]  # per sample, (B, 1, H, W)
    for k in range(1, n + 1):
        mean = sum(q[:k]) / k
        torch.testing.assert_close(out[f"samples/{k}"], torch.cat([1 - mean, mean], 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[FINAL], out[f"samples/{n}"])
    mean = sum(q) / n
    std = (sum((qs - mean) ** 2 for qs in q) / n).sqrt()
    torch.testing.assert_close(out[STD], std, atol=1e-4, rtol=0)
    assert set(model.output_prefixes) == {FINAL, "samples/1", "samples/2", "samples/3"}
    assert model.output_prefixes["samples/2"] == "samples/2/"


def test_image_twice_the_patch_size_is_stitched():
    model = make_model(EpsOracle(), roi=(16, 16), sampling={"num_samples": 2})
    image, mask = binary_image(b=1, size=32)
    out = model.predict_case(image, "case_0")
    assert out[FINAL].shape == (1, 2, 32, 32) and out[STD].shape == (1, 1, 32, 32)
    assert torch.equal(out[FINAL].argmax(1, keepdim=True).float(), mask)


def test_noise_is_seeded_per_case():
    net = Affine(0.5)
    model = make_model(net, sampling={"num_samples": 2})
    image, _ = binary_image(b=1)
    a, b = model.predict_case(image, "a"), model.predict_case(image, "a")
    c = model.predict_case(image, "c")
    assert torch.equal(a[FINAL], b[FINAL]) and not torch.equal(a[FINAL], c[FINAL])


# ---------------------------------------------------------------------------- uncertainty map
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_uncertainty_map_is_saved(tmp_path, spatial_dims):
    n, size = 2, 8
    shape = (size,) * spatial_dims
    g = torch.Generator().manual_seed(4)
    targets = torch.rand(n, 1, *shape, generator=g) * 1.8 - 0.9
    model = make_model(EpsOracle(targets=targets), spatial_dims=spatial_dims, roi=shape,
                       sampling={"num_samples": n}, save_predictions=True, output_dir=str(tmp_path))
    image = torch.rand(1, 3, *shape, generator=g)
    outputs = model.predict_case(image, "case_7")
    model.save_case_outputs("case_7", outputs, image)
    q = (targets + 1) / 2
    expected_std = (q[0] - q[1]).abs()[0] / 2  # population std of two values
    # 2D: uint8 PNG = round(510 · std); 3D: float32 NIfTI
    expected = np.clip(np.rint(expected_std.numpy() * 510.0), 0, 255) if spatial_dims == 2 else expected_std.numpy()
    ext = ".png" if spatial_dims == 2 else ".nii.gz"
    pred_file = tmp_path / "predictions" / f"case_7{ext}"
    std_file = tmp_path / "predictions" / f"case_7_std{ext}"
    assert pred_file.is_file() and std_file.is_file()
    if spatial_dims == 2:
        saved = np.asarray(Image.open(std_file)).astype(np.float64)
    else:
        import nibabel as nib
        saved = np.asarray(nib.load(str(std_file)).dataobj).astype(np.float64)
    assert saved.shape == shape
    assert np.abs(saved - expected).max() <= (1 if spatial_dims == 2 else 1e-5)  # 2D: rounding to uint8
    assert (tmp_path / "predictions" / f"case_7_entropy{ext}").is_file()


# ---------------------------------------------------------------------------- EMA
def _tiny_denoiser():
    return SegDiffDenoiser(2, 3, 1, rrdb_blocks=0, rrdb_features=4, rrdb_growth=4,
                           unet=dict(channels=[4, 4], norm_groups=2, activation="silu", upsample="nearest"))


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n):
        self.items = []
        for i in range(n):
            image, mask = binary_image(b=1, size=8, seed=i)
            self.items.append({"image": image[0], "label": mask[0].long(), "case_id": f"c{i}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _Recorder(L.Callback):
    """Raw parameters after every optimiser step, and which module ran during validation."""

    def __init__(self):
        self.snapshots, self.val_calls = [], {"net": 0, "ema": 0}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.snapshots.append([p.detach().clone() for p in module.net.parameters()])

    def on_validation_epoch_start(self, trainer, module):
        self.hooks = [module.net.unet.register_forward_hook(lambda *a: self._count("net")),
                      module.ema.module.unet.register_forward_hook(lambda *a: self._count("ema"))]

    def _count(self, name):
        self.val_calls[name] += 1

    def on_validation_epoch_end(self, trainer, module):
        for h in self.hooks:
            h.remove()


def test_ema_weights_are_tracked_and_used_in_validation(tmp_path):
    torch.manual_seed(0)
    decay, steps = 0.6, 4
    model = make_model(_tiny_denoiser(), roi=(8, 8), ema_decay=decay, num_steps=25, lr_schedule=constant,
                       sampling={"num_samples": 1, "steps": 3})
    recorder = _Recorder()
    loader = torch.utils.data.DataLoader(_Batches(steps), batch_size=1)
    trainer = L.Trainer(max_steps=steps, limit_val_batches=1, val_check_interval=steps, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder],
                        default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    # the first update copies the weights, then ema = d_n·ema + (1 - d_n)·w, d_n = min(decay, (1+n)/(10+n))
    expected = recorder.snapshots[0]
    for n, snap in enumerate(recorder.snapshots[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, snap)]
    assert int(model.ema.n_averaged) == steps
    ema = list(model.ema.module.parameters())
    for e, p in zip(expected, ema):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(p, w) for p, w in zip(ema, model.net.parameters()))
    # validation ran the EMA copy (3 sampling steps x 1 window) and never the raw network
    assert recorder.val_calls == {"net": 0, "ema": 3}
    assert model.eval_net is model.ema.module
    # the EMA weights are in the state dict: a model rebuilt from it predicts with them
    state = model.state_dict()
    assert any(k.startswith("ema.module.") for k in state)
    clone = make_model(_tiny_denoiser(), roi=(8, 8), ema_decay=decay, num_steps=25,
                       sampling={"num_samples": 1, "steps": 3})
    clone.load_state_dict(state)
    image, _ = binary_image(b=1, size=8)
    torch.testing.assert_close(clone.predict_case(image, "x")[FINAL], model.predict_case(image, "x")[FINAL])


def _ema_closed_form(n: int, decay: float) -> float:
    """Σ_k k·weight_k for the EMA after n updates of weights w_k = w_0 - k·c (k = 1..n): the first update
    copies (weight_1 = Π_{j=2..n} d_j), then weight_k = (1 - d_k)·Π_{j=k+1..n} d_j with
    d_j = min(decay, j/(j+9)) (the decay of update j, after j - 1 earlier ones)."""
    d = {j: min(decay, j / (j + 9)) for j in range(2, n + 1)}
    weights = {k: (1.0 if k == 1 else 1.0 - d[k]) * math.prod(d[j] for j in range(k + 1, n + 1))
               for k in range(1, n + 1)}
    assert sum(weights.values()) == pytest.approx(1.0)
    return sum(k * w for k, w in weights.items())


def test_ema_ramped_decay_matches_the_closed_form_and_resumes():
    """Constant-gradient toy: SGD with gradient g and rate lr gives w_k = w_0 - k·lr·g, so the EMA after n
    updates is w_0 - lr·g·Σ_k k·weight_k (weights of the ramped decay). A fixed decay 0.9999 would leave
    the EMA near w_0 (Σ k·weight_k ~ 1); the ramp keeps ~the last 10-20% of the run. The update counter is
    in the state dict: a model restored mid-run continues the same ramp."""
    lr = 0.1

    def run(model, start, stop):
        params = list(model.net.parameters())
        opt = torch.optim.SGD(params, lr=lr)
        for _ in range(start, stop):
            opt.zero_grad()
            sum(p.sum() for p in params).backward()  # gradient 1 for every weight
            opt.step()
            model.ema.update_parameters(model.net)

    for n, decay in ((30, 0.9999), (100, 0.9)):  # the ramp only; the ramp, then the cap (j >= 81)
        torch.manual_seed(0)
        model = make_model(_tiny_denoiser(), roi=(8, 8), ema_decay=decay)
        w0 = [p.detach().clone() for p in model.net.parameters()]
        run(model, 0, n)
        m = _ema_closed_form(n, decay)
        for p0, e in zip(w0, model.ema.module.parameters()):
            torch.testing.assert_close(e, p0 - lr * m, rtol=0, atol=1e-4)  # float32 lerps
        # resume from the state dict after n // 2 updates: the same EMA as the uninterrupted run
        torch.manual_seed(0)
        first = make_model(_tiny_denoiser(), roi=(8, 8), ema_decay=decay)
        run(first, 0, n // 2)
        resumed = make_model(_tiny_denoiser(), roi=(8, 8), ema_decay=decay)
        resumed.load_state_dict(first.state_dict())
        run(resumed, n // 2, n)
        for e, r in zip(model.ema.module.parameters(), resumed.ema.module.parameters()):
            torch.testing.assert_close(r, e, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- configuration errors
def test_bad_configuration_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        make_model(EpsOracle(), sampling={"samples": 3})
    with pytest.raises(ValueError, match="num_samples"):
        make_model(EpsOracle(), sampling={"num_samples": 0})
    with pytest.raises(ValueError, match="steps"):
        make_model(EpsOracle(), sampling={"steps": T + 1})
    with pytest.raises(ValueError, match="sampler"):
        make_model(EpsOracle(), sampling={"sampler": "euler"})
    with pytest.raises(ValueError, match="eta"):
        make_model(EpsOracle(), sampling={"eta": 0.5})
    with pytest.raises(ValueError, match="ema_decay"):
        make_model(EpsOracle(), ema_decay=1.5)
    with pytest.raises(ValueError, match="mask_channels"):
        make_model(EpsOracle(mask_channels=1), num_classes=3)
    with pytest.raises(ValueError, match="label"):
        make_model(EpsOracle()).encode_mask(torch.zeros(2, 8, 8, dtype=torch.long))


# ---------------------------------------------------------------------------- configs
def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    config_dir = str(Path(__file__).resolve().parents[2] / "experiments")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name="fit", overrides=list(overrides))


def test_experiment_sizes_and_tiny_override():
    paper = _compose("experiment=segdiff_monuseg", "data.root=/x")
    tiny = _compose("experiment=segdiff_monuseg", "data.root=/x", "scale=tiny")
    assert paper.model.net.rrdb_blocks == 12 and tiny.model.net.rrdb_blocks == 0
    assert paper.model.net.unet.attention_levels == [4, 5] and list(paper.data.patch_size) == [256, 256]
    assert tiny.model.net.unet.attention_levels == [2] and list(tiny.data.patch_size) == [64, 64]
    assert _compose("experiment=segdiff_vaihingen", "data.root=/x").model.net.rrdb_blocks == 6
    brats = _compose("experiment=segdiff_brats", "data=brats_synthetic", "scale=tiny")
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(brats.model.net)["mask_channels"] == "${data.num_classes}"
    # the experiment's own tiny sizes (sizes/experiment/segdiff_brats_tiny.yaml) win over the model's
    assert brats.trainer.max_steps == 320 and brats.model.sampling.steps == 25
    assert brats.model.net.unet.channels == tiny.model.net.unet.channels
    assert _compose("experiment=segdiff_brats", "data=brats_synthetic").model.net.rrdb_blocks == 2
    abl = _compose("experiment=segdiff_folder2d", "data=shapes2d", "scale=tiny", "+ablation=segdiff_concat")
    assert abl.model.net.conditioning == "concat"
