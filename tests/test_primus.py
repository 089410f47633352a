"""Primus backbone: planning (-arch), the visible-token MAE, export for nnunetv2's Primus trainers, and a real
``nnUNetv2_train -tr nnUNet_Primus_SSLSmoke_Trainer -pretrained_weights`` run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import load_primus_export_into_smoke_trainer_network, write_synthetic_dataset
from ssl_nnunet.backbones.primus import (adapt_primus_weights, build_primus, eva_forward_visible,
                                         interpolate_pos_embed, primus_hyperparameters, scatter_tokens, token_indices,
                                         tokens_from_volume)
from ssl_nnunet.methods import all_methods
from ssl_nnunet.methods.mae import MAE, PrimusMAE
from ssl_nnunet.methods.masking import num_hidden_units
from ssl_nnunet.paths import nnunet_preprocessed, nnunet_results
from ssl_nnunet.utilities.errors import SSLInputError

TINY = {"embed_dim": 96, "patch_embed_size": [8, 8, 8], "eva_depth": 2, "eva_numheads": 4, "input_shape": [32, 32, 32],
        "drop_path_rate": 0.0, "scale_attn_inner": True, "init_values": 0.1}
SSL_PLAN = {"architecture_family": "primus", "total_stride": [8, 8, 8], "mask_quantum": [8, 8, 8]}


def _mae(seed=0, **layout):
    torch.manual_seed(seed)
    net = build_primus(TINY, 1, 1)
    plan = {"pretrain_patch_size": [32, 32, 32], "layout": {"mask_unit": [8, 8, 8], **layout}}
    return PrimusMAE(net, plan, SSL_PLAN, 1)


def test_hyperparameters_are_nnunetv2_primus_trainers():
    assert {k: primus_hyperparameters("primus_m")[k] for k in ("embed_dim", "eva_depth", "eva_numheads")} == \
        {"embed_dim": 864, "eva_depth": 16, "eva_numheads": 12}
    assert primus_hyperparameters("primus_s")["embed_dim"] == 396 and primus_hyperparameters("primus_l")["eva_depth"] == 24
    assert primus_hyperparameters("primus_b")["patch_embed_size"] == [8, 8, 8]
    with pytest.raises(SSLInputError, match="primus_xl"):
        primus_hyperparameters("primus_xl")
    assert MAE.variant_for("primus") is PrimusMAE and MAE.variant_for("cnn") is MAE


def test_visible_encoder_matches_eva_and_sees_exactly_the_visible_tokens():
    m = _mae().eval()
    x = torch.randn(2, 1, 32, 32, 32)
    tokens, grid = tokens_from_volume(m.network, x)
    assert grid == (4, 4, 4) and tokens.shape == (2, 64, 96)
    full, _ = m.network.eva(tokens)  # dynamic-network-architectures' own EVA path, all tokens
    assert torch.allclose(eva_forward_visible(m.network.eva, tokens, None), full, atol=1e-6)
    seen = []
    hook = m.network.eva.blocks[0].register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0].shape),
                                                              with_kwargs=True)
    gen = torch.Generator().manual_seed(3)
    mask = m.sample_mask(x, gen)
    enc, dec, rec = m.reconstruct(x, mask)
    hook.remove()
    n_keep = 64 - num_hidden_units(64, 0.75)
    assert n_keep == 16 and seen == [torch.Size([2, n_keep, 96])] and enc.shape == (2, n_keep, 96)
    assert dec.shape == (2, 64, 512) and rec.shape == x.shape  # linear pixel head: 8^3 voxels per token
    keep = token_indices(mask)
    from ssl_nnunet.backbones.primus import embed_visible, gather_tokens
    # the visible-only patch embedding equals the network's convolution at those tokens
    assert torch.allclose(embed_visible(m.network, x, keep), gather_tokens(tokens, keep), atol=1e-5)
    assert torch.allclose(enc, eva_forward_visible(m.network.eva, tokens, keep), atol=1e-5)
    assert keep.shape == (2, n_keep) and bool((mask.flatten(1).gather(1, keep) == 1).all())
    # the restored sequence holds each kept token at its own index and the mask token elsewhere
    fill = torch.full((1, 1, 96), 7.0)
    restored = scatter_tokens(enc, keep, fill, 64)
    assert torch.equal(restored.gather(1, keep[..., None].expand(-1, -1, 96)), enc)
    assert int((restored == 7.0).all(-1).sum()) == 2 * (64 - n_keep)
    from ssl_nnunet.backbones.primus import encode_tokens, token_map
    assert torch.allclose(encode_tokens(m.network, x, keep), enc, atol=1e-5)
    fmap = token_map(m.network, x)  # every token encoded, as a (B, E, n0, n1, n2) map in C order
    assert fmap.shape == (2, 96, 4, 4, 4) and torch.allclose(fmap.flatten(2).transpose(1, 2), full, atol=1e-5)


@pytest.mark.parametrize("head", ["linear", "up_projection"])
def test_hidden_tokens_do_not_leak_and_loss_is_on_hidden_voxels_only(head):
    m = _mae(pixel_head=head).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    mask = m.sample_mask(x, torch.Generator().manual_seed(1))
    from ssl_nnunet.methods.masking import expand_mask, masked_mse
    hidden = expand_mask(mask, x.shape[2:]) == 0
    noisy = torch.where(hidden, torch.randn_like(x) * 50, x)
    with torch.no_grad():
        a, _, rec_a = m.reconstruct(x, mask)
        b, _, rec_b = m.reconstruct(noisy, mask)
    assert torch.equal(a, b) and torch.equal(rec_a, rec_b)  # the encoder never saw a hidden voxel
    m_full = expand_mask(mask, x.shape[2:])
    base = masked_mse(rec_a, x, m_full)
    assert torch.allclose(masked_mse(torch.where(hidden, rec_a, rec_a + 100), x, m_full), base)
    assert masked_mse(torch.where(hidden, x, rec_a), x, m_full) == 0
    # the training loss decodes only the hidden tokens: the same value as the full reconstruction's
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        loss = m(x, gen_a)["loss"]
        mask5 = m.sample_mask(x, gen_b)
        full = masked_mse(m.reconstruct(x, mask5)[2], x, expand_mask(mask5, x.shape[2:]))
    assert torch.allclose(loss, full, rtol=1e-5, atol=1e-6)


def test_loss_falls_on_a_fixed_batch():
    m = _mae(decoder_depth=1).train()
    x = torch.randn(1, 1, 32, 32, 32).cumsum(2) / 8  # smooth, learnable content
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = m(x, torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_pos_embed_interpolation_and_target_weights():
    pre = build_primus(TINY, 1, 1).state_dict()
    target = dict(TINY, input_shape=[48, 32, 32])
    fresh = build_primus(target, 1, 4).state_dict()
    w, notes = adapt_primus_weights(pre, fresh, [32, 32, 32], [48, 32, 32], [8, 8, 8])
    assert w["eva.pos_embed"].shape == fresh["eva.pos_embed"].shape == (1, 96, 96)
    assert any("interpolated" in n and "[48, 32, 32]" in n for n in notes)
    assert all(torch.equal(w[k], pre[k]) for k in pre if k.startswith(("down_projection.", "eva.blocks.")))
    assert all(torch.equal(w[k], fresh[k]) for k in fresh if k.startswith("up_projection."))
    same = interpolate_pos_embed(pre["eva.pos_embed"], (4, 4, 4), (4, 4, 4))
    assert torch.allclose(same, pre["eva.pos_embed"], atol=1e-6)
    with pytest.raises(SSLInputError, match="down_projection.proj.weight"):
        adapt_primus_weights(build_primus(dict(TINY, embed_dim=48), 1, 1).state_dict(), fresh, [32] * 3,
                             [48, 32, 32], [8, 8, 8])


# ------------------------------------------------------------------------------------------------ pipeline

@pytest.fixture(scope="module")
def primus_source(primus_planned):
    from ssl_nnunet.training.run import pretrain
    trainer = pretrain(primus_planned["id"], "mae", "sslPlans_primus_m", iterations=3, num_prefetch=1)
    return {**primus_planned, "trainer": trainer}


def test_primus_plan_lives_next_to_the_cnn_plan(primus_source):
    folder = os.path.join(nnunet_preprocessed(), primus_source["name"])
    for f in ("sslPlans.json", "sslFinetunePlans.json", "sslPlans_primus_m.json", "sslFinetunePlans_primus_m.json"):
        assert os.path.isfile(os.path.join(folder, f)), f
    with open(os.path.join(folder, "sslPlans.json")) as f:
        assert json.load(f)["ssl"]["architecture_family"] == "cnn"
    plans = primus_source["plans"]
    cfg = plans["configurations"]["3d_fullres"]
    assert plans["plans_name"] == "sslPlans_primus_m" and cfg["data_identifier"] == "sslPlans_primus_m_3d_fullres"
    kw = cfg["architecture"]["arch_kwargs"]
    assert cfg["architecture"]["network_class_name"].endswith("primus.Primus")
    assert kw["embed_dim"] == 96 and kw["eva_depth"] == 4 and kw["input_shape"] == cfg["patch_size"] == [32, 32, 32]
    ssl = plans["ssl"]
    assert ssl["architecture_family"] == "primus" and ssl["mask_quantum"] == [8, 8, 8] and list(ssl["methods"]) == [
        n for n, c in all_methods().items() if c.variant_for("primus")]
    assert ssl["methods"]["mae"]["layout"]["mask_unit"] == [8, 8, 8]
    with open(os.path.join(folder, "sslFinetunePlans_primus_m.json")) as f:
        ft = json.load(f)
    assert ft["ssl_pretraining_source"]["finetune_trainer"] == "nnUNet_Primus_SSLSmoke_Trainer"
    assert ft["ssl_pretraining_source"]["plans_name"] == "sslPlans_primus_m"


def test_gpu_primus_plan_has_nnunet_sizes(primus_source):
    from ssl_nnunet.experiment_planning.planner import plan_experiment
    plans = plan_experiment(primus_source["id"], "gpu", verbose=False, arch="primus_b")
    cfg = plans["configurations"]["3d_fullres"]
    kw = cfg["architecture"]["arch_kwargs"]
    assert (kw["embed_dim"], kw["eva_depth"], kw["eva_numheads"]) == (792, 12, 12)
    assert all(p % 8 == 0 for p in cfg["patch_size"]) and kw["input_shape"] == cfg["patch_size"]
    with open(os.path.join(nnunet_preprocessed(), primus_source["name"], "sslFinetunePlans_primus_b.json")) as f:
        assert json.load(f)["ssl_pretraining_source"]["finetune_trainer"] == "nnUNet_Primus_B_Trainer"


def test_export_loads_into_the_network_of_the_primus_trainer(primus_source, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from ssl_nnunet.export import export_bundle
    out = export_bundle(primus_source["id"], "mae", str(tmp_path / "b"), "sslPlans_primus_m", num_classes=3)
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=True)
    assert ckpt["init_args"]["plans"]["plans_name"] == "sslFinetunePlans_primus_m"
    assert ckpt["nnssl_adaptation_plan"]["architecture_plans"]["arch_class_name"] == "PrimusM"
    assert "Primus transfer" in open(os.path.join(out, "README.md")).read()
    pretrained = primus_source["trainer"].network.state_dict()
    net = load_primus_export_into_smoke_trainer_network(out, pretrained, num_classes=3)  # every key checked
    with pytest.raises(AssertionError):  # the pretraining head (1 output) could never pass nnU-Net's check
        torch.save({"network_weights": pretrained}, str(tmp_path / "raw.pth"))
        load_pretrained_weights(net, str(tmp_path / "raw.pth"))
    # another fine-tuning patch: pos_embed interpolated, the plan in the bundle follows
    out2 = export_bundle(primus_source["id"], "mae", str(tmp_path / "b2"), "sslPlans_primus_m", num_classes=3,
                         patch_size=[48, 32, 32])
    ck2 = torch.load(os.path.join(out2, "checkpoint_final.pth"), weights_only=True)
    assert ck2["network_weights"]["eva.pos_embed"].shape == (1, 96, 96)
    assert ck2["init_args"]["plans"]["configurations"]["3d_fullres"]["patch_size"] == [48, 32, 32]


@pytest.fixture(scope="module")
def primus_target(primus_source, new_dataset_id):
    from ssl_nnunet.export import transfer_and_preprocess
    tid, tname = new_dataset_id("PrimusTarget")
    write_synthetic_dataset(tid, tname.split("_", 1)[1], n_cases=5, shape=(40, 44, 48), spacing=(2.0, 2.0, 2.0),
                            labeled=True, seed=1)
    transfer_and_preprocess(primus_source["id"], tid, "sslFinetunePlans_primus_m")
    return tid, tname


def test_finetune_reads_plans_and_trainer_from_the_bundle_and_writes_primus_target_weights(
        primus_source, primus_target, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from ssl_nnunet.export import export_bundle
    from ssl_nnunet.finetune.finetune import resolve_bundle, target_weights
    from ssl_nnunet.utilities.network import build_network_from_plans
    out = export_bundle(primus_source["id"], "mae", str(tmp_path / "b"), "sslPlans_primus_m")  # C_in head
    bundle = resolve_bundle(out)
    assert bundle["plans_identifier"] == "sslFinetunePlans_primus_m"
    assert bundle["trainer"] == "nnUNet_Primus_SSLSmoke_Trainer"
    path, notes = target_weights(bundle, primus_target[1], False, str(tmp_path))
    assert path != bundle["checkpoint"] and any("up_projection" in n for n in notes)
    with open(os.path.join(nnunet_preprocessed(), primus_target[1], "sslFinetunePlans_primus_m.json")) as f:
        net = build_network_from_plans(json.load(f), 1, 3)
    load_pretrained_weights(net, path)
    pretrained = primus_source["trainer"].network.state_dict()
    assert all(torch.equal(v, pretrained[k].cpu()) for k, v in net.state_dict().items() if k.startswith("eva."))


def test_nnunetv2_train_tiny_primus_with_pretrained_weights(primus_source, primus_target, tmp_path):
    """Real ``nnUNetv2_train`` (subprocess) with the tiny Primus trainer and the target-specific weights."""
    from ssl_nnunet.export import export_bundle
    from ssl_nnunet.nnunet_trainers import trainer_dir
    tid, tname = primus_target
    out = export_bundle(primus_source["id"], "mae", str(tmp_path / "b"), "sslPlans_primus_m", num_classes=3)
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    cmd = [exe] if os.path.isfile(exe) else [sys.executable, "-c",
                                             "from nnunetv2.run.run_training import run_training_entry as m; m()"]
    env = dict(os.environ, nnUNet_extTrainer=trainer_dir(), OMP_NUM_THREADS="2", MKL_NUM_THREADS="2",
               nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="0")
    r = subprocess.run(cmd + [str(tid), "3d_fullres", "0", "-p", "sslFinetunePlans_primus_m",
                              "-tr", "nnUNet_Primus_SSLSmoke_Trainer", "-device", "cpu",
                              "-pretrained_weights", os.path.join(out, "checkpoint_final.pth")],
                       capture_output=True, text=True, env=env, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "################### Loading pretrained weights from file" in r.stdout, log[-4000:]
    fold = os.path.join(nnunet_results(), tname, "nnUNet_Primus_SSLSmoke_Trainer__sslFinetunePlans_primus_m__3d_fullres",
                        "fold_0")
    trained = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
    assert trained["trainer_name"] == "nnUNet_Primus_SSLSmoke_Trainer" and trained["current_epoch"] == 1
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
