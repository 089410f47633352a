"""Drop-in proof: an exported bundle is accepted by unmodified nnU-Net (``nnUNetv2_train -pretrained_weights``).

The SSL checkpoint is fabricated from a freshly built network (the SSL trainer is tested elsewhere); its
encoder weights get recognisable values so that the test can see them arrive in nnU-Net's network.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import write_synthetic_dataset
from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
from ssl_nnunet.experiment_planning.planner import plan_experiment
from ssl_nnunet.experiment_planning.preprocess import preprocess
from ssl_nnunet.export import export_bundle, transfer_and_preprocess
from ssl_nnunet.export.exporter import BUNDLE_FILES
from ssl_nnunet.utilities.file_io import ssl_output_folder
from ssl_nnunet.nnunet_trainers import trainer_dir
from ssl_nnunet.paths import nnunet_preprocessed, nnunet_results
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.network import build_network_from_plans

SOURCE_ID, SOURCE = 930, "Dataset930_DropinSource"
TARGET_ID, TARGET = 931, "Dataset931_DropinTarget"
MARK_KEY = "encoder.stem.convs.0.conv.weight"


def _plans(dataset_name, identifier):
    with open(os.path.join(nnunet_preprocessed(), dataset_name, identifier + ".json")) as f:
        return json.load(f)


def _fabricate_ssl_checkpoint(path, method="mae", drop_key=None):
    """What the SSL trainer writes: the sslPlans network (C_in -> C_in, no deep supervision) + bookkeeping."""
    torch.manual_seed(0)
    net = build_network_from_plans(_plans(SOURCE, "sslPlans"), 1, 1, deep_supervision=False)
    with torch.no_grad():
        net.state_dict()[MARK_KEY].fill_(0.125)
    weights = {k: v.clone() for k, v in net.state_dict().items() if k != drop_key}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"network_weights": weights, "current_epoch": 3, "ssl_method": method, "iterations_done": 12,
                "logging": {"train_loss": [1.0, 0.8, 0.6], "val_loss": [1.1, 0.9, 0.7], "lr": [1e-2, 6e-3, 2e-3]}},
               path)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    write_synthetic_dataset(SOURCE_ID, "DropinSource", n_cases=3, shape=(48, 52, 56), spacing=(2.0, 2.0, 2.0))
    extract_fingerprint(SOURCE_ID, 1, verbose=False)
    plan_experiment(SOURCE_ID, "cpu_smoke", verbose=False)
    preprocess(SOURCE_ID, num_processes=1, verbose=False)
    _fabricate_ssl_checkpoint(os.path.join(ssl_output_folder(SOURCE, "mae"), "checkpoint_final.pth"))
    out = str(tmp_path_factory.mktemp("bundles") / "mae_bundle")
    assert export_bundle(SOURCE_ID, "mae", out) == out
    return out


def test_bundle_matches_the_network_nnunet_builds_from_the_finetune_plans(bundle):
    assert sorted(os.listdir(bundle)) == sorted(BUNDLE_FILES)
    ckpt = torch.load(os.path.join(bundle, "checkpoint_final.pth"), weights_only=False)
    downstream = build_network_from_plans(_plans(SOURCE, "sslFinetunePlans"), 1, 4, deep_supervision=True)
    expected = downstream.state_dict()
    weights = ckpt["network_weights"]
    assert list(weights) == list(expected)
    assert any(k.startswith("decoder.encoder.") for k in weights) and any(".all_modules." in k for k in weights)
    for k, v in weights.items():
        assert v.device.type == "cpu"
        if ".seg_layers." not in k:
            assert v.shape == expected[k].shape, k
    assert torch.all(weights[MARK_KEY] == 0.125)
    assert ckpt["trainer_name"] == "nnUNetTrainer" and ckpt["inference_allowed_mirroring_axes"] is None
    assert ckpt["optimizer_state"] is None and ckpt["grad_scaler_state"] is None and ckpt["_best_ema"] is None
    assert ckpt["current_epoch"] == 3 and ckpt["logging"]["train_loss"][-1] == 0.6
    init = ckpt["init_args"]
    assert init["plans"]["plans_name"] == "sslFinetunePlans" and init["configuration"] == "3d_fullres"
    assert init["fold"] == 0 and init["device"] == torch.device("cpu") and "labels" in init["dataset_json"]
    with open(os.path.join(bundle, "adaptation_plan.json")) as f:
        adaptation = json.load(f)
    assert adaptation == json.loads(json.dumps(ckpt["nnssl_adaptation_plan"]))
    arch = adaptation["architecture_plans"]
    assert arch["arch_class_name"] == "ResidualEncoderUNet"
    assert arch["arch_kwargs"]["conv_op"] == "torch.nn.modules.conv.Conv3d"
    assert adaptation["keys_to_in_proj"] == ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]
    assert adaptation["key_to_stem"] == "encoder.stem" and adaptation["key_to_encoder"] == "encoder.stages"
    assert adaptation["pretrain_num_input_channels"] == 1 and adaptation["key_to_lpe"] is None
    assert adaptation["recommended_downstream_patchsize"] == [32, 32, 32]
    assert adaptation["pretrain_plan"]["configurations"]["3d_fullres"]["spacing"] == [2.0, 2.0, 2.0]
    with open(os.path.join(bundle, "plans.json")) as f:
        assert json.load(f) == _plans(SOURCE, "sslFinetunePlans")
    with open(os.path.join(bundle, "README.md")) as f:
        card = f.read()
    for text in ("`mae`", SOURCE, "cpu_smoke", "encoder and decoder", "12", "0.6",
                 "nnUNetv2_move_plans_between_datasets -s 930 -t TGT -sp sslFinetunePlans -tp sslFinetunePlans",
                 "nnUNetv2_preprocess -d TGT -plans_name sslFinetunePlans -c 3d_fullres",
                 f"-pretrained_weights {bundle}/checkpoint_final.pth", "nnUNet_extTrainer"):
        assert text in card, text


def test_nnunet_load_pretrained_weights_accepts_bundle_in_process(bundle, capsys):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    net = build_network_from_plans(_plans(SOURCE, "sslFinetunePlans"), 1, 4, deep_supervision=True)
    head_before = net.decoder.seg_layers[-1].weight.detach().clone()
    load_pretrained_weights(net, os.path.join(bundle, "checkpoint_final.pth"))
    assert torch.all(net.state_dict()[MARK_KEY] == 0.125)
    assert torch.equal(net.decoder.seg_layers[-1].weight, head_before)  # 4-class head untouched
    assert "Loading pretrained weights from file" in capsys.readouterr().out


def test_export_errors_and_rerun(bundle, tmp_path):
    with pytest.raises(SSLInputError) as e:
        export_bundle(SOURCE_ID, "voco", str(tmp_path / "voco"))
    msg = str(e.value)
    assert os.path.join(ssl_output_folder(SOURCE, "voco"), "checkpoint_final.pth") in msg
    assert "ssl_nnunet_pretrain -d 930 -m voco" in msg
    assert not (tmp_path / "voco").exists()

    bad = _fabricate_ssl_checkpoint(str(tmp_path / "bad.pth"), drop_key=MARK_KEY)
    with pytest.raises(SSLInputError) as e:
        export_bundle(SOURCE_ID, "mae", str(tmp_path / "bad_bundle"), checkpoint=bad)
    assert "missing keys" in str(e.value) and MARK_KEY in str(e.value)
    assert not (tmp_path / "bad_bundle").exists()

    other = tmp_path / "not_a_bundle"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SSLInputError):
        export_bundle(SOURCE_ID, "mae", str(other))
    assert (other / "notes.txt").read_text() == "keep me"

    first_mtime = os.path.getmtime(os.path.join(bundle, "checkpoint_final.pth"))
    export_bundle(SOURCE_ID, "mae", bundle)  # rerun replaces the earlier bundle
    assert sorted(os.listdir(bundle)) == sorted(BUNDLE_FILES)
    assert os.path.getmtime(os.path.join(bundle, "checkpoint_final.pth")) >= first_mtime
    assert not [p for p in os.listdir(os.path.dirname(bundle)) if p.startswith(".")]


def test_cli_missing_checkpoint_exit_code(bundle, tmp_path):
    r = subprocess.run([sys.executable, "-c", "from ssl_nnunet.export.exporter import main; main()",
                        "-d", str(SOURCE_ID), "-m", "gvsl", "-o", str(tmp_path / "x")],
                       capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 2, r.stderr
    assert "ssl_nnunet_pretrain -d 930 -m gvsl" in r.stderr and "Traceback" not in r.stderr


def test_nnunetv2_train_with_pretrained_weights(bundle):
    """Real ``nnUNetv2_train`` (subprocess) on a transferred+preprocessed labeled target."""
    write_synthetic_dataset(TARGET_ID, "DropinTarget", n_cases=5, shape=(40, 44, 48), spacing=(2.0, 2.0, 2.0),
                            labeled=True, seed=1)  # >= 5 cases: nnU-Net creates a 5-fold split
    plans_path = transfer_and_preprocess(SOURCE_ID, TARGET_ID)
    target_plans = _plans(TARGET, "sslFinetunePlans")
    assert plans_path == os.path.join(nnunet_preprocessed(), TARGET, "sslFinetunePlans.json")
    assert target_plans["dataset_name"] == TARGET
    assert (target_plans["configurations"]["3d_fullres"]["architecture"]
            == _plans(SOURCE, "sslFinetunePlans")["configurations"]["3d_fullres"]["architecture"])
    assert os.path.isdir(os.path.join(nnunet_preprocessed(), TARGET, "sslFinetunePlans_3d_fullres"))

    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    cmd = [exe] if os.path.isfile(exe) else [sys.executable, "-c",
                                             "from nnunetv2.run.run_training import run_training_entry as m; m()"]
    env = dict(os.environ)
    env.update({"nnUNet_extTrainer": trainer_dir(), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "0"})
    r = subprocess.run(cmd + [str(TARGET_ID), "3d_fullres", "0", "-p", "sslFinetunePlans",
                              "-tr", "nnUNetTrainer_SSLSmoke", "-device", "cpu",
                              "-pretrained_weights", os.path.join(bundle, "checkpoint_final.pth")],
                       capture_output=True, text=True, env=env, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "################### Loading pretrained weights from file" in r.stdout, log[-4000:]
    fold = os.path.join(nnunet_results(), TARGET, "nnUNetTrainer_SSLSmoke__sslFinetunePlans__3d_fullres", "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    trained = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
    assert trained["trainer_name"] == "nnUNetTrainer_SSLSmoke" and trained["current_epoch"] == 1
