"""nnssl / OpenMind interoperability: the exporter's adaptation plans follow nnssl's schema, bundles load
weights-only, and nnssl checkpoints (built here to nnssl's documented schema) import as bundles that nnU-Net
builds and ``ssl_nnunet_finetune`` fine-tunes."""
import copy
import json
import os
import re

import pytest
import torch

from helpers import prepare_planned_dataset, write_synthetic_dataset
from ssl_nnunet.export import export_bundle
from ssl_nnunet.export.adaptation_schema import (ADAPTATION_PLAN_FIELDS, ARCHITECTURE_PLANS_FIELDS,
                                                 CONFIGURATION_PLAN_FIELDS, DYNAMIC_ARCH_KWARGS_FIELDS, PLAN_FIELDS,
                                                 adaptation_plan_problems)
from ssl_nnunet.export.exporter import BUNDLE_FILES, build_adaptation_plan
from ssl_nnunet.export.nnssl_import import PRESETS, import_nnssl_checkpoint, main as import_main, resolve_architecture
from ssl_nnunet.paths import nnunet_preprocessed
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.file_io import ssl_output_folder
from ssl_nnunet.utilities.network import build_network_from_plans

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "documentation", "export.md")
TINY_RESENC = {  # nnssl's DynamicArchitecturePlans fields, serialised (ops as import strings)
    "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_blocks_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.modules.activation.LeakyReLU",
    "nonlin_kwargs": {"inplace": True}}


def _load(path):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ export side

@pytest.fixture(scope="module")
def exported(new_dataset_id, tmp_path_factory):
    did, name = new_dataset_id("InteropSource")
    prepare_planned_dataset(did, name.split("_", 1)[1], n_cases=2, shape=(40, 44, 48))
    plans = _load(os.path.join(nnunet_preprocessed(), name, "sslPlans.json"))
    net = build_network_from_plans(plans, 1, 1)
    os.makedirs(ssl_output_folder(name, "mae"), exist_ok=True)
    torch.save({"network_weights": net.state_dict(), "ssl_method": "mae", "current_epoch": 1,
                "logging": {"train_loss": [1.0]}}, os.path.join(ssl_output_folder(name, "mae"), "checkpoint_final.pth"))
    out = str(tmp_path_factory.mktemp("interop") / "mae")
    export_bundle(did, "mae", out)
    return name, out


def test_resenc_export_follows_nnssl_schema_and_loads_weights_only(exported):
    name, bundle = exported
    assert sorted(os.listdir(bundle)) == sorted(BUNDLE_FILES)
    ckpt = torch.load(os.path.join(bundle, "checkpoint_final.pth"), map_location="cpu", weights_only=True)
    plan = ckpt["nnssl_adaptation_plan"]
    assert plan == _load(os.path.join(bundle, "adaptation_plan.json"))
    assert adaptation_plan_problems(plan, ckpt["network_weights"], exact=True) == []
    assert list(plan) == list(ADAPTATION_PLAN_FIELDS)
    assert list(plan["architecture_plans"]) == list(ARCHITECTURE_PLANS_FIELDS)
    assert set(plan["architecture_plans"]["arch_kwargs"]) == set(DYNAMIC_ARCH_KWARGS_FIELDS)
    assert list(plan["pretrain_plan"]) == list(PLAN_FIELDS)
    assert list(plan["pretrain_plan"]["configurations"]["3d_fullres"]) == list(CONFIGURATION_PLAN_FIELDS)
    assert plan["key_to_stem"] == "encoder.stem"
    assert any(k.startswith("encoder.stem.") for k in ckpt["network_weights"])
    assert plan["architecture_plans"]["arch_kwargs_requiring_import"] == ["conv_op", "norm_op", "nonlin"]
    # nnU-Net master's loader: the plan's stem/encoder prefixes select real weights
    assert [c["type"] for c in ckpt["citations"]] == ["framework", "architecture", "pretraining"]
    config = _load(os.path.join(bundle, "config.json"))
    assert config["pretraining_method"] == "mae" and config["citations"] == ckpt["citations"]
    assert config["encoder_only"] is False
    with open(os.path.join(bundle, "README.md")) as f:
        assert "Please cite" in f.read()


