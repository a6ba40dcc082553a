"""RRDB image encoder and SegDiff denoiser (docs/methods.md §2)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffseg.nets import RRDB, DenseBlock, RRDBEncoder, SegDiffDenoiser, TimeUNet

torch.set_num_threads(1)

SMALL_UNET = dict(channels=(8, 16), norm_groups=8)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _zero_last_convs(module: nn.Module) -> None:
    with torch.no_grad():
        for block in module.modules():
            if isinstance(block, DenseBlock):
                block.convs[-1].weight.zero_()
                block.convs[-1].bias.zero_()


@pytest.mark.parametrize("dims", [2, 3])
def test_rrdb_encoder_shapes(dims):
    torch.manual_seed(0)
    enc = RRDBEncoder(dims, 3, 8, num_blocks=1, features=8, growth=4)
    x = torch.randn(2, 3, *([6] * dims))
    assert enc(x).shape == (2, 8, *([6] * dims))
    assert RRDBEncoder(dims, 3, 5, num_blocks=0, features=8)(x).shape == (2, 5, *([6] * dims))


def test_dense_block_structure():
    torch.manual_seed(0)
    block = DenseBlock(2, features=6, growth=4)
    widths = [(c.in_channels, c.out_channels) for c in block.convs]
    assert widths == [(6, 4), (10, 4), (14, 4), (18, 4), (22, 6)]
    x = torch.randn(1, 6, 5, 5)
    # closed form of ESRGAN's ResidualDenseBlock_5C
    act = lambda z: F.leaky_relu(z, 0.2)  # noqa: E731
    x1 = act(block.convs[0](x))
    x2 = act(block.convs[1](torch.cat([x, x1], 1)))
    x3 = act(block.convs[2](torch.cat([x, x1, x2], 1)))
    x4 = act(block.convs[3](torch.cat([x, x1, x2, x3], 1)))
    x5 = block.convs[4](torch.cat([x, x1, x2, x3, x4], 1))
    torch.testing.assert_close(block(x), x + 0.2 * x5)


def test_rrdb_residual_scaling():
    torch.manual_seed(0)
    rrdb = RRDB(2, features=6, growth=4)
    x = torch.randn(2, 6, 5, 5)
    assert not torch.allclose(rrdb(x), 1.2 * x)
    _zero_last_convs(rrdb)  # every dense block becomes the identity
    # RRDB(x) = x + 0.2 * RDB3(RDB2(RDB1(x))) = x + 0.2 x
    torch.testing.assert_close(rrdb(x), 1.2 * x)


def test_rrdb_encoder_long_skip_and_input_dependence():
    torch.manual_seed(0)
    enc = RRDBEncoder(2, 3, 4, num_blocks=2, features=6, growth=4)
    x = torch.randn(1, 3, 8, 8)
    assert (enc(x) - enc(x + 0.1 * torch.randn_like(x))).abs().max() > 1e-4
    with torch.no_grad():
        enc.trunk_conv.weight.zero_()
        enc.trunk_conv.bias.zero_()
    # with the trunk silenced the encoder is conv_out(LeakyReLU(HRconv(conv_in(x)))) (reference RRDBNet)
    ref = enc.conv_out(F.leaky_relu(enc.hr_conv(enc.conv_in(x)), 0.2))
    torch.testing.assert_close(enc(x), ref)


def test_rrdb_param_count_grows_per_block():
    one = _n_params(RRDB(2, features=8, growth=4))
    base = _n_params(RRDBEncoder(2, 3, 4, num_blocks=0, features=8, growth=4))
    for n in (1, 3):
        assert _n_params(RRDBEncoder(2, 3, 4, num_blocks=n, features=8, growth=4)) - base == n * one
    with pytest.raises(ValueError, match="num_blocks"):
        RRDBEncoder(2, 3, 4, num_blocks=-1)


def _denoiser(conditioning, dims=2):
    return SegDiffDenoiser(
        dims, image_channels=3, mask_channels=1, conditioning=conditioning,
        rrdb_blocks=1, rrdb_features=8, rrdb_growth=4, unet=SMALL_UNET,
    )


@pytest.mark.parametrize("conditioning,unet_in", [("sum", 1), ("concat", 16), ("none", 4)])
def test_conditioning_variants(conditioning, unet_in):
    torch.manual_seed(0)
    net = _denoiser(conditioning)
    assert net.unet.in_channels == unet_in
    x_t, image = torch.randn(2, 1, 8, 8), torch.randn(2, 3, 8, 8, requires_grad=True)
    out = net(x_t, image, torch.tensor([1.0, 50.0]))
    assert out.shape == (2, 1, 8, 8)
    out.square().mean().backward()
    assert image.grad.abs().sum() > 0  # the image conditions the prediction
    if conditioning == "none":
        assert net.image_encoder is None and net.mask_encoder is None
        assert net.unet.conv_in.weight.grad.abs().sum() > 0
    else:
        for name, p in net.image_encoder.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        mask_conv = net.unet.conv_in if conditioning == "sum" else net.mask_encoder
        assert mask_conv.weight.grad.abs().sum() > 0


def test_sum_is_f_plus_g_with_f_the_unets_first_conv():
    """Reference: F is the UNet's first conv; conv_in(x_t) + G(I) enters the first block (and is its first
    skip). No other conv sits between F(x_t) + G(I) and the UNet's blocks."""
    torch.manual_seed(0)
    net = _denoiser("sum")
    assert net.mask_encoder is None and net.unet.in_channels == 1
    assert net.unet.conv_in.kernel_size == (3, 3) and net.unet.conv_in.out_channels == 8
    x_t, image, t = torch.randn(1, 1, 8, 8), torch.randn(1, 3, 8, 8), torch.tensor([3])
    h = net.unet.conv_in(x_t) + net.image_encoder(image)  # h = F(x_t) + G(I)
    seen = {}
    hook = net.unet.encoder[0].register_forward_pre_hook(lambda m, args: seen.update(h=args[0]))
    out = net(x_t, image, t)
    hook.remove()
    torch.testing.assert_close(seen["h"], h)  # the first encoder stage receives F(x_t) + G(I) itself
    torch.testing.assert_close(out, net.unet(x_t, t, input_features=net.image_encoder(image)))
    # the parameters: the UNet on the 1-channel mask plus G, nothing else
    assert _n_params(net) == _n_params(net.unet) + _n_params(net.image_encoder)
    with pytest.raises(ValueError, match="input_features"):
        net.unet(x_t, t, input_features=torch.zeros(1, 4, 8, 8))


