"""VoCo and Alice on the Primus backbone: token-level invariants on a tiny Primus, a loss that falls on a fixed
batch, and plan -> pretrain -> export -> nnU-Net's Primus trainer network with every key checked."""
import os

import pytest
import torch

from helpers import load_primus_export_into_smoke_trainer_network, train_on_fixed_batch

from ssl_nnunet.backbones.primus import build_primus, encode_tokens
from ssl_nnunet.methods.alice import Alice, PrimusAlice
from ssl_nnunet.methods.base import PlanningContext
from ssl_nnunet.methods.masking import num_hidden_units
from ssl_nnunet.methods.voco import PrimusVoCo, VoCo
from ssl_nnunet.utilities.errors import SSLInputError

TINY = {"embed_dim": 96, "patch_embed_size": [8, 8, 8], "eva_depth": 2, "eva_numheads": 4, "input_shape": [32, 32, 32],
        "drop_path_rate": 0.0, "scale_attn_inner": True, "init_values": 0.1}
SSL_PLAN = {"architecture_family": "primus", "total_stride": [8, 8, 8], "mask_quantum": [8, 8, 8],
            "out_of_plane_axis": 0}
NO_AUG = {"p_flip": 0.0, "p_rot90": 0.0, "p_shift": 0.0, "shift": 0.1}


def _voco(seed=0, crop=(16, 16, 16), **layout):
    torch.manual_seed(seed)
    region = [c * g for c, g in zip(crop, (1, 2, 2))]
    plan = {"pretrain_patch_size": [32, 32, 32], "batch_size": 2,
            "layout": {"crop_size": list(crop), "base_grid": [1, 2, 2], "region_size": region, "n_target_crops": 2,
                       "proj_dims": [64, 64], "region_mode": "native", "augmentation": NO_AUG, **layout}}
    return PrimusVoCo(build_primus(TINY, 1, 1), plan, SSL_PLAN, 1)


def _alice(seed=0, **layout):
    torch.manual_seed(seed)
    plan = {"pretrain_patch_size": [32, 32, 32], "batch_size": 2,
            "layout": {"crop_size": [32, 32, 32], "mask_unit": [8, 8, 8], "head": [64, 32, 48],
                       "casa": {"dim": 32, "heads": 2}, "ema": [0.99, 1.0], "matcher": "random", **layout}}
    return PrimusAlice(build_primus(TINY, 1, 1), plan, SSL_PLAN, 1)


def _record(module, seen):
    return module.register_forward_pre_hook(lambda mod, args, kw: seen.append(tuple(args[0].shape)), with_kwargs=True)


def _smooth(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).cumsum(-1).cumsum(-2) / 16).float()


def _falls(method, batch, steps, lr=2e-3):
    return [out["loss"] for out in train_on_fixed_batch(method, batch, steps, lr)]


# ------------------------------------------------------------------------------------------------ VoCo

def test_voco_primus_layout_keeps_the_fine_tuning_scale_where_the_images_allow():
    assert VoCo.variant_for("primus") is PrimusVoCo and VoCo.variant_for("cnn") is VoCo

    def ctx(median, patch=(32, 32, 32), profile="cpu_smoke"):
        return PlanningContext(patch_size=patch, strides=(), spacing=(2.0, 2.0, 2.0), median_shape=median,
                               profile=profile, token_size=(8, 8, 8))
    _, lay = PrimusVoCo.default_layout(ctx((200.0, 250.0, 250.0), (160, 160, 160), "gpu"))  # GPU grid rule, zoom 2
    assert lay["crop_size"] == [80, 80, 80] and lay["base_grid"] == [1, 3, 3]
    _, lay = PrimusVoCo.default_layout(ctx((60.0, 68.0, 56.0), (64, 80, 56), "gpu"))  # nothing fits: never stretched
    assert lay["crop_size"] == [64, 80, 56] and lay["base_grid"] == [1, 2, 2]
    assert "padded" in PrimusVoCo.check_layout({"layout": lay}, {**SSL_PLAN, "median_shape": [60, 68, 56]})[0]
    patch, lay = PrimusVoCo.default_layout(ctx((80.0, 80.0, 80.0)))  # the region of 32^3 crops fits: no zoom
    assert patch == [32, 32, 32] and lay["crop_size"] == [32, 32, 32] and lay["region_size"] == [32, 64, 64]
    patch, lay = PrimusVoCo.default_layout(ctx((40.0, 44.0, 48.0)))  # it does not: one isotropic zoom of 2
    assert patch == [32, 32, 32] and lay["crop_size"] == [16, 16, 16] and lay["region_size"] == [16, 32, 32]
    with pytest.raises(SSLInputError, match="token size"):
        _voco(crop=(12, 16, 16))
    with pytest.raises(SSLInputError, match="input_shape"):
        PrimusVoCo(build_primus(TINY, 1, 1), {"pretrain_patch_size": [16, 32, 32], "batch_size": 2,
                                               "layout": {"crop_size": [16, 16, 16], "base_grid": [1, 2, 2]}},
                   SSL_PLAN, 1)


