"""A folder of scans -> unlabeled dataset (ssl_nnunet_make_dataset) and sharded, resumable preprocessing."""
import json
import os
import pickle
import shutil

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk

from helpers import write_synthetic_dataset
from ssl_nnunet.experiment_planning import preprocess as pp
from ssl_nnunet.experiment_planning.entrypoints import plan_and_preprocess_entry, preprocess_entry
from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
from ssl_nnunet.experiment_planning.make_dataset import main as make_dataset_main
from ssl_nnunet.experiment_planning.planner import plan_experiment
from ssl_nnunet.paths import nnunet_preprocessed, nnunet_raw
from ssl_nnunet.utilities.errors import SSLInputError

SHAPE = (24, 28, 32)


def _write(path, seed, spacing=(2.0, 2.0, 2.0)):
    rng = np.random.RandomState(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    body = (grid ** 2).sum(0) < 0.7
    img = sitk.GetImageFromArray((100.0 * body + rng.normal(0, 5, SHAPE) * body).astype(np.float32))
    img.SetSpacing(spacing)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(img, path)


def test_folder_converter_nested_two_channels_no_labels(tmp_path, new_dataset_id, capsys):
    """A BIDS-like tree with two channels in three formats becomes a dataset.json that references the files in
    place (no copy, no 'labels'), with subject/session; it plans and preprocesses without labels, with one
    notice; a rerun is a no-op; an incomplete case is named."""
    scans = tmp_path / "scans"
    layout = {("sub-01", "ses-1", ".nii.gz"), ("sub-01", "ses-2", ".mha"), ("sub-02", "ses-1", ".nrrd")}
    for i, (sub, ses, ending) in enumerate(sorted(layout)):
        for c, mod in enumerate(("T1w", "FLAIR")):
            _write(str(scans / sub / ses / "anat" / f"{sub}_{ses}_{mod}{ending}"), 10 * i + c)
    (scans / "sub-02" / "ses-1" / "anat" / "notes.txt").write_text("not an image")
    _write(str(scans / "sub-02" / "ses-1" / "dwi" / "sub-02_ses-1_dwi.nii.gz"), 99)  # matches no channel
    did, name = new_dataset_id("FolderScans")
    argv = ["-i", str(scans), "-d", str(did), "-n", name.split("_", 1)[1], "--channels", "_T1w$", "_FLAIR$",
            "--channel_names", "T1", "FLAIR"]
    make_dataset_main(argv)
    path = os.path.join(nnunet_raw(), name, "dataset.json")
    dj = json.load(open(path))
    assert "labels" not in dj and dj["channel_names"] == {"0": "T1", "1": "FLAIR"} and dj["numTraining"] == 3
    assert sorted(dj["dataset"]) == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"]
    entry = dj["dataset"]["sub-01_ses-2"]
    assert entry["subject"] == "sub-01" and entry["session"] == "ses-2"
    assert entry["images"] == [str(scans / "sub-01" / "ses-2" / "anat" / f"sub-01_ses-2_{m}.mha")
                               for m in ("T1w", "FLAIR")]
    assert not os.path.exists(os.path.join(nnunet_raw(), name, "imagesTr"))  # referenced, not copied
    mtime = os.stat(path).st_mtime_ns
    make_dataset_main(argv)  # same folder, same arguments: the file is left as it is
    assert os.stat(path).st_mtime_ns == mtime and "up to date" in capsys.readouterr().out

    capsys.readouterr()
    plan_and_preprocess_entry(["-d", str(did), "-np", "1", "-profile", "cpu_smoke"])
    out = capsys.readouterr().out
    assert out.count("has no 'labels' key") == 1, out
    pp_folder = os.path.join(nnunet_preprocessed(), name)
    assert json.load(open(os.path.join(pp_folder, "dataset.json")))["labels"] == {"background": 0}
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = json.load(open(os.path.join(pp_folder, "sslPlans.json")))
    folder = os.path.join(pp_folder, "sslPlans_3d_fullres")
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(folder)) == sorted(dj["dataset"])
    data, seg, _, props = nnUNetDatasetBlosc2(folder).load_case("sub-02_ses-1")
    assert data.shape[0] == 2 and int(np.asarray(seg[:]).max()) <= 0 and "ssl_body_bbox" in props
    label_manager = PlansManager(plans).get_label_manager(json.load(open(os.path.join(pp_folder, "dataset.json"))))
    assert label_manager.num_segmentation_heads == 1  # what nnU-Net's trainer builds from it

    os.remove(str(scans / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_FLAIR.mha"))
    with pytest.raises(SystemExit):
        make_dataset_main(argv + ["--overwrite"])
    err = capsys.readouterr().err
    assert "sub-01_ses-2" in err and "FLAIR" in err and "--skip_incomplete" in err
    make_dataset_main(argv + ["--overwrite", "--skip_incomplete"])
    assert sorted(json.load(open(path))["dataset"]) == ["sub-01_ses-1", "sub-02_ses-1"]


def _snapshot(folder):
    """{file name: array or properties} of a preprocessed folder."""
    snap = {}
    for f in sorted(os.listdir(folder)):
        full = os.path.join(folder, f)
        if f.endswith(".b2nd"):
            snap[f] = np.asarray(blosc2.open(full, mode="r")[:])
        elif f.endswith(".pkl"):
            with open(full, "rb") as fh:
                snap[f] = pickle.load(fh)
        else:
            snap[f] = "other"
    return snap


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert repr(a[k]) == repr(b[k]), k


@pytest.fixture(scope="module")
def planned_five(new_dataset_id):
    did, name = new_dataset_id("Shards")
    write_synthetic_dataset(did, name.split("_", 1)[1], n_cases=5, shape=SHAPE)
    extract_fingerprint(did, 1, verbose=False)
    plan_experiment(did, "cpu_smoke", verbose=False)
    out = pp.preprocess(did, num_processes=1, verbose=False)
    return did, name, out, _snapshot(out)


def test_parts_merge_to_the_unsplit_result(planned_five):
    did, name, out, unsplit = planned_five
    shutil.rmtree(out)
    seen = []
    for part in (2, 0, 1):  # any order, into the same folder
        pre = pp.SSLPreprocessor(verbose=False)
        pre.show_progress_bar = False
        _, counts = pre.run(did, part=part, total_parts=3)
        seen.append(counts["cases"])
        assert counts["written"] == counts["cases"] and counts["skipped"] == 0
    assert sorted(seen) == [1, 2, 2]
    _assert_same(_snapshot(out), unsplit)
    preprocess_entry(["-d", str(did), "-np", "1", "--quiet"])  # everything done: nothing rewritten
    _assert_same(_snapshot(out), unsplit)
    with pytest.raises(SystemExit):
        preprocess_entry(["-d", str(did), "-part", "3", "-total_parts", "3"])


def test_interrupted_run_leaves_no_half_case_and_resumes(planned_five, monkeypatch):
    """A run killed between writing a case's files (here: while the 3rd case's data file is renamed into
    place) leaves only complete cases visible; the rerun skips them and ends with the unsplit result."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    did, name, out, unsplit = planned_five
    shutil.rmtree(out)
    calls = []

    class KilledOs:
        def __getattr__(self, attr):
            return getattr(os, attr)

        @staticmethod
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 9:  # 3rd case, data file (renamed last)
                raise KeyboardInterrupt
            os.replace(src, dst)

    monkeypatch.setattr(pp, "os", KilledOs())
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(did, num_processes=1, verbose=False)
    monkeypatch.undo()
    ids = nnUNetDatasetBlosc2.get_identifiers(out)
    assert len(ids) == 2 and all(os.path.isfile(os.path.join(out, i + ".pkl")) for i in ids)
    half = os.path.basename(calls[-1])[:-len(".b2nd")]
    assert half not in ids and os.path.isfile(os.path.join(out, half + "_seg.b2nd"))
    pre = pp.SSLPreprocessor(verbose=False)
    pre.show_progress_bar = False
    _, counts = pre.run(did, num_processes=1)
    assert counts == {"cases": 5, "written": 3, "skipped": 2, "removed": 0}
    _assert_same(_snapshot(out), unsplit)


def test_failing_case_is_named_and_the_others_are_kept(planned_five):
    """One unreadable raw file: the other cases are written (2 worker processes), the error names the case, and
    after the fix only that case is preprocessed."""
    did, name, out, unsplit = planned_five
    shutil.rmtree(out)
    bad = os.path.join(nnunet_raw(), name, "imagesTr", f"{name.split('_', 1)[1]}_003_0000.nii.gz")
    good = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(b"not a nifti")
    try:
        with pytest.raises(SSLInputError) as e:
            pp.preprocess(did, num_processes=2, verbose=False)
    finally:
        with open(bad, "wb") as f:
            f.write(good)
    msg = str(e.value)
    assert "1 of 5 case(s) failed" in msg and f"case '{name.split('_', 1)[1]}_003'" in msg and bad in msg
    assert len(os.listdir(out)) == 4 * 3  # the other four cases, complete; no temporary folder left
    pre = pp.SSLPreprocessor(verbose=False)
    pre.show_progress_bar = False
    _, counts = pre.run(did, num_processes=1)
    assert counts["written"] == 1 and counts["skipped"] == 4
    _assert_same(_snapshot(out), unsplit)


def test_changed_plan_redoes_cases_and_removed_cases_go(planned_five):
    did, name, out, unsplit = planned_five
    pre = pp.SSLPreprocessor(verbose=False)
    pre.show_progress_bar = False
    pre.run(did, num_processes=1)
    plans_file = os.path.join(nnunet_preprocessed(), name, "sslPlans.json")
    plans = json.load(open(plans_file))
    saved = json.dumps(plans)
    plans["ssl"]["methods"]["mae"]["num_epochs"] = 7  # the ssl block does not change the data
    json.dump(plans, open(plans_file, "w"))
    assert pre.run(did, num_processes=1)[1]["skipped"] == 5
    plans["configurations"]["3d_fullres"]["spacing"] = [3.0, 3.0, 3.0]
    json.dump(plans, open(plans_file, "w"))
    with open(os.path.join(out, "gone_case.pkl"), "wb") as f:
        pickle.dump({}, f)
    try:
        _, counts = pre.run(did, num_processes=1)
    finally:
        open(plans_file, "w").write(saved)
    assert counts["written"] == 5 and counts["removed"] == 1 and not os.path.exists(os.path.join(out, "gone_case.pkl"))
    assert pre.run(did, num_processes=1)[1]["written"] == 5  # back to the original plan: redone again
    _assert_same(_snapshot(out), unsplit)
