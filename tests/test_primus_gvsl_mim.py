"""MiM and GVSL on Primus: token-grid level masks and visible-token encoders (MiM), token map + patch-decoder
features (GVSL), loss that falls on a fixed batch, and the pipeline plan -> pretrain -> export -> the network of
nnU-Net's Primus trainer (``load_pretrained_weights``, every key checked)."""
import math
import os

import pytest
import torch

from helpers import load_primus_export_into_smoke_trainer_network, train_on_fixed_batch
from ssl_nnunet.backbones.primus import build_primus
from ssl_nnunet.methods.base import PlanningContext, merge_layout
from ssl_nnunet.methods.gvsl import GVSL, PrimusGVSL
from ssl_nnunet.methods.masking import expand_mask, num_hidden_units
from ssl_nnunet.methods.mim import MiM, PrimusMiM, mostly_hidden
from ssl_nnunet.utilities.errors import SSLInputError

TINY = {"embed_dim": 96, "patch_embed_size": [8, 8, 8], "eva_depth": 2, "eva_numheads": 4, "input_shape": [32, 32, 32],
        "drop_path_rate": 0.0, "scale_attn_inner": True, "init_values": 0.1}
SSL_PLAN = {"architecture_family": "primus", "total_stride": [8, 8, 8], "mask_quantum": [8, 8, 8],
            "median_shape": [40.0, 44.0, 48.0]}
CTX = PlanningContext(patch_size=(32, 32, 32), strides=((1, 1, 1),), spacing=(2.0, 2.0, 2.0),
                      median_shape=(40.0, 44.0, 48.0), profile="cpu_smoke", token_size=(8, 8, 8))