@pytest.mark.parametrize("crop", [(16, 16, 16), (32, 32, 32)])
def test_voco_embeddings_are_token_means_of_crops_at_the_patch(crop):
    m = _voco(crop=crop, pool="avgmax").eval()
    region = [c * g for c, g in zip(crop, (1, 2, 2))]
    batch = torch.randn(2, 1, *region)
    crops, labels, _ = m.make_views(batch, torch.Generator().manual_seed(0))
    n_crops = 2 * (4 + 2)
    assert crops.shape == (n_crops, 1, 32, 32, 32) and labels.shape == (2, 2, 4)
    if crop == (32, 32, 32):  # native size = P: the crops are cut, not resampled (base 0 = the region's corner)
        assert torch.equal(crops[0], batch[0, :, :32, :32, :32])
    seen = []
    hook = _record(m.network.eva.blocks[0], seen)
    with torch.no_grad():
        out = m(batch, torch.Generator().manual_seed(0))
        tokens = encode_tokens(m.network, crops)
        emb = m.embed(crops)
    hook.remove()
    assert seen[0] == (n_crops, 64, 96)  # every crop enters at P: all (32/8)^3 tokens
    assert emb.shape == (n_crops, 64)
    features = torch.cat([tokens.mean(1), tokens.amax(1)], 1)
    assert torch.allclose(m.pooled_features(m.network, crops), features, atol=1e-6)
    assert torch.allclose(emb, m.projector(features).float(), atol=1e-5)
    assert set(out) == {"loss", "L_pred", "L_pred_zero", "L_reg", "pos_acc", "pos_acc_chance"}
    assert float(out["pos_acc_chance"]) == 0.25 and 0.0 <= float(out["pos_acc"]) <= 1.0
    assert m.untrained_parameters() == [f"network.up_projection.{n}" for n, _ in
                                        m.network.up_projection.named_parameters()]


def test_voco_loss_falls_on_a_fixed_batch_and_only_the_encoder_learns():
    m = _voco(seed=1, use_ema_teacher=True, ema_momentum=0.5).train()
    assert [type(s).__name__ for s, _ in m.ema_pairs()] == ["PatchEmbed", "Eva", "Projector"]
    teacher0 = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    batch = _smooth((1, 1, 16, 32, 32), 0)
    losses = _falls(m, batch, 8)
    assert losses[-1] < 0.75 * losses[0], losses
    up = [p for n, p in m.named_parameters() if n.startswith("network.up_projection.")]
    assert up and all(p.grad is None for p in up)  # never runs
    assert all(p.grad is not None for p in m.network.eva.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in m.teacher.parameters())
    moved = m.teacher.state_dict()
    assert not torch.equal(moved["eva.pos_embed"], teacher0["eva.pos_embed"])
    assert not torch.equal(moved["eva.pos_embed"], m.network.eva.pos_embed)


# ------------------------------------------------------------------------------------------------ Alice

