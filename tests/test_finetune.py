"""ssl_nnunet_finetune: pretrain -> export -> real nnUNetv2_train on a 2-channel target, scratch arm, report."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from helpers import write_synthetic_dataset
from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
from ssl_nnunet.experiment_planning.planner import plan_experiment
from ssl_nnunet.experiment_planning.preprocess import preprocess
from ssl_nnunet.export import export_bundle
from ssl_nnunet.finetune.finetune import finetune, fold_folder
from ssl_nnunet.finetune.report import build_report, write_report
from ssl_nnunet.paths import nnunet_results
from ssl_nnunet.training.run import pretrain

SOURCE_ID, TARGET_ID = 960, 961
TARGET = "Dataset961_FinetuneTarget"
TRAINER = "nnUNetTrainer_SSLSmoke"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    write_synthetic_dataset(SOURCE_ID, "FinetuneSource", n_cases=3, shape=(48, 52, 56))
    extract_fingerprint(SOURCE_ID, 1, verbose=False)
    plan_experiment(SOURCE_ID, "cpu_smoke", verbose=False)
    preprocess(SOURCE_ID, num_processes=1, verbose=False)
    pretrain(SOURCE_ID, "mae", device="cpu", iterations=2, num_prefetch=0)
    out = str(tmp_path_factory.mktemp("bundles") / "mae")
    export_bundle(SOURCE_ID, "mae", out)
    write_synthetic_dataset(TARGET_ID, "FinetuneTarget", n_cases=5, shape=(44, 48, 52), labeled=True,
                            channel_names={"0": "MRI", "1": "MRI"}, seed=3)
    return out


def test_finetune_two_channel_target_pretrained_and_scratch(bundle, capsys):
    report = finetune(TARGET_ID, bundle, folds=[0], scratch=True, trainer=TRAINER, device="cpu", num_processes=1)
    out = capsys.readouterr().out
    assert "input channels adapted" in out
    root = os.path.join(nnunet_results(), TARGET, "ssl_nnunet_finetune", "Dataset960_FinetuneSource")
    pre = fold_folder(os.path.join(root, "pretrained_mae"), TARGET, TRAINER, 0)
    scr = fold_folder(os.path.join(root, "scratch"), TARGET, TRAINER, 0)
    for folder in (pre, scr):
        assert os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
        assert os.path.isfile(os.path.join(folder, "validation", "summary.json"))
    with open(os.path.join(pre, "ssl_nnunet_finetune_stdout.txt")) as f:
        assert "Loading pretrained weights" in f.read()
    with open(os.path.join(scr, "ssl_nnunet_finetune_stdout.txt")) as f:
        assert "Loading pretrained weights" not in f.read()
    # the adapted weights file: first conv repeated over 2 channels and halved
    adapted = torch.load(os.path.join(root, f"weights_for_{TARGET}.pth"), weights_only=False)["network_weights"]
    original = torch.load(os.path.join(bundle, "checkpoint_final.pth"), weights_only=False)["network_weights"]
    key = "encoder.stem.convs.0.conv.weight"
    assert adapted[key].shape[1] == 2 and original[key].shape[1] == 1
    assert torch.allclose(adapted[key][:, 1:2], original[key] / 2)
    assert report["folds_compared"] == [0]
    report_dir = os.path.join(root, f"report_mae__{TRAINER}")
    for name in ("finetune_report.md", "finetune_report.json", "finetune_report.png", "finetune_curves.png"):
        assert os.path.isfile(os.path.join(report_dir, name)), name

    # rerun: both folds are finished and skipped
    finetune(TARGET_ID, bundle, folds=[0], scratch=True, trainer=TRAINER, device="cpu", num_processes=1)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2

    # an interrupted fold (latest checkpoint, no final, no validation) continues with nnU-Net's --c
    shutil.move(os.path.join(scr, "checkpoint_final.pth"), os.path.join(scr, "checkpoint_latest.pth"))
    shutil.rmtree(os.path.join(scr, "validation"))
    finetune(TARGET_ID, bundle, folds=[0], scratch=True, trainer=TRAINER, device="cpu", num_processes=1)
    assert "--c" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(scr, "checkpoint_final.pth"))


def _fake_fold(root, fold, dice1, dice2, n_cases=4):
    """nnU-Net-like summary.json: per-case Dice spread around the given class means (same case ids in every
    arm of a fold)."""
    os.makedirs(os.path.join(root, f"fold_{fold}", "validation"))
    spread = np.linspace(-0.02, 0.02, n_cases)
    cases = [{"reference_file": f"/gt/case_{fold}_{i}.nii.gz", "prediction_file": f"/p/case_{fold}_{i}.nii.gz",
              "metrics": {"1": {"Dice": dice1 + d}, "2": {"Dice": dice2 + d}}} for i, d in enumerate(spread)]
    with open(os.path.join(root, f"fold_{fold}", "validation", "summary.json"), "w") as f:
        json.dump({"foreground_mean": {"Dice": (dice1 + dice2) / 2},
                   "mean": {"1": {"Dice": dice1}, "2": {"Dice": dice2}}, "metric_per_case": cases}, f)
    return os.path.join(root, f"fold_{fold}")


def test_report_numbers(tmp_path):
    folders = {"pretrained": {f: _fake_fold(tmp_path / "p", f, 0.8 + 0.02 * f, 0.6) for f in range(3)},
               "scratch": {f: _fake_fold(tmp_path / "s", f, 0.7, 0.6 - 0.01 * f) for f in range(3)}}
    report = build_report(folders, {"1": "a", "2": "b"})
    assert report["arms"] == ["pretrained", "scratch"]
    rows = {r["class"]: r for r in report["classes"]}
    assert np.isclose(rows["1"]["pretrained"]["mean"], 0.82)
    assert np.isclose(rows["1"]["difference_vs_scratch"]["mean"], 0.12)
    assert np.isclose(rows["2"]["difference_vs_scratch"]["mean"], 0.01)
    assert np.isclose(rows["mean"]["scratch"]["mean"], np.mean([(0.7 + 0.6 - 0.01 * f) / 2 for f in range(3)]))
    c = report["comparisons"]["scratch"]["1"]
    assert np.isclose(c["mean_difference"], 0.12) and c["ci95"][0] <= 0.12 <= c["ci95"][1]
    assert c["n_cases"] == 12 and c["n_folds"] == 3
    assert report["verdict"] == "better" and report["verdicts"] == {"scratch": "better"}
    write_report(folders, str(tmp_path / "r"), "test")
    text = (tmp_path / "r" / "finetune_report.md").read_text()
    assert "+0.1200" in text and os.path.isfile(tmp_path / "r" / "finetune_report.png")
    assert "better than scratch" in text and "12 validation case(s) in 3 fold(s)" in text
    saved = json.loads((tmp_path / "r" / "finetune_report.json").read_text())
    assert saved["verdict"] == "better"


def test_report_one_fold_two_scratch_arms(tmp_path):
    """One fold: no verdict and no '± 0.0000' spread; the vanilla scratch arm gets its own column."""
    folders = {"pretrained": {0: _fake_fold(tmp_path / "p", 0, 0.8, 0.6)},
               "scratch": {0: _fake_fold(tmp_path / "s", 0, 0.7, 0.6)},
               "scratch_vanilla": {0: _fake_fold(tmp_path / "v", 0, 0.75, 0.65)}}
    report = write_report(folders, str(tmp_path / "r"), "one fold")
    assert report["verdict"] is None and set(report["verdicts"]) == {"scratch", "scratch_vanilla"}
    rows = {r["class"]: r for r in report["classes"]}
    assert rows["mean"]["pretrained"]["std"] is None
    assert np.isclose(rows["1"]["difference_vs_scratch_vanilla"]["mean"], 0.05)
    text = (tmp_path / "r" / "finetune_report.md").read_text()
    assert "± 0.0000" not in text and "no verdict" in text and "single fold" in text
    assert "pretrained − scratch_vanilla" in text and "scratch_vanilla Dice" in text


@pytest.fixture(scope="module")
def budget_plans():
    """Fine-tuning plans + dataset.json of a small labeled dataset (planned once for both budgets)."""
    write_synthetic_dataset(962, "BudgetTrainers", n_cases=2, labeled=True)
    extract_fingerprint(962, 1, verbose=False)
    plan_experiment(962, "cpu_smoke", verbose=False)
    plans = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], "Dataset962_BudgetTrainers",
                                        "sslFinetunePlans.json")))
    dataset_json = json.load(open(os.path.join(os.environ["nnUNet_raw"], "Dataset962_BudgetTrainers",
                                               "dataset.json")))
    plans["continue_training"] = False  # nnUNetv2_train sets this key; nnunetv2 2.8.1's trainer pops it
    return plans, dataset_json


@pytest.mark.parametrize("name, total", [("nnUNetTrainer_SSLFinetune_CPU300", 300),
                                         ("nnUNetTrainer_SSLFinetune_CPU1000", 1000)])
def test_cpu_budget_trainers_as_nnunet_builds_them(name, total, budget_plans, monkeypatch):
    """The transfer benchmark's budgets, found and constructed as nnUNetv2_train does (nnU-Net's signature, so
    its init-arg introspection works): training iterations, warm-up, lr and no mirroring at inference."""
    import inspect
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from ssl_nnunet.nnunet_trainers import trainer_dir
    monkeypatch.setenv("nnUNet_extTrainer", trainer_dir())
    cls = recursive_find_trainer_class_by_name(name)
    assert cls.__name__ == name
    assert list(inspect.signature(cls.__init__).parameters) == ["self", "plans", "configuration", "fold",
                                                                "dataset_json", "device"]
    plans, dataset_json = budget_plans
    trainer = cls(copy.deepcopy(plans), "3d_fullres", 0, dataset_json, torch.device("cpu"))
    assert trainer.num_epochs * trainer.num_iterations_per_epoch == total
    assert trainer.initial_lr == 1e-2 and trainer.warmup_duration_whole_net == 2
    assert trainer.num_val_iterations_per_epoch == 5
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert trainer.inference_allowed_mirroring_axes is None
