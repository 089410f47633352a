"""VoCo (METHODS.md §4.7 invariants 1-5, the training signal, export).

Tiny cpu_smoke-sized networks: crops 16^3, base grid (1, 2, 2), region (16, 32, 32).
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from ssl_nnunet.methods import get_method
from ssl_nnunet.methods.helpers import split_into_cells
from ssl_nnunet.methods.voco import (augment_crops, clamp_logits, extract_crops, pairwise_cosine, position_accuracy,
                                     position_labels, prediction_loss, random_crop_starts, regularisation_loss)
from ssl_nnunet.utilities.errors import SSLInputError

NORM = dict(norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
            nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
CROP, GRID, REGION = [16, 16, 16], [1, 2, 2], [16, 32, 32]


def resenc(seed=0, in_ch=1):
    torch.manual_seed(seed)
    return ResidualEncoderUNet(
        input_channels=in_ch, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * 4, strides=STRIDES, n_blocks_per_stage=[1, 1, 1, 1], num_classes=in_ch,
        n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True, deep_supervision=False, **NORM)


def plain(seed=0, in_ch=1):
    torch.manual_seed(seed)
    return PlainConvUNet(
        input_channels=in_ch, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * 4, strides=STRIDES, n_conv_per_stage=[1, 1, 1, 1], num_classes=in_ch,
        n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True, deep_supervision=False, **NORM)


def plan(**layout):
    base = {"crop_size": CROP, "base_grid": GRID, "region_size": REGION, "n_target_crops": 2, "lambda_reg": 1.0,
            "loss_variant": "paper", "region_mode": "native", "proj_dims": [64, 64, 32],
            "projector_norm": "batch", "use_ema_teacher": False}
    base.update(layout)
    return {"pretrain_patch_size": list(base["crop_size"]), "layout": base, "batch_size": 2}


SSL_PLAN = {"out_of_plane_axis": 0, "total_stride": [8, 8, 8]}


def build(net=None, **layout):
    return get_method("voco")(net if net is not None else resenc(), plan(**layout), SSL_PLAN, 1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- §4.7-1 bases

def test_bases_tile_the_region_exactly():
    x = torch.randn(2, 3, 8, 12, 20)
    grid = (2, 3, 4)
    bases = split_into_cells(x, grid)
    assert bases.shape == (2, 24, 3, 4, 4, 5)
    for j, (k0, k1, k2) in enumerate(itertools.product(range(2), range(3), range(4))):
        assert torch.equal(bases[:, j], x[:, :, 4 * k0:4 * k0 + 4, 4 * k1:4 * k1 + 4, 5 * k2:5 * k2 + 5])
    # reassembling the bases reproduces the region; total voxel count is preserved (no overlap, no gap)
    back = bases.view(2, 2, 3, 4, 3, 4, 4, 5).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape)
    assert torch.equal(back, x)
    with pytest.raises(ValueError):
        split_into_cells(x, (3, 3, 4))


# ---------------------------------------------------------------------------------------------- §4.7-2 labels

def test_target_crops_and_position_labels():
    region, crop, grid = [8, 24, 24], [8, 12, 12], [1, 2, 2]
    starts = random_crop_starts(3, 50, region, crop, generator=gen(1))
    assert starts.shape == (3, 50, 3) and starts.dtype == torch.int64
    assert bool((starts >= 0).all()) and bool((starts + torch.tensor(crop) <= torch.tensor(region)).all())
    assert set(starts[..., 1].unique().tolist()) > {0, 12}  # covers the range, borders included
    y = position_labels(starts, crop, grid)
    assert y.shape == (3, 50, 4) and y.dtype == torch.float32
    assert bool((y >= 0).all()) and bool((y <= 1).all())
    torch.testing.assert_close(y.sum(-1), torch.ones(3, 50), atol=1e-6, rtol=0)
    assert int((y > 0).sum(-1).max()) <= 2 ** 2  # two split axes
    # brute force: overlap of the crop with each base, counted in voxels
    x = torch.arange(math.prod(region), dtype=torch.float32).view(1, 1, *region).expand(3, 1, *region)
    crops = extract_crops(x, starts, crop)
    base_id = torch.arange(4).view(1, 1, 2, 2).repeat_interleave(12, 2).repeat_interleave(12, 3).expand(1, 8, 24, 24)
    for b, t in [(0, 0), (1, 7), (2, 49)]:
        s = starts[b, t].tolist()
        assert torch.equal(crops[b, t, 0], x[b, 0, s[0]:s[0] + 8, s[1]:s[1] + 12, s[2]:s[2] + 12])
        ids = base_id[0, s[0]:s[0] + 8, s[1]:s[1] + 12, s[2]:s[2] + 12]
        expected = torch.stack([(ids == j).float().mean() for j in range(4)])
        torch.testing.assert_close(y[b, t], expected, atol=1e-6, rtol=0)
    # a crop placed exactly on base j gives the one-hot e_j
    on_bases = torch.tensor([[[0, 0, 0], [0, 0, 12], [0, 12, 0], [0, 12, 12]]])
    assert torch.equal(position_labels(on_bases, crop, grid), torch.eye(4).unsqueeze(0))


def test_views_shapes_and_device_ops():
    m = build()
    x = torch.randn(2, 1, *REGION)
    crops, labels, starts = m.make_views(x, gen(0))
    assert crops.shape == (2 * (4 + 2), 1, *CROP) and labels.shape == (2, 2, 4) and starts.shape == (2, 2, 3)
    # without augmentation the first n crops of every volume are its bases, the next n_t its target crops
    m.augmentation = {"p_flip": 0.0, "p_rot90": 0.0, "p_shift": 0.0, "shift": 0.0}
    crops, labels, starts = m.make_views(x, gen(0))
    crops = crops.view(2, 6, 1, *CROP)
    assert torch.equal(crops[:, :4], split_into_cells(x, GRID))
    assert torch.equal(crops[:, 4:], extract_crops(x, starts, CROP))
    with pytest.raises(ValueError):
        m.make_views(torch.randn(2, 1, 16, 32, 48))


def test_augment_crops():
    x = torch.randn(6, 2, 4, 6, 6)
    assert torch.equal(augment_crops(x, (1, 2), 0.0, 0.0, 0.0, 0.1, generator=gen()), x)
    flipped = augment_crops(x, (1, 2), 1.0, 0.0, 0.0, 0.0, generator=gen())
    assert torch.equal(flipped, x.flip(2).flip(3).flip(4))
    rot = augment_crops(x, (1, 2), 0.0, 1.0, 0.0, 0.0, generator=gen(3))
    for i in range(6):  # every crop is some in-plane rotation of itself, rotated as a whole (channels together)
        assert any(torch.equal(rot[i], torch.rot90(x[i], k, (2, 3))) for k in (1, 2, 3))
    shifted = augment_crops(x, (1, 2), 0.0, 0.0, 1.0, 0.1, generator=gen())
    offsets = (shifted - x).flatten(1)
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets), atol=1e-6)
    assert bool((offsets.abs() <= 0.1 + 1e-6).all()) and bool((offsets[:, 0].abs() > 0).all())
    # not square in-plane: only the 180-degree rotation is used
    y = torch.randn(4, 1, 4, 6, 8)
    rot = augment_crops(y, (1, 2), 0.0, 1.0, 0.0, 0.0, generator=gen())
    assert rot.shape == y.shape and torch.equal(rot, torch.rot90(y, 2, (3, 4)))


# ---------------------------------------------------------------------------------------------- §4.7-3/4 losses

def test_prediction_loss_zero_at_labels_and_stop_gradient_on_bases_with_stop():
    y = position_labels(random_crop_starts(2, 3, REGION, CROP, generator=gen(2)), CROP, GRID)
    assert abs(float(prediction_loss(y, y))) < 1e-5
    assert abs(float(prediction_loss(y, y, "official"))) < 1e-5
    assert float(prediction_loss(1 - y, y)) > 1.0  # far from the labels: large, finite
    assert torch.isfinite(prediction_loss(torch.ones_like(y), torch.zeros_like(y)))
    # through the method with base_gradient = "stop" (Eq. 1): L_pred gives no gradient to the base embeddings,
    # but does train the encoder
    m = build(base_gradient="stop")
    crops, labels, _ = m.make_views(torch.randn(2, 1, *REGION), gen(0))
    emb = m.embed(crops)
    q, p = m._split(emb, 2)
    assert q.shape == (2, 4, 32) and p.shape == (2, 2, 32)  # §4.7-5: (B, n, D), (B, n_t, D)
    logits, cos, q2 = m.logits_and_bases(crops, 2)
    assert logits.shape == (2, 2, 4) and q2.shape == (2, 4, 32) and cos.shape == (2, 2, 4)
    torch.testing.assert_close(logits.detach(), cos.clamp(0, 1))
    assert bool((logits >= 0).all()) and bool((logits <= 1).all())
    l_pred = prediction_loss(logits, labels)
    (g_q,) = torch.autograd.grad(l_pred, q2, retain_graph=True, allow_unused=True)
    assert g_q is None or torch.count_nonzero(g_q) == 0
    grads = torch.autograd.grad(l_pred, list(m.network.encoder.parameters()), allow_unused=True)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_trivial_solution_reference_term():
    """``L_pred_zero`` is L_pred of all-zero logits on the step's own labels (what collapsing every embedding to
    orthogonal achieves); it lies between 0 and the loss of maximally wrong logits."""
    m = build()
    x = torch.randn(2, 1, *REGION)
    terms = m(x, generator=gen(3))
    _crops, labels, _ = m.make_views(x, gen(3))
    assert torch.isclose(terms["L_pred_zero"], prediction_loss(torch.zeros_like(labels), labels))
    assert 0 < float(terms["L_pred_zero"]) < float(prediction_loss(1 - labels, labels))


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_regularisation_loss_orthogonal_and_identical(variant):
    eye = torch.eye(8)[:4].unsqueeze(0).repeat(3, 1, 1) * 2.5
    assert float(regularisation_loss(eye, variant)) < 1e-7
    same = torch.randn(3, 1, 8).repeat(1, 4, 1)
    assert abs(float(regularisation_loss(same, variant)) - 1.0) < 1e-5
    # paper: |cos| counts anti-correlated bases; official: ReLU^2 does not
    anti = torch.stack([torch.ones(8), -torch.ones(8)]).unsqueeze(0)
    assert abs(float(regularisation_loss(anti, variant)) - (1.0 if variant == "paper" else 0.0)) < 1e-5


def test_position_accuracy_and_cosine():
    y = torch.tensor([[[0.7, 0.3, 0.0, 0.0], [0.0, 0.1, 0.1, 0.8]]])
    assert float(position_accuracy(y, y)) == 1.0
    assert float(position_accuracy(y.flip(-1), y)) == 0.0
    a, b = torch.randn(2, 3, 5), torch.randn(2, 4, 5)
    torch.testing.assert_close(pairwise_cosine(a, b), F.cosine_similarity(a.unsqueeze(2), b.unsqueeze(1), dim=-1),
                               atol=1e-5, rtol=1e-5)


def test_clamp_logits_hard_and_straight_through():
    cos = torch.tensor([-0.5, 0.3, 1.2])
    for mode, grad in (("hard", [0.0, 1.0, 0.0]), ("straight_through", [1.0, 1.0, 1.0])):
        c = cos.clone().requires_grad_(True)
        out = clamp_logits(c, mode)
        torch.testing.assert_close(out.detach(), torch.tensor([0.0, 0.3, 1.0]))
        out.sum().backward()
        torch.testing.assert_close(c.grad, torch.tensor(grad))
    with pytest.raises(ValueError):
        clamp_logits(cos, "soft")


def test_embedding_pool_options():
    net = resenc()
    channels = sum(net.encoder.output_channels)
    assert build(resenc()).projector.net[0].in_features == channels
    m = build(resenc(), pool="avgmax")
    assert m.projector.net[0].in_features == 2 * channels
    terms = m(torch.randn(2, 1, *REGION), generator=gen(3))
    assert torch.isfinite(terms["loss"])
    with pytest.raises(SSLInputError):
        build(pool="median")


# ---------------------------------------------------------------------------------------------- training signal

@pytest.mark.parametrize("variant,teacher", [("paper", False), ("official", True)])
def test_loss_decreases_on_a_fixed_batch_and_decoder_stays_at_init(variant, teacher):
    torch.manual_seed(0)
    net = plain() if teacher else resenc()
    m = build(net, loss_variant=variant, use_ema_teacher=teacher)
    decoder_init = {k: v.clone() for k, v in net.decoder.state_dict().items() if not k.startswith("encoder.")}
    encoder_init = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    x = torch.randn(2, 1, *REGION)
    params = [p for p in m.parameters() if p.requires_grad]
    assert not any(p is q for p in params for q in net.decoder.seg_layers.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    losses = []
    for step in range(25):
        terms = m(x, generator=gen(7))  # the same views every step
        assert set(terms) == {"loss", "L_pred", "L_reg", "pos_acc", "L_pred_zero", "pos_acc_chance"}
        assert float(terms["pos_acc_chance"]) == 0.25
        assert all(v.dtype == torch.float32 and v.dim() == 0 for v in terms.values())
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        m.after_optimizer_step(step, 25)
        losses.append(float(terms["loss"].detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    # the decoder received no gradient and is bit-exactly at its initialisation; the encoder was trained
    for k, v in net.decoder.state_dict().items():
        if not k.startswith("encoder."):
            assert torch.equal(v, decoder_init[k]), k
    assert any(not torch.equal(v, encoder_init[k]) for k, v in net.encoder.state_dict().items())
    if teacher:  # EMA teacher: frozen, moved towards the student, not equal to it
        t_w = m.teacher.encoder.state_dict()
        s_w = net.encoder.state_dict()
        assert not any(p.requires_grad for p in m.teacher.parameters())
        assert any(not torch.equal(t_w[k], encoder_init[k]) for k in t_w)
        assert any(not torch.equal(t_w[k], s_w[k]) for k in t_w)


def test_ema_momentum_schedule_and_update():
    m = build(use_ema_teacher=True, ema_momentum=[0.5, 1.0])
    # the update after step `step` uses i = step + 1 steps done (ssl_nnunet.methods.ema)
    assert m.ema_momentum_at(-1, 10) == pytest.approx(0.5) and m.ema_momentum_at(9, 10) == pytest.approx(1.0)
    mu = m.ema_momentum_at(0, 10)
    assert mu == pytest.approx(1.0 - 0.5 * (math.cos(math.pi / 10) + 1) / 2)
    with torch.no_grad():
        for p in m.network.encoder.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in m.teacher.encoder.state_dict().items()}
    m.after_optimizer_step(0, 10)  # teacher moves by 1 - mu towards the student
    for k, v in m.teacher.encoder.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, mu * before[k] + (1 - mu) * m.network.encoder.state_dict()[k])


def test_layout_errors_and_projector_norm():
    assert get_method("voco").required_patch_size(plan()) == REGION
    for bad in ({"region_size": [16, 32, 48]}, {"crop_size": [12, 16, 16], "region_size": [12, 32, 32]},
                {"loss_variant": "v3"}, {"region_mode": "random"}, {"base_grid": [1, 1, 1], "region_size": CROP},
                {"projector_norm": "instance"}, {"base_gradient": "teacher"}, {"region_jitter": 0.7},
                {"region_mode": "body_resized", "resize_stage": 0.5}):
        with pytest.raises(SSLInputError):
            build(**bad)
    assert isinstance(build().projector.net[1], nn.BatchNorm1d)
    assert isinstance(build(projector_norm="layer").projector.net[1], nn.LayerNorm)
    small = plan(n_target_crops=1, base_grid=[1, 1, 2], region_size=[16, 16, 32])
    small["batch_size"] = 1  # 3 crops per step: BatchNorm falls back to LayerNorm
    with pytest.warns(UserWarning):
        m = get_method("voco")(resenc(), small, SSL_PLAN, 1)
    assert isinstance(m.projector.net[1], nn.LayerNorm)
    # the projector's BatchNorm uses batch statistics in eval mode too (validation = training behaviour)
    m = build().eval()
    x = torch.randn(2, 1, *REGION)
    torch.testing.assert_close(m(x, gen(1))["loss"], m.train()(x, gen(1))["loss"])


def test_previews():
    m = build()
    rows = m.previews(torch.randn(2, 1, *REGION))
    assert len(rows) == 3
    shapes = [[tuple(t.shape) for t in v] for v in rows.values()]
    assert shapes == [[tuple(REGION)], [tuple(CROP)] * 4, [tuple(CROP)] * 2]


# ---------------------------------------------------------------------------------------------- issue 14

def test_gradient_reaches_the_bases_with_prediction_and_not_with_stop():
    x = torch.randn(2, 1, *REGION)
    for mode in ("prediction", "stop"):
        m = build(base_gradient=mode)
        crops, labels, _ = m.make_views(x, gen(0))
        logits, _cos, q = m.logits_and_bases(crops, 2)
        (g_q,) = torch.autograd.grad(prediction_loss(logits, labels), q, allow_unused=True)
        has = g_q is not None and bool(torch.count_nonzero(g_q) > 0)
        assert has == (mode == "prediction"), mode
    # the default is the prediction gradient
    assert get_method("voco").layout_defaults["base_gradient"] == "prediction"


def test_position_accuracy_on_raw_cosines_and_ties():
    labels = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    # every cosine negative, the largest on a wrong base: raw accuracy 0; the clamped logits are all 0, an argmax
    # over them would credit base 0 (= crop 0's and crop 1's label); tie-aware scoring gives |T|/n instead
    raw = torch.tensor([[[-0.9, -0.5, -0.1, -0.8], [-0.7, -0.9, -0.2, -0.6], [-0.3, -0.9, -0.9, -0.6]]])
    assert float(position_accuracy(raw, labels)) == 0.0
    clamped = raw.clamp(0, 1)
    assert float((clamped.argmax(-1) == labels.argmax(-1)).float().mean()) == pytest.approx(2 / 3)
    assert float(position_accuracy(clamped, labels)) == pytest.approx((1 / 4 + 2 / 4 + 1 / 4) / 3)
    # a crop on two bases (tied labels) is right with either; a tied prediction gets the share it hits
    pred = torch.tensor([[[0.3, 0.1, 0.3, 0.0], [0.1, 0.6, 0.2, 0.0], [0.0, 0.2, 0.1, 0.4]]])
    assert float(position_accuracy(pred, labels)) == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    # through the method: pos_acc is computed on the raw cosines, pos_acc_chance = 1/n
    m = build()
    xb = torch.randn(2, 1, *REGION)
    terms = m(xb, generator=gen(4))
    crops, labels, _ = m.make_views(xb, gen(4))
    _, cos, _ = m.logits_and_bases(crops, 2)
    assert float(terms["pos_acc"]) == pytest.approx(float(position_accuracy(cos, labels)))
    assert float(terms["pos_acc_chance"]) == pytest.approx(1 / 4)


class _Cases:
    """A stand-in for nnU-Net's dataset: ``load_case`` → (data, None, None, {"ssl_body_bbox": box})."""

    def __init__(self, cases):
        self.cases = cases  # identifier -> (data (C, a0, a1, a2), bbox)
        self.source_folder = ""

    def load_case(self, identifier):
        data, box = self.cases[identifier]
        return data, None, None, {"ssl_body_bbox": box}


