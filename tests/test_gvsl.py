"""GVSL (METHODS.md §5.6 invariants 1-7, the three corrected defects, appearance in [0, 1], export drop-in).

Tiny networks at 32³ (cpu_smoke: ResEnc 8-16-32-64, S = 8) so the file runs in well under a minute on a CPU.
"""
import json
import math
import os

import pytest
import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from experiment_planning.ssl_layout import gvsl_layout
from ssl_nnunet.methods import get_method
from ssl_nnunet.methods.gvsl import (_box_count, _box_sum, affine_matrix, affine_theta, affine_warp, bezier_intensity,
                                     bound_affine_params, compose_displacement, gaussian_smooth, inpaint, local_ncc,
                                     local_shuffle, ncc_loss, smoothness_loss, warp)
from ssl_nnunet.utilities.errors import SSLInputError

P = (32, 32, 32)
NORM = dict(norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def textured(shape=(2, 1, 16, 20, 24), seed=0):
    """Smooth random texture (box-filtered noise), values of order 1."""
    x = torch.randn(shape, generator=gen(seed))
    return torch.nn.functional.avg_pool3d(x, 3, 1, 1) * 3


def method_plan(patch=P, **layout_overrides):
    layout = gvsl_layout(list(patch))
    layout.update({"affine_hidden": 16, "deform_hidden": 16, "min_shuffle_windows": 50})
    layout.update(layout_overrides)
    return {"pretrain_patch_size": list(patch), "layout": layout}


def build(in_ch=1, seed=0, patch=P, **layout_overrides):
    torch.manual_seed(seed)
    net = ResidualEncoderUNet(
        input_channels=in_ch, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        n_blocks_per_stage=[1, 1, 1, 1], num_classes=in_ch, n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True,
        deep_supervision=False, **NORM)
    return get_method("gvsl")(net, method_plan(patch, **layout_overrides), {}, in_ch)


def pair_batch(b=1, c=1, seed=0, patch=P):
    return textured((b * 2, c, *patch), seed).view(b, 2, c, *patch)


S16 = (16, 16, 16)  # smallest patch for the network (S = 8): the tests that run the U-Net use it


# ------------------------------------------------------------------------------ §5.6-1 affine: [I | 0], identity

def test_zero_affine_parameters_give_identity_matrix_and_warp():
    raw = {"rotation": torch.zeros(2, 3), "scale": torch.zeros(2, 3), "translation": torch.zeros(2, 3),
           "shear": torch.zeros(2, 6)}
    p = bound_affine_params(raw, [math.pi / 9, 0.25, math.pi / 18])
    m = affine_matrix(p["rotation"], p["scale"], p["shear"])
    theta = affine_theta(m, p["translation"], (16, 20, 24))
    assert torch.equal(m, torch.eye(3).expand(2, 3, 3))
    assert torch.equal(theta, torch.cat([torch.eye(3), torch.zeros(3, 1)], 1).expand(2, 3, 4))
    x = torch.randn(2, 3, 16, 20, 24, generator=gen())
    assert (affine_warp(x, m, p["translation"]) - x).abs().max() < 1e-5
    # bounds: saturated raw outputs stay inside (rot pi/9, scale 1 +- 0.25, shear pi/18)
    big = {k: 100 * torch.ones_like(v) for k, v in raw.items()}
    pb = bound_affine_params(big, [math.pi / 9, 0.25, math.pi / 18])
    assert torch.allclose(pb["rotation"], torch.full((2, 3), math.pi / 9)) and torch.allclose(pb["scale"],
                                                                                                torch.full((2, 3), 1.25))


# ------------------------------------------------------------------------------ §5.6-2 displacement warper

def test_zero_field_is_identity_and_unit_field_shifts_by_one_voxel():
    x = torch.randn(2, 2, 16, 20, 24, generator=gen(1))
    assert (warp(x, torch.zeros(2, 3, 16, 20, 24)) - x).abs().max() < 1e-5
    for ax in range(3):
        field = torch.zeros(2, 3, 16, 20, 24)
        field[:, ax] = 1.0  # documented: out(p) = x(p + e_ax), content moves towards lower indices
        out = warp(x, field)
        n = x.shape[2 + ax]
        assert (out.narrow(2 + ax, 0, n - 1) - x.narrow(2 + ax, 1, n - 1)).abs().max() < 1e-5
        assert out.narrow(2 + ax, n - 1, 1).abs().max() == 0  # read outside the patch -> zero padding


def test_known_translation_is_recovered_and_affine_path_matches_composed_field():
    x = torch.randn(1, 1, 16, 20, 24, generator=gen(2))
    eye = torch.eye(3)[None]
    # a translation of tau = 2 * 3 / n_1 (normalised) moves by exactly 3 voxels along a1 only (not a0 / a2)
    tau = torch.tensor([[0.0, 2 * 3 / 20, 0.0]])
    out = affine_warp(x, eye, tau)
    assert (out[:, :, :, :17] - x[:, :, :, 3:]).abs().max() < 1e-4
    disp = compose_displacement(eye, tau, x.shape[2:])
    assert torch.allclose(disp[:, 1], torch.full_like(disp[:, 1], 3.0)) and disp[:, [0, 2]].abs().max() < 1e-6
    # a general affine map: affine_grid (align_corners=False) and the voxel-space composition agree
    m = affine_matrix(torch.tensor([[0.2, -0.1, 0.15]]), torch.tensor([[1.1, 0.9, 1.05]]),
                      torch.tensor([[0.05, -0.05, 0.1, 0.0, -0.1, 0.02]]))
    tau = torch.tensor([[0.1, -0.05, 0.2]])
    assert (affine_warp(x, m, tau) - warp(x, compose_displacement(m, tau, x.shape[2:]))).abs().max() < 1e-4
    # composition: affine after a field phi equals warping by the affine map first, then by phi
    phi = torch.zeros(1, 3, 16, 20, 24)
    phi[:, 2] = 2.0
    two_step = warp(affine_warp(x, eye, tau), phi)
    one_step = warp(x, compose_displacement(eye, tau, x.shape[2:], phi))
    interior = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -6))
    assert (two_step[interior] - one_step[interior]).abs().max() < 1e-4


