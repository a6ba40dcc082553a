"""SegRefiner model (docs/methods.md §3): texture loss against closed forms and scipy, training loss wiring,
coarse-mask transforms, windowed prediction with the coarse mask, global-then-local inference."""
import logging
from functools import partial

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from diffseg.data.coarse import mask_iou
from diffseg.data.coarse_transforms import FixedCoarseMaskd, RandCoarseMaskd
from diffseg.data.datamodule import SegDataModule
from diffseg.data.errors import DataError
from diffseg.data.formats.folder2d import Folder2DSource
from diffseg.data.synthetic import shapes2d_sample, write_shapes2d
from diffseg.inference.global_local import RefineSettings, global_local_refine, nms, select_patches
from diffseg.models.base import FINAL
from diffseg.models.segrefiner import SegRefiner, sobel_magnitude, texture_l1
from diffseg.nets.unet import TimeUNet
from diffseg.utils.errors import ConfigError

EPS = 1e-6


# ----------------------------------------------------------------------------- texture loss
def reference_texture_loss(logits: np.ndarray, target: np.ndarray) -> float:
    """The reference's TextureL1Loss from its definition (numpy/scipy, float64): 3x3 mean with zero padding
    counted in the mean, cross-correlation with [[1,0,-1],[2,0,-2],[1,0,-1]]/4 and its transpose (zero
    padding), magnitude sqrt(gx² + gy² + 1e-4), mean L1 between sigmoid(logits) and target."""
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64) / 4

    def texture(img):
        m = ndimage.correlate(img, np.full((3, 3), 1 / 9), mode="constant", cval=0.0)
        gx = ndimage.correlate(m, kx, mode="constant", cval=0.0)
        gy = ndimage.correlate(m, kx.T, mode="constant", cval=0.0)
        return np.sqrt(gx ** 2 + gy ** 2 + 1e-4)

    prob = 1 / (1 + np.exp(-logits))
    return float(np.mean([np.abs(texture(p) - texture(t)) for p, t in zip(prob[:, 0], target[:, 0])]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_texture_loss_equals_the_reference_definition(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(3, 1, 17, 12))
    target = (rng.uniform(size=(3, 1, 17, 12)) > 0.5).astype(np.float64)
    expected = reference_texture_loss(logits, target)
    prob = torch.sigmoid(torch.tensor(logits, dtype=torch.float32))
    got = texture_l1(prob, torch.tensor(target, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, abs=1e-5)
    # the model's training loss uses it with the same defaults (pool 3, eps 1e-4)
    model = stub_model()
    assert model.texture_pool == 3 and model.texture_weight == 5.0


def test_sobel_magnitude_is_scipy_sobel_over_4_with_zero_padding():
    x = torch.rand(1, 1, 9, 11, dtype=torch.float64)
    img = x[0, 0].numpy()
    ref = np.hypot(ndimage.sobel(img, 0, mode="constant"), ndimage.sobel(img, 1, mode="constant")) / 4
    np.testing.assert_allclose(sobel_magnitude(x, eps=0.0)[0, 0].numpy(), ref, atol=1e-12)
    assert texture_l1(x, x).item() == 0.0


def test_texture_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="differ"):
        texture_l1(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="odd"):
        texture_l1(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), pool=2)


# ----------------------------------------------------------------------------- model helpers
BASE = dict(num_classes=2, spatial_dims=2, regions={"foreground": [1]},
            optimizer=partial(torch.optim.AdamW, lr=1e-3), roi_size=(32, 32))


def tiny_unet(**kw):
    return TimeUNet(spatial_dims=2, in_channels=4, out_channels=1, channels=[8, 16], num_res_blocks=1,
                    attention_levels=[1], time_embedding="learned", num_time_steps=6, activation="silu",
                    upsample="nearest", **kw)


class StubNet(torch.nn.Module):
    """Logit = gain · (2·m_t - 1) (keep the mask) or = the first image channel (the image holds the logits)."""

    in_channels, out_channels, time_embedding, num_time_steps = 4, 1, "learned", 6

    def __init__(self, mode="keep"):
        super().__init__()
        self.mode = mode
        self.calls = []

    def forward(self, x, t):
        assert x.shape[1] == self.in_channels
        self.calls.append((tuple(x.shape), t.clone()))
        if self.mode == "keep":
            return 12.0 * (2.0 * x[:, -1:] - 1.0)
        return x[:, :1].clone()


def stub_model(mode="keep", refine=None, **kw):
    return SegRefiner(net=StubNet(mode), refine=refine, **{**BASE, **kw})


def shapes_batch(n=2, size=32, seed=0):
    imgs, labels, coarse = [], [], []
    for i in range(n):
        img, mask = shapes2d_sample(np.random.default_rng([seed, i]), size)
        imgs.append(torch.tensor(img, dtype=torch.float32).permute(2, 0, 1) / 255)
        labels.append(torch.tensor(mask > 0)[None].long())
        d = RandCoarseMaskd().set_random_state(seed + i)({"label": labels[-1]})
        coarse.append(d["coarse"])
    return {"image": torch.stack(imgs), "label": torch.stack(labels), "coarse": torch.stack(coarse)}


# ----------------------------------------------------------------------------- training
def test_training_loss_finite_with_gradients_and_components():
    torch.manual_seed(0)
    model = SegRefiner(net=tiny_unet(), **BASE)
    assert model.image_channels == 3
    batch = shapes_batch()
    loss, logs = model.training_loss(batch)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(logs["bce"].item() + 5.0 * logs["texture"].item(), rel=1e-6)
    loss.backward()
    grads = {n: p.grad for n, p in model.net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["conv_in.weight"].abs().sum() > 0 and grads["time_table.weight"].abs().sum() > 0


def test_training_input_is_q_sample_of_gt_and_coarse():
    """The denoiser sees [image, m_t] with m_t = gt where u < β̄_t, coarse elsewhere (coarse = 1 - gt here,
    so the fraction of pixels equal to gt is β̄_t), and its own step t."""
    model = stub_model(roi_size=(64, 64))
    gt = torch.zeros(4, 1, 64, 64, dtype=torch.long)
    gt[..., 16:48, 16:48] = 1
    batch = {"image": torch.randn(4, 3, 64, 64), "label": gt, "coarse": 1 - gt}
    seen = {}

    def spy(x, t):
        seen["x"], seen["t"] = x, t
        return torch.zeros(x.shape[0], 1, *x.shape[2:])

    model.net.forward = spy
    torch.manual_seed(3)
    model.training_loss(batch)
    torch.testing.assert_close(seen["x"][:, :3], batch["image"])
    m_t = seen["x"][:, 3:]
    assert set(m_t.unique().tolist()) <= {0.0, 1.0}
    frac_fine = (m_t == gt).float().mean(dim=(1, 2, 3))
    beta_bar = model.diffusion.beta_bar[seen["t"]].float()
    torch.testing.assert_close(frac_fine, beta_bar, atol=0.03, rtol=0)


def test_config_errors():
    with pytest.raises(ConfigError, match="2D binary"):
        SegRefiner(net=tiny_unet(), **{**BASE, "num_classes": 3})
    with pytest.raises(ConfigError, match="unknown key"):
        stub_model(refine={"locall": True})
    with pytest.raises(ConfigError, match="fine_prob_thr"):
        stub_model(refine={"fine_prob_thr": 0.0})
    with pytest.raises(ConfigError, match="unknown key.*max_patches"):
        stub_model(refine={"max_patches": 16})
    with pytest.raises(ConfigError, match="time_embedding='sinusoidal'"):
        SegRefiner(net=TimeUNet(2, 4, 1, channels=[8]), **BASE)
    with pytest.raises(ConfigError, match="num_time_steps=6 .expected 10"):
        SegRefiner(net=tiny_unet(), num_steps=10, **BASE)
    with pytest.raises(ConfigError, match="out_channels=2"):
        SegRefiner(net=TimeUNet(2, 4, 2, channels=[8], time_embedding="learned", num_time_steps=6), **BASE)
    with pytest.raises(ConfigError, match="coarse_dir"):
        stub_model().training_loss({"image": torch.zeros(1, 3, 32, 32), "label": torch.zeros(1, 1, 32, 32)})


# ----------------------------------------------------------------------------- coarse-mask transforms
def labels(n=12, size=48):
    return [torch.tensor(shapes2d_sample(np.random.default_rng([5, i]), size)[1] > 0)[None].long() for i in range(n)]


def test_rand_coarse_mask_binary_below_target_and_random():
    iou_target = 0.8
    t = RandCoarseMaskd(iou_target=iou_target).set_random_state(0)
    for lab in labels():
        lab = MetaTensor(lab, meta={"filename_or_obj": "x.png"})
        a, b = t({"label": lab, "case_id": "c"})["coarse"], t({"label": lab, "case_id": "c"})["coarse"]
        assert isinstance(a, MetaTensor) and a.dtype == torch.int64 and a.shape == lab.shape
        assert set(a.unique().tolist()) <= {0, 1}
        assert mask_iou(a[0].numpy(), lab[0].numpy()) < iou_target
        assert not torch.equal(a, b)  # a new mask each call
    empty = {"label": torch.zeros(1, 16, 16, dtype=torch.long)}
    assert not t(empty)["coarse"].any()


def test_fixed_coarse_mask_deterministic_per_case_and_cached(monkeypatch):
    labs = labels(4)
    first = [FixedCoarseMaskd(seed=1)({"label": lab, "case_id": f"case_{i}"})["coarse"] for i, lab in enumerate(labs)]
    t = FixedCoarseMaskd(seed=1)  # a new instance (a new process) gives the same masks
    again = [t({"label": lab, "case_id": f"case_{i}"})["coarse"] for i, lab in enumerate(labs)]
    for a, b, lab in zip(first, again, labs):
        torch.testing.assert_close(a, b)
        assert mask_iou(a[0].numpy(), lab[0].numpy()) < 0.8
    other_id = t({"label": labs[0], "case_id": "another"})["coarse"]
    other_seed = FixedCoarseMaskd(seed=2)({"label": labs[0], "case_id": "case_0"})["coarse"]
    assert not torch.equal(other_id, first[0]) and not torch.equal(other_seed, first[0])
    calls = []
    monkeypatch.setattr(t, "_make", lambda fg, rng: calls.append(1) or np.zeros_like(fg))
    torch.testing.assert_close(t({"label": labs[1], "case_id": "case_1"})["coarse"], first[1])
    assert calls == []  # served from the cache


def test_coarse_from_files_wins_and_is_reported(caplog):
    import diffseg.data.coarse_transforms as ct

    ct._CoarseMaskBase._notified = False
    lab = labels(1)[0]
    given = torch.zeros_like(lab)
    with caplog.at_level(logging.WARNING, logger="diffseg"):
        for t in (RandCoarseMaskd(), FixedCoarseMaskd()):
            assert t({"label": lab, "coarse": given, "case_id": "a"})["coarse"] is given
    assert "read from files" in caplog.text and "not used" in caplog.text


def test_datamodule_serves_generated_or_file_coarse_masks(tmp_path):
    from PIL import Image

    root = write_shapes2d(tmp_path / "shapes", num_cases=10, size=32, seed=0)

    def datamodule(**source_kw):
        dm = SegDataModule(source=Folder2DSource(root, **source_kw), root=root, patch_size=(32, 32), batch_size=4,
                           samples_per_epoch=4, train_transforms=[RandCoarseMaskd()],
                           eval_transforms=[FixedCoarseMaskd()])
        dm.setup("fit")
        return dm

    a = datamodule()
    batch = next(iter(a.train_dataloader()))
    assert batch["coarse"].shape == batch["label"].shape
    for c, lab in zip(batch["coarse"], batch["label"]):
        assert set(c.unique().tolist()) <= {0, 1}
        if lab.any():
            assert mask_iou(c[0].numpy(), lab[0].numpy()) < 0.8
    val = [a.datasets["val"][i]["coarse"] for i in range(len(a.datasets["val"]))]
    again = [datamodule().datasets["val"][i]["coarse"] for i in range(len(val))]
    assert all(torch.equal(x, y) for x, y in zip(val, again))  # fixed evaluation masks
    # masks from another model (data.source.coarse_dir): the files are served, the generators step aside
    (root / "coarse").mkdir()
    for path in (root / "masks").glob("*.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "coarse" / path.name)
    b = datamodule(coarse_dir="coarse")
    assert not b.datasets["val"][0]["coarse"].any()
    assert not next(iter(b.train_dataloader()))["coarse"].any()


def test_coarse_transform_bad_input():
    with pytest.raises(DataError, match="iou_target: expected one number"):
        RandCoarseMaskd(iou_target=(0.5, 0.8))
    with pytest.raises(DataError, match="2D label"):
        RandCoarseMaskd()({"label": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(DataError, match="case_id"):
        FixedCoarseMaskd()({"label": torch.zeros(1, 4, 4)})


# ----------------------------------------------------------------------------- prediction
@pytest.mark.parametrize("size", [(48, 80), (20, 24)])  # larger than the window (32, 32) / smaller (padded)
def test_predict_case_windows_the_coarse_mask_with_the_image(size):
    """A denoiser that keeps its input mask returns the coarse mask exactly: the mask was windowed (or
    padded) in register with the image (refine.local: false, the sliding window for larger images)."""
    model = stub_model(refine={"local": False}).eval()
    coarse = torch.zeros(1, 1, *size, dtype=torch.long)
    coarse[..., 3:17, 5:19] = 1
    coarse[..., -9:, -7:] = 1
    out = model.predict_case(torch.randn(1, 3, *size), "case", {"coarse": coarse})
    assert set(out) == {FINAL, "coarse"}
    for name in (FINAL, "coarse"):
        assert out[name].shape == (1, 2, *size)
        torch.testing.assert_close(out[name].sum(1), torch.ones(1, *size))
        assert torch.equal(out[name].argmax(1, keepdim=True), coarse)
    shapes = {s for s, _ in model.net.calls}
    assert shapes == {(1, 4, 32, 32)}  # image + coarse channel, window size
    assert len(model.net.calls) == 6 * (2 * 4 if size == (48, 80) else 1)  # K steps per window (overlap 0.5)


def test_predict_is_reproducible_per_case():
    model = SegRefiner(net=tiny_unet(), **BASE).eval()
    batch = shapes_batch(1)
    a = model.predict_case(batch["image"], "c1", batch)[FINAL]
    b = model.predict_case(batch["image"], "c1", batch)[FINAL]
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- global-then-local
def test_select_patches_hand_made_fine_probability():
    """8x8 model resolution, 32x32 image (scale 4), patches of the model size 8. Fine probability 0.8
    (its maximum) except at five points; 0.9 x 0.8 = 0.72 makes (3, 3) at 0.75 no centre. Centres (y, x) x 4,
    boxes shifted inside the image, NMS on 1 - f at IoU 0.2 (|(0,0,8,8) ∩ (0,4,8,12)| = 32 / 96 = 1/3)."""
    f = torch.full((8, 8), 0.8)
    f[1, 1], f[1, 2], f[6, 6], f[6, 1], f[7, 7], f[3, 3] = 0.1, 0.2, 0.3, 0.5, 0.6, 0.75
    boxes = select_patches(f, (32, 32), (8, 8), fine_prob_thr=0.9, nms_iou=0.2)
    # score 0.9: centre (4, 4) -> (0, 0); 0.8: (4, 8) -> (0, 4), suppressed by the first; 0.7: (24, 24) -> (20, 20);
    # 0.5: (24, 4) -> (20, 0); 0.4: (28, 28) -> shifted inside to (24, 24), IoU 16 / 112 with (20, 20)
    assert boxes.tolist() == [[0, 0, 8, 8], [20, 20, 28, 28], [20, 0, 28, 8], [24, 24, 32, 32]]
    looser = select_patches(f, (32, 32), (8, 8), fine_prob_thr=0.9, nms_iou=0.4)
    assert looser.tolist() == [[0, 0, 8, 8], [0, 4, 8, 12], [20, 20, 28, 28], [20, 0, 28, 8], [24, 24, 32, 32]]
    # a non-square image: y scaled by 16/8, x by 48/8 (truncated), patches stay inside
    wide = select_patches(f, (16, 48), (8, 8), fine_prob_thr=0.9, nms_iou=0.2)
    assert wide[0].tolist() == [0, 2, 8, 10]  # centre (2, 6)
    assert ((wide[:, 2] <= 16) & (wide[:, 3] <= 48) & (wide[:, :2] >= 0).all(1)).all()
    assert len(select_patches(torch.full((8, 8), 0.8), (32, 32), (8, 8), 0.9, 0.2)) == 0  # all equally fine


def test_nms_fallback_matches_brute_force():
    """Greedy NMS: a box is kept when no higher-scored kept box overlaps it by IoU > threshold."""
    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 40, (60, 2), generator=g).float()
    boxes = torch.cat([xy, xy + 16], dim=1)
    scores = torch.rand(60, generator=g)
    keep = nms(boxes, scores, 0.2).tolist()
    expected = []
    for i in torch.argsort(scores, descending=True).tolist():
        ious = [float(_iou(boxes[i], boxes[j])) for j in expected]
        if all(v <= 0.2 for v in ious):
            expected.append(i)
    assert keep == expected


def _iou(a, b):
    inter = (min(a[2], b[2]) - max(a[0], b[0])).clamp(min=0) * (min(a[3], b[3]) - max(a[1], b[1])).clamp(min=0)
    return inter / (256 + 256 - inter)


def test_global_local_filters_averages_binarises_and_pastes():
    """A fake step function: the global pass (t = 5 .. 1 at 8x8) gives the left half as foreground and a
    hand-made fine probability; the local pass (t = 0) gives a constant per patch. Patches all 1 or all 0
    in the global mask are dropped; overlaps averaged, binarised at 0.5, pasted; the global mask elsewhere."""
    image = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    coarse = torch.zeros(1, 1, 32, 32)
    coarse[..., :, :16] = 1
    f = torch.full((1, 1, 8, 8), 0.8)
    f[0, 0, 1, 1] = 0.1   # centre (4, 4): box (0, 0, 8, 8), all foreground -> dropped
    f[0, 0, 4, 4] = 0.2   # centre (16, 16): box (12, 12, 20, 20), mixed -> kept, local value 0.2
    f[0, 0, 5, 4] = 0.3   # centre (20, 16): box (16, 12, 24, 20), IoU 1/3 with the previous, mixed -> 0.7
    f[0, 0, 6, 6] = 0.4   # centre (24, 24): box (20, 20, 28, 28), all background -> dropped
    calls, local_values = [], [0.2, 0.7]

    def step_fn(img, mask, start, num_steps):
        calls.append((tuple(img.shape), start, num_steps, img.clone(), mask.clone()))
        if start == 5:
            return mask.clone(), f  # the global probability: the (resized) coarse mask itself
        return torch.full((len(img), 1, 8, 8), local_values[len(calls) - 2]), None

    settings = RefineSettings(nms_iou=0.4, batch_max=1)
    out = global_local_refine(step_fn, image, coarse, (8, 8), 6, settings)
    assert [(c[0], c[1], c[2]) for c in calls] == [((1, 1, 8, 8), 5, 5), ((1, 1, 8, 8), 0, 1), ((1, 1, 8, 8), 0, 1)]
    torch.testing.assert_close(calls[0][3], image[..., ::4, ::4])  # nearest resize of the image
    assert out["boxes"].tolist() == [[12, 12, 20, 20], [16, 12, 24, 20]]
    torch.testing.assert_close(calls[1][3], image[..., 12:20, 12:20])
    torch.testing.assert_close(calls[1][4], coarse[..., 12:20, 12:20])  # the patch of the global mask
    torch.testing.assert_close(out["global"], coarse)
    expected = coarse.clone()
    expected[..., 12:16, 12:20] = 0  # 0.2
    expected[..., 16:20, 12:20] = 0  # (0.2 + 0.7) / 2 = 0.45 (the last patch alone would give 1)
    expected[..., 20:24, 12:20] = 1  # 0.7
    torch.testing.assert_close(out["final"], expected)


class RecordingNet(StubNet):
    """Logit = the first image channel (the image holds the logits); records every call's steps."""

    def __init__(self):
        super().__init__("image")


def test_model_global_pass_steps_k_minus_1_to_1_then_local_at_0():
    """64x64 image, training size 32: the network is called at t = 5, 4, 3, 2, 1 on the 32x32 global input,
    then at t = 0 on full-resolution 32x32 patches around the uncertain column (logit 0 -> c = 0 -> f = 0)."""
    image = torch.full((1, 3, 64, 64), 8.0)
    image[:, :, :, 32:] = -8.0
    image[:, :, :, 30:34] = 0.0
    coarse = torch.zeros(1, 1, 64, 64, dtype=torch.long)
    coarse[..., :, :32] = 1
    model = SegRefiner(net=RecordingNet(), **BASE).eval()
    assert model.refine_settings.local and model.refine_settings.nms_iou == 0.2
    out = model.predict_case(image, "c", {"coarse": coarse})
    assert set(out) == {FINAL, "global", "coarse"}
    steps = [t.tolist() for _, t in model.net.calls]
    shapes = [s for s, _ in model.net.calls]
    assert steps[:5] == [[5], [4], [3], [2], [1]] and shapes[:5] == [(1, 4, 32, 32)] * 5
    local = steps[5:]  # every later call: a batch of local patches at t = 0, one patch each
    assert local and all(set(t) == {0} for t in local) and all(s[1:] == (4, 32, 32) for s in shapes[5:])
    assert sum(len(t) for t in local) == model.last_local_patches >= 1
    # local patches see the full-resolution logits: the output is sharp where the logits are
    assert torch.equal(out[FINAL].argmax(1)[..., :, :30], torch.ones(1, 64, 30, dtype=torch.long))
    assert torch.equal(out[FINAL].argmax(1)[..., :, 34:], torch.zeros(1, 64, 30, dtype=torch.long))
    model.curves = False  # validation: the final mask only, the same one
    assert set(final_only := model.predict_case(image, "c", {"coarse": coarse})) == {FINAL}
    assert torch.equal(final_only[FINAL], out[FINAL])
    model.curves = True
    # no larger than the training size: plain refinement t = 5 .. 0; local: false -> sliding window
    model.net.calls.clear()
    small = model.predict_case(image[..., :32, :32], "c", {"coarse": coarse[..., :32, :32]})
    assert set(small) == {FINAL, "coarse"}
    assert [t.tolist() for _, t in model.net.calls] == [[t] for t in range(5, -1, -1)]
    sliding = SegRefiner(net=RecordingNet(), refine={"local": False}, **BASE).eval()
    window = sliding.predict_case(image, "c", {"coarse": coarse})
    assert set(window) == {FINAL, "coarse"}


def test_refine_steps_run_k_minus_1_downwards():
    model = SegRefiner(net=RecordingNet(), refine={"steps": 2}, **BASE).eval()
    coarse = torch.ones(1, 1, 32, 32, dtype=torch.long)
    model.predict_case(torch.full((1, 3, 32, 32), 8.0), "c", {"coarse": coarse})
    assert [t.tolist() for _, t in model.net.calls] == [[5], [4]]  # the coarse mask is the state at t = K-1


@pytest.mark.parametrize("pixels,empty", [(128, True), (129, False)])
def test_coarse_mask_of_at_most_128_pixels_gives_an_empty_mask(pixels, empty):
    model = stub_model().eval()  # the network keeps its input mask
    coarse = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    coarse.view(-1)[:pixels] = 1
    out = model.predict_case(torch.zeros(1, 3, 32, 32), "c", {"coarse": coarse})
    assert out[FINAL].argmax(1).sum().item() == (0 if empty else pixels)
    assert torch.equal(out["coarse"].argmax(1, keepdim=True), coarse)  # the input is still scored as it was


# ----------------------------------------------------------------------------- refine.py helpers
def test_refine_pairs_files_by_stem_and_lists_every_missing_partner(tmp_path):
    from PIL import Image

    from diffseg.drivers.refine import pair_files

    def write(folder, *stems):
        (tmp_path / folder).mkdir(exist_ok=True)
        for s in stems:
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / folder / f"{s}.png")
        return tmp_path / folder

    images, coarse, masks = write("im", "a", "b", "c"), write("co", "a", "b", "x"), write("gt", "a", "c")
    with pytest.raises(DataError) as err:
        pair_files(images, coarse, masks)
    msg = str(err.value)
    assert "no coarse mask for 1 stem(s): ['c']" in msg and "no image for 1 stem(s): ['x']" in msg
    assert "no ground-truth mask for 2 stem(s): ['b', 'x']" in msg and "match=coarse" in msg
    cases = pair_files(images, write("co2", "a", "b"), match="coarse")  # the coarse masks choose
    assert [c["case_id"] for c in cases] == ["a", "b"] and all("label" not in c for c in cases)
    assert pair_files(images, write("co3", "a"), write("gt3", "a"), match="coarse")[0]["label"].endswith("a.png")
    with pytest.raises(ConfigError, match="match"):
        pair_files(images, coarse, match="all")


def test_refine_binarises_coarse_masks():
    from diffseg.drivers.refine import binarise_coarse

    mask = np.array([[[0, 255], [255, 0]]], np.uint8)
    assert binarise_coarse(mask, "m.png", None).tolist() == [[[[0.0, 1.0], [1.0, 0.0]]]]
    assert binarise_coarse(mask // 255, "m.png", None).sum() == 2  # 0/1 masks too
    soft = np.array([[[0, 100], [200, 255]]], np.uint8)
    with pytest.raises(DataError, match="4 gray levels.*coarse_threshold"):
        binarise_coarse(soft, "soft.png", None)
    assert binarise_coarse(soft, "soft.png", 128).tolist() == [[[[0.0, 0.0], [1.0, 1.0]]]]


# ----------------------------------------------------------------------------- the reference's optimisation
@pytest.mark.parametrize("experiment", ["segrefiner_folder2d budget=none", "segrefiner_dis", "segrefiner_big"])
@pytest.mark.parametrize("scale", ["paper", "tiny"])
def test_config_selects_the_reference_optimisation(experiment, scale):
    """SegRefiner's model config picks model/lr_schedule=step_decay (halved at 2/3 and 5/6 of the run: 80k and
    100k of 120k steps), AdamW with weight decay 0 and no warm-up: the experiments that reproduce the paper
    and any SegRefiner run without a shared budget; the 2D comparison family trains under its own budget."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    repo = Path(__file__).resolve().parents[2]
    name, *extra = experiment.split()
    with initialize_config_dir(config_dir=str(repo / "experiments"), version_base="1.3"):
        cfg = compose("fit", overrides=[f"experiment={name}", "data.root=/x", f"scale={scale}", *extra])
        family = compose("fit", overrides=["experiment=segrefiner_folder2d", "data=shapes2d", f"scale={scale}"])
    assert cfg.budget_name == "none"
    assert cfg.model.lr_schedule._target_ == "diffseg.models.lr_schedules.step_decay"
    assert cfg.model.lr_schedule.warmup_steps == 0 and cfg.model.optimizer.weight_decay == 0.0
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW"
    schedule = instantiate(cfg.model.lr_schedule)
    assert [schedule(s, total_steps=120_000) for s in (0, 79_999, 80_000, 99_999, 100_000, 119_999)] == \
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert family.budget_name == "family_2d"
    assert family.model.lr_schedule._target_ == "diffseg.models.lr_schedules.warmup_cosine"
    # the coarse masks of training and evaluation: the reference's IoU target, no range
    if name != "segrefiner_big":  # (BIG trains on a named segmenter's coarse masks)
        assert cfg.coarse.iou_target == 0.8 and "iou_range" not in cfg.coarse
        assert cfg.data.train_transforms[0].iou_target == 0.8 and cfg.data.eval_transforms[0].iou_target == 0.8
