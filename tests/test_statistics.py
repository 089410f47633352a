"""Paired statistics of fine-tuning arms on constructed per-case Dice (no training)."""
import json
import os

import numpy as np

from ssl_nnunet.finetune.statistics import case_dice, comparison_sentence, paired_comparison


def _arms(n_folds, n_cases, shift, noise=0.02, seed=0):
    """Scratch Dice per case with a per-fold offset (training-run noise) and pretrained = scratch + shift."""
    rng = np.random.default_rng(seed)
    scratch, pretrained = {}, {}
    for f in range(n_folds):
        run = rng.normal(0, 0.01)
        base = rng.uniform(0.5, 0.8, n_cases)
        scratch[f] = {f"case_{f}_{i}": float(v + run) for i, v in enumerate(base)}
        pretrained[f] = {c: v + shift + float(rng.normal(0, noise)) for c, v in scratch[f].items()}
    return pretrained, scratch


def test_known_difference_is_covered_and_called_better():
    pretrained, scratch = _arms(5, 8, shift=0.05)
    c = paired_comparison(pretrained, scratch, "pretrained", "scratch")
    assert c["n_folds"] == 5 and c["n_cases"] == 40
    low, high = c["ci95"]
    assert low < 0.05 < high
    assert abs(c["mean_difference"] - 0.05) < 0.01
    assert c["wilcoxon_p"] < 1e-6
    assert c["verdict"] == "better"
    assert "40 validation case(s) in 5 fold(s)" in c["rests_on"]
    # seeded: the same data give the same interval
    assert paired_comparison(pretrained, scratch)["ci95"] == c["ci95"]
    worse = paired_comparison(scratch, pretrained, "scratch", "pretrained")
    assert worse["verdict"] == "worse" and np.isclose(worse["mean_difference"], -c["mean_difference"])


def test_identical_arms_no_evidence():
    _, scratch = _arms(4, 5, shift=0.0)
    c = paired_comparison(scratch, scratch, "pretrained", "scratch")
    assert c["mean_difference"] == 0.0 and c["ci95"] == [0.0, 0.0] and c["wilcoxon_p"] == 1.0
    assert c["verdict"] == "no evidence of a difference"
    # noise around no shift: still no evidence
    pretrained, scratch = _arms(4, 5, shift=0.0, noise=0.05, seed=1)
    c = paired_comparison(pretrained, scratch)
    assert c["ci95"][0] < 0 < c["ci95"][1] and c["verdict"] == "no evidence of a difference"
    assert "no evidence of a difference" in comparison_sentence(c)


def test_single_fold_gives_no_verdict():
    pretrained, scratch = _arms(1, 10, shift=0.2)
    c = paired_comparison(pretrained, scratch, "pretrained", "scratch")
    assert c["verdict"] is None and c["ci95"] is None and c["n_folds"] == 1
    assert c["rests_on"].startswith("no verdict") and "single fold" in c["rests_on"]
    assert np.isclose(c["mean_difference"], 0.2, atol=0.02)
    assert "no verdict" in comparison_sentence(c) and "±" not in comparison_sentence(c)


def test_only_shared_defined_cases_are_paired():
    a = {0: {"x": 0.9, "y": float("nan"), "z": 0.5}, 1: {"u": 0.7}, 2: {"v": 0.1}}
    b = {0: {"x": 0.8, "y": 0.4}, 1: {"u": 0.6}}
    c = paired_comparison(a, b)
    assert c["folds"] == [0, 1] and c["n_cases"] == 2
    assert np.isclose(c["mean_difference"], 0.1)
    empty = paired_comparison({0: {"x": 1.0}}, {})
    assert empty["verdict"] is None and "nothing to compare" in comparison_sentence(empty)


def test_case_dice_reads_nnunet_summary(tmp_path):
    summary = {"metric_per_case": [
        {"reference_file": "/gt/Case_001.nii.gz", "prediction_file": "/p/Case_001.nii.gz",
         "metrics": {"1": {"Dice": 0.8}, "2": {"Dice": 0.6}}},
        {"reference_file": "/gt/Case_002.nii.gz", "prediction_file": "/p/Case_002.nii.gz",
         "metrics": {"1": {"Dice": 0.4}, "2": {"Dice": float("nan")}}}]}
    path = os.path.join(tmp_path, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f)
    d = case_dice(path)
    assert set(d) == {"Case_001", "Case_002"}
    assert np.isclose(d["Case_001"]["mean"], 0.7) and np.isclose(d["Case_002"]["mean"], 0.4)
