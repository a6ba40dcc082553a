"""TimeUNet (docs/methods.md §1-§3): shapes, time conditioning, attention vs torch MHA, errors, learning."""

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from diffseg.nets import AttentionBlock, TimeUNet, sinusoidal_embedding
from diffseg.nets.unet import group_norm

torch.set_num_threads(1)

TINY = dict(channels=(8, 16), norm_groups=8)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("dims,size", [(2, (16, 24)), (3, (8, 8, 16))])
@pytest.mark.parametrize("upsample", ["transpose", "nearest"])
def test_output_shape(dims, size, upsample):
    torch.manual_seed(0)
    net = TimeUNet(dims, 3, 2, channels=(8, 16, 32), upsample=upsample)
    out = net(torch.randn(2, 3, *size), torch.tensor([0.0, 7.5]))
    assert out.shape == (2, 2, *size)
    assert torch.isfinite(out).all()


def test_sinusoidal_matches_diffusers():
    t = torch.tensor([0.0, 1.0, 2.5, 999.0])
    for dim in (8, 32, 33):
        ours = sinusoidal_embedding(t, dim)
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_sinusoidal_time_changes_output(dims):
    torch.manual_seed(0)
    net = TimeUNet(dims, 2, 1, **TINY).eval()
    x = torch.randn(1, 2, *([8] * dims)).repeat(2, 1, *([1] * dims))
    out = net(x, torch.tensor([1.0, 1.5]))  # non-integer t is allowed
    assert (out[0] - out[1]).abs().max() > 1e-4
    # same t -> identical output; a scalar t broadcasts over the batch
    torch.testing.assert_close(net(x, torch.tensor(3.0)), net(x, torch.tensor([3.0, 3.0])))
    o = net(x, torch.tensor(3.0))
    torch.testing.assert_close(o[0], o[1])


def test_learned_time_changes_output_and_validates():
    torch.manual_seed(0)
    net = TimeUNet(2, 2, 1, time_embedding="learned", num_time_steps=6, **TINY).eval()
    x = torch.randn(1, 2, 8, 8).repeat(2, 1, 1, 1)
    out = net(x, torch.tensor([0, 5]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert net.time_table.weight.shape == (6, 8)  # one learned vector per step
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        net(x, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="integer"):
        net(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_time_steps"):
        TimeUNet(2, 2, 1, time_embedding="learned", **TINY)


def test_no_time_is_same_network_without_time():
    torch.manual_seed(0)
    plain = TimeUNet(2, 2, 1, time_embedding=None, **TINY)
    timed = TimeUNet(2, 2, 1, time_embedding="sinusoidal", **TINY)
    x = torch.randn(2, 2, 8, 8)
    assert plain(x).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="takes no t"):
        plain(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="needs t"):
        timed(x)
    # the only difference: the time MLP and one Linear(4*C0 -> width) per res block
    res_blocks = [m for m in timed.modules() if getattr(m, "time_proj", None) is not None]
    extra = _n_params(timed.time_mlp) + sum(_n_params(m.time_proj) for m in res_blocks)
    assert _n_params(timed) - _n_params(plain) == extra
    assert not any("time" in name for name, _ in plain.named_parameters())


def test_samples_are_independent_in_batch():
    # GroupNorm normalises per sample: output of a sample must not depend on the rest of the batch
    torch.manual_seed(0)
    net = TimeUNet(2, 2, 1, attention_levels=(1,), **TINY).eval()
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(net(x, t)[1:2], net(x[1:2], t[1:2]), rtol=1e-5, atol=1e-5)


def test_divisibility_error():
    net = TimeUNet(2, 1, 1, channels=(8, 16, 32))
    with pytest.raises(ValueError, match=r"\(12, 10\).*divisible by 4"):
        net(torch.randn(1, 1, 12, 10), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(1, 2, 12, 12), torch.tensor([1.0]))


def test_bad_arguments():
    for kwargs, match in [
        (dict(activation="relu"), "activation"),
        (dict(upsample="bicubic"), "upsample"),
        (dict(time_embedding="fourier"), "time_embedding"),
        (dict(attention_levels=(2,)), "attention_levels"),
        (dict(attention_levels=(1,), num_heads=3), "num_heads"),
        (dict(num_res_blocks=0), "num_res_blocks"),
    ]:
        with pytest.raises(ValueError, match=match):
            TimeUNet(2, 1, 1, **TINY, **kwargs)


def test_group_norm_uses_gcd():
    assert group_norm(8, 32).num_groups == 8
    assert group_norm(12, 8).num_groups == 4
    assert group_norm(64, 8).num_groups == 8


@pytest.mark.parametrize("dims", [2, 3])
def test_attention_levels_run(dims):
    torch.manual_seed(0)
    net = TimeUNet(dims, 1, 2, channels=(8, 16), num_res_blocks=2, attention_levels=(0, 1), num_heads=2)
    n_attn = sum(isinstance(m, AttentionBlock) for m in net.modules())
    assert n_attn == 2 * 2 + 1 + 2  # encoder 2 levels x 2 blocks, middle, decoder level 0 x 2
    out = net(torch.randn(1, 1, *([8] * dims)), torch.tensor([4.0]))
    assert out.shape == (1, 2, *([8] * dims))
    # mid_attention defaults to True iff attention_levels is non-empty
    assert sum(isinstance(m, AttentionBlock) for m in TimeUNet(dims, 1, 1, **TINY).modules()) == 0
    only_mid = TimeUNet(dims, 1, 1, mid_attention=True, **TINY)
    assert sum(isinstance(m, AttentionBlock) for m in only_mid.modules()) == 1


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    c, heads = 8, 2
    block = AttentionBlock(2, c, num_heads=heads, norm_groups=4)
    mha = nn.MultiheadAttention(c, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight.reshape(3 * c, c))
        mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(block.proj.weight.reshape(c, c))
        mha.out_proj.bias.copy_(block.proj.bias)
    x = torch.randn(2, c, 4, 5)
    seq = block.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
    ref = x + mha(seq, seq, seq, need_weights=False)[0].transpose(1, 2).reshape_as(x)
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_neck_receives_level_features():
    seen = []

    class Spy(nn.Module):
        def forward(self, feats):
            seen.extend(f.shape for f in feats)
            return feats

    net = TimeUNet(2, 1, 1, channels=(8, 16, 32), neck=Spy())
    net(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 2.0]))
    assert net.level_channels == [8, 16, 32]
    assert seen == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]

    class Bad(nn.Module):
        def forward(self, feats):
            return feats[:-1]

    with pytest.raises(ValueError, match="neck must return"):
        TimeUNet(2, 1, 1, channels=(8, 16), neck=Bad())(torch.randn(1, 1, 8, 8), torch.tensor([1.0]))


