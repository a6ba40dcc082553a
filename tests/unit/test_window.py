"""The 3D sliding-window path: stitching, reproducibility, and what validation and test stitch.

Oracles: the input itself (an identity predictor must give it back, whatever the overlap and the
window grid), and MONAI's ``sliding_window_inference`` run separately on each output, fed the very
window outputs the model produced (replayed in order).
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
from monai.inferers import sliding_window_inference

from diffseg.inference.window import sliding_window_predict
from diffseg.models.base import FINAL
from diffseg.models.imgx import ImgXDiffSeg
from diffseg.nets.unet import TimeUNet

C, IN, ROI = 3, 2, (16, 16, 16)
VOLUME = (32, 28, 40)  # 3 x 3 x 4 windows at overlap 0.5; 28 is not on the window grid


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("overlap", [0.5, 0.25])
def test_window_stitching_of_an_identity_predictor_returns_the_volume(overlap):
    image = torch.randn(1, IN, *VOLUME, generator=torch.Generator().manual_seed(0))
    calls = []

    def identity(window):
        calls.append(tuple(window.shape[2:]))
        return {FINAL: window, "doubled": 2 * window}

    out = sliding_window_predict(identity, image, ROI, overlap=overlap)
    assert len(calls) > 8 and set(calls) == {ROI}  # many windows, each the window size
    torch.testing.assert_close(out[FINAL], image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["doubled"], 2 * image, rtol=1e-5, atol=1e-5)


def _model(steps: int = 3, net_dims: int = 3, roi=ROI) -> ImgXDiffSeg:
    """ImgX on 3D data; ``net_dims=2`` with a (P, P, 1) window is the ablation's 2D slice-by-slice model."""
    torch.manual_seed(0)
    net = TimeUNet(net_dims, IN + C, C, channels=[4, 8])
    return ImgXDiffSeg(net=net, num_classes=C, spatial_dims=3, regions={"all": [1, 2], "inner": [2]},
                       optimizer=partial(torch.optim.AdamW, lr=1e-3), roi_size=list(roi), num_plot_cases=0,
                       sampling={"steps": steps}).eval()


@pytest.mark.parametrize("net_dims,roi,volume", [(3, ROI, VOLUME), (2, (16, 16, 1), (32, 28, 5))])
def test_window_diffusion_prediction_is_reproducible_and_stitched_like_monai(net_dims, roi, volume):
    """A 3-step ImgX prediction over a volume several windows wide (3D windows, or the 2D slice model's
    one-slice windows along z): the same case gives the same outputs; every output (final and each step)
    equals MONAI's Gaussian-weighted stitching of the window outputs the model produced, each output
    stitched on its own."""
    model = _model(net_dims=net_dims, roi=roi)
    image = torch.randn(1, IN, *volume, generator=torch.Generator().manual_seed(1))
    windows = []
    predict_window = model.predict_window

    def recording(window, batch=None):
        out = predict_window(window, batch)
        windows.append({k: v.clone() for k, v in out.items()})
        return out

    model.predict_window = recording
    first = model.predict_case(image, "case_a")
    recorded, windows[:] = list(windows), []
    second = model.predict_case(image, "case_a")
    # the prediction, each sampling step, and the uncertainty maps over samples (std, entropy)
    assert set(first) == {FINAL, "step/1", "step/2", "step/3", "std", "entropy"} and len(recorded) > 8
    for name in first:
        assert torch.equal(first[name], second[name]), name
        replay = iter(w[name] for w in recorded)
        expected = sliding_window_inference(image, roi, 1, lambda x: next(replay), overlap=model.overlap,
                                            mode="gaussian", padding_mode="constant")
        torch.testing.assert_close(first[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(first["step/1"], first[FINAL])


def test_validation_stitches_only_the_final_output():
    """model.curves=False (validation): one output, the same final prediction as with the curves (test)."""
    model = _model()
    image = torch.randn(1, IN, *VOLUME, generator=torch.Generator().manual_seed(2))
    with_curves = model.predict_case(image, "case_v")
    model.curves, model.spread = False, False  # what validation sets (base.timed_predict_case)
    final_only = model.predict_case(image, "case_v")
    assert set(final_only) == {FINAL} and set(model.evaluated_outputs) == {FINAL}
    assert torch.equal(final_only[FINAL], with_curves[FINAL])
    model.curves, model.spread = True, True
    assert set(model.evaluated_outputs) == {FINAL, "step/1", "step/2", "step/3"}
