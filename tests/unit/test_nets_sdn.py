"""Semantic Diffusion Network neck (docs/methods.md §4): SDC against closed forms, fusion, neck, UNet plug-in."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from diffseg.nets import SDNFusion, SDNNeck, SemanticDifferenceConv, TimeUNet

torch.set_num_threads(1)


def _naive_sdc(sdc: SemanticDifferenceConv, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pixel-by-pixel y(p) = sum_q w_q exp(-mean_c (Av_q - Av_p)^2) (u_q - u_p), q inside the image (2D)."""
    e = sdc.similarity(v)
    b, c, h, w = u.shape
    r = sdc.kernel_size // 2
    y = torch.zeros_like(u)
    for i, j in itertools.product(range(h), range(w)):
        for k, (di, dj) in enumerate(itertools.product(range(-r, r + 1), repeat=2)):
            qi, qj = i + di, j + dj
            if 0 <= qi < h and 0 <= qj < w:
                s = torch.exp(-(e[:, :, qi, qj] - e[:, :, i, j]).pow(2).mean(1, keepdim=True))
                y[:, :, i, j] += sdc.weight[:, k] * s * (u[:, :, qi, qj] - u[:, :, i, j])
    return y


def test_sdc_matches_naive_loop():
    torch.manual_seed(0)
    sdc = SemanticDifferenceConv(2, channels=3, guide_channels=2)
    u, v = torch.randn(2, 3, 5, 6), torch.randn(2, 2, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(sdc(u, v), _naive_sdc(sdc, u, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_sdc_with_uniform_similarity_is_depthwise_conv_minus_centre(dims):
    # A = 0  =>  s = 1  =>  y = conv(u, w) - u * conv(1, w)  (zero padding = no-flux border)
    torch.manual_seed(0)
    sdc = SemanticDifferenceConv(dims, channels=4, guide_channels=3)
    with torch.no_grad():
        sdc.similarity.weight.zero_()
        sdc.similarity.bias.zero_()
    size = (5, 6, 4)[:dims]
    u, v = torch.randn(2, 4, *size), torch.randn(2, 3, *size)
    conv = getattr(F, f"conv{dims}d")
    kernel = sdc.weight.detach().reshape(4, 1, *([3] * dims))
    ref = conv(u, kernel, padding=1, groups=4) - u * conv(torch.ones_like(u), kernel, padding=1, groups=4)
    torch.testing.assert_close(sdc(u, v).detach(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_sdc_zero_on_constant_u(dims):
    torch.manual_seed(0)
    sdc = SemanticDifferenceConv(dims, channels=3, guide_channels=5)
    u = torch.full((2, 3, *([6] * dims)), 2.7)
    v = torch.randn(2, 5, *([3] * dims))  # coarser guidance, resized inside
    y = sdc(u, v)
    assert y.shape == u.shape
    assert torch.equal(y, torch.zeros_like(u))


def test_sdc_stops_at_semantic_boundary():
    # u and v are the same two-region step; a sharp similarity blocks all flow across the edge
    torch.manual_seed(0)
    sdc = SemanticDifferenceConv(2, channels=1, guide_channels=1)
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    with torch.no_grad():
        sdc.similarity.weight.fill_(10.0)  # s across the edge = exp(-100) ~ 0
        sdc.similarity.bias.zero_()
    assert sdc(step, step).abs().max() < 1e-30
    with torch.no_grad():
        sdc.similarity.weight.zero_()  # s = 1: the edge diffuses
    assert sdc(step, step).abs().max() > 1e-2


def test_sdc_gradients_reach_similarity_and_kernel():
    torch.manual_seed(0)
    sdc = SemanticDifferenceConv(2, channels=3, guide_channels=4)
    u, v = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 3, 3)
    sdc(u, v).square().sum().backward()
    assert sdc.weight.grad.abs().sum() > 0
    assert sdc.similarity.weight.grad.abs().sum() > 0
    assert sdc.similarity.bias.grad is not None


def test_sdc_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        SemanticDifferenceConv(2, 3, 3, kernel_size=4)


@pytest.mark.parametrize("dims", [2, 3])
def test_fusion_keeps_width(dims):
    torch.manual_seed(0)
    fusion = SDNFusion(dims, 6)
    u, y = torch.randn(2, 6, *([4] * dims)), torch.randn(2, 6, *([4] * dims))
    out = fusion(u, y)
    assert out.shape == u.shape
    w = fusion.conv.weight.flatten(1)  # 1x1 conv on [u, y]
    ref = torch.einsum("oc,bc...->bo...", w, torch.cat([u, y], 1)) + fusion.conv.bias.reshape(1, -1, *[1] * dims)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["single", "multi"])
def test_neck_keeps_shapes(dims, mode):
    torch.manual_seed(0)
    chans = [4, 8, 16]
    neck = SDNNeck(dims, chans, mode=mode)
    feats = [torch.randn(2, c, *([8 // 2**i] * dims)) for i, c in enumerate(chans)]
    out = neck(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]
    changed = [not torch.equal(o, f) for o, f in zip(out, feats)]
    assert changed == ([False, False, True] if mode == "single" else [True, True, True])


def test_neck_errors():
    with pytest.raises(ValueError, match="mode"):
        SDNNeck(2, [4, 8], mode="dual")
    with pytest.raises(ValueError, match="widths"):
        SDNNeck(2, [4, 8])([torch.randn(1, 4, 4, 4), torch.randn(1, 16, 2, 2)])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["single", "multi"])
def test_unet_with_sdn_neck(dims, mode):
    torch.manual_seed(0)
    chans = (8, 16)
    net = TimeUNet(dims, 2, 1, channels=chans, neck=SDNNeck(dims, list(chans), mode=mode))
    x = torch.randn(1, 2, *([8] * dims))
    out = net(x, torch.tensor([5.0]))
    assert out.shape == (1, 1, *([8] * dims))
    out.square().mean().backward()
    sdc = net.neck.units[str(len(chans) - 1)].sdc
    assert sdc.weight.grad.abs().sum() > 0 and sdc.similarity.weight.grad.abs().sum() > 0