def test_rescaled_timesteps_reach_the_embedding():
    """With num_train_steps = T the UNet's sinusoidal embedding is that of t·1000/T (rescale_timesteps)."""
    from diffseg.nets import sinusoidal_embedding

    torch.manual_seed(0)
    kw = dict(image_channels=3, rrdb_blocks=0, rrdb_features=8, unet=SMALL_UNET)
    for steps, scale in ((50, 20.0), (None, 1.0)):
        net = SegDiffDenoiser(2, num_train_steps=steps, **kw)
        seen = {}
        hook = net.unet.time_mlp.register_forward_pre_hook(lambda m, args: seen.update(emb=args[0]))
        t = torch.tensor([0, 7, 49])
        net(torch.randn(3, 1, 8, 8), torch.randn(3, 3, 8, 8), t)
        hook.remove()
        torch.testing.assert_close(seen["emb"], sinusoidal_embedding(t.double() * scale, 8))
    with pytest.raises(ValueError, match="num_train_steps"):
        SegDiffDenoiser(2, num_train_steps=0, **kw)


def test_denoiser_3d_runs():
    torch.manual_seed(0)
    net = _denoiser("sum", dims=3)
    out = net(torch.randn(1, 1, 4, 8, 8), torch.randn(1, 3, 4, 8, 8), torch.tensor([2.0]))
    assert out.shape == (1, 1, 4, 8, 8)


def test_denoiser_errors():
    with pytest.raises(ValueError, match=r"\('sum', 'concat', 'none'\)"):
        _denoiser("add")
    with pytest.raises(ValueError, match="in_channels"):
        SegDiffDenoiser(2, 3, unet=dict(in_channels=4))
    net = _denoiser("sum")
    with pytest.raises(ValueError, match="spatial"):
        net(torch.randn(1, 1, 8, 8), torch.randn(1, 3, 16, 16), torch.tensor([1.0]))


def test_unet_kwargs_forwarded():
    net = SegDiffDenoiser(2, 3, rrdb_blocks=0, rrdb_features=8,
                          unet=dict(channels=(16, 32), upsample="nearest", activation="silu"))
    assert isinstance(net.unet, TimeUNet)
    assert net.unet.level_channels == [16, 32]
    assert net.image_encoder.conv_out.out_channels == 16
