"""The method contract end to end, for every registered objective and for a toy one defined here.

One cpu_smoke dataset is planned once (with the toy objective registered, so the planner writes its layout
too); each method then pretrains a few iterations, exports its bundle, and nnU-Net's own
``load_pretrained_weights`` loads it into the fine-tuning network nnU-Net builds from ``sslFinetunePlans.json``.
Method-specific checks of the exported weights stay beside the generic ones (``EXTRA_CHECKS``).

The toy objective touches no project file: its layout hooks, views and loss live in this module, and one
``register`` call makes the planner, the trainer and the exporter use it.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

from helpers import write_synthetic_dataset
from ssl_nnunet.methods import method_names, register, unregister
from ssl_nnunet.methods.base import PlanningContext, SSLMethod
from ssl_nnunet.utilities.errors import SSLInputError

PATCH = [32, 32, 32]  # cpu_smoke


class ToyDenoising(SSLMethod):
    """Denoising: the network reconstructs the patch from a noisy copy (noise std ``layout.noise_std``)."""

    name = "toy_denoise"
    trained_parts = "encoder and decoder (toy denoising objective of tests/test_roundtrip.py)"
    layout_defaults = {"noise_std": 0.5}

    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        return list(ctx.patch_size), {"noise_std": cls.layout_defaults["noise_std"],
                                      "unit": list(ctx.mask_quantum)}

    @classmethod
    def check_layout(cls, method_plan, ssl_plan):
        if not float(method_plan["layout"]["noise_std"]) > 0:
            raise cls.layout_error(ssl_plan, "noise_std", "must be > 0")
        return []

    def forward(self, batch, generator=None):
        noise = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
        out = self.network(batch + float(self.layout["noise_std"]) * noise)
        loss = torch.mean((out.float() - batch.float()) ** 2)
        return {"loss": loss, "rec_loss": loss.detach()}


REAL_METHODS = method_names()

#: iterations and epoch length of each run; methods not listed get the default
RUN = {"default": (2, 1), "voco": (3, 3), "alice": (2, 2)}


@pytest.fixture(scope="module")
def planned(new_dataset_id):
    """A 5-case dataset planned and preprocessed with the toy objective registered; yields its id and name."""
    from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
    from ssl_nnunet.experiment_planning.planner import plan_experiment
    from ssl_nnunet.experiment_planning.preprocess import preprocess
    register(ToyDenoising)
    did, name = new_dataset_id("RoundTrip")
    # (40, 96, 40): two patches along a1 only, so MiM's level-1 region is (1, 2, 1) patches at native resolution
    write_synthetic_dataset(did, "RoundTrip", n_cases=5, shape=(40, 96, 40), spacing=(2.0, 2.0, 2.0))
    extract_fingerprint(did, 1, verbose=False)
    plan_experiment(did, "cpu_smoke", verbose=False)
    preprocess(did, num_processes=1, verbose=False)
    yield did, name
    unregister(ToyDenoising.name)


def _pp(name, *parts):
    return os.path.join(os.environ["nnUNet_preprocessed"], name, *parts)


def _set_run(name, method, iterations_per_epoch):
    path = _pp(name, "sslPlans.json")
    with open(path) as f:
        plans = json.load(f)
    plans["ssl"]["methods"][method].update(iterations_per_epoch=iterations_per_epoch, num_val_iterations=1)
    with open(path, "w") as f:
        json.dump(plans, f)
    return plans


# ------------------------------------------------------------------------------------ method-specific checks

def _check_mim(plans, trainer, ckpt, bundle):
    lay = plans["ssl"]["methods"]["mim"]["layout"]
    assert lay["r1"] == [1, 2, 1] and lay["level2_zoom"] == [1, 1, 1]                  # native level 2
    assert lay["level1_mask_unit"] == [8, 8, 8] and lay["ratios"][0] == 0.6           # fine level-1 mask
    for key in ("rec_l1", "rec_l2", "rec_l3", "align_12", "align_23", "loss", "align_12_chance", "align_23_acc"):
        assert len(trainer.logger.get_checkpoint()[f"train_{key}"]) == 2, key


def _check_gvsl(plans, trainer, ckpt, bundle):
    assert plans["ssl"]["methods"]["gvsl"]["layout"]["pair_patch"] == PATCH
    log = trainer.logger.get_checkpoint()
    for key in ("loss", "ncc", "smooth", "restore", "sim", "sim_gain"):
        assert len(log[f"train_{key}"]) == 2 and len(log[f"val_{key}"]) == 2, key
    batch = trainer.dataloader_train.sampler.next_batch()  # matched pairs of two different cases
    b = plans["ssl"]["methods"]["gvsl"]["batch_size"]
    assert batch.shape == (b, 2, 1, *PATCH) and not torch.equal(batch[:, 0], batch[:, 1])
    assert not any("head" in k for k in ckpt["network_weights"])  # heads are not exported


def _check_voco(plans, trainer, ckpt, bundle):
    from ssl_nnunet.export.exporter import build_network_from_plans
    assert {"train_L_pred", "train_L_reg", "train_pos_acc", "val_pos_acc"} <= set(trainer.logger.values)
    torch.manual_seed(0)  # the trainer seeds with its seed (0) right before building the network
    init = build_network_from_plans(plans, 1, 1).state_dict()
    weights = ckpt["network_weights"]
    # every key is present; the decoder's own weights are bit-exactly its initialisation, the encoder was trained
    dec_keys = [k for k in weights if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert dec_keys and all(torch.equal(weights[k], init[k]) for k in dec_keys)
    assert any(not torch.equal(weights[k], init[k]) for k in weights if k.startswith("encoder."))


def _check_alice(plans, trainer, ckpt, bundle):
    for term in ("rec_loss", "dv_loss", "st_loss", "cls_std", "token_std", "dv_chance", "st_chance"):
        assert len(trainer.logger.get_checkpoint()[f"train_{term}"]) == 1
    assert os.path.isfile(_pp(plans["dataset_name"], "alice_matcher_sslPlans_3d_fullres.json"))
    assert not any(k.startswith(("target_encoder", "psi", "phi", "casa")) for k in ckpt["network_weights"])


def _check_mae(plans, trainer, ckpt, bundle):
    assert not any("densify" in k or "mask_token" in k for k in ckpt["network_weights"])


EXTRA_CHECKS = {"mim": _check_mim, "gvsl": _check_gvsl, "voco": _check_voco, "alice": _check_alice,
                "mae": _check_mae}


# ------------------------------------------------------------------------------------ the round trip

def _round_trip(method, did, name, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from ssl_nnunet.export.exporter import build_network_from_plans, export_bundle
    from ssl_nnunet.methods import get_method
    from ssl_nnunet.training.run import pretrain

    iterations, per_epoch = RUN.get(method, RUN["default"])
    plans = _set_run(name, method, per_epoch)
    trainer = pretrain(did, method, device="cpu", iterations=iterations, num_prefetch=0)
    assert len(trainer.iteration_losses) == iterations and all(math.isfinite(v) for v in trainer.iteration_losses)
    assert os.path.isfile(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    ckpt = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["ssl_method"] == method and ckpt["iterations_done"] == iterations

    bundle = export_bundle(did, method, str(tmp_path / f"{method}_bundle"))
    with open(os.path.join(bundle, "README.md")) as f:
        assert get_method(method).trained_parts in f.read()
    with open(_pp(name, "sslFinetunePlans.json")) as f:
        ft_plans = json.load(f)
    net = build_network_from_plans(ft_plans, 1, 3, deep_supervision=True)
    load_pretrained_weights(net, os.path.join(bundle, "checkpoint_final.pth"), verbose=False)
    for k, v in net.state_dict().items():
        if ".seg_layers." not in k:
            assert torch.equal(v, ckpt["network_weights"][k]), k
    return plans, trainer, ckpt, bundle


@pytest.mark.parametrize("method", REAL_METHODS)
def test_plan_pretrain_export_nnunet_load(planned, method, tmp_path):
    did, name = planned
    plans, trainer, ckpt, bundle = _round_trip(method, did, name, tmp_path)
    assert any(f.startswith("preview_epoch_") for f in os.listdir(trainer.output_folder))
    if method in EXTRA_CHECKS:
        EXTRA_CHECKS[method](plans, trainer, ckpt, bundle)


def test_toy_objective_registered_in_the_test_alone(planned, tmp_path):
    """A new objective = one class + one register() call: planned, pretrained, exported, loaded by nnU-Net."""
    did, name = planned
    with open(_pp(name, "sslPlans.json")) as f:
        entry = json.load(f)["ssl"]["methods"][ToyDenoising.name]
    assert entry["layout"] == {"noise_std": 0.5, "unit": [4, 4, 4]} and entry["pretrain_patch_size"] == PATCH
    assert {"optimizer", "lr_schedule", "batch_size", "iterations_per_epoch"} <= set(entry)  # common settings
    _, trainer, _, _ = _round_trip(ToyDenoising.name, did, name, tmp_path)
    assert np.isfinite(trainer.logger.get_checkpoint()["val_rec_loss"]).all()


def test_toy_objective_layout_check_runs_in_the_planner(planned):
    from ssl_nnunet.experiment_planning.ssl_layout import validate_ssl_block
    _, name = planned
    with open(_pp(name, "sslPlans.json")) as f:
        ssl = json.load(f)["ssl"]
    ssl["methods"][ToyDenoising.name]["layout"]["noise_std"] = -1.0
    with pytest.raises(SSLInputError, match="'toy_denoise', key 'noise_std'"):
        validate_ssl_block(ssl, PATCH)
