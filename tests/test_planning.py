"""Fingerprint, SSL planning and preprocessing on small synthetic datasets (cpu_smoke profile)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import write_synthetic_dataset
from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
from ssl_nnunet.experiment_planning.planner import FINETUNE_PLANS, SSL_PLANS, plan_experiment
from ssl_nnunet.experiment_planning.preprocess import preprocess
from ssl_nnunet.methods.features import cumulative_strides
from ssl_nnunet.paths import nnunet_preprocessed
from ssl_nnunet.utilities.errors import SSLInputError

SHAPE = (60, 64, 70)


def _plan_and_preprocess(dataset_id, profile="cpu_smoke", **kw):
    extract_fingerprint(dataset_id, 1, verbose=False)
    plans = plan_experiment(dataset_id, profile, verbose=False, **kw)
    out = preprocess(dataset_id, num_processes=1, verbose=False)
    return plans, out


@pytest.fixture(scope="module")
def planned_unlabeled():
    write_synthetic_dataset(910, "PlanUnlabeled", n_cases=3, shape=SHAPE, spacing=(2.0, 1.5, 1.5))
    return _plan_and_preprocess(910)


def test_plans_load_in_nnunet_and_build_network(planned_unlabeled):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans, _ = planned_unlabeled
    for name in (SSL_PLANS, FINETUNE_PLANS):
        with open(os.path.join(nnunet_preprocessed(), "Dataset910_PlanUnlabeled", name + ".json")) as f:
            pm = PlansManager(json.load(f))
        cm = pm.get_configuration("3d_fullres")
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 1, deep_supervision=False)
        with torch.no_grad():
            out = net(torch.zeros(1, 1, *cm.patch_size))
        assert out.shape == (1, 1, *cm.patch_size)
    assert cm.patch_size == [32, 32, 32]
    assert "ssl" in plans and set(plans["ssl"]["methods"]) == {"mae", "mim", "voco", "gvsl", "alice"}


def test_preprocessed_data_load_with_nnunet_dataset_at_planned_spacing(planned_unlabeled):
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    plans, out = planned_unlabeled
    config = plans["configurations"]["3d_fullres"]
    assert os.path.basename(out) == config["data_identifier"]
    ds = nnUNetDatasetBlosc2(out)
    assert len(ds.identifiers) == 3
    data, seg, _, props = ds.load_case(ds.identifiers[0])
    original_spacing = [props["spacing"][i] for i in plans["transpose_forward"]]
    expected = compute_new_shape(props["shape_after_cropping_and_before_resampling"], original_spacing,
                                 config["spacing"])
    assert tuple(data.shape[1:]) == tuple(expected)
    assert np.allclose(config["spacing"], [2.0, 1.5, 1.5])
    lo_hi = props["ssl_body_bbox"]
    assert all(0 <= lo < hi <= s for (lo, hi), s in zip(lo_hi, data.shape[1:]))
    # z-score normalised foreground
    assert abs(float(np.asarray(data[0]).mean())) < 2


def _check_layout_valid(ssl):
    S, q = ssl["total_stride"], ssl["mask_quantum"]
    for name, m in ssl["methods"].items():
        P = m["pretrain_patch_size"]
        assert all(p % s == 0 for p, s in zip(P, S)), name
    mae = ssl["methods"]["mae"]
    assert all(p % u == 0 for p, u in zip(mae["pretrain_patch_size"], mae["layout"]["mask_unit"]))
    voco = ssl["methods"]["voco"]["layout"]
    assert voco["base_grid"][ssl["out_of_plane_axis"]] == 1
    assert voco["region_size"] == [g * c for g, c in zip(voco["base_grid"], voco["crop_size"])]
    mim = ssl["methods"]["mim"]
    assert all(p % u == 0 and u % qq == 0 for p, u, qq in zip(mim["pretrain_patch_size"], mim["layout"]["u2"], q))


def test_two_profiles_give_different_valid_layouts():
    write_synthetic_dataset(911, "PlanProfiles", n_cases=3, shape=(70, 72, 76), spacing=(1.5, 1.5, 1.5))
    extract_fingerprint(911, 1, verbose=False)
    smoke = plan_experiment(911, "cpu_smoke", verbose=False)["ssl"]
    bench = plan_experiment(911, "cpu_bench", verbose=False)["ssl"]
    for ssl in (smoke, bench):
        _check_layout_valid(ssl)
    assert smoke["total_stride"] != bench["total_stride"]
    assert smoke["methods"]["mae"]["layout"] != bench["methods"]["mae"]["layout"]
    assert smoke["methods"]["mim"]["layout"]["u2"] == [8, 8, 8]      # METHODS.md §8 worked example E3
    assert bench["methods"]["mim"]["layout"]["u2"] == [16, 16, 16]   # E4
    assert bench["methods"]["voco"]["layout"]["crop_size"] == [32, 32, 32]
    assert [list(s) for s in cumulative_strides([[1, 1, 1], [1, 2, 2], [2, 2, 2]])] == [[1, 1, 1], [1, 2, 2], [2, 4, 4]]


def test_labeled_dataset_uses_labels_for_foreground():
    write_synthetic_dataset(912, "PlanLabeled", n_cases=2, shape=SHAPE, labeled=True)
    fp = extract_fingerprint(912, 1, verbose=False)
    assert fp["ssl_nnunet"]["foreground_source"] == ["labels", "labels"]
    assert fp["ssl_nnunet"]["has_labels"]


# ---------------------------------------------------------------- bad input

def _raw(dataset_dir):
    return dataset_dir


def _expect_error(dataset_id, *fragments):
    with pytest.raises(SSLInputError) as e:
        extract_fingerprint(dataset_id, 1, verbose=False)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert not os.path.exists(os.path.join(nnunet_preprocessed(), os.path.basename(_last_folder[0]),
                                           "dataset_fingerprint.json"))


_last_folder = [""]


def _fresh(dataset_id, name, **kw):
    _last_folder[0] = write_synthetic_dataset(dataset_id, name, n_cases=2, shape=(36, 40, 44), **kw)
    return _last_folder[0]


def test_unknown_dataset_id_lists_datasets():
    _fresh(920, "Known")
    with pytest.raises(SSLInputError) as e:
        extract_fingerprint(987, 1, verbose=False)
    assert "987" in str(e.value) and "Dataset920_Known" in str(e.value)


def test_missing_and_invalid_dataset_json():
    folder = _fresh(921, "NoJson")
    os.remove(os.path.join(folder, "dataset.json"))
    _expect_error(921, "dataset.json is missing")
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        f.write("{not json")
    _expect_error(921, "not valid JSON")
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"}, f)
    _expect_error(921, "'numTraining'")  # 'labels' is optional (unlabeled); the others are required
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", "numTraining": 2, "labels": [0]}, f)
    _expect_error(921, "'labels' must map")


def test_corrupt_image_names_file_and_rerun_after_fix_succeeds():
    folder = _fresh(922, "Corrupt")
    bad = os.path.join(folder, "imagesTr", "Corrupt_001_0000.nii.gz")
    good_copy = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(b"this is not a nifti file")
    _expect_error(922, "Corrupt_001_0000.nii.gz", "cannot read")
    with open(bad, "wb") as f:
        f.write(good_copy)
    fp = extract_fingerprint(922, 1, verbose=False)
    assert len(fp["spacings"]) == 2


def test_channels_with_different_shape_or_spacing():
    folder = _fresh(923, "Channels", channel_names={"0": "T1", "1": "T2"})
    path = os.path.join(folder, "imagesTr", "Channels_000_0001.nii.gz")
    img = sitk.GetImageFromArray(np.zeros((30, 40, 44), np.float32))
    sitk.WriteImage(img, path)
    _expect_error(923, "Channels_000_0001.nii.gz", "shape")
    img = sitk.GetImageFromArray(np.zeros((36, 40, 44), np.float32))
    img.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(img, path)
    _expect_error(923, "spacing")


def test_nan_voxels_and_2d_images():
    folder = _fresh(924, "NaN")
    path = os.path.join(folder, "imagesTr", "NaN_000_0000.nii.gz")
    import nibabel
    arr = np.ones((36, 40, 44), np.float32)
    arr[3, 4, 5] = np.nan
    nibabel.save(nibabel.Nifti1Image(arr, np.eye(4)), path)  # ITK's NIfTI reader would hide the NaN
    _expect_error(924, "NaN_000_0000.nii.gz", "NaN/inf")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((40, 44), np.float32)), path)
    _expect_error(924, "2D image")


def test_empty_images_tr():
    folder = _fresh(925, "Empty")
    for f in os.listdir(os.path.join(folder, "imagesTr")):
        os.remove(os.path.join(folder, "imagesTr", f))
    _expect_error(925, "imagesTr")


def test_cli_exit_code_and_message():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", "from ssl_nnunet.experiment_planning.entrypoints import "
                        "plan_and_preprocess_entry as m; m()", "-d", "986", "-np", "1"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "Dataset id 986 not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_dataset_key_of_dataset_json_lists_the_files():
    """nnU-Net v2's explicit file list (``"dataset"`` key, paths relative to the raw folder) is honoured: files
    outside imagesTr are found, imagesTr files not listed are ignored, a listed file that is missing is named."""
    folder = _fresh(926, "FileList")
    os.makedirs(os.path.join(folder, "scans"), exist_ok=True)
    listed = {}
    for i, f in enumerate(sorted(os.listdir(os.path.join(folder, "imagesTr")))):
        if i == 0:
            os.replace(os.path.join(folder, "imagesTr", f), os.path.join(folder, "scans", f"scan{i}.nii.gz"))
            listed[f"scan{i}"] = {"images": [f"scans/scan{i}.nii.gz"]}
    dj_path = os.path.join(folder, "dataset.json")
    dj = json.load(open(dj_path))
    dj["dataset"] = listed
    json.dump(dj, open(dj_path, "w"))
    _plans, out = _plan_and_preprocess(926)
    fp = json.load(open(os.path.join(nnunet_preprocessed(), "Dataset926_FileList", "dataset_fingerprint.json")))
    assert len(fp["spacings"]) == 1  # only the listed case; the one left in imagesTr is not part of the list
    assert {f.split(".")[0].replace("_seg", "") for f in os.listdir(out)} == {"scan0"}
    dj["dataset"]["scan_missing"] = {"images": ["scans/nope.nii.gz"]}
    json.dump(dj, open(dj_path, "w"))
    os.remove(os.path.join(nnunet_preprocessed(), "Dataset926_FileList", "dataset_fingerprint.json"))
    _expect_error(926, "scan_missing", "nope.nii.gz")


def test_gvsl_intensity_range_from_ct_fingerprint():
    """CT: GVSL's map to [0, 1] is the fingerprint's foreground 0.5/99.5 percentiles in normalised units (a fixed
    range); MR keeps per-patch percentiles (METHODS.md §5.3)."""
    write_synthetic_dataset(927, "PlanCT", n_cases=2, shape=(36, 40, 44), channel_names={"0": "CT"})
    plans, _ = _plan_and_preprocess(927)
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    intensity = plans["ssl"]["methods"]["gvsl"]["layout"]["intensity"]
    assert intensity["mode"] == "fixed"
    (lo, hi), = intensity["range"]
    assert lo == pytest.approx((props["percentile_00_5"] - props["mean"]) / props["std"])
    assert hi == pytest.approx((props["percentile_99_5"] - props["mean"]) / props["std"])
    assert lo < 0 < hi


def test_gvsl_intensity_per_patch_for_mr(planned_unlabeled):
    plans, _ = planned_unlabeled
    assert plans["ssl"]["methods"]["gvsl"]["layout"]["intensity"]["mode"] == "per_patch"