#: the shipped cpu overrides (plans/method_defaults.json)
CPU_LAYOUT = {"mim": {"gamma": 2, "beta": 1, "proj_dim": 256}, "gvsl": {"affine_hidden": 64, "deform_hidden": 16}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this file: next to the long benchmark on this 2-core machine, the 2 threads of
    conftest made the small ops here ~20x slower (2.5 s vs 50 s for the MiM fixed-batch test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _plan(cls, **layout):
    patch, lay = cls.default_layout(CTX)
    lay = cls.finalize_layout(patch, merge_layout(lay, {**CPU_LAYOUT[cls.name], **layout}), CTX)
    return {"pretrain_patch_size": patch, "layout": lay}


def _method(cls, seed=0, **layout):
    torch.manual_seed(seed)
    return cls(build_primus(TINY, 1, 1), _plan(cls, **layout), SSL_PLAN, 1)


def _eva_inputs(method):
    """Record the shape of every sequence entering the first EVA block."""
    seen = []
    hook = method.network.eva.blocks[0].register_forward_pre_hook(
        lambda mod, args, kw: seen.append(tuple(args[0].shape)), with_kwargs=True)
    return seen, hook


# ------------------------------------------------------------------------------------------------ MiM

def test_mim_primus_layout_is_a_token_layout():
    assert MiM.variant_for("primus") is PrimusMiM and MiM.variant_for("cnn") is MiM
    plan = _plan(PrimusMiM)
    lay = plan["layout"]
    assert plan["pretrain_patch_size"] == [32, 32, 32]
    # small images (median < 2P): the level-1 region is P split into halves; u2 and the level-1 mask unit are one
    # token (METHODS.md §6.4, Primus: multiples of q, not 2q)
    assert lay["level1_region"] == [32] * 3 and lay["level1_unit"] == [16] * 3
    assert lay["level1_mask_unit"] == [8] * 3 and lay["u2"] == [8] * 3 and lay["level3_zoom"] == [4] * 3
    assert lay["align_stride"] == [8] * 3 and lay["pixel_head"] == "linear" and lay["gamma"] == 2
    # the decoder tokens carry position (the paper's setting): no extra candidate embedding, context = token mean
    assert lay["candidate_position"] is False and lay["context_grid"] == [1, 1, 1]
    assert PrimusMiM.check_layout(plan, SSL_PLAN) == []
    bad = {**plan, "layout": {**lay, "align_stride": [4, 4, 4]}}
    with pytest.raises(SSLInputError, match="align_stride"):
        PrimusMiM.check_layout(bad, SSL_PLAN)
    with pytest.raises(SSLInputError, match="u2 .* token size"):
        PrimusMiM(build_primus(TINY, 1, 1), {**plan, "layout": {**lay, "u2": [4, 4, 4], "level3_zoom": [8] * 3}},
                  SSL_PLAN, 1)
    with pytest.raises(SSLInputError, match="position embedding"):
        PrimusMiM(build_primus(dict(TINY, input_shape=[48, 32, 32]), 1, 1), plan, SSL_PLAN, 1)


def test_mim_each_level_encodes_exactly_its_visible_tokens_and_aligns_on_hidden_units():
    m = _method(PrimusMiM).eval()
    B, gamma, beta = 2, m.gamma, m.beta
    x = torch.randn(B, 1, 32, 32, 32)
    views = m.make_views(x, torch.Generator().manual_seed(1))
    seen, hook = _eva_inputs(m)
    with torch.no_grad():
        outs = m.masked_forward(views)
    hook.remove()
    keep = [64 - num_hidden_units(64, r) for r in m.ratios]
    assert keep == [26, 26, 32]
    assert seen == [(B, keep[0], 96), (B * gamma, keep[1], 96), (B * gamma * beta, keep[2], 96)]
    d = m.decoder.norm.normalized_shape[0]
    for (tap, rec), n in zip(outs, (B, B * gamma, B * gamma * beta)):
        assert tap.shape == (n, d, 4, 4, 4) and rec.shape == (n, 1, 32, 32, 32)
    # the encoder never saw a hidden token: noise under level 1's hidden voxels changes nothing of level 1
    hidden1 = expand_mask(views.mask1, x.shape[2:]) == 0
    noisy = type(views)(**{**views.__dict__, "x1": torch.where(hidden1, 50 * torch.randn_like(views.x1), views.x1)})
    with torch.no_grad():
        tap_n, rec_n = m.masked_forward(noisy)[0]
    assert torch.equal(tap_n, outs[0][0]) and torch.equal(rec_n, outs[0][1])
    # candidates: the parent's mostly hidden level-1 units / its hidden level-2 units only (logit -inf elsewhere)
    assert torch.equal(views.valid12, mostly_hidden(views.mask1, m.grid1).repeat_interleave(gamma, 0))
    assert torch.equal(views.valid23, (views.mask2.flatten(1) == 0).repeat_interleave(beta, 0))
    for (coarse, fine, grid, labels, valid) in ((0, 1, m.grid1, views.label12, views.valid12),
                                                (1, 2, m.grid2, views.label23, views.valid23)):
        assert bool(valid.gather(1, labels[:, None]).all())       # the positive is always a real candidate
        tap_c = outs[coarse][0].clone().requires_grad_(True)
        tap_f = outs[fine][0].clone().requires_grad_(True)
        loss, logits = m.alignment(tap_c, grid, tap_f, labels, valid)
        assert logits.shape == (tap_f.shape[0], math.prod(grid))
        assert torch.equal(torch.isfinite(logits), valid)
        loss.backward()
        assert tap_c.grad is None and tap_f.grad is not None and float(tap_f.grad.abs().sum()) > 0  # sg on candidates
    out = m(x, torch.Generator().manual_seed(1))
    assert set(out) >= {"loss", "rec_l1", "rec_l2", "rec_l3", "align_12", "align_23", "align_12_chance",
                        "align_12_acc", "align_12_acc_chance", "align_23_chance", "align_23_acc",
                        "align_23_acc_chance"}
    assert float(out["align_23_chance"]) == pytest.approx(math.log(num_hidden_units(64, m.ratios[1])), rel=1e-6)
    assert m.untrained_parameters() and all(n.startswith("network.up_projection.") for n in m.untrained_parameters())
    rows = m.previews(x)  # the CNN class's preview rows, from the Primus pass
    assert len(rows) == 3 and all(len(r) == 3 and all(t.shape == (32, 32, 32) for t in r) for r in rows.values())


def test_mim_loss_falls_on_a_fixed_batch():
    m = _method(PrimusMiM, target="none").train()
    x = torch.randn(1, 1, 32, 32, 32).cumsum(2) / 8  # smooth, learnable content
    outs = train_on_fixed_batch(m, x, 12, 3e-3)
    assert outs[-1]["loss"] < 0.5 * outs[0]["loss"], [o["loss"] for o in outs]
    assert all(outs[-1][f"rec_l{lvl}"] < 0.7 * outs[0][f"rec_l{lvl}"] for lvl in (1, 2, 3)), outs[-1]
    assert outs[-1]["align_12"] < 0.5 * outs[-1]["align_12_chance"], outs[-1]  # the alignment is learned too


# ------------------------------------------------------------------------------------------------ GVSL

def test_gvsl_primus_features_and_heads():
    assert GVSL.variant_for("primus") is PrimusGVSL and GVSL.variant_for("cnn") is GVSL
    m = _method(PrimusGVSL).eval()
    assert m.patch == [32, 32, 32] and PrimusGVSL.check_layout(_plan(PrimusGVSL), SSL_PLAN) == []
    x = torch.randn(3, 1, 32, 32, 32)
    with torch.no_grad():
        f_g, f_l = m.global_local_features(x)
        from ssl_nnunet.backbones.primus import token_map
        tokens = token_map(m.network, x)
        half = m.network.up_projection.decode[:-1](tokens)
    assert f_g.shape == (3, 96, 4, 4, 4) and torch.allclose(f_g, tokens)
    assert half.shape == (3, 8, 16, 16, 16) and f_l.shape == (3, 8, 32, 32, 32)
    up = torch.nn.functional.interpolate(half, scale_factor=2, mode="trilinear", align_corners=False)
    assert torch.allclose(f_l, up, atol=1e-6)  # the patch decoder's last hidden map, trilinear x2
    assert m.deform_head.trunk[0].in_channels == 16 and m.affine_head.trunk[0].in_channels == 192
    last = len(m.network.up_projection.decode) - 1
    assert sorted(m.untrained_parameters()) == [f"network.up_projection.decode.{last}.bias",
                                                f"network.up_projection.decode.{last}.weight"]
    batch = torch.randn(2, 2, 1, 32, 32, 32)
    out = m(batch, torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "ncc", "smooth", "restore", "sim", "sim_gain"}
    rows = m.previews(batch)
    assert [len(r) for r in rows.values()] == [4, 3] and all(t.shape == (32, 32, 32) for r in rows.values() for t in r)
    m.train()(batch, torch.Generator().manual_seed(0))["loss"].backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert trained.isdisjoint(m.untrained_parameters())
    assert {n for n, _ in m.named_parameters()} - trained == set(m.untrained_parameters())
    tok = _method(PrimusGVSL, local_features="tokens").eval()
    with torch.no_grad():
        g_tok, l_tok = tok.global_local_features(x)
    assert g_tok.shape == (3, 96, 4, 4, 4) and l_tok.shape == (3, 8, 32, 32, 32)
    assert set(tok.untrained_parameters()) == {f"network.up_projection.{n}"
                                               for n, _ in tok.network.up_projection.named_parameters()}
    with pytest.raises(SSLInputError, match="local_features"):
        _method(PrimusGVSL, local_features="bottleneck")
    bad = _plan(PrimusGVSL)
    bad["layout"]["pair_patch"] = [48, 32, 32]
    with pytest.raises(SSLInputError, match="pair_patch"):
        PrimusGVSL(build_primus(TINY, 1, 1), bad, SSL_PLAN, 1)


def test_gvsl_loss_falls_on_a_fixed_batch():
    m = _method(PrimusGVSL).train()
    base = torch.randn(1, 1, 32, 32, 32).cumsum(2) / 8
    batch = torch.stack([base, torch.roll(base, 2, dims=3)], dim=1)  # (1, 2, C, 32, 32, 32)
    outs = train_on_fixed_batch(m, batch, 8, 2e-3)
    assert outs[-1]["loss"] < 0.9 * outs[0]["loss"], [o["loss"] for o in outs]
    assert outs[-1]["restore"] < 0.8 * outs[0]["restore"], [o["restore"] for o in outs]


# ------------------------------------------------------------------------------------------------ pipeline

@pytest.mark.parametrize("method", ["mim", "gvsl"])
def test_pretrain_export_loads_into_the_network_of_the_primus_trainer(primus_planned, method, tmp_path):
    from ssl_nnunet.export import export_bundle
    from ssl_nnunet.training.run import pretrain
    entry = primus_planned["plans"]["ssl"]["methods"][method]
    assert entry["pretrain_patch_size"] == [32, 32, 32]
    if method == "mim":
        assert all(u % 8 == 0 for key in ("level1_unit", "level1_mask_unit", "u2") for u in entry["layout"][key])
    trainer = pretrain(primus_planned["id"], method, "sslPlans_primus_m", iterations=2, num_prefetch=1)
    assert type(trainer.method) is {"mim": PrimusMiM, "gvsl": PrimusGVSL}[method]
    out = export_bundle(primus_planned["id"], method, str(tmp_path / "b"), "sslPlans_primus_m", num_classes=3)
    load_primus_export_into_smoke_trainer_network(out, trainer.network.state_dict(), num_classes=3)
    # the transferred encoder was trained: both optimizer steps reached it
    for p in (trainer.network.eva.pos_embed, trainer.network.down_projection.proj.weight):
        assert int(trainer.optimizer.state[p]["step"]) == 2
    assert "Primus transfer" in open(os.path.join(out, "README.md")).read()