def test_plain_conv_export_uses_the_architecture_stem_key(exported):
    name, _ = exported
    plans = _load(os.path.join(nnunet_preprocessed(), name, "sslFinetunePlans.json"))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    arch["arch_kwargs"]["n_conv_per_stage"] = arch["arch_kwargs"].pop("n_blocks_per_stage")
    net = build_network_from_plans(plans, 2, 2)
    pre = _load(os.path.join(nnunet_preprocessed(), name, "sslPlans.json"))
    plan = build_adaptation_plan(pre, plans, "mae", 2, net)
    state = net.state_dict()
    assert plan["key_to_stem"] == "encoder.stages.0" and plan["key_to_encoder"] == "encoder.stages"
    assert any(k.startswith("encoder.stages.0.") for k in state)
    assert all(k + ".weight" in state for k in plan["keys_to_in_proj"])
    assert adaptation_plan_problems(plan, state, exact=True) == []
    # the one documented deviation from nnssl's dataclass: n_conv_per_stage instead of n_blocks_per_stage
    assert "n_conv_per_stage" in plan["architecture_plans"]["arch_kwargs"]
    assert "n_blocks_per_stage" not in plan["architecture_plans"]["arch_kwargs"]


def test_checker_reports_extra_keys_wrong_types_and_foreign_stem(exported):
    _, bundle = exported
    ckpt = torch.load(os.path.join(bundle, "checkpoint_final.pth"), weights_only=True)
    plan, state = ckpt["nnssl_adaptation_plan"], ckpt["network_weights"]
    bad = copy.deepcopy(plan)
    bad["ssl_method"] = "mae"
    bad["architecture_plans"]["arch_kwargs"]["deep_supervision"] = True
    bad["pretrain_plan"]["configurations"]["3d_fullres"]["patch_size"] = "32"
    bad["key_to_stem"] = "encoder.nostem"
    problems = " | ".join(adaptation_plan_problems(bad, state, exact=True))
    for text in ("'ssl_method'", "'deep_supervision'", "patch_size", "encoder.nostem"):
        assert text in problems, text
    assert adaptation_plan_problems(dict(plan, key_to_stem=None), exact=True)  # None is not a str (nnssl's type)


def test_documentation_lists_every_schema_field():
    with open(DOCS) as f:
        text = f.read()
    for table in (ADAPTATION_PLAN_FIELDS, ARCHITECTURE_PLANS_FIELDS, DYNAMIC_ARCH_KWARGS_FIELDS, PLAN_FIELDS,
                  CONFIGURATION_PLAN_FIELDS):
        for field in table:
            assert f"`{field}`" in text, field


# ------------------------------------------------------------------------------------------------ import side