# ------------------------------------------------------------------------------ §5.6-3/4/5 losses

def test_ncc_minimum_for_identical_images_and_affine_intensity_invariance():
    x = textured()
    l_same = ncc_loss(x, x, [9, 9, 9])
    assert l_same < 1e-3
    assert abs(float(ncc_loss(x, 2 * x + 3, [9, 9, 9]) - l_same)) < 1e-4
    assert abs(float(ncc_loss(2 * x + 3, x, [9, 9, 9]) - l_same)) < 1e-4
    assert ncc_loss(x, textured(seed=5), [9, 9, 9]) > 0.5
    cc = local_ncc(x, torch.zeros_like(x), [9, 9, 9])  # flat image: cc = 0, not NaN
    assert torch.isfinite(cc).all() and cc.abs().max() < 1e-6


def test_box_sums_equal_a_zero_padded_box_convolution():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 9, 13, dtype=torch.float64)
    for window in ([9, 9, 9], [3, 1, 5], [1, 1, 1], [15, 3, 7]):
        k = torch.ones(3, 1, *window, dtype=torch.float64)  # per channel
        ref = torch.nn.functional.conv3d(x, k, padding=[w // 2 for w in window], groups=3)
        torch.testing.assert_close(_box_sum(x, window), ref)
        ones = torch.ones(1, 1, 11, 9, 13, dtype=torch.float64)
        count = torch.nn.functional.conv3d(ones, k[:1], padding=[w // 2 for w in window])
        torch.testing.assert_close(_box_count((11, 9, 13), window, x.device).double(), count)


def test_ncc_gradient_vanishes_at_the_identity():
    x = textured((1, 1, 20, 20, 20), seed=3)
    phi = torch.zeros(1, 3, 20, 20, 20, requires_grad=True)
    ncc_loss(warp(x, phi), x, [9, 9, 9]).backward()
    assert phi.grad.abs().max() < 1e-4
    # ... but not for a pair misaligned by one voxel along a1, where it points towards phi_1 = +1
    phi2 = torch.zeros(1, 3, 20, 20, 20, requires_grad=True)
    ncc_loss(warp(torch.roll(x, 1, dims=3), phi2), x, [9, 9, 9]).backward()
    assert phi2.grad.abs().max() > 1e-4 and phi2.grad[:, 1].sum() < 0


def test_smoothness_of_constant_field_is_zero():
    const = torch.ones(2, 3, 8, 9, 10) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    assert smoothness_loss(const) == 0
    ramp = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 3, 8, 9, 10)
    assert torch.isclose(smoothness_loss(ramp), torch.tensor(1.0 / 3))  # unit steps along a0 only


# ------------------------------------------------------------------------------ §5.6-6 affine head gets gradients

@pytest.mark.parametrize("affine_grad", [True, False])
def test_affine_head_receives_gradient_only_when_differentiable(affine_grad):
    m = build(affine_grad=affine_grad, patch=S16)
    m(pair_batch(patch=S16), generator=gen())["loss"].backward()
    for name in ("rotation", "scale", "translation", "shear"):
        g = getattr(m.affine_head, name).weight.grad
        if affine_grad:
            assert g is not None and g.abs().max() > 0, name
        else:  # the released code's detached matrix: nothing reaches the affine head
            assert g is None or g.abs().max() == 0, name
    assert m.deform_head.flow.weight.grad.abs().max() > 0
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.network.encoder.parameters())


# ------------------------------------------------------------------------------ §5.6-7 restoration target = clean A

def test_restoration_target_is_clean_a_and_terms():
    m = build(patch=S16)
    views = m.make_views(pair_batch(patch=S16), gen(4))
    assert (views["At"] - views["A"]).abs().max() > 0.1  # the appearance transform changed A
    out = m.match_pair(views)
    terms = m.losses(views, out)
    assert torch.isclose(terms["restore"], ((out["restored"] - views["A"]) ** 2).mean())
    assert not torch.isclose(terms["restore"], ((out["restored"] - views["At"]) ** 2).mean())
    w = m.weights
    assert torch.isclose(terms["loss"], w[0] * terms["ncc"] + w[1] * terms["smooth"] + w[2] * terms["restore"])
    assert torch.isclose(terms["sim"], 1 - terms["ncc"])
    for k, v in terms.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v), k
    assert out["phi"].abs().max() < 1e-2  # flow conv initialised N(0, 1e-5): initial field ~ 0


# ------------------------------------------------------------------------------ views

def test_channels_last_heads_compute_the_plain_convolutions():
    """The full-resolution heads run channels-last for speed: same values (and gradients) as the contiguous
    layers, contiguous outputs."""
    from ssl_nnunet.methods.gvsl import DeformHead, RestoreHead
    torch.manual_seed(0)
    deform, restore = DeformHead(4, 8), RestoreHead(4, 8, 1)
    nn.init.normal_(deform.flow.weight, std=0.1)
    fb, fa = (torch.randn(2, 4, 8, 10, 12, requires_grad=True) for _ in range(2))
    phi, rec = deform(fb, fa), restore(fa)
    assert phi.is_contiguous() and rec.is_contiguous() and phi.shape == (2, 3, 8, 10, 12)
    ref_phi = deform.flow(deform.trunk(torch.cat([fb, fa], dim=1)))
    ref_rec = nn.Sequential(*restore)(fa)
    torch.testing.assert_close(phi, ref_phi, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec, ref_rec, rtol=1e-4, atol=1e-5)
    g_fast = torch.autograd.grad((phi.square().sum() + rec.sum()), fa)[0]
    g_ref = torch.autograd.grad((ref_phi.square().sum() + ref_rec.sum()), fa)[0]
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_appearance_transforms_work_in_unit_range_and_map_back():
    # z-scored-like data with a fixed map [-3, 5] -> [0, 1]: in-painting noise spans the whole range
    x = (textured((2, 1, *P), 6) * 1.5 + 1).clamp(-3, 5)
    fixed = {"mode": "fixed", "range": [-3.0, 5.0], "percentiles": [0.5, 99.5]}
    m = build(intensity=fixed, appearance={"local_shuffle_p": 0.0, "nonlinear_p": 0.0, "inpaint": False})
    assert torch.allclose(m.appearance_transform(x, gen()), x, atol=1e-5)  # nothing applied: exact round trip
    m = build(intensity=fixed, appearance={"local_shuffle_p": 0.0, "nonlinear_p": 0.0, "inpaint": True,
                                           "inpaint_continue_p": 1.0, "inpaint_size": [0.4, 0.5]})
    xt = m.appearance_transform(x, gen(1))
    changed = xt[(xt - x).abs() > 1e-6]
    assert changed.numel() > 1000 and changed.min() < -2.0 and changed.max() > 4.0  # U[0,1) noise mapped back
    m = build(appearance={"local_shuffle_p": 1.0, "nonlinear_p": 1.0, "inpaint": True})  # per-patch percentiles
    xt = m.appearance_transform(x, gen(2))
    lo, hi = torch.quantile(x.flatten(1), 0.005, dim=1), torch.quantile(x.flatten(1), 0.995, dim=1)
    assert (xt.flatten(1).min(1).values >= lo - 1e-4).all() and (xt.flatten(1).max(1).values <= hi + 1e-4).all()


def test_individual_appearance_transforms():
    u = torch.rand(2, 2, 16, 16, 16, generator=gen(3))
    s = local_shuffle(u, [2, 2, 2], 100, 1.0, gen(1))
    assert torch.equal(s.flatten(1).sort(1).values, u.flatten(1).sort(1).values)  # a permutation
    assert ((s != u).flatten(1).sum(1) > 100).all()
    assert torch.equal(local_shuffle(u, [2, 2, 2], 100, 0.0, gen(1)), u)
    ramp = torch.linspace(0, 1, 101).view(1, 1, 101).expand(8, 1, 101)
    y = bezier_intensity(ramp, 1.0, 1000, gen(5))
    d = torch.diff(y[:, 0], dim=1)
    assert (y >= 0).all() and (y <= 1).all()
    assert ((d >= -1e-6).all(1) | (d <= 1e-6).all(1)).all()  # each curve is monotone (possibly inverted)
    assert torch.equal(bezier_intensity(ramp, 0.0, 1000, gen(5)), ramp)
    v = inpaint(u, 30, 1.0, [0.1, 0.2], gen(6))
    assert ((v != u).flatten(1).float().mean(1) > 0.01).all() and (v >= 0).all() and (v < 1).all()
    assert torch.equal(inpaint(u, 30, 0.0, [0.1, 0.2], gen(6)), u)


def test_spatial_augmentation_is_shared_and_elastic_smoothing():
    m = build(appearance={"local_shuffle_p": 0.0, "nonlinear_p": 0.0, "inpaint": False},
              intensity={"mode": "fixed", "range": [-100.0, 100.0]})  # wide range: no clipping
    x = textured((1, 1, *P), 7)
    views = m.make_views(torch.stack([x, x], dim=1), gen(8))
    assert torch.equal(views["A"], views["B"]) and torch.allclose(views["At"], views["A"], atol=1e-5)
    assert (views["A"] - x).abs().max() > 0.1  # the augmentation did move the image
    noise = torch.rand(1, 1, 24, 24, 24, generator=gen(9)) * 2 - 1
    sm = gaussian_smooth(noise, torch.tensor([10.0]))
    assert sm.std() < 0.05 * noise.std()  # sigma 10: heavily smoothed
    assert torch.allclose(gaussian_smooth(torch.ones(1, 1, 40, 8, 8), torch.tensor([1.0]))[0, 0, 3:-3, 3:-3, 3:-3],
                          torch.ones(34, 2, 2), atol=1e-4)  # normalised kernel


# ------------------------------------------------------------------------------ forward / previews / layout

def test_forward_multichannel_batch_and_previews():
    m = build(in_ch=2, patch=S16)
    terms = m(pair_batch(b=2, c=2, patch=S16), generator=gen())
    assert set(terms) == {"loss", "ncc", "smooth", "restore", "sim", "sim_gain"}
    assert terms["loss"].requires_grad and torch.isfinite(terms["loss"])
    rows = m.previews(pair_batch(b=2, c=2, patch=S16))
    assert [len(v) for v in rows.values()] == [4, 3]
    assert all(t.shape == S16 for v in rows.values() for t in v)
    with pytest.raises(ValueError, match="B, 2, C"):
        m(torch.zeros(1, 1, *S16))


def test_invalid_layout_is_rejected():
    with pytest.raises(SSLInputError, match="ncc_window"):
        build(ncc_window=[8, 9, 9])
    with pytest.raises(SSLInputError, match="ncc_window"):
        build(ncc_window=[33, 9, 9])
    with pytest.raises(SSLInputError, match="weights"):
        build(weights=[1.0, -1.0, 1.0])
    with pytest.raises(SSLInputError, match="intensity.range"):
        build(intensity={"mode": "fixed"})
    assert gvsl_layout([160, 160, 160])["ncc_window"] == [9, 9, 9]
    assert gvsl_layout([16, 32, 64])["ncc_window"] == [5, 9, 9]


# ------------------------------------------------------------------------------ pretrain -> export -> nnU-Net load

def test_pretrain_export_and_nnunet_load():
    """cpu_smoke pretraining for 2 iterations (matched pairs), export, nnU-Net's loader into a 3-class net."""
    from conftest import prepare_planned_dataset
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from ssl_nnunet.export.exporter import build_network_from_plans, export_bundle
    from ssl_nnunet.paths import nnunet_preprocessed
    from ssl_nnunet.training.run import pretrain

    did, name = 952, "Dataset952_GVSLSmoke"
    path = prepare_planned_dataset(did, "GVSLSmoke", n_cases=3, shape=(40, 44, 48), spacing=(2.0, 2.0, 2.0))
    with open(path) as f:
        plans = json.load(f)
    assert plans["ssl"]["methods"]["gvsl"]["layout"]["pair_patch"] == list(P)
    plans["ssl"]["methods"]["gvsl"].update(iterations_per_epoch=1, num_val_iterations=1)
    with open(path, "w") as f:
        json.dump(plans, f)

    trainer = pretrain(did, "gvsl", device="cpu", iterations=2, num_prefetch=0)
    assert len(trainer.iteration_losses) == 2 and all(math.isfinite(v) for v in trainer.iteration_losses)
    log = trainer.logger.get_checkpoint()
    for key in ("loss", "ncc", "smooth", "restore", "sim", "sim_gain"):
        assert len(log[f"train_{key}"]) == 2 and len(log[f"val_{key}"]) == 2, key
    assert any(f.startswith("preview_epoch_") for f in os.listdir(trainer.output_folder))
    batch = trainer.dataloader_train.sampler.next_batch()  # matched pairs of two different cases
    b = plans["ssl"]["methods"]["gvsl"]["batch_size"]
    assert batch.shape == (b, 2, 1, *P) and not torch.equal(batch[:, 0], batch[:, 1])

    out = export_bundle(did, "gvsl", os.path.join(os.environ["nnUNet_results"], "gvsl_bundle"))
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    assert not any("head" in k for k in ckpt["network_weights"])  # heads are not exported
    with open(os.path.join(nnunet_preprocessed(), name, "sslFinetunePlans.json")) as f:
        ft_plans = json.load(f)
    net = build_network_from_plans(ft_plans, 1, 3, deep_supervision=True)
    load_pretrained_weights(net, os.path.join(out, "checkpoint_final.pth"))
    pretrained = trainer.network.state_dict()
    for k, v in net.state_dict().items():
        if ".seg_layers." not in k:
            assert torch.equal(v, pretrained[k].cpu()), k
