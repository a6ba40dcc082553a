"""TimeUNet (docs/methods.md §1-§3): shapes, time conditioning, attention vs torch MHA, errors, learning."""

import pytest
import torch
import torch.nn.functional as F
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
def test_gradient_reaches_every_parameter_and_every_input_voxel(dims, size, upsample):
    """Every weight takes part in the output (no dead branch, no unused skip or time projection), and one
    output voxel depends on the whole input (GroupNorm statistics and the deepest level span the image)."""
    torch.manual_seed(0)
    net = TimeUNet(dims, 3, 2, channels=(8, 16, 32), upsample=upsample, attention_levels=(2,))
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = net(x, torch.tensor([0.0, 7.5]))
    assert out.shape == (2, 2, *size)  # the input's spatial size
    out[(0, 1, *(s // 2 for s in size))].backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    assert (x.grad[0].abs().sum(0) > 0).all()  # every input voxel of sample 0 reaches that output voxel
    assert (x.grad[1] == 0).all()  # and none of sample 1 (samples are independent)


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


# ---------------------------------------------------------------- improved-diffusion options (SegDiff, §2)
IDDPM = dict(skips="block", time_conditioning="scale_shift", activation="silu", upsample="nearest")


@pytest.mark.parametrize("dims", [2, 3])
def test_block_skips_layout_and_shapes(dims):
    """A skip per block: conv_in, every encoder res(+attn) block and every down conv; num_res_blocks + 1
    decoder blocks per level, each on cat(h, the last unused skip); down convs keep the width."""
    torch.manual_seed(0)
    channels, nrb = (8, 16, 32), 2
    net = TimeUNet(dims, 3, 1, channels=channels, num_res_blocks=nrb, attention_levels=[2], **IDDPM)
    assert net.skip_channels == [8, 8, 8, 8, 16, 16, 16, 32, 32]
    assert len(net.output_blocks) == len(channels) * (nrb + 1)
    res_in = [blk.blocks[0].conv1.in_channels for blk in net.output_blocks]
    assert res_in == [32 + 32, 32 + 32, 32 + 16, 32 + 16, 16 + 16, 16 + 8, 16 + 8, 8 + 8, 8 + 8]
    ups = [i for i, blk in enumerate(net.output_blocks) if type(blk.blocks[-1]).__name__ == "Resample"]
    assert ups == [nrb, 2 * nrb + 1]  # the last block of every level but the first
    x = torch.randn(2, 3, *([8] * dims))
    out = net(x, torch.tensor([3.0, 900.0]))
    assert out.shape == (2, 1, *([8] * dims))
    out[(0, 0, *([4] * dims))].backward()  # every skip and every block takes part in the output
    dead = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    with pytest.raises(ValueError, match="neck"):
        TimeUNet(dims, 3, 1, channels=channels, neck=nn.Identity(), **IDDPM)
    with pytest.raises(ValueError, match="skips"):
        TimeUNet(dims, 3, 1, channels=channels, skips="level_and_block")


def test_scale_shift_norm_matches_its_formula():
    """scale_shift: [scale, shift] = Linear(SiLU(temb)); h2 = GroupNorm(conv1(...))·(1 + scale) + shift."""
    from diffseg.nets.blocks import ResBlock

    torch.manual_seed(0)
    block = ResBlock(2, 4, 6, time_dim=5, norm_groups=2, activation="silu", time_conditioning="scale_shift").eval()
    assert block.time_proj.out_features == 12
    x, temb = torch.randn(2, 4, 5, 5), torch.randn(2, 5)
    h = block.conv1(F.silu(block.norm1(x)))
    scale, shift = block.time_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
    h = F.group_norm(h, 2, block.norm2.weight, block.norm2.bias, eps=block.norm2.eps) * (1 + scale) + shift
    ref = block.skip(x) + block.conv2(F.silu(h))
    torch.testing.assert_close(block(x, temb), ref)
    with pytest.raises(ValueError, match="time_conditioning"):
        ResBlock(2, 4, 6, time_dim=5, time_conditioning="film")


def test_zero_init_blocks_start_as_identity():
    torch.manual_seed(0)
    net = TimeUNet(2, 2, 3, channels=(8, 16), attention_levels=[1], zero_init=True, **IDDPM)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1.0, 2.0])
    assert net(x, t).abs().max() == 0  # the output conv starts at zero
    res = net.input_blocks[0].blocks[0]  # 8 -> 8: its skip is the identity, its residual branch zero
    h = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(res(h, net._time(t, 2, h.device)), h)
    attn = net.input_blocks[2].blocks[1]
    torch.testing.assert_close(attn(torch.randn(2, 16, 4, 4).clone()) * 0, torch.zeros(2, 16, 4, 4))
    h16 = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(attn(h16), h16)
    # zero_init=False keeps the default initialisation (same seed, same weights as before the option)
    torch.manual_seed(0)
    plain = TimeUNet(2, 2, 3, channels=(8, 16), attention_levels=[1], **IDDPM)
    assert plain(x, t).abs().max() > 0


def test_input_features_are_added_after_conv_in():
    torch.manual_seed(0)
    net = TimeUNet(2, 1, 1, channels=(8, 16), **IDDPM).eval()
    x, t, f = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 8, 8, 8)
    hook = net.conv_in.register_forward_hook(lambda m, a, out: out + f)
    ref = net(x, t)
    hook.remove()
    torch.testing.assert_close(net(x, t, input_features=f), ref)


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
