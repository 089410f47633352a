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

from ssl_nnunet.methods import get_method
from ssl_nnunet.methods.alice import (CASA, cosine_loss, embedding_spread, pooled_info_nce, rotation_about_axis,
                                     strong_augment, token_info_nce)
from ssl_nnunet.training.schedule import build_optimizer
from ssl_nnunet.data.alice_pairs import CrossVolumeMatcher, CrossVolumePairSampler, centre_range
from ssl_nnunet.data.body_geometry import DatasetGeometry, cache_path, fit_profile_affine
from ssl_nnunet.data.samplers import SamplerSpec
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
    return images, CrossVolumeMatcher(DatasetGeometry.from_arrays(images, a_op=0))


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
    bbox_only = CrossVolumeMatcher(DatasetGeometry.from_arrays({k: images[k] for k in ("A", "crop")}, a_op=0,
                                                               kind="bbox"))
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
    m = DatasetGeometry.load_or_compute(ds, 0, verbose=False)
    path = cache_path(folder)
    assert path == str(tmp_path / "Dataset999_X" / "alice_matcher_sslPlans_3d_fullres.json")
    assert os.path.isfile(path) and not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")]
    assert ds.loads == 3
    again = DatasetGeometry.load_or_compute(ds, 0, verbose=False)
    assert ds.loads == 3 and again.to_json()["cases"] == m.to_json()["cases"]
    os.utime(os.path.join(folder, "shift.pkl"), ns=(1, 1))  # re-preprocessed case
    DatasetGeometry.load_or_compute(ds, 0, verbose=False)
    assert ds.loads == 6
    with open(path) as f:
        assert json.load(f)["out_of_plane_axis"] == 0


def test_make_sampler_reads_out_of_plane_axis_from_the_ssl_plan(tmp_path, matcher_cases):
    images, _ = matcher_cases
    folder = str(tmp_path / "Dataset999_X" / "sslPlans_3d_fullres")
    ds = _FakeDataset(folder, {k: images[k] for k in ("A", "shift")})
    plan = {"pretrain_patch_size": list(P), "layout": {**LAYOUT, "matcher": "bbox"}}
    for a_op in (1, 2):
        spec = SamplerSpec(ds, ["A", "shift"], list(P), 2, 0, plan, {"out_of_plane_axis": a_op}, folder)
        sampler = get_method("alice").make_sampler(spec)
        assert isinstance(sampler, CrossVolumePairSampler) and sampler.matcher.a_op == a_op
        with open(cache_path(folder)) as f:
            assert json.load(f)["out_of_plane_axis"] == a_op


def test_sampler_pairs_different_cases_at_corresponding_points(tmp_path, matcher_cases):
    images, m = matcher_cases
    ds = _FakeDataset(str(tmp_path / "d"), images)
    sampler = CrossVolumePairSampler(ds, ["A", "shift", "crop"], P, 4, m, seed=0)
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
    single = CrossVolumePairSampler(ds, ["A"], P, 3, m, seed=1, key_identifiers=sorted(images))
    single.next_batch()
    assert all(s == "A" and t != "A" for s, t, *_ in single.last_pairs)
    with pytest.raises(ValueError):
        CrossVolumePairSampler(ds, ["A"], P, 1, m)


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
    assert a.ema_momentum_at(-1, 100) == pytest.approx(0.99) and a.ema_momentum_at(99, 100) == pytest.approx(1.0)
    assert 0.99 < a.ema_momentum_at(49, 100) < 1.0

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