def test_tiny_unet_overfits_fixed_target():
    torch.manual_seed(0)
    net = TimeUNet(2, 1, 1, channels=(8, 16), activation="silu")
    x = torch.randn(1, 1, 16, 16)
    target = (torch.rand(1, 1, 16, 16) > 0.5).float()
    t = torch.tensor([3.0])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = nn.functional.binary_cross_entropy_with_logits(net(x, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_imgx_reference_parameter_count():
    # ImgX-DiffSeg reference: 3D, channels [32, 64, 128, 256], 4 image + 4 noisy-mask channels in, 4 classes out
    net = TimeUNet(3, 4 + 4, 4, channels=(32, 64, 128, 256))
    n = _n_params(net)
    print(f"ImgX reference TimeUNet parameters: {n:,}")
    assert 5_000_000 < n < 30_000_000


@pytest.mark.parametrize("dims", [2, 3])
def test_fixed_share_of_the_input_conv_gives_the_same_output(dims):
    """conv_in is linear: conv_in_fixed(first channels) + the rest (what ImgX computes once per window and
    reuses at every sampling step) equals the network on the whole input."""
    from diffseg.nets.slicewise import SliceWise

    torch.manual_seed(0)
    net = TimeUNet(dims, 5, 3, channels=[4, 8]).eval()
    image, x_t = torch.randn(2, 3, *[8] * dims), torch.randn(2, 2, *[8] * dims)
    t = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        whole = net(torch.cat([image, x_t], 1), t)
        torch.testing.assert_close(net(x_t, t, fixed=net.conv_in_fixed(image)), whole, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="fixed=conv_in_fixed"):
            net(torch.cat([image, x_t], 1), t, fixed=net.conv_in_fixed(image))
        if dims == 2:
            sw = SliceWise(net)
            fixed = sw.conv_in_fixed(image.unsqueeze(-1))
            torch.testing.assert_close(sw(x_t.unsqueeze(-1), t, fixed=fixed), whole.unsqueeze(-1),
                                       rtol=1e-4, atol=1e-5)