def _nnssl_checkpoint(path, dataset_name, encoder_only=False, arch_class="ResidualEncoderUNet", citations=True):
    """What nnssl's trainer saves (``AbstractBaseTrainer.save_checkpoint`` + ``_convert_numpy``), with a tiny
    ResEnc U-Net. ``encoder_only``: VoCo/SimCLR-style, the encoder plus a projection head, no decoder."""
    torch.manual_seed(1)
    plans = {"configurations": {"3d_fullres": {"architecture": {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{arch_class}",
        "arch_kwargs": TINY_RESENC, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
    net = build_network_from_plans(plans, 1, 1)
    with torch.no_grad():
        net.encoder.stem.convs[0].conv.weight.fill_(0.25)
        net.decoder.stages[0].convs[0].conv.weight.fill_(-0.5)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    if encoder_only:
        weights = {k: v for k, v in weights.items() if k.startswith("encoder.")}
        weights["projector.0.weight"] = torch.ones(8, 28)
    config = {"data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
              "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"],
              "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
              "resampling_fn_mask": "resample_data_or_seg_to_shape",
              "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
              "spacing": [2.0, 2.0, 2.0], "patch_size": [32, 32, 32]}
    plan = {"architecture_plans": {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": TINY_RESENC,
                                   "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]},
            "pretrain_plan": {"dataset_name": dataset_name, "plans_name": "nnsslPlans",
                              "original_median_spacing_after_transp": [2.0, 2.0, 2.0],
                              "image_reader_writer": "NibabelReaderWriter", "transpose_forward": [0, 1, 2],
                              "transpose_backward": [0, 1, 2], "configurations": {"onemmiso": config},
                              "experiment_planner_used": "ExperimentPlanner"},
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": [32, 32, 32],
            "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
            "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
            "key_to_lpe": None}
    ckpt = {"network_weights": weights, "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None, "logging": {"train_losses": [1.0, 0.5]}, "_best_ema": None,
            "current_epoch": 2, "init_args": {"configuration_name": "onemmiso", "fold": 0},
            "trainer_name": "VoCoTrainer" if encoder_only else "BaseMAETrainer", "nnssl_adaptation_plan": plan}
    if citations:
        ckpt["citations"] = [{"type": "pretraining", "name": "MAE", "apa_citations": ["Wald et al. (2025)."]}]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path)
    with open(os.path.join(os.path.dirname(path), "adaptation_plan.json"), "w") as f:
        json.dump(plan, f)
    return weights


def test_full_resenc_nnssl_checkpoint_imports_and_loads_into_nnunet_network(new_dataset_id, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    _, pretrain_name = new_dataset_id("OpenMindTiny")
    src = str(tmp_path / "nnssl" / "checkpoint_final.pth")
    weights = _nnssl_checkpoint(src, pretrain_name)
    bundle = import_nnssl_checkpoint(src, str(tmp_path / "bundle"), name="MAE")
    assert sorted(os.listdir(bundle)) == sorted(BUNDLE_FILES)
    ckpt = torch.load(os.path.join(bundle, "checkpoint_final.pth"), weights_only=True)
    plans = _load(os.path.join(bundle, "plans.json"))
    cfg = plans["configurations"]["3d_fullres"]
    assert plans["dataset_name"] == pretrain_name and plans["plans_name"] == "sslFinetunePlans"
    assert cfg["spacing"] == [2.0, 2.0, 2.0] and cfg["normalization_schemes"] == ["ZScoreNormalization"]
    assert cfg["patch_size"] == [32, 32, 32] and cfg["architecture"]["arch_kwargs"] == TINY_RESENC
    net = build_network_from_plans(plans, 1, 1)
    net.load_state_dict(ckpt["network_weights"], strict=True)
    for k, v in weights.items():
        assert torch.equal(ckpt["network_weights"][k], v), k
    assert ckpt["encoder_only"] is False and ckpt["ssl_method"] == "MAE"
    assert ckpt["citations"][0]["name"] == "MAE"
    assert adaptation_plan_problems(ckpt["nnssl_adaptation_plan"], ckpt["network_weights"], exact=True) == []
    # nnU-Net 2.8.1's -pretrained_weights loader into a 3-class deep-supervision target network
    target = build_network_from_plans(plans, 1, 3, deep_supervision=True)
    load_pretrained_weights(target, os.path.join(bundle, "checkpoint_final.pth"))
    assert torch.all(target.encoder.stem.convs[0].conv.weight == 0.25)
    assert torch.all(target.decoder.stages[0].convs[0].conv.weight == -0.5)


def test_encoder_only_checkpoint_gets_fresh_decoder_and_is_marked(new_dataset_id, tmp_path):
    _, pretrain_name = new_dataset_id("VoCoTiny")
    folder = tmp_path / "voco"
    weights = _nnssl_checkpoint(str(folder / "checkpoint_final.pth"), pretrain_name, encoder_only=True,
                                citations=False)
    import_main(["-i", str(folder), "-o", str(tmp_path / "bundle")])  # CLI, folder input
    bundle = str(tmp_path / "bundle")
    ckpt = torch.load(os.path.join(bundle, "checkpoint_final.pth"), weights_only=True)
    state = ckpt["network_weights"]
    assert ckpt["encoder_only"] is True and _load(os.path.join(bundle, "config.json"))["encoder_only"] is True
    assert not any(k.startswith("projector.") for k in state)
    for k, v in weights.items():
        if k.startswith("encoder."):
            assert torch.equal(state[k], v) and torch.equal(state["decoder." + k], v), k
    assert not torch.all(state["decoder.stages.0.convs.0.conv.weight"] == -0.5)  # fresh, not the source's
    net = build_network_from_plans(_load(os.path.join(bundle, "plans.json")), 1, 1)
    net.load_state_dict(state, strict=True)
    with open(os.path.join(bundle, "README.md")) as f:
        card = f.read()
    assert "**encoder only**" in card and "--encoder-only" in card and "`projector.0.weight`" in card
    # rerun from the same source gives the same decoder (seeded initialisation)
    again = import_nnssl_checkpoint(str(folder), str(tmp_path / "bundle2"))
    assert torch.equal(torch.load(os.path.join(again, "checkpoint_final.pth"), weights_only=True)[
        "network_weights"]["decoder.stages.0.convs.0.conv.weight"], state["decoder.stages.0.convs.0.conv.weight"])


def test_import_errors_and_presets(new_dataset_id, tmp_path, monkeypatch):
    _, pretrain_name = new_dataset_id("ImportErrors")
    src = str(tmp_path / "src" / "checkpoint_final.pth")
    _nnssl_checkpoint(src, pretrain_name)
    with pytest.raises(SSLInputError, match="PrimusM.*nnUNetv2_train_pretrained"):
        import_nnssl_checkpoint(src, str(tmp_path / "b1"), arch="PrimusM")
    with pytest.raises(SSLInputError, match="unexpected keys|lack encoder keys"):
        import_nnssl_checkpoint(src, str(tmp_path / "b2"), arch="ResEncL")  # tiny weights, ResEnc-L preset
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()
    cls, kwargs = resolve_architecture({"architecture_plans": {"arch_class_name": "ResEncL", "arch_kwargs": None}},
                                       None, None, "x")
    assert cls == "ResidualEncoderUNet" and kwargs == PRESETS["ResEncL"][1]
    assert kwargs["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    ckpt = torch.load(src, weights_only=True)
    ckpt["nnssl_adaptation_plan"]["pretrain_plan"]["configurations"]["onemmiso"]["spacing"] = "1mm"
    torch.save(ckpt, str(tmp_path / "bad.pth"))
    with pytest.raises(SSLInputError, match="spacing"):
        import_nnssl_checkpoint(str(tmp_path / "bad.pth"), str(tmp_path / "b3"))
    with pytest.raises(SSLInputError, match="does not exist"):
        import_nnssl_checkpoint(str(tmp_path / "missing.pth"), str(tmp_path / "b4"))
    # a Hugging Face id goes through huggingface_hub.hf_hub_download (offline here: served from the local folder)
    import huggingface_hub
    calls = []

    def fake_download(repo_id, filename, cache_dir=None):
        calls.append((repo_id, filename))
        return os.path.join(os.path.dirname(src), filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    bundle = import_nnssl_checkpoint("https://huggingface.co/Owner/ResEnc-Tiny", str(tmp_path / "hub"))
    assert ("Owner/ResEnc-Tiny", "checkpoint_final.pth") in calls and os.path.isfile(
        os.path.join(bundle, "checkpoint_final.pth"))


def test_finetune_one_pretrained_fold_from_imported_bundle(new_dataset_id, tmp_path):
    from ssl_nnunet.finetune.finetune import finetune, fold_folder
    from ssl_nnunet.paths import nnunet_results
    _, pretrain_name = new_dataset_id("OpenMindFT")
    src = str(tmp_path / "nnssl" / "checkpoint_final.pth")
    _nnssl_checkpoint(src, pretrain_name)
    bundle = import_nnssl_checkpoint(src, str(tmp_path / "bundle"), name="MAE")
    tid, target = new_dataset_id("InteropTarget")
    write_synthetic_dataset(tid, "InteropTarget", n_cases=5, shape=(40, 44, 48), labeled=True, seed=2)
    finetune(tid, bundle, folds=[0], scratch=False, trainer="nnUNetTrainer_SSLSmoke", device="cpu",
             num_processes=1)
    root = os.path.join(nnunet_results(), target, "ssl_nnunet_finetune", pretrain_name)
    fold = fold_folder(os.path.join(root, "pretrained_MAE"), target, "nnUNetTrainer_SSLSmoke", 0)
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    with open(os.path.join(fold, "ssl_nnunet_finetune_stdout.txt")) as f:
        assert "Loading pretrained weights" in f.read()