def test_alice_student_sees_exactly_the_visible_tokens_and_the_teacher_all():
    assert Alice.variant_for("primus") is PrimusAlice and Alice.variant_for("cnn") is Alice
    a = _alice().eval()
    batch = torch.randn(2, 2, 1, 32, 32, 32)
    online, target, mask = a.make_views(batch, torch.Generator().manual_seed(0))
    assert online.shape == (4, 1, 32, 32, 32) and mask.shape == (4, 1, 4, 4, 4)
    n_vis = 64 - num_hidden_units(64, 0.75)
    assert n_vis == 16 and a.visible_tokens(mask) == n_vis
    student, teacher = [], []
    hooks = [_record(a.network.eva.blocks[0], student), _record(a.target_encoder.eva.blocks[0], teacher)]
    with torch.no_grad():
        out = a.branches(online, target, mask)
    for h in hooks:
        h.remove()
    assert student == [(4, n_vis, 96)] and teacher == [(4, 64, 96)]
    assert out["V"].shape == (4, n_vis, 96) and out["H"].shape == (4, 64, 48) and out["Y"].shape == (4, 64, 48)
    assert out["rec"].shape == (4, 64 - n_vis, 512) and out["hidden"].shape == (4, 64 - n_vis)
    assert int(out["token_mask"].sum()) == 4 * n_vis
    from ssl_nnunet.backbones.primus import token_indices
    assert torch.equal(out["hidden"], token_indices(1 - mask))  # sorted hidden indices, found without a host sync
    # the student never sees a hidden voxel: V and H do not change when the hidden voxels do
    from ssl_nnunet.methods.masking import expand_mask
    noisy = torch.where(expand_mask(mask, online.shape[2:]) == 0, torch.randn_like(online) * 50, online)
    with torch.no_grad():
        again = a.branches(noisy, target, mask)
    assert torch.equal(again["V"], out["V"]) and torch.equal(again["H"], out["H"])
    # reconstruction over the full grid agrees with the hidden-token pixel head
    with torch.no_grad():
        full = a.reconstruct(online, mask)
    from ssl_nnunet.backbones.primus import gather_tokens, volume_to_patches
    assert full.shape == online.shape
    assert torch.allclose(gather_tokens(volume_to_patches(full, (8, 8, 8)), out["hidden"]), out["rec"], atol=1e-5)


def test_alice_loss_falls_gradients_and_decay_groups():
    from ssl_nnunet.training.schedule import weight_decay_groups
    a = _alice(seed=2).train()
    assert [type(s).__name__ for s, _ in a.ema_pairs()] == ["PatchEmbed", "Eva", "ProjectionHead"]
    batch = _smooth((2, 2, 1, 32, 32, 32), 1)
    out = a(batch, torch.Generator().manual_seed(0))
    assert {"loss", "rec_loss", "dv_loss", "st_loss", "cls_std", "token_std", "dv_chance", "st_chance"} <= set(out)
    out["loss"].backward()
    for part in (a.network.down_projection, a.network.eva, a.decoder, a.pixel_head, a.phi, a.casa):
        assert all(p.grad is not None for p in part.parameters()), type(part).__name__
    assert all(p.grad is None for p in list(a.psi.parameters()) + list(a.target_encoder.parameters()))
    assert all(p.grad is None for p in a.network.up_projection.parameters())
    assert set(a.untrained_parameters()) == {f"network.up_projection.{n}" for n, _ in
                                             a.network.up_projection.named_parameters()}
    trainable = [p for n, p in a.named_parameters() if p.requires_grad and n not in set(a.untrained_parameters())]
    decay, no_decay = weight_decay_groups(trainable, 0.05)
    ids = {id(p) for p in trainable}
    norms = [p for m in a.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters() if id(p) in ids]
    assert len(norms) >= 6 and {id(p) for p in norms} <= {id(p) for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() >= 2 for p in decay["params"])
    a.zero_grad()
    teacher0 = a.target_encoder.eva.pos_embed.detach().clone()
    losses = _falls(a, batch, 12)
    assert losses[-1] < 0.85 * losses[0], losses
    assert not torch.equal(a.target_encoder.eva.pos_embed, teacher0)  # EMA moved the teacher


# ------------------------------------------------------------------------------------------------ pipeline

@pytest.mark.parametrize("method", ["voco", "alice"])
def test_plan_pretrain_export_and_load_into_the_primus_trainer_network(primus_planned, method, tmp_path):
    from ssl_nnunet.export import export_bundle
    from ssl_nnunet.training.run import pretrain
    entry = primus_planned["plans"]["ssl"]["methods"][method]
    assert entry["pretrain_patch_size"] == [32, 32, 32]
    if method == "voco":
        crop = entry["layout"]["crop_size"]
        assert all(32 % c == 0 and c % 8 == 0 for c in crop) and len(set(32 // c for c in crop)) == 1
    else:
        assert entry["layout"]["mask_unit"] == [8, 8, 8] and "token_stride" not in entry["layout"]
    trainer = pretrain(primus_planned["id"], method, "sslPlans_primus_m", iterations=2, num_prefetch=1)
    assert type(trainer.method) is {"voco": PrimusVoCo, "alice": PrimusAlice}[method]
    assert all(n.startswith("network.up_projection.") for n in trainer.frozen_parameters) and trainer.frozen_parameters
    out = export_bundle(primus_planned["id"], method, str(tmp_path / "b"), "sslPlans_primus_m", num_classes=3)
    load_primus_export_into_smoke_trainer_network(out, trainer.network.state_dict(), num_classes=3)
    assert "down_projection and eva" in open(os.path.join(out, "README.md")).read()
