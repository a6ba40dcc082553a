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
from diffseg.inference.global_local import (RefineSettings, global_local_refine, merge_patches, patch_boxes,
                                            select_patches)
from diffseg.models.base import FINAL
from diffseg.models.segrefiner import SegRefiner, sobel_magnitude, texture_l1
from diffseg.nets.unet import TimeUNet
from diffseg.utils.errors import ConfigError

EPS = 1e-6


# ----------------------------------------------------------------------------- texture loss
def test_texture_loss_closed_form_step_edge():
    """Unit step at column c: after the 3-wide mean the row reads 0, 1/3, 2/3, 1 around the edge; the
    Sobel gives |g| = 4·(v[x+1] - v[x-1]) = 4/3, 8/3, 8/3, 4/3 at x = c-2 .. c+1, 0 elsewhere.
    A constant prediction (p = 0.5) has no gradient, so the loss is the mean of sqrt(g²+eps) - sqrt(eps)."""
    h, w, c = 8, 16, 7
    target = torch.zeros(1, 1, h, w)
    target[..., c:] = 1.0
    prob = torch.full_like(target, 0.5)
    g = torch.tensor([4 / 3, 8 / 3, 8 / 3, 4 / 3], dtype=torch.float64)
    expected = h * (torch.sqrt(g ** 2 + EPS) - EPS ** 0.5).sum() / (h * w)
    got = texture_l1(prob, target, pool=3, eps=EPS)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() == pytest.approx(8.0 / w, rel=1e-3)  # 8 x the total variation of a unit step
    # symmetric in its arguments and zero for identical inputs
    assert texture_l1(target, prob).item() == pytest.approx(got.item(), rel=1e-6)
    assert texture_l1(target, target).item() == 0.0


def test_texture_loss_matches_scipy_oracle():
    rng = np.random.default_rng(0)
    prob = rng.uniform(size=(2, 1, 12, 10))
    target = (rng.uniform(size=(2, 1, 12, 10)) > 0.5).astype(np.float64)

    def mag(x):  # scipy: 3x3 mean (edge replicate), Sobel along both axes (edge replicate)
        out = []
        for img in x[:, 0]:
            s = ndimage.uniform_filter(img, size=3, mode="nearest")
            gy, gx = ndimage.sobel(s, axis=0, mode="nearest"), ndimage.sobel(s, axis=1, mode="nearest")
            out.append(np.sqrt(gx ** 2 + gy ** 2 + EPS))
        return np.stack(out)

    expected = np.abs(mag(prob) - mag(target)).mean()
    got = texture_l1(torch.tensor(prob), torch.tensor(target), pool=3, eps=EPS)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # pool=1: no smoothing, Sobel magnitude alone
    s = torch.tensor(prob[:1])
    ref = np.hypot(ndimage.sobel(prob[0, 0], 0, mode="nearest"), ndimage.sobel(prob[0, 0], 1, mode="nearest"))
    np.testing.assert_allclose(sobel_magnitude(s, eps=0.0)[0, 0].numpy(), ref, atol=1e-12)


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
    with pytest.raises(ConfigError, match="threshold"):
        stub_model(refine={"threshold": 0.0})
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