def _coordinate_volume(shape):
    """3 channels holding each voxel's a0, a1, a2 index (float32)."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return torch.stack(grids).numpy()


def test_body_box_regions_sit_at_the_same_relative_body_position():
    import numpy as np
    from ssl_nnunet.data.samplers import SamplerSpec, UnlabeledPatchSampler
    from ssl_nnunet.data.voco_regions import AnchoredRegionSampler
    shapes_boxes = {"a": ((40, 60, 60), [[5, 35], [10, 50], [4, 56]]),
                    "b": ((30, 80, 50), [[0, 30], [30, 76], [2, 30]]),
                    "c": ((24, 48, 90), [[3, 20], [1, 47], [50, 89]]),
                    "d": ((12, 20, 40), [[1, 11], [2, 18], [5, 35]])}  # smaller than the region on a0, a1: padded
    ds = _Cases({k: (_coordinate_volume(s), box) for k, (s, box) in shapes_boxes.items()})
    spec = SamplerSpec(ds, sorted(ds.cases), REGION, 2, 0, plan(region_mode="body_box"), SSL_PLAN, "")
    sampler = get_method("voco").make_sampler(spec)
    assert isinstance(sampler, AnchoredRegionSampler) and sampler.jitter == pytest.approx(0.1)
    assert type(get_method("voco").make_sampler(SamplerSpec(ds, sorted(ds.cases), REGION, 2, 0,
                                                            plan(region_mode="native"), SSL_PLAN, ""))) \
        is UnlabeledPatchSampler
    half = [r // 2 for r in REGION]
    offsets = {k: [] for k in ds.cases}
    for _ in range(40):
        for k in ds.cases:
            patch = sampler.sample_patch(k)
            assert patch.shape == (3, *REGION)
            shape, box = shapes_boxes[k]
            for ax in range(3):
                centre = float(patch[ax][tuple(half)])  # the coordinate of the region's centre voxel
                if shape[ax] < REGION[ax]:  # centred on the volume, padded with the channel minimum (0)
                    assert centre == half[ax] - (REGION[ax] - shape[ax]) // 2
                    continue
                want = (box[ax][0] + box[ax][1]) // 2
                want = min(max(want, REGION[ax] // 2), shape[ax] - REGION[ax] + REGION[ax] // 2 + 0)  # in volume
                offsets[k].append((ax, centre - want))
    for k, offs in offsets.items():
        for ax, off in offs:
            shape, box = shapes_boxes[k]
            lo_ok = REGION[ax] // 2
            hi_ok = shape[ax] - REGION[ax] + REGION[ax] // 2
            # within +-10 % of the region of the body-box centre, unless the volume edge clipped the region
            c = (box[ax][0] + box[ax][1]) // 2
            if lo_ok + 0.1 * REGION[ax] < c < hi_ok - 0.1 * REGION[ax]:
                assert abs(off) <= round(0.1 * REGION[ax]), (k, ax, off)
    # the jitter is used: not every draw of case "a" lands exactly on the centre (a1, a2 have room)
    assert len({off for ax, off in offsets["a"] if ax > 0}) > 1
    # the same relative body position across cases: the centre's place in the body box agrees within the jitter
    rel = {k: [] for k in ("a", "b")}
    for k in rel:
        for _ in range(30):
            patch = sampler.sample_patch(k)
            box = shapes_boxes[k][1]
            rel[k].append([(float(patch[ax][tuple(half)]) - box[ax][0]) / (box[ax][1] - box[ax][0])
                           for ax in range(3)])
    for ax in (1, 2):
        tol = 0.1 * REGION[ax] / min(shapes_boxes[k][1][ax][1] - shapes_boxes[k][1][ax][0] for k in rel) + 0.05
        assert abs(np.mean([r[ax] for r in rel["a"]]) - np.mean([r[ax] for r in rel["b"]])) < tol
        assert all(abs(r[ax] - 0.5) <= tol for k in rel for r in rel[k])


def test_body_resized_shapes_and_values():
    import numpy as np
    from ssl_nnunet.data.voco_regions import AnchoredRegionSampler, staging_size
    voco = get_method("voco")
    assert voco.required_patch_size(plan(region_mode="body_resized")) == [2 * r for r in REGION]
    assert voco.required_patch_size(plan(region_mode="body_resized", resize_stage=1)) == REGION
    assert voco.required_patch_size(plan(region_mode="body_box")) == REGION
    assert staging_size([16, 32, 30], 1.5) == [24, 48, 45]
    shape, box = (44, 80, 76), [[3, 39], [5, 75], [2, 71]]   # body box 36 x 70 x 69 (larger than 2R)
    a0, a1, a2 = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    linear = (0.5 * a0 + 0.25 * a1 - 0.1 * a2 + 3.0)[None]
    rough = torch.randn(1, *shape, generator=gen(5)).numpy()
    box_of = lambda v: torch.from_numpy(v[:, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]])[None]
    for stage in (1, 2):
        lay = dict(region_mode="body_resized", resize_stage=stage)
        m = build(**lay)
        m.augmentation = {"p_flip": 0.0, "p_rot90": 0.0, "p_shift": 0.0, "shift": 0.0}
        size = voco.required_patch_size(plan(**lay))
        for vol in (linear, rough):
            sampler = AnchoredRegionSampler(_Cases({"x": (vol, box)}), ["x"], size, 2, mode="body_resized")
            batch = sampler.next_batch()
            assert batch.shape == (2, 1, *size) and batch.dtype == torch.float32
            expected = F.interpolate(box_of(vol), size=REGION, mode="trilinear", align_corners=False)
            crops, _, _ = m.make_views(batch, gen(0))       # the device step resizes S -> R
            region = crops.view(2, 6, 1, *CROP)[:, :4]
            got = split_into_cells(expected.expand(2, -1, -1, -1, -1), GRID)
            if stage == 1 or vol is linear:  # one resize, or two that agree exactly on linear content
                torch.testing.assert_close(region, got, atol=1e-4, rtol=0)
            else:  # noise: exactly the CPU resize to S followed by the device resize S -> R
                two = F.interpolate(F.interpolate(box_of(vol), size=size, mode="trilinear", align_corners=False),
                                    size=REGION, mode="trilinear", align_corners=False)
                torch.testing.assert_close(region, split_into_cells(two.expand(2, -1, -1, -1, -1), GRID),
                                           atol=1e-5, rtol=0)
                assert not torch.allclose(region, got, atol=1e-2)
    with pytest.raises(ValueError):
        build(region_mode="body_resized").make_views(torch.randn(2, 1, *REGION))


def test_planner_check_rejects_unknown_region_mode_and_base_gradient():
    voco = get_method("voco")
    ssl = {**SSL_PLAN, "median_shape": [10.0, 10.0, 10.0]}
    assert voco.check_layout(plan(region_mode="body_box"), ssl)  # region larger than the median: warned
    assert voco.check_layout(plan(region_mode="body_resized"), ssl) == []  # resized: never padded
    for bad in ({"region_mode": "random"}, {"base_gradient": "none"}):
        with pytest.raises(SSLInputError, match=next(iter(bad))):
            voco.check_layout(plan(**bad), ssl)
