"""Tests of the synthetic MNI152 demo datasets (ssl_nnunet.data.demo_dataset). CPU only, a few seconds."""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

from ssl_nnunet.constants import DEMO_LABELED_DATASET, DEMO_UNLABELED_DATASET
from ssl_nnunet.data import demo_dataset as dd

SPACING = 5.0
N_UNLABELED = 3
N_LABELED = 2


def _nifti_files(folder: str) -> List[str]:
    out = []
    for sub in ("imagesTr", "labelsTr"):
        if os.path.isdir(os.path.join(folder, sub)):
            out += sorted(os.path.join(sub, f) for f in os.listdir(os.path.join(folder, sub)))
    return out


def _read_array(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Dict[str, str]:
    raw = tmp_path_factory.mktemp("nnUNet_raw")
    folders = dd.make_demo_datasets(n_unlabeled=N_UNLABELED, n_labeled=N_LABELED, spacing=SPACING, seed=0,
                                    raw_dir=str(raw))
    folders["raw"] = str(raw)
    return folders


def test_layout_and_dataset_json(demo, monkeypatch):
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    monkeypatch.setenv("nnUNet_raw", demo["raw"])
    assert convert_id_to_dataset_name(900) == DEMO_UNLABELED_DATASET
    assert convert_id_to_dataset_name(901) == DEMO_LABELED_DATASET
    assert sorted(os.listdir(demo["raw"])) == [DEMO_UNLABELED_DATASET, DEMO_LABELED_DATASET]

    unlabeled = json.load(open(os.path.join(demo["unlabeled"], "dataset.json")))
    assert unlabeled["channel_names"] == {"0": "T1"}
    assert unlabeled["labels"] == {"background": 0}
    assert unlabeled["numTraining"] == N_UNLABELED and unlabeled["file_ending"] == ".nii.gz"
    assert unlabeled["description"]
    assert unlabeled[dd.CONFIG_KEY]["seed"] == 0 and unlabeled[dd.CONFIG_KEY]["spacing_mm"] == SPACING
    assert not os.path.exists(os.path.join(demo["unlabeled"], "labelsTr"))
    assert _nifti_files(demo["unlabeled"]) == [f"imagesTr/DemoBrainSSL_{i:04d}_0000.nii.gz"
                                               for i in range(1, N_UNLABELED + 1)]

    labeled = json.load(open(os.path.join(demo["labeled"], "dataset.json")))
    assert labeled["labels"] == {"background": 0, "csf_other": 1, "grey_matter": 2, "white_matter": 3}
    assert labeled["numTraining"] == N_LABELED
    cases = get_filenames_of_train_images_and_targets(demo["labeled"], labeled)
    assert sorted(cases) == [f"DemoBrainSeg_{i:04d}" for i in range(1, N_LABELED + 1)]
    for case in cases.values():
        assert len(case["images"]) == 1 and os.path.isfile(case["images"][0]) and os.path.isfile(case["label"])


def test_geometry_labels_and_nnunet_reader(demo):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    reader = SimpleITKIO()
    for folder in (demo["unlabeled"], demo["labeled"]):
        for rel in _nifti_files(folder):
            image = sitk.ReadImage(os.path.join(folder, rel))
            assert image.GetDimension() == 3
            assert image.GetSpacing() == (SPACING,) * 3
    for i in range(1, N_LABELED + 1):
        img_path = os.path.join(demo["labeled"], "imagesTr", f"DemoBrainSeg_{i:04d}_0000.nii.gz")
        seg_path = os.path.join(demo["labeled"], "labelsTr", f"DemoBrainSeg_{i:04d}.nii.gz")
        data, props = reader.read_images([img_path])
        seg, seg_props = reader.read_seg(seg_path)
        assert data.ndim == 4 and data.shape[0] == 1  # (C, Z, Y, X): one channel, 3D
        assert seg.shape == data.shape
        assert list(props["spacing"]) == [SPACING] * 3 == list(seg_props["spacing"])
        assert props["sitk_stuff"] == seg_props["sitk_stuff"]
        assert np.isfinite(data).all() and data.std() > 0
        assert set(np.unique(seg).astype(int)) == {0, 1, 2, 3}
        # the brain should be bright compared to the background
        assert data[seg > 0].mean() > 3 * np.abs(data[seg == 0]).mean()


def test_world_geometry_matches_mni(demo):
    """Files are in LPS with direction diag(-1, -1, 1); the image centre is near the MNI brain centre."""
    image = sitk.ReadImage(os.path.join(demo["labeled"], "imagesTr", "DemoBrainSeg_0001_0000.nii.gz"))
    assert image.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    size = np.array(image.GetSize())
    centre_lps = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    template = dd.load_template()
    centre_ras = (template.brain_min_mm + template.brain_max_mm) / 2
    np.testing.assert_allclose(centre_lps * [-1, -1, 1], centre_ras, atol=1e-3)


def test_same_seed_identical_other_seed_different(demo, tmp_path):
    again = dd.make_demo_datasets(n_unlabeled=1, n_labeled=1, spacing=SPACING, seed=0, raw_dir=str(tmp_path / "a"))
    other = dd.make_demo_datasets(n_unlabeled=1, n_labeled=1, spacing=SPACING, seed=1, raw_dir=str(tmp_path / "b"))
    for key in ("unlabeled", "labeled"):
        for rel in _nifti_files(again[key]):  # case 0001 of the shared fixture was made with seed 0 too
            reference = _read_array(os.path.join(demo[key], rel))
            same = _read_array(os.path.join(again[key], rel))
            different = _read_array(os.path.join(other[key], rel))
            assert reference.dtype == same.dtype and reference.tobytes() == same.tobytes()
            assert reference.shape == different.shape and not np.array_equal(reference, different)


def test_datasets_share_no_subject(demo):
    unlabeled = [_read_array(os.path.join(demo["unlabeled"], "imagesTr", f)) for f in
                 sorted(os.listdir(os.path.join(demo["unlabeled"], "imagesTr")))]
    labeled = [_read_array(os.path.join(demo["labeled"], "imagesTr", f)) for f in
               sorted(os.listdir(os.path.join(demo["labeled"], "imagesTr")))]
    everything = unlabeled + labeled
    for i in range(len(everything)):
        for j in range(i + 1, len(everything)):
            assert everything[i].shape == everything[j].shape
            assert np.abs(everything[i] - everything[j]).mean() > 1.0


def test_rerun_is_idempotent_and_mismatch_needs_overwrite(tmp_path, capsys):
    raw = str(tmp_path)
    first = dd.make_demo_datasets(n_unlabeled=1, n_labeled=1, spacing=SPACING, seed=3, raw_dir=raw)
    stamp = {p: os.stat(os.path.join(first["labeled"], p)).st_mtime_ns for p in _nifti_files(first["labeled"])}
    capsys.readouterr()

    second = dd.make_demo_datasets(n_unlabeled=1, n_labeled=1, spacing=SPACING, seed=3, raw_dir=raw)
    assert second == first
    assert capsys.readouterr().out.count("skipping") == 2
    assert {p: os.stat(os.path.join(first["labeled"], p)).st_mtime_ns for p in stamp} == stamp

    with pytest.raises(dd.DemoDatasetError, match="--overwrite"):
        dd.make_demo_datasets(n_unlabeled=1, n_labeled=2, spacing=SPACING, seed=3, raw_dir=raw)

    dd.make_demo_datasets(n_unlabeled=1, n_labeled=2, spacing=SPACING, seed=3, raw_dir=raw, overwrite=True)
    labeled_json = json.load(open(os.path.join(first["labeled"], "dataset.json")))
    assert labeled_json["numTraining"] == 2 and len(_nifti_files(first["labeled"])) == 4
    assert sorted(os.listdir(raw)) == [DEMO_UNLABELED_DATASET, DEMO_LABELED_DATASET]  # no leftovers

    # both folders are checked before anything is generated
    shutil.rmtree(first["unlabeled"])
    with pytest.raises(dd.DemoDatasetError, match="seed: 3 on disk vs 4 requested"):
        dd.make_demo_datasets(n_unlabeled=1, n_labeled=2, spacing=SPACING, seed=4, raw_dir=raw)
    assert os.listdir(raw) == [DEMO_LABELED_DATASET]


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = dd.write_volume

    def failing_write(array, path, grid):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_write(array, path, grid)

    monkeypatch.setattr(dd, "write_volume", failing_write)
    with pytest.raises(KeyboardInterrupt):
        dd.make_demo_datasets(n_unlabeled=2, n_labeled=1, spacing=SPACING, seed=0, raw_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_conflicting_dataset_id_is_refused(tmp_path):
    os.makedirs(tmp_path / "Dataset900_SomethingElse")
    with pytest.raises(dd.DemoDatasetError, match="dataset id 900"):
        dd.make_demo_datasets(n_unlabeled=1, n_labeled=1, spacing=SPACING, raw_dir=str(tmp_path))


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        dd.make_demo_datasets(n_unlabeled=0, raw_dir=str(tmp_path))
    with pytest.raises(ValueError):
        dd.make_demo_datasets(spacing=0.1, raw_dir=str(tmp_path))
    with pytest.raises(ValueError):
        dd.make_demo_datasets(seed=-1, raw_dir=str(tmp_path))


def test_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    argv = ["--n_unlabeled", "1", "--n_labeled", "1", "--spacing", "6", "--seed", "2"]
    assert dd.main(argv) == 0
    out = capsys.readouterr().out
    assert os.path.join(str(tmp_path), DEMO_UNLABELED_DATASET) in out
    assert os.path.join(str(tmp_path), DEMO_LABELED_DATASET) in out
    image = sitk.ReadImage(str(tmp_path / DEMO_LABELED_DATASET / "imagesTr" / "DemoBrainSeg_0001_0000.nii.gz"))
    assert image.GetSpacing() == (6.0, 6.0, 6.0)
    assert dd.main(argv + ["--n_labeled", "2"]) == 1  # differs from what is on disk, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert dd.main(argv + ["--n_labeled", "2", "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        dd.main(["-h"])
    assert exit_info.value.code == 0


def test_tissue_labels_from_probabilities():
    gm = np.array([0.6, 0.3, 0.2, 0.45, 0.9], dtype=np.float32)
    wm = np.array([0.3, 0.6, 0.2, 0.45, 0.0], dtype=np.float32)
    mask = np.array([True, True, True, True, False])
    np.testing.assert_array_equal(dd.tissue_labels_from_probabilities(gm, wm, mask), [2, 3, 1, 1, 0])
