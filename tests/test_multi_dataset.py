"""Several datasets in one pretraining run and the subject-aware held-out split (issue 16 items 3, 4)."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import write_synthetic_dataset
from ssl_nnunet.utilities.errors import SSLInputError


def _pp(name):
    return os.path.join(os.environ["nnUNet_preprocessed"], name)


def _plans(name):
    with open(os.path.join(_pp(name), "sslPlans.json")) as f:
        return json.load(f)


def _shrink_mae(name, **updates):
    path = os.path.join(_pp(name), "sslPlans.json")
    plans = _plans(name)
    plans["ssl"]["methods"]["mae"].update({"iterations_per_epoch": 2, "num_val_iterations": 1, **updates})
    with open(path, "w") as f:
        json.dump(plans, f)


def _rename_to_sessions(name, n_subjects, n_sessions):
    """Rename the cases ``<name>_000 ...`` of a raw dataset to ``subj<k>_ses-<s>`` (k subjects x s sessions)."""
    images = os.path.join(os.environ["nnUNet_raw"], name, "imagesTr")
    short = name.split("_", 1)[1]
    for i in range(n_subjects * n_sessions):
        os.rename(os.path.join(images, f"{short}_{i:03d}_0000.nii.gz"),
                  os.path.join(images, f"subj{i // n_sessions}_ses-{i % n_sessions}_0000.nii.gz"))


@pytest.fixture(scope="module")
def two_datasets(new_dataset_id):
    """Two compatible raw datasets (6 and 4 cases, different spacing) planned and preprocessed together."""
    from ssl_nnunet.experiment_planning.entrypoints import plan_and_preprocess_entry
    (a, name_a), (b, name_b) = new_dataset_id("MultiA"), new_dataset_id("MultiB")
    write_synthetic_dataset(a, "MultiA", n_cases=6, shape=(24, 28, 32), seed=1)
    write_synthetic_dataset(b, "MultiB", n_cases=4, shape=(20, 24, 28), spacing=(2.5, 2.0, 2.0), seed=2)
    plan_and_preprocess_entry(["-d", str(a), str(b), "-np", "1", "-profile", "cpu_smoke", "--quiet"])
    for n in (name_a, name_b):
        _shrink_mae(n)
    return (a, name_a), (b, name_b)


def test_shared_plan_is_the_first_datasets_plan(two_datasets):
    (a, name_a), (b, name_b) = two_datasets
    pa, pb = _plans(name_a), _plans(name_b)
    assert pb["dataset_name"] == name_b and pa["dataset_name"] == name_a
    assert pa["configurations"] == pb["configurations"]  # spacing of A (2 mm), not B's 2.5 mm
    assert pa["configurations"]["3d_fullres"]["spacing"] == [2.0, 2.0, 2.0]
    assert pa["ssl"]["shared_plan"]["datasets"] == pb["ssl"]["shared_plan"]["datasets"] == [name_a, name_b]
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    for name, n in ((name_a, 6), (name_b, 4)):
        assert len(nnUNetDatasetBlosc2.get_identifiers(os.path.join(_pp(name), "sslPlans_3d_fullres"))) == n
    assert not os.path.exists(os.path.join(_pp(name_b), "dataset_fingerprint.json"))  # only the reference's


def test_two_dataset_run_follows_the_weights_and_export_records_both(two_datasets, tmp_path):
    from ssl_nnunet.data.case_cache import choose_cases
    from ssl_nnunet.export.exporter import export_bundle
    from ssl_nnunet.training.run import pretrain
    (a, name_a), (b, name_b) = two_datasets
    trainer = pretrain([a, b], "mae", device="cpu", iterations=2, num_prefetch=0, dataset_weights=["1", "3"])
    assert trainer.output_folder.endswith(os.path.join(name_a, f"SSL_mae__sslPlans__3d_fullres__multi_{a}_{b}"))
    sampler = trainer.dataloader_train.sampler
    ids = sampler.identifiers
    train_counts = {n: sum(i.startswith(n + "/") for i in ids) for n in (name_a, name_b)}
    assert train_counts == {name_a: 5, name_b: 3}  # one held-out case per dataset
    assert sampler.groups.probabilities == (0.25, 0.75)
    rng = np.random.RandomState(0)
    draws = [choose_cases(rng, ids, 1, sampler.cases, sampler.groups)[0] for _ in range(4000)]
    from_b = sum(d.startswith(name_b + "/") for d in draws)
    assert abs(from_b - 3000) < 120  # 0.75 of 4000 draws, ~4 standard deviations
    per_case = {i: draws.count(i) for i in ids if i.startswith(name_b)}
    assert all(abs(c - 1000) < 130 for c in per_case.values())  # uniform inside the dataset
    # the batches the run trained on came from both datasets, read through their own folders
    batch = sampler.next_batch()
    assert batch.shape[0] == trainer.batch_size and torch.isfinite(batch).all()

    ckpt = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    sources = ckpt["source_datasets"]
    assert [s["name"] for s in sources] == [name_a, name_b]
    assert [s["weight"] for s in sources] == [0.25, 0.75] and [s["train_cases"] for s in sources] == [5, 3]
    out = export_bundle([a, b], "mae", str(tmp_path / "bundle"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["pretraining_datasets"] == [name_a, name_b]
    card = open(os.path.join(out, "README.md")).read()
    assert name_a in card and name_b in card and "sampling weight 0.75" in card
    bundle = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=True)
    assert [s["name"] for s in bundle["source_datasets"]] == [name_a, name_b]

    from ssl_nnunet.training.run import build_trainer
    default = build_trainer([a, b], "mae", num_prefetch=0)  # default weights: from the training cases
    default.initialize()
    default._make_samplers()
    assert default.dataloader_train.sampler.groups.probabilities == pytest.approx((5 / 8, 3 / 8))
    default.dataloader_train.close()


def test_incompatible_or_separately_planned_datasets_are_refused(two_datasets, new_dataset_id):
    from ssl_nnunet.experiment_planning.planner import transfer_shared_plan
    from ssl_nnunet.training.run import build_trainer
    (a, name_a), (b, name_b) = two_datasets
    c, name_c = new_dataset_id("TwoChannels")
    write_synthetic_dataset(c, "TwoChannels", n_cases=2, shape=(16, 16, 16), channel_names={"0": "MRI", "1": "MRI"})
    with pytest.raises(SSLInputError) as e:
        transfer_shared_plan(a, [c], verbose=False)
    assert name_a in str(e.value) and name_c in str(e.value)
    assert "1 input channel(s)" in str(e.value) and "has 2" in str(e.value)
    d, name_d = new_dataset_id("OtherModality")
    write_synthetic_dataset(d, "OtherModality", n_cases=2, shape=(16, 16, 16), channel_names={"0": "CT"})
    with pytest.raises(SSLInputError, match=f"{name_a} and {name_d}.*'MRI' vs 'CT'"):
        transfer_shared_plan(a, [d], verbose=False)
    # a plan that differs (planned on its own) is refused at pretraining time
    plans = _plans(name_b)
    plans["configurations"]["3d_fullres"]["spacing"] = [2.5, 2.0, 2.0]
    path = os.path.join(_pp(name_b), "sslPlans.json")
    original = open(path).read()
    try:
        with open(path, "w") as f:
            json.dump(plans, f)
        with pytest.raises(SSLInputError, match=f"{name_a} and {name_b} do not share one pretraining plan.*"
                                                f"configurations"):
            build_trainer([a, b], "mae")
    finally:
        with open(path, "w") as f:
            f.write(original)
    with pytest.raises(SSLInputError, match="one per dataset"):
        build_trainer([a, b], "mae", dataset_weights=["1"])
    from ssl_nnunet.data.multi_dataset import resolve_dataset_weights
    assert resolve_dataset_weights(["equal"], {"A": 9, "B": 1}) == {"A": 0.5, "B": 0.5}
    assert resolve_dataset_weights(None, {"A": 9, "B": 1}) == {"A": 0.9, "B": 0.1}


def test_subject_rules():
    from ssl_nnunet.data.split import case_subjects, compile_subject_pattern, make_split
    pattern = compile_subject_pattern(None)
    subjects, source = case_subjects(["sub-01_ses-02", "P007_visit3", "BraTS_0001", "x_tp1", "y"], {}, pattern)
    assert subjects == {"sub-01_ses-02": "sub-01", "P007_visit3": "P007", "BraTS_0001": "BraTS_0001",
                        "x_tp1": "x", "y": "y"}
    dj = {"dataset": {"a1": {"subject": "S1"}, "a2": {"subject": "S1"}, "b": {"images": []}}}
    assert case_subjects(["a1", "a2", "b"], dj, pattern)[0] == {"a1": "S1", "a2": "S1", "b": "b"}
    with pytest.raises(SSLInputError, match="subject"):
        compile_subject_pattern(r"(.+)_\d+")
    # one case per subject: exactly the old rule (the last n // 10 sorted cases held out)
    ids = [f"c{i:02d}" for i in range(30)]
    split = make_split(ids, {None: {}}, 1, pattern)
    assert split["val"] == ids[-3:] and split["train"] == ids[:-3]
    # 3 sessions of 8 subjects: whole subjects held out, none shared
    ids = sorted(f"s{k}_ses{j}" for k in range(8) for j in range(3))
    split = make_split(ids, {None: {}}, 2, pattern)
    subj = lambda c: c.split("_")[0]  # noqa: E731
    assert len(split["val"]) == 3 and {subj(c) for c in split["val"]} == {"s7"}
    assert not {subj(c) for c in split["val"]} & {subj(c) for c in split["train"]}
    assert sorted(split["train"] + split["val"]) == ids


def test_subject_split_written_and_reused_on_continue(new_dataset_id):
    from ssl_nnunet.experiment_planning.entrypoints import plan_and_preprocess_entry
    from ssl_nnunet.training.run import pretrain
    did, name = new_dataset_id("Sessions")
    write_synthetic_dataset(did, "Sessions", n_cases=8, shape=(20, 20, 20), seed=3)
    _rename_to_sessions(name, 4, 2)  # subj0..subj3, sessions ses-0 / ses-1
    plan_and_preprocess_entry(["-d", str(did), "-np", "1", "-profile", "cpu_smoke", "--quiet"])
    _shrink_mae(name)
    trainer = pretrain(did, "mae", device="cpu", iterations=2, num_prefetch=0)
    split_file = os.path.join(trainer.output_folder, "ssl_split.json")
    with open(split_file) as f:
        split = json.load(f)
    subj = lambda c: c.split("_")[0]  # noqa: E731
    assert split["val"] == ["subj3_ses-0", "subj3_ses-1"]  # both sessions of one subject held out
    assert not {subj(c) for c in split["val"]} & {subj(c) for c in split["train"]}
    assert trainer.val_identifiers == split["val"] and trainer.dataloader_train.sampler.identifiers == split["train"]
    assert split["datasets"][name]["val_subjects"] == 1 and split["datasets"][name]["subjects"] == 4

    # --c reads the saved split instead of splitting again (here: edited by hand to hold out subj0)
    split["train"] = sorted(set(split["train"]) - {"subj0_ses-0", "subj0_ses-1"} | set(split["val"]))
    split["val"] = ["subj0_ses-0", "subj0_ses-1"]
    with open(split_file, "w") as f:
        json.dump(split, f)
    resumed = pretrain(did, "mae", device="cpu", iterations=4, num_prefetch=0, continue_training=True)
    assert resumed.val_identifiers == ["subj0_ses-0", "subj0_ses-1"]
    assert "subj0_ses-0" not in resumed.dataloader_train.sampler.identifiers

    # a preprocessed case gone from disk: the saved split no longer matches -> a clear error on --c
    os.remove(os.path.join(_pp(name), "sslPlans_3d_fullres", "subj2_ses-1.b2nd"))
    with pytest.raises(SSLInputError, match="no longer preprocessed: subj2_ses-1"):
        pretrain(did, "mae", device="cpu", iterations=6, num_prefetch=0, continue_training=True)