def test_forward_terms_total_and_chance_levels_infonce():
    a = alice()
    assert a.similarity == "infonce" and a.center_momentum is None
    a.train()
    terms = a(torch.randn(2, 2, 1, *P), gen())
    assert set(terms) == {"loss", "rec_loss", "dv_loss", "st_loss", "cls_std", "token_std", "dv_chance", "st_chance"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    assert terms["loss"].item() == pytest.approx(
        (terms["rec_loss"] + terms["dv_loss"] + terms["st_loss"]).item(), rel=1e-5)
    # 2 pairs: 3 candidates per pooled row; 16 visible tokens per view; both terms summed over Q and K
    assert terms["dv_chance"].item() == pytest.approx(2 * math.log(3)) and terms["st_chance"].item() == pytest.approx(
        2 * math.log(16))
    assert a.center_dv.abs().sum() == 0 and a.center_st.abs().sum() == 0        # no centring with InfoNCE


def test_info_nce_invariants():
    """Distinct identical student/teacher tokens: far below chance; constant embeddings: exactly log N."""
    tokens = torch.eye(16, 24)[None].repeat(3, 1, 1) + 0.01 * torch.randn(3, 16, 24)
    assert token_info_nce(tokens, tokens, 0.2).item() < 0.5 * math.log(16)
    assert token_info_nce(tokens, tokens.flip(1), 0.2).item() > math.log(16)      # wrong pairing: above chance
    const = torch.ones(3, 16, 24)
    assert token_info_nce(torch.randn(3, 16, 24), const, 0.2).item() == pytest.approx(math.log(16), abs=1e-5)
    assert token_info_nce(const, const, 0.2).item() == pytest.approx(math.log(16), abs=1e-5)
    b = 4
    emb = torch.eye(2 * b, 12)
    paired = torch.cat([emb[b:], emb[:b]])                                         # teacher of the other crop
    assert pooled_info_nce(emb, paired, b, 0.1).item() < 0.01
    assert pooled_info_nce(torch.randn(2 * b, 12), torch.ones(2 * b, 12), b, 0.1).item() == pytest.approx(
        2 * math.log(2 * b - 1), abs=1e-5)
    # a student row's own crop is no candidate: a teacher equal to the student gains nothing from it
    assert pooled_info_nce(emb, emb, b, 0.1).item() == pytest.approx(2 * math.log(2 * b - 1), abs=1e-5)


def test_st_loss_has_no_encoder_free_minimum():
    """Issue 14 item 8: a zero key/value LayerNorm in CASA makes every value token equal, so S and T are
    constant whatever the encoder. The cosine ℓ_st is then at its minimum 0 (an encoder-free solution); the
    InfoNCE ℓ_st is at its chance level instead, and with an intact CASA it depends on the encoder."""
    batch = torch.randn(1, 2, 1, *P, generator=gen(1))
    for similarity, expect in (("cosine", 0.0), ("infonce", 2 * math.log(16))):
        a = alice(similarity=similarity, center_momentum=None)
        a.eval()
        with torch.no_grad():
            a.casa.norm_kv.weight.zero_()
            a.casa.norm_kv.bias.zero_()
        st = [a(batch, gen(2))["st_loss"].item()]
        with torch.no_grad():
            for p in a.network.encoder.parameters():
                p.add_(0.3 * torch.randn_like(p))
        st.append(a(batch, gen(2))["st_loss"].item())
        assert st == pytest.approx([expect, expect], abs=1e-4), similarity          # encoder-free value
    a = alice()
    a.eval()
    before = a(batch, gen(2))["st_loss"].item()
    assert before < 2 * math.log(16) - 1e-3 or before > 2 * math.log(16) + 1e-3
    with torch.no_grad():
        for p in a.network.encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert abs(a(batch, gen(2))["st_loss"].item() - before) > 1e-3                  # depends on the encoder


def test_adamw_excludes_norms_and_biases_from_decay_alice():
    """Every AdamW plan: ≥ 2-dim tensors decay, norm weights and biases (CASA's key/value LayerNorm among
    them) do not, so weight decay cannot pull the norm gain towards the encoder-free minimum."""
    a = alice()
    params = [p for p in a.parameters() if p.requires_grad]
    opt = build_optimizer(params, {"name": "AdamW", "lr": 0.1, "weight_decay": 0.5})
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)
    ids = {id(p) for p in no_decay["params"]}
    assert {id(a.casa.norm_kv.weight), id(a.casa.norm_kv.bias), id(a.casa.w_v.bias)} <= ids
    assert id(a.casa.w_v.weight) not in ids
    before_norm, before_w = a.casa.norm_kv.weight.detach().clone(), a.casa.w_v.weight.detach().clone()
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()                                                                      # zero gradient: decay only
    assert torch.equal(a.casa.norm_kv.weight, before_norm)
    assert torch.allclose(a.casa.w_v.weight, before_w * (1 - 0.1 * 0.5))
    sgd = build_optimizer(params, {"name": "SGD", "lr": 0.1, "weight_decay": 0.5})
    assert len(sgd.param_groups) == 1


def test_forward_terms_total_and_centres_cosine():
    a = alice(similarity="cosine")
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
    with pytest.raises(SSLInputError, match="similarity"):
        alice(similarity="dino")


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
