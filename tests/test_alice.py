"""Alice (METHODS.md §7.7 invariants 1-5): cross-volume matcher, EMA teacher, CASA, losses, sampler, export.

Tiny networks (cpu_smoke layout: S = 8, q = 4) at 16^3 for speed (4^3 = 64 tokens, 16 visible) and small
synthetic volumes; the end-to-end test uses the cpu_smoke plan (32^3).
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from conftest import prepare_planned_dataset
from ssl_nnunet.methods import get_method
from ssl_nnunet.methods.alice import CASA, cosine_loss, embedding_spread, rotation_about_axis, strong_augment
from ssl_nnunet.methods.alice_matcher import (CrossVolumeMatcher, MatchedPairSampler, cache_path, centre_range,
                                              fit_profile_affine, plan_out_of_plane_axis)
from ssl_nnunet.methods.masking import expand_mask, masked_mse, per_unit_target
from ssl_nnunet.utilities.errors import SSLInputError

P = (16, 16, 16)
LAYOUT = {"crop_size": list(P), "mask_unit": [4, 4, 4], "mask_ratio": 0.75, "token_stride": [4, 4, 4],
          "head": [32, 16, 24], "casa": {"dim": 16, "heads": 2}, "ema": [0.99, 1.0], "matcher": "profile_bbox",
          "recon_weight": 1.0, "center_momentum": 0.9, "use_predictor": False}


def resenc(seed=0):
    torch.manual_seed(seed)
    return ResidualEncoderUNet(
        input_channels=1, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        n_blocks_per_stage=[1, 1, 1, 1], num_classes=1, n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True,
        deep_supervision=False, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def alice(seed=0, **layout):
    plan = {"pretrain_patch_size": list(P), "layout": {**LAYOUT, **layout}}
    return get_method("alice")(resenc(seed), plan, {"out_of_plane_axis": 0}, 1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ matcher

def torso(length=70, h=40, w=44, seed=0):
    """Synthetic body along a0: radius varies with z, one bright 'organ' and one dark 'lung', empty ends."""
    rng = np.random.RandomState(seed)
    z = np.arange(length)[:, None, None]
    y = np.linspace(-1, 1, h)[None, :, None]
    x = np.linspace(-1, 1, w)[None, None, :]
    radius = 0.55 + 0.25 * np.sin(z / length * 2.6 * np.pi) ** 2
    body = ((y ** 2 + x ** 2) < radius ** 2) & (z >= 8) & (z < length - 6)
    organ = ((y - 0.1) ** 2 + (x + 0.2) ** 2 < 0.08) & (z > 20) & (z < 35)
    lung = ((y + 0.1) ** 2 + (x - 0.25) ** 2 < 0.06) & (z > 40) & (z < 58)
    img = np.where(body, 1.0, -1.0) + 1.5 * organ - 1.6 * lung
    return (img + 0.05 * rng.randn(length, h, w)).astype(np.float32)


@pytest.fixture(scope="module")
def matcher_cases():
    a = torso()
    shifted = np.full_like(a, -1.0)
    shifted[7:] = a[:-7]                                     # p -> p + 7 along a0
    cropped = a[15:].copy()                                  # field of view cut: p -> p - 15
    scaled = ndimage.zoom(a, (1.15, 1, 1), order=1)          # p -> p * 79 / 69 (zoom keeps the end voxels)
    inplane = np.full((70, 48, 44), -1.0, np.float32)
    inplane[:, 5:45] = a                                     # shift along a1: p1 -> p1 + 5
    images = {"A": a, "shift": shifted, "crop": cropped, "scale": scaled, "inplane": inplane}
    return images, CrossVolumeMatcher.from_arrays(images, a_op=0)


def test_matcher_identity(matcher_cases):
    _, m = matcher_cases
    for case in m.cases:
        for p in ([20, 10, 12], [33.5, 20, 30], [50, 30, 5]):
            q, valid = m.map_point(case, case, p)
            lo, hi = m.cases[case].bbox[0]
            assert np.allclose(q, p) and valid == (lo <= p[0] <= hi - 1)


@pytest.mark.parametrize("target, expected", [("shift", lambda z: z + 7), ("crop", lambda z: z - 15),
                                              ("scale", lambda z: z * 79 / 69)])
def test_matcher_recovers_shift_and_scale_along_out_of_plane_axis(matcher_cases, target, expected):
    _, m = matcher_cases
    assert m.cases[target].source == "profile"
    for z in range(20, 60, 4):
        q, valid = m.map_point("A", target, [z, 20, 22])
        assert valid
        assert abs(q[0] - expected(z)) <= 1.0, (target, z, q[0], expected(z))
        assert np.allclose(q[1:], [20, 22], atol=1.0)
        back, _ = m.map_point(target, "A", q)
        assert abs(back[0] - z) <= 1e-6


def test_profile_beats_body_box_when_the_field_of_view_is_cut(matcher_cases):
    images, _ = matcher_cases
    bbox_only = CrossVolumeMatcher.from_arrays({k: images[k] for k in ("A", "crop")}, a_op=0, kind="bbox")
    errors = [abs(bbox_only.map_point("A", "crop", [z, 20, 22])[0][0] - (z - 15)) for z in range(20, 60, 4)]
    assert max(errors) > 3  # the body box stretches the truncated case; the profile fit does not


def test_matcher_in_plane_shift_and_coverage(matcher_cases):
    _, m = matcher_cases
    for p in ([30, 12, 20], [40, 25, 30]):
        q, _ = m.map_point("A", "inplane", p)
        assert abs(q[1] - (p[1] + 5)) <= 1.0 and abs(q[0] - p[0]) <= 1.0
    # anatomy of A near its top is outside the cropped case's field of view
    _, valid = m.map_point("A", "crop", [10, 20, 22])
    assert not valid
    lo, hi = m.coverage("crop")
    assert lo < hi


def test_fit_profile_affine_known_map():
    rng = np.random.RandomState(0)
    ref = ndimage.gaussian_filter1d(rng.randn(120, 3), 3, axis=0)
    z = np.arange(100)
    case = np.stack([np.interp(1.1 * z + 4.0, np.arange(120), ref[:, f]) for f in range(3)], 1)
    scale, offset, ncc = fit_profile_affine(case, ref)
    assert abs(scale - 1.1) < 0.01 and abs(offset - 4.0) < 1.0 and ncc > 0.95


class _FakeDataset:
    def __init__(self, folder, images):
        self.source_folder, self.images, self.identifiers, self.loads = folder, images, sorted(images), 0
        os.makedirs(folder, exist_ok=True)
        for ident in self.identifiers:
            with open(os.path.join(folder, ident + ".pkl"), "w") as f:
                f.write(ident)

    def load_case(self, identifier):
        self.loads += 1
        return self.images[identifier][None], None, None, {}


def test_matcher_cache_beside_data_and_rebuilt_when_stale(tmp_path, matcher_cases):
    images, _ = matcher_cases
    folder = str(tmp_path / "Dataset999_X" / "sslPlans_3d_fullres")
    ds = _FakeDataset(folder, {k: images[k] for k in ("A", "shift", "crop")})
    m = CrossVolumeMatcher.load_or_build(ds, 0, verbose=False)
    path = cache_path(folder)
    assert path == str(tmp_path / "Dataset999_X" / "alice_matcher_sslPlans_3d_fullres.json")
    assert os.path.isfile(path) and not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")]
    assert ds.loads == 3
    again = CrossVolumeMatcher.load_or_build(ds, 0, verbose=False)
    assert ds.loads == 3 and again.to_json()["cases"] == m.to_json()["cases"]
    os.utime(os.path.join(folder, "shift.pkl"), ns=(1, 1))  # re-preprocessed case
    CrossVolumeMatcher.load_or_build(ds, 0, verbose=False)
    assert ds.loads == 6
    with open(path) as f:
        assert json.load(f)["out_of_plane_axis"] == 0


def test_plan_out_of_plane_axis(tmp_path):
    folder = tmp_path / "sslPlans_3d_fullres"
    folder.mkdir()
    plans = {"configurations": {"3d_fullres": {"data_identifier": "sslPlans_3d_fullres", "spacing": [1, 3, 1]}}}
    (tmp_path / "sslPlans.json").write_text(json.dumps(plans))
    assert plan_out_of_plane_axis(str(folder)) == 1
    plans["ssl"] = {"out_of_plane_axis": 2}
    (tmp_path / "sslPlans.json").write_text(json.dumps(plans))
    assert plan_out_of_plane_axis(str(folder)) == 2


def test_sampler_pairs_different_cases_at_corresponding_points(tmp_path, matcher_cases):
    images, m = matcher_cases
    ds = _FakeDataset(str(tmp_path / "d"), images)
    sampler = MatchedPairSampler(ds, ["A", "shift", "crop"], P, 4, m, seed=0)
    batch = sampler.next_batch()
    assert batch.shape == (4, 2, 1, *P) and batch.dtype == torch.float32
    for source, target, c_a, c_b, matched in sampler.last_pairs:
        assert source != target
        rng_b = centre_range(m.cases[target].bbox, m.cases[target].shape, P)
        assert all(lo <= c <= hi for c, (lo, hi) in zip(c_b, rng_b))
        if matched:
            mapped, _ = m.map_point(source, target, c_a)
            clamped = [min(max(round(v), lo), hi) for v, (lo, hi) in zip(mapped, rng_b)]
            assert c_b == clamped
    # a single query case (the trainer's held-out validation case) is paired with the other cases
    single = MatchedPairSampler(ds, ["A"], P, 3, m, seed=1, key_identifiers=sorted(images))
    single.next_batch()
    assert all(s == "A" and t != "A" for s, t, *_ in single.last_pairs)
    with pytest.raises(ValueError):
        MatchedPairSampler(ds, ["A"], P, 1, m)


# ------------------------------------------------------------------------------------------------ method

def test_ema_extremes_schedule_and_no_teacher_gradients():
    a = alice()
    assert all(not p.requires_grad for p in a.target_encoder.parameters())
    assert all(not p.requires_grad for p in a.psi.parameters())
    with torch.no_grad():
        for p in a.network.encoder.parameters():
            p.add_(0.5)
        for p in a.phi.parameters():
            p.add_(0.5)
    teacher = {k: v.clone() for k, v in a.target_encoder.state_dict().items()}
    a.ema_update(1.0)
    assert all(torch.equal(v, teacher[k]) for k, v in a.target_encoder.state_dict().items())
    a.ema_update(0.0)
    student = a.network.encoder.state_dict()
    assert all(torch.equal(v, student[k]) for k, v in a.target_encoder.state_dict().items())
    assert all(torch.equal(v, a.phi.state_dict()[k]) for k, v in a.psi.state_dict().items())
    assert a.ema_momentum(-1, 100) == pytest.approx(0.99) and a.ema_momentum(99, 100) == pytest.approx(1.0)
    assert 0.99 < a.ema_momentum(49, 100) < 1.0

    a.train()
    assert not a.target_encoder.training and not a.psi.training and a.network.training
    terms = a(torch.randn(1, 2, 1, *P), gen())
    terms["loss"].backward()
    assert all(p.grad is None for p in a.target_encoder.parameters())
    assert all(p.grad is None for p in a.psi.parameters())
    for module in (a.phi, a.casa, a.network.encoder, a.network.decoder, a.densify):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module


def test_casa_rows_sum_to_one_query_count_and_identical_keys_give_zero_loss():
    a = alice(center_momentum=None)
    a.eval()
    online, target, mask = a.make_views(torch.randn(2, 2, 1, *P), gen())
    out = a.branches(online, target, mask)
    assert out["V"].shape == (4, 16, 32) and out["H"].shape == (4, 64, 24) and out["Y"].shape == (4, 64, 24)
    assert torch.equal(out["token_mask"].sum(1), torch.full((4,), 16))  # 64 units, 48 hidden
    att, _ = a.casa.attention(out["V"], out["H"])
    assert att.shape == (4, 2, 16, 64)
    assert torch.allclose(att.sum(-1), torch.ones(4, 2, 16), atol=1e-5)
    same = out["H"].detach()
    s, t = a.casa(out["V"], same), a.casa_teacher(out["V"], same)
    assert torch.equal(s.float(), t)
    assert cosine_loss(s, t).item() == pytest.approx(0.0, abs=1e-6)


def test_casa_has_no_residual():
    casa = CASA(8, 6, 4, 2)
    q = torch.randn(1, 5, 8)
    keys = torch.randn(1, 7, 6)
    with torch.no_grad():
        casa.w_v.weight.zero_()
        casa.w_v.bias.zero_()
        casa.zeta.bias.zero_()
    assert torch.all(casa(q, keys) == 0)  # nothing of the query reaches the output


def test_cosine_loss_range():
    a, b = torch.randn(10, 7), torch.randn(10, 7)
    assert 0.0 <= cosine_loss(a, b).item() <= 4.0
    assert cosine_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(a, -a).item() == pytest.approx(4.0, abs=1e-5)
    assert embedding_spread(torch.ones(5, 7)).item() == pytest.approx(0.0, abs=1e-6)


def test_reconstruction_loss_counts_hidden_voxels_only():
    a = alice()
    a.eval()
    batch = torch.randn(2, 2, 1, *P)
    terms = a(batch, gen(3))
    online, target, mask = a.make_views(batch, gen(3))
    rec = a.branches(online, target, mask)["rec"].float()
    m = expand_mask(mask, P)
    t = per_unit_target(online, a.mask_unit)
    hidden = (m == 0).float()
    manual = sum(((rec[i] - t[i]) ** 2 * hidden[i]).sum() / hidden[i].sum() for i in (slice(0, 2), slice(2, 4)))
    assert terms["rec_loss"].item() == pytest.approx(manual.item(), rel=1e-5)
    everywhere = F.mse_loss(rec[:2], t[:2]) + F.mse_loss(rec[2:], t[2:])
    assert abs(terms["rec_loss"].item() - everywhere.item()) > 1e-4
    assert terms["rec_loss"].item() == pytest.approx(
        (masked_mse(rec[:2], t[:2], m[:2]) + masked_mse(rec[2:], t[2:], m[2:])).item(), rel=1e-6)


def test_forward_terms_total_and_centres():
    a = alice()
    a.train()
    terms = a(torch.randn(1, 2, 1, *P), gen())
    assert set(terms) == {"loss", "rec_loss", "dv_loss", "st_loss", "cls_std", "token_std"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    assert terms["loss"].item() == pytest.approx(
        (terms["rec_loss"] + terms["dv_loss"] + terms["st_loss"]).item(), rel=1e-5)
    assert a.center_dv.abs().sum() > 0 and a.center_st.abs().sum() > 0  # centres move in training mode
    centre = a.center_dv.clone()
    a.eval()
    a(torch.randn(1, 2, 1, *P), gen())
    assert torch.equal(a.center_dv, centre)  # but not in validation
    with pytest.raises(ValueError):
        a(torch.randn(2, 1, *P))


def test_predictor_option_and_layout_errors():
    a = alice(use_predictor=True)
    a(torch.randn(1, 2, 1, *P), gen())["loss"].backward()
    assert all(p.grad is not None for p in a.pred_dv.parameters())
    with pytest.raises(SSLInputError, match="token_stride"):
        alice(token_stride=[8, 8, 8])
    with pytest.raises(SSLInputError, match="matcher"):
        alice(matcher="sam")
    with pytest.raises(SSLInputError, match="divisible"):
        alice(casa={"dim": 10, "heads": 3})


def test_rotation_about_out_of_plane_axis_matches_rot90():
    x = torch.randn(1, 1, 6, 8, 8)
    theta = rotation_about_axis(torch.tensor([0.0]), 0, x.shape[2:])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    assert torch.allclose(F.grid_sample(x, grid, align_corners=False), x, atol=1e-5)
    theta = rotation_about_axis(torch.tensor([math.pi / 2]), 0, x.shape[2:])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    rotated = F.grid_sample(x, grid, align_corners=False)
    assert any(torch.allclose(rotated, torch.rot90(x, k, dims=(3, 4)), atol=1e-4) for k in (1, 3))
    assert strong_augment(x, 0, gen()).shape == x.shape


def test_export_excludes_teacher_and_heads():
    a = alice()
    keys = set(a.network.state_dict())
    assert keys == set(resenc().state_dict())
    resenc().load_state_dict(a.network.state_dict(), strict=True)
    assert not any(k.startswith(("target_encoder", "psi", "phi", "casa")) for k in keys)
    assert {"target_encoder", "psi", "phi", "casa", "densify"} <= {k.split(".")[0] for k in a.state_dict()}
    rows = a.previews(torch.randn(1, 2, 1, *P))
    assert all(len(v) == 2 and all(t.shape == P for t in v) for v in rows.values())


# ------------------------------------------------------------------------------------------------ end to end

def test_pretrain_export_and_load_into_finetune_network():
    """2 trainer iterations on a synthetic dataset (matched sampler via the make_sampler hook), export, and
    nnU-Net's load_pretrained_weights into the fine-tuning network with 3 classes."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from ssl_nnunet.export import export_bundle
    from ssl_nnunet.export.exporter import build_network_from_plans
    from ssl_nnunet.paths import nnunet_preprocessed
    from ssl_nnunet.training.run import pretrain

    dataset = "Dataset950_AliceSmoke"
    prepare_planned_dataset(950, "AliceSmoke", "alice", {"iterations_per_epoch": 2, "num_val_iterations": 1},
                            n_cases=5, shape=(40, 44, 48))

    trainer = pretrain(950, "alice", device="cpu", iterations=2, num_prefetch=0)
    assert len(trainer.iteration_losses) == 2 and all(np.isfinite(trainer.iteration_losses))
    for term in ("rec_loss", "dv_loss", "st_loss", "cls_std", "token_std"):
        assert len(trainer.logger.get_checkpoint()[f"train_{term}"]) == 1
    assert os.path.isfile(os.path.join(nnunet_preprocessed(), dataset, "alice_matcher_sslPlans_3d_fullres.json"))
    ckpt = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    assert not any(k.startswith(("target_encoder", "psi", "phi", "casa")) for k in ckpt["network_weights"])

    bundle = export_bundle(950, "alice", os.path.join(trainer.output_folder, "bundle"))
    with open(os.path.join(nnunet_preprocessed(), dataset, "sslFinetunePlans.json")) as f:
        finetune = json.load(f)
    net = build_network_from_plans(finetune, 1, 3, deep_supervision=True)
    load_pretrained_weights(net, os.path.join(bundle, "checkpoint_final.pth"), verbose=False)
    key = "encoder.stem.convs.0.conv.weight"
    assert torch.equal(net.state_dict()[key], ckpt["network_weights"][key])