@pytest.mark.parametrize("iou_range", [(0.5, 0.8), (0.3, 0.6)])
def test_rand_coarse_mask_binary_nonempty_in_range_and_random(iou_range):
    t = RandCoarseMaskd(iou_range=iou_range).set_random_state(0)
    for lab in labels():
        lab = MetaTensor(lab, meta={"filename_or_obj": "x.png"})
        a, b = t({"label": lab, "case_id": "c"})["coarse"], t({"label": lab, "case_id": "c"})["coarse"]
        assert isinstance(a, MetaTensor) and a.dtype == torch.int64 and a.shape == lab.shape
        assert set(a.unique().tolist()) <= {0, 1} and a.any()  # binary, non-empty from non-empty
        assert iou_range[0] <= mask_iou(a[0].numpy(), lab[0].numpy()) < iou_range[1]
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
        assert 0.5 <= mask_iou(a[0].numpy(), lab[0].numpy()) < 0.8
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
            assert 0.5 <= mask_iou(c[0].numpy(), lab[0].numpy()) < 0.8
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
    with pytest.raises(DataError, match="iou_range"):
        RandCoarseMaskd(iou_range=(0.8, 0.5))
    with pytest.raises(DataError, match="2D label"):
        RandCoarseMaskd()({"label": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(DataError, match="case_id"):
        FixedCoarseMaskd()({"label": torch.zeros(1, 4, 4)})


# ----------------------------------------------------------------------------- prediction
@pytest.mark.parametrize("size", [(48, 80), (20, 24)])  # larger than the window (32, 32) / smaller (padded)
def test_predict_case_windows_the_coarse_mask_with_the_image(size):
    """A denoiser that keeps its input mask returns the coarse mask exactly: the mask was windowed (or
    padded) in register with the image."""
    model = stub_model().eval()
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
def test_select_patches_low_confidence_nms_and_limit():
    conf = torch.ones(64, 64)
    conf[10:14, 10:14] = 0.1   # blob A (16 pixels)
    conf[50:52, 40:42] = 0.3   # blob B (4 pixels)
    centres, boxes = select_patches(conf, (16, 16), threshold=0.5, max_patches=8, nms_iou=0.3)
    assert len(centres) >= 2 and (conf[centres[:, 0], centres[:, 1]] < 0.5).all()  # centred on low confidence
    assert (boxes[:, 2] - boxes[:, 0] == 16).all() and (boxes[:, 3] - boxes[:, 1] == 16).all()
    covered = torch.zeros(64, 64, dtype=torch.bool)
    for y0, x0, y1, x1 in boxes.tolist():
        covered[y0:y1, x0:x1] = True
    assert covered[conf < 0.5].all()
    first = boxes[0].tolist()  # most uncertain pixels covered first: blob A
    assert first[0] <= 10 and first[2] >= 14 and first[1] <= 10 and first[3] >= 14
    # NMS: no two chosen patches overlap by more than nms_iou
    for i in range(len(boxes)):
        for j in range(i):
            y = max(0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            x = max(0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            assert y * x / (2 * 256 - y * x) <= 0.3
    assert len(select_patches(conf, (16, 16), 0.5, 1, 0.3)[0]) == 1
    assert len(select_patches(conf, (16, 16), 0.05, 8, 0.3)[0]) == 0  # nothing uncertain
    # boxes stay inside the image at the borders
    b = patch_boxes(torch.tensor([[0, 63], [63, 0]]), (16, 16), (64, 64))
    assert b.tolist() == [[0, 48, 16, 64], [48, 0, 64, 16]]


def test_merge_patches_averages_overlaps():
    base = torch.full((1, 1, 8, 8), 0.25)
    boxes = torch.tensor([[0, 0, 4, 4], [2, 2, 6, 6]])
    patches = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 0.0)])
    out = merge_patches(base, patches, boxes)[0, 0]
    assert out[0, 0] == 1.0 and out[5, 5] == 0.0 and out[3, 3] == 0.5 and out[7, 7] == 0.25


def test_global_local_on_image_twice_the_training_size():
    """The image holds the denoiser's logits: +8 everywhere except two zero squares (p = 0.5). The global
    pass (32x32) blurs them; patches must sit on those low-confidence points and, merged, give the
    full-resolution prediction inside the patches and the global one elsewhere."""
    image = torch.full((1, 1, 64, 64), 8.0)
    image[..., 8:12, 40:44] = 0.0
    image[..., 44:50, 10:16] = 0.0
    calls = []

    def refine_fn(img, coarse, steps):
        calls.append((tuple(img.shape), steps))
        return torch.sigmoid(img[:, :1])

    settings = RefineSettings(local=True, threshold=0.9, max_patches=4, nms_iou=0.3, batch_size=2)
    out = global_local_refine(refine_fn, image, torch.ones(1, 1, 64, 64), (32, 32), settings, num_steps=6)
    assert calls[0] == ((1, 1, 32, 32), 6) and all(s == 1 for _, s in calls[1:])
    boxes = out["boxes"]
    conf = (2 * out["global"][0, 0] - 1).abs()
    assert 2 <= len(boxes) <= 4
    centres = out["centres"]
    assert (conf[centres[:, 0], centres[:, 1]] < 0.9).all()  # patches centred on low-confidence points
    assert ((boxes[:, 2] - boxes[:, 0] == 32) & (boxes[:, 3] - boxes[:, 1] == 32)).all()
    covered = torch.zeros(64, 64, dtype=torch.bool)
    for y0, x0, y1, x1 in boxes.tolist():
        covered[y0:y1, x0:x1] = True
    assert covered[8:12, 40:44].all() and covered[44:50, 10:16].all()
    full = torch.sigmoid(image)[0, 0]
    torch.testing.assert_close(out["final"][0, 0][covered], full[covered])
    torch.testing.assert_close(out["final"][0, 0][~covered], out["global"][0, 0][~covered])
    assert (out["final"][0, 0][8:12, 40:44] == 0.5).all()  # sharp again after the local pass


def test_model_uses_global_local_only_when_asked_and_larger():
    image = torch.full((1, 3, 64, 64), 8.0)
    image[:, :, 20:26, 30:36] = -8.0
    coarse = {"coarse": torch.ones(1, 1, 64, 64, dtype=torch.long)}
    gl = stub_model("image", refine={"local": True, "max_patches": 3}).eval()
    out = gl.predict_case(image, "c", coarse)
    assert set(out) == {FINAL, "global", "coarse"}
    assert torch.equal(out[FINAL].argmax(1), (image[:, 0] > 0).long())
    assert gl.net.calls[0][0] == (1, 4, 32, 32) and len(gl.net.calls) == 6 + 1  # global K steps + 1 batch
    small = gl.predict_case(image[..., :32, :32], "c", {"coarse": coarse["coarse"][..., :32, :32]})
    assert set(small) == {FINAL, "coarse"}  # no larger than the training size: plain refinement
    window = stub_model("image").eval().predict_case(image, "c", coarse)
    assert set(window) == {FINAL, "coarse"}  # local: false -> sliding window


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
