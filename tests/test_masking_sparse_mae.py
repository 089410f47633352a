"""Block masks, SparK-style sparse encoder and MAE (METHODS.md §2.2, §2.3, §2.5, §3.5 invariants 1-5).

Tiny networks at 32^3 (cpu_smoke: S = 8, q = 4) so the file runs in seconds on a CPU.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from ssl_nnunet.methods import get_method
from ssl_nnunet.methods.features import cumulative_strides, decoder_forward, encoder_forward
from ssl_nnunet.methods.masking import (expand_mask, masked_mse, num_hidden_units, per_unit_target,
                                        random_block_mask, unit_grid)
from ssl_nnunet.methods.sparse import (Densify, convert_encoder_to_sparse, derive_remask_strides,
                                       get_sparse_context, sparse_instance_norm, sparse_masked_forward)
from ssl_nnunet.utilities.errors import SSLInputError

ISO_STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
ANISO_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
NORM = dict(norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def resenc(strides=ISO_STRIDES, in_ch=1, seed=0):
    torch.manual_seed(seed)
    return ResidualEncoderUNet(
        input_channels=in_ch, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * 4, strides=strides, n_blocks_per_stage=[1, 1, 1, 1], num_classes=in_ch,
        n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True, deep_supervision=False, **NORM)


def plain(strides=ISO_STRIDES, in_ch=1, seed=0):
    torch.manual_seed(seed)
    return PlainConvUNet(
        input_channels=in_ch, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * 4, strides=strides, n_conv_per_stage=[1, 1, 1, 1], num_classes=in_ch,
        n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True, deep_supervision=False, **NORM)


# (builder, strides, unit, patch): isotropic ResEnc / PlainConv with q = 4, anisotropic ResEnc with unit (2, 4, 4)
CASES = {
    "resenc": (resenc, ISO_STRIDES, (4, 4, 4), (32, 32, 32)),
    "plain": (plain, ISO_STRIDES, (4, 4, 4), (32, 32, 32)),
    "resenc_aniso": (resenc, ANISO_STRIDES, (2, 4, 4), (16, 32, 32)),
}


def build_case(name, in_ch=1):
    builder, strides, unit, patch = CASES[name]
    return builder(strides, in_ch), unit, patch


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_mask(batch, patch, unit, ratio=0.75, seed=0):
    return random_block_mask(batch, unit_grid(patch, unit), ratio, generator=gen(seed))


# ---------------------------------------------------------------------------------------------- §3.5-1 masks

@pytest.mark.parametrize("grid,ratio", [((8, 8, 8), 0.75), ((3, 3, 3), 0.75), ((1, 1, 5), 0.5), ((2, 3, 4), 0.6)])
def test_random_block_mask_exact_hidden_count(grid, ratio):
    n = math.prod(grid)
    expected_hidden = math.floor(ratio * n + 0.5)
    mask = random_block_mask(6, grid, ratio, device="cpu", generator=gen(3))
    assert mask.shape == (6, 1, *grid) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    hidden = (mask == 0).flatten(1).sum(1)
    assert hidden.tolist() == [expected_hidden] * 6
    assert num_hidden_units(5, 0.5) == 3  # round half up, not banker's rounding (would give 2)
    # reproducible with the same seed, different between samples
    assert torch.equal(mask, random_block_mask(6, grid, ratio, device="cpu", generator=gen(3)))
    if n >= 27:
        assert not torch.equal(mask[0], mask[1])


def test_expand_mask_reproduces_units():
    mask = random_block_mask(2, (2, 3, 4), 0.5, generator=gen(1))
    shape = (4, 9, 16)  # unit (2, 3, 4)
    full = expand_mask(mask, shape)
    assert full.shape == (2, 1, *shape)
    ref = mask.repeat_interleave(2, 2).repeat_interleave(3, 3).repeat_interleave(4, 4)
    assert torch.equal(full, ref)
    # every unit block is constant and equals its unit's value
    blocks = full.reshape(2, 1, 2, 2, 3, 3, 4, 4)
    assert torch.equal(blocks.amax(dim=(3, 5, 7)), mask) and torch.equal(blocks.amin(dim=(3, 5, 7)), mask)
    assert torch.equal(expand_mask(mask, (2, 3, 4)), mask)
    with pytest.raises(ValueError, match="integer multiple"):
        expand_mask(mask, (4, 8, 16))


# ------------------------------------------------------------------------------------ §3.5-2/3/4 sparse encoder

@pytest.mark.parametrize("case", list(CASES))
def test_leak_hidden_content_does_not_matter(case):
    net, unit, patch = build_case(case)
    convert_encoder_to_sparse(net)
    densify = Densify(net.encoder.output_channels, nn.Conv3d)
    mask = make_mask(2, patch, unit)
    m = expand_mask(mask, patch)
    x1 = torch.randn(2, 1, *patch, generator=gen(5))
    x2 = torch.where(m.bool(), x1, 10 * torch.randn(2, 1, *patch, generator=gen(6)))
    assert not torch.equal(x1, x2)
    with torch.no_grad():
        e1, d1, o1 = sparse_masked_forward(net, x1, mask, densify)
        e2, d2, o2 = sparse_masked_forward(net, x2, mask, densify)
    assert len(e1) == 4 and len(d1) == 3 and o1.shape == (2, 1, *patch)
    for a, b in zip(e1 + d1 + [o1], e2 + d2 + [o2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_positions_exactly_zero_in_remasked_maps(case):
    net, unit, patch = build_case(case)
    convert_encoder_to_sparse(net)
    mask = make_mask(2, patch, unit)
    grid = mask.shape[2:]
    seen = {"remasked": 0, "dense": 0, "conv_into_norm": 0}

    def check(module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 5:
            return
        if not getattr(module, "_ssl_mask_output", True):
            # a conv whose output only feeds a sparse norm (which masks it first): checked at the norm's output,
            # bit-identity to masking it here in test_skipping_the_conv_mask_before_a_sparse_norm_is_exact
            seen["conv_into_norm"] += 1
            return
        if all(s % g == 0 for s, g in zip(output.shape[2:], grid)):
            hidden = expand_mask(mask, output.shape[2:]) == 0
            assert torch.all(output.masked_select(hidden.expand_as(output)) == 0), type(module).__name__
            seen["remasked"] += 1
        else:
            seen["dense"] += 1

    # hooks only in the test, to inspect every intermediate map of the encoder
    handles = [mod.register_forward_hook(check) for mod in net.encoder.modules()]
    x = torch.randn(2, 1, *patch, generator=gen(2))
    with torch.no_grad():
        enc, _, _ = sparse_masked_forward(net, x, mask)
    for h in handles:
        h.remove()
    assert seen["remasked"] > 10 and seen["dense"] > 0 and seen["conv_into_norm"] > 0
    remask = [tuple(s) for s in derive_remask_strides(net, unit)]
    for e, s in zip(enc, cumulative_strides(net)):
        hidden = expand_mask(mask, e.shape[2:]) == 0 if s in remask else None
        if hidden is not None:
            assert torch.all(e.masked_select(hidden.expand_as(e)) == 0)
    # the bottleneck (stride 8 resp. (4, 8, 8), coarser than the unit) is computed densely
    assert tuple(cumulative_strides(net)[-1]) not in remask
    assert (enc[-1] != 0).float().mean() > 0.3


@pytest.mark.parametrize("case", list(CASES))
def test_all_ones_mask_and_no_mask_equal_plain_network(case):
    net, unit, patch = build_case(case)
    ref = copy.deepcopy(net)  # plain network, same weights
    convert_encoder_to_sparse(net)
    x = torch.randn(2, 1, *patch, generator=gen(4))
    ones = torch.ones(2, 1, *unit_grid(patch, unit))
    with torch.no_grad():
        e_ref = encoder_forward(ref, x)
        _, o_ref = decoder_forward(ref, e_ref)
        e_sp, _, o_sp = sparse_masked_forward(net, x, ones)  # no densify: plain decoder on sparse skips
        out_none = net(x)  # converted network, no mask active
    # float32 round-off of the masked statistics (E[x^2] - mean^2) scales with the magnitude of each map
    for a, b in zip(e_ref, e_sp):
        assert (a - b).abs().max() < 1e-5 * max(1.0, float(a.abs().max()))
    assert (o_ref - o_sp).abs().max() < 1e-5 * max(1.0, float(o_ref.abs().max()))
    assert torch.equal(out_none, o_ref)
    assert torch.equal(ref(x), o_ref)


@pytest.mark.parametrize("case", list(CASES))
def test_skipping_the_conv_mask_before_a_sparse_norm_is_exact(case):
    """Convs feeding a sparse instance norm skip their output mask; the masked forward stays bit-identical to
    masking every conv output (and hidden positions of re-masked maps stay 0)."""
    from ssl_nnunet.methods.sparse import _MaskedOutput
    net, unit, patch = build_case(case)
    convert_encoder_to_sparse(net)
    convs = [m for m in net.encoder.modules() if isinstance(m, _MaskedOutput) and isinstance(m, nn.Conv3d)]
    skipped = [m for m in convs if not m._ssl_mask_output]
    assert skipped and len(skipped) == len(convs)  # every encoder conv of these U-Nets is followed by a norm
    x = torch.randn(2, 1, *patch, generator=gen(5))
    mask = random_block_mask(2, unit_grid(patch, unit), 0.75, generator=gen(6))
    with torch.no_grad():
        e_fast, _, o_fast = sparse_masked_forward(net, x, mask)
        for m in skipped:
            m._ssl_mask_output = True
        e_ref, _, o_ref = sparse_masked_forward(net, x, mask)
    assert all(torch.equal(a, b) for a, b in zip(e_fast, e_ref)) and torch.equal(o_fast, o_ref)


def test_sparse_instance_norm_matches_gather_with_unequal_counts():
    x = torch.randn(3, 4, 8, 8, 8, generator=gen(7))
    m = torch.zeros(3, 1, 8, 8, 8)
    m[0, :, :4] = 1
    m[1, :, :, 2:7, 1:] = 1
    m[2] = 1
    w, b = torch.randn(4), torch.randn(4)
    y = sparse_instance_norm(x, m, w, b, eps=1e-5)
    for i in range(3):
        sel = m[i, 0].bool()
        v = x[i][:, sel]  # (C, n_visible)
        ref = (v - v.mean(1, keepdim=True)) / torch.sqrt(v.var(1, unbiased=False, keepdim=True) + 1e-5)
        ref = ref * w[:, None] + b[:, None]
        assert (y[i][:, sel] - ref).abs().max() < 1e-5
        assert torch.all(y[i][:, ~sel] == 0)
    # all-visible == F.instance_norm
    ones = torch.ones(3, 1, 8, 8, 8)
    assert (sparse_instance_norm(x, ones, w, b) - F.instance_norm(x, weight=w, bias=b, eps=1e-5)).abs().max() < 1e-5


def test_converted_state_dict_loads_strictly_into_plain_network():
    net, unit, patch = build_case("resenc")
    keys_before = list(net.state_dict().keys())
    mae = get_method("mae")(net, {"pretrain_patch_size": list(patch), "layout": {"mask_unit": list(unit)}}, {}, 1)
    # one optimisation step so the weights differ from any fresh initialisation
    opt = torch.optim.SGD(mae.parameters(), lr=0.1)
    mae(torch.randn(2, 1, *patch, generator=gen(1)), gen(2))["loss"].backward()
    opt.step()
    sd = mae.network.state_dict()
    assert list(sd.keys()) == keys_before
    assert not any("densify" in k or "mask_token" in k for k in sd)
    fresh = resenc(seed=123)
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(1, 1, *patch, generator=gen(3))
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
    assert get_sparse_context(fresh) is None and get_sparse_context(net) is not None
    assert convert_encoder_to_sparse(net) is get_sparse_context(net)  # idempotent


# ------------------------------------------------------------------------------------------- §3.5-5 loss

def test_masked_mse_ignores_visible_voxels():
    patch, unit = (16, 16, 16), (4, 4, 4)
    x = torch.randn(2, 2, *patch, generator=gen(1))
    mask = make_mask(2, patch, unit)
    m = expand_mask(mask, patch)
    pred = torch.randn(2, 2, *patch, generator=gen(2))
    loss = masked_mse(pred, x, m)
    perturbed = torch.where(m.bool(), pred + 100 * torch.randn(pred.shape, generator=gen(3)), pred)
    perturbed[:, :, 0, 0, 0] = torch.where(m[:, :, 0, 0, 0].bool(), torch.inf, perturbed[:, :, 0, 0, 0])
    assert torch.equal(masked_mse(perturbed, x, m), loss)
    assert masked_mse(x, x, m).item() == 0.0
    hidden = (1 - m).expand_as(x)
    manual = (((pred - x) ** 2) * hidden).sum() / hidden.sum()
    assert torch.allclose(loss, manual, rtol=1e-6)
    assert loss.dtype == torch.float32
    assert masked_mse(pred.half(), x.half(), m).dtype == torch.float32


def test_per_unit_target_normalises_each_unit():
    x = 3 + 2 * torch.randn(2, 2, 8, 12, 16, generator=gen(1))
    t = per_unit_target(x, (2, 4, 4))
    blocks = t.reshape(2, 2, 4, 2, 3, 4, 4, 4)
    assert blocks.mean(dim=(3, 5, 7)).abs().max() < 1e-4
    assert (blocks.var(dim=(3, 5, 7), unbiased=False) - 1).abs().max() < 1e-3
    assert not t.requires_grad and t.dtype == torch.float32


# --------------------------------------------------------------------------------------------------- MAE

def _smooth_batch(shape, seed=0):
    x = torch.randn(shape, generator=gen(seed))
    for _ in range(3):
        x = F.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    return (x - x.mean()) / x.std()


def mae_method(net, unit, patch, **layout):
    unit = unit if isinstance(unit, int) else list(unit)
    plan = {"pretrain_patch_size": list(patch), "layout": {"mask_unit": unit, "mask_ratio": 0.75, **layout}}
    return get_method("mae")(net, plan, {"total_stride": [8, 8, 8], "mask_quantum": unit}, 1)


def test_mae_loss_decreases_on_fixed_batch():
    net, unit, patch = build_case("resenc")
    mae = mae_method(net, unit, patch, remask_strides=[[1, 1, 1], [2, 2, 2], [4, 4, 4]], target="none")
    x = _smooth_batch((2, 1, *patch))
    opt = torch.optim.Adam(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = mae(x, gen(11))  # same generator seed: same mask every step
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["rec_loss"].item())
    assert set(out) >= {"loss", "rec_loss"} and not out["rec_loss"].requires_grad
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses
    # every densify parameter receives gradient (no unused parameter for DDP); the dense bottleneck has no token
    assert sorted(mae.densify.mask_tokens.keys()) == ["0", "1", "2"]
    assert all(p.grad is not None for p in mae.densify.parameters())


@pytest.mark.parametrize("variant,target", [("dense", "none"), ("sparse", "per_unit")])
def test_mae_variants_and_previews(variant, target):
    net, unit, patch = build_case("resenc_aniso")
    mae = mae_method(net, unit, patch, variant=variant, target=target)
    assert (mae.densify is None) == (variant == "dense")
    assert (get_sparse_context(net) is None) == (variant == "dense")
    x = torch.randn(2, 1, *patch, generator=gen(1))
    out = mae(x, gen(2))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    rows = mae.previews(x)
    assert set(rows) == {"input", "masked input", "reconstruction", "visible + reconstruction"}
    for imgs in rows.values():
        assert len(imgs) == 1 and imgs[0].shape == patch
    assert mae.remask_strides == [[1, 1, 1], [1, 2, 2], [2, 4, 4]]


def test_mae_rejects_inconsistent_layout():
    net, unit, patch = build_case("resenc")
    with pytest.raises(SSLInputError, match="remask_strides"):
        mae_method(net, unit, patch, remask_strides=[[1, 1, 1], [2, 2, 2], [4, 4, 4], [8, 8, 8]])
    with pytest.raises(SSLInputError, match="target"):
        mae_method(resenc(), unit, patch, target="pixel")
    with pytest.raises(SSLInputError, match="divide"):
        mae_method(resenc(), (3, 4, 4), patch)
    # isotropic int unit and int stride entries are accepted
    mae = mae_method(resenc(), 4, patch, remask_strides=[1, 2, 4])
    assert mae.mask_unit == (4, 4, 4)
