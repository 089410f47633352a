"""ssl_nnunet_predict: an arm's model folder found and predicted with nnUNetPredictor (oneDNN on CPU); the
segmentations of two cases match nnUNetv2_predict on the same fold. The fold is a real nnU-Net model folder
(plans.json, dataset.json, fold_0/checkpoint_final.pth in nnU-Net's format) with a randomly initialised
network, so no training is needed."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import write_synthetic_dataset
from ssl_nnunet.utilities.errors import SSLInputError

TRAINER = "nnUNetTrainer_SSLSmoke"
SOURCE = "Dataset999_PredictSource"


@pytest.fixture(scope="module")
def arm_model(new_dataset_id, tmp_path_factory):
    """A target planned with cpu_smoke and a scratch-arm model folder laid out as ssl_nnunet_finetune does."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
    from ssl_nnunet.experiment_planning.planner import plan_experiment
    from ssl_nnunet.finetune.finetune import arm_roots, fold_folder
    from ssl_nnunet.utilities.file_io import load_json
    from ssl_nnunet.utilities.network import build_network_from_plans
    did, name = new_dataset_id("PredictTarget")
    raw = write_synthetic_dataset(did, "PredictTarget", n_cases=2, shape=(40, 44, 48), labeled=True, seed=7)
    extract_fingerprint(did, 1, verbose=False)
    plan_experiment(did, "cpu_smoke", verbose=False)
    plans = load_json(os.path.join(os.environ["nnUNet_preprocessed"], name, "sslFinetunePlans.json"), "plans")
    dataset_json = load_json(os.path.join(raw, "dataset.json"), "dataset.json")
    arm_root = arm_roots(os.path.join(os.environ["nnUNet_results"], name, "ssl_nnunet_finetune", SOURCE), "mae")
    fold = fold_folder(arm_root["scratch"], name, TRAINER, 0)
    os.makedirs(fold)
    shutil.copy(os.path.join(os.environ["nnUNet_preprocessed"], name, "sslFinetunePlans.json"),
                os.path.join(os.path.dirname(fold), "plans.json"))
    shutil.copy(os.path.join(raw, "dataset.json"), os.path.join(os.path.dirname(fold), "dataset.json"))
    torch.manual_seed(0)
    n_out = PlansManager(plans).get_label_manager(dataset_json).num_segmentation_heads
    network = build_network_from_plans(plans, 1, n_out, deep_supervision=True)
    torch.save({"network_weights": network.state_dict(), "trainer_name": TRAINER,
                "init_args": {"configuration": "3d_fullres", "fold": 0}, "inference_allowed_mirroring_axes": None},
               os.path.join(fold, "checkpoint_final.pth"))
    images = str(tmp_path_factory.mktemp("predict") / "imagesTs")  # outside nnUNet_raw
    shutil.copytree(os.path.join(raw, "imagesTr"), images)
    return {"id": did, "name": name, "images": images, "arm_root": arm_root["scratch"],
            "model": os.path.dirname(fold)}


def _read(folder):
    import SimpleITK as sitk
    files = sorted(f for f in os.listdir(folder) if f.endswith(".nii.gz"))
    return files, [sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, f))) for f in files]


def test_predict_matches_nnunetv2_predict(arm_model, tmp_path, capsys):
    from ssl_nnunet.finetune.predict import main
    from ssl_nnunet.nnunet_trainers import trainer_dir
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "ref")
    main(["-i", arm_model["images"], "-o", ours, "-d", str(arm_model["id"]), "-arm", "scratch", "-f", "0",
          "-device", "cpu", "-npp", "1", "-nps", "1"])
    assert arm_model["model"] in capsys.readouterr().out
    env = dict(os.environ, nnUNet_results=arm_model["arm_root"], nnUNet_extTrainer=trainer_dir())
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_predict")
    subprocess.run([exe, "-i", arm_model["images"], "-o", ref, "-d", arm_model["name"], "-c", "3d_fullres",
                    "-p", "sslFinetunePlans", "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"],
                   env=env, check=True, capture_output=True)
    files, seg = _read(ours)
    ref_files, ref_seg = _read(ref)
    assert files == ref_files and len(files) == 2
    for a, b in zip(seg, ref_seg):
        assert a.shape == b.shape and len(np.unique(b)) > 1  # a real segmentation, not one constant label
        # oneDNN and PyTorch's generic kernel agree to float round-off: at most a voxel on a logit tie differs
        assert np.mean(a != b) < 1e-4


def test_arm_folder_errors(arm_model):
    from ssl_nnunet.finetune.predict import find_model_folder
    assert find_model_folder(arm_model["id"], "scratch") == arm_model["model"]
    with pytest.raises(SSLInputError, match="No fine-tuned 'pretrained' model"):
        find_model_folder(arm_model["id"], "pretrained")
    # a second scratch model (another trainer) makes the choice ambiguous until -tr names one
    other = arm_model["model"].replace(TRAINER, "nnUNetTrainer_SSLFinetune_CPU300")
    shutil.copytree(arm_model["model"], other)
    try:
        with pytest.raises(SSLInputError, match="Several fine-tuned 'scratch' models"):
            find_model_folder(arm_model["id"], "scratch")
        assert find_model_folder(arm_model["id"], "scratch", trainer=TRAINER) == arm_model["model"]
    finally:
        shutil.rmtree(other)
