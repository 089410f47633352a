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
    report = finetune(TARGET_ID, bundle, folds=[0], scratch=["scratch"], trainer=TRAINER, device="cpu",
                      num_processes=1)
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
    finetune(TARGET_ID, bundle, folds=[0], scratch=["scratch"], trainer=TRAINER, device="cpu", num_processes=1)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2

    # an interrupted fold (latest checkpoint, no final, no validation) continues with nnU-Net's --c
    shutil.move(os.path.join(scr, "checkpoint_final.pth"), os.path.join(scr, "checkpoint_latest.pth"))
    shutil.rmtree(os.path.join(scr, "validation"))
    finetune(TARGET_ID, bundle, folds=[0], scratch=["scratch"], trainer=TRAINER, device="cpu", num_processes=1)
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


@pytest.mark.parametrize("vanilla, budget", [("nnUNetTrainer_SSLVanilla_CPU300", "nnUNetTrainer_SSLFinetune_CPU300"),
                                             ("nnUNetTrainer_SSLVanilla_CPU1000", "nnUNetTrainer_SSLFinetune_CPU1000"),
                                             ("nnUNetTrainer_SSLVanilla", "nnUNetTrainer_SSLFinetune")])
def test_vanilla_trainers_are_nnunet_defaults_at_the_budget(vanilla, budget, budget_plans, monkeypatch):
    """The scratch_vanilla arm: nnU-Net's own lr, optimiser and poly schedule (no warm-up), the same epochs,
    iterations, validation iterations and mirroring as the fine-tuning budget it is paired with."""
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from ssl_nnunet.nnunet_trainers import VANILLA_TRAINERS, trainer_dir
    monkeypatch.setenv("nnUNet_extTrainer", trainer_dir())
    assert VANILLA_TRAINERS[budget] == vanilla
    plans, dataset_json = budget_plans
    build = lambda name: recursive_find_trainer_class_by_name(name)(copy.deepcopy(plans), "3d_fullres", 0,
                                                                   dataset_json, torch.device("cpu"))
    v, ft, default = build(vanilla), build(budget), nnUNetTrainer(copy.deepcopy(plans), "3d_fullres", 0,
                                                                  dataset_json, torch.device("cpu"))
    assert not isinstance(v, nnUNetTrainer_warmup)
    assert (v.initial_lr, v.weight_decay) == (default.initial_lr, default.weight_decay) == (1e-2, 3e-5)
    assert (v.num_epochs, v.num_iterations_per_epoch, v.num_val_iterations_per_epoch) == \
        (ft.num_epochs, ft.num_iterations_per_epoch, ft.num_val_iterations_per_epoch)
    v.network = torch.nn.Linear(2, 2)  # nnU-Net's own configure_optimizers on any parameters
    optimizer, scheduler = v.configure_optimizers()
    assert isinstance(scheduler, PolyLRScheduler) and optimizer.param_groups[0]["nesterov"]
    assert optimizer.param_groups[0]["momentum"] == 0.99 and optimizer.param_groups[0]["lr"] == 1e-2
    for t in (v, ft):
        t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert v.inference_allowed_mirroring_axes == ft.inference_allowed_mirroring_axes


def test_splits_k_fold_and_leave_one_out():
    from ssl_nnunet.finetune.finetune import describe_splits, make_splits
    from ssl_nnunet.utilities.errors import SSLInputError
    ids = [f"c{i}" for i in range(4)]
    loo = make_splits(ids)
    assert len(loo) == 4 and all(len(s["val"]) == 1 for s in loo)
    assert sorted(c for s in loo for c in s["val"]) == ids
    assert describe_splits(loo).startswith("4-fold (leave-one-out) over 4 labelled cases")
    assert len(make_splits([f"c{i}" for i in range(12)])) == 5
    two = make_splits(ids, k=2)
    assert len(two) == 2 and all(len(s["val"]) == 2 for s in two)
    assert "leave-one-out" not in describe_splits(two)
    for bad_ids, k in ((ids[:1], None), (ids, 5), (ids, 1)):
        with pytest.raises(SSLInputError):
            make_splits(bad_ids, k)
    # repeated k-fold for very few cases: the first k folds are nnU-Net's split, each case validated once per repeat
    ids6 = [f"c{i}" for i in range(6)]
    rep = make_splits(ids6, k=3, repeats=2)
    assert len(rep) == 6 and rep[:3] == make_splits(ids6, k=3) and rep[3:] != rep[:3]
    for r in (rep[:3], rep[3:]):
        assert sorted(c for s in r for c in s["val"]) == ids6
    assert describe_splits(rep).startswith("3-fold x 2 repeats (6 folds")
    with pytest.raises(SSLInputError, match="-repeats 0"):
        make_splits(ids6, k=3, repeats=0)


def test_ensure_splits_refuses_contradicting_repeats(tmp_path, monkeypatch):
    import ssl_nnunet.finetune.finetune as ft
    from ssl_nnunet.utilities.errors import SSLInputError
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    (tmp_path / "Dataset555_X").mkdir()
    monkeypatch.setattr(ft, "preprocessed_case_ids", lambda name: [f"c{i}" for i in range(4)])
    assert len(ft.ensure_splits("Dataset555_X", repeats=2)) == 8  # 4-fold leave-one-out, twice
    assert len(ft.ensure_splits("Dataset555_X")) == 8 and len(ft.ensure_splits("Dataset555_X", 4, 2)) == 8
    with pytest.raises(SSLInputError, match=r"8 folds \(4-fold x 2 repeat"):
        ft.ensure_splits("Dataset555_X", repeats=1)


def test_epoch_progress_condenses_nnunet_lines():
    from ssl_nnunet.finetune.finetune import EpochProgress
    out = []
    p = EpochProgress("pretrained fold 0", out.append)
    for line in ["2026-01-01 10:00:00.000001: ", "2026-01-01 10:00:00.000002: Epoch 3",
                 "2026-01-01 10:00:00.000003: Current learning rate: 0.00946", "using pin_memory on device 0",
                 "2026-01-01 10:00:09.1: train_loss -0.4123", "2026-01-01 10:00:09.2: val_loss -0.3801",
                 "2026-01-01 10:00:09.3: Pseudo dice [np.float32(0.61), np.float32(0.52)]",
                 "2026-01-01 10:00:09.4: Epoch time: 9.41 s",
                 "2026-01-01 10:00:30.0: Mean Validation Dice:  0.57309876"]:
        p.feed(line + "\n")
    assert out == ["  [pretrained fold 0] epoch 3: lr 0.00946 train_loss -0.4123 val_loss -0.3801 pseudo Dice "
                   "[0.61, 0.52] (9.41 s)",
                   "  [pretrained fold 0] final validation (nnU-Net, full cases): mean Dice 0.5731"]


def test_epoch_progress_writes_tensorboard_scalars(tmp_path):
    """With a TensorBoard sink, each epoch's nnU-Net values become scalars at step = nnU-Net's epoch."""
    from helpers import tensorboard_scalars
    from ssl_nnunet.finetune.finetune import EpochProgress
    from ssl_nnunet.utilities.tensorboard import TensorBoardLog
    tb = TensorBoardLog(str(tmp_path / "tb"))
    p = EpochProgress("scratch fold 1", lambda text: None, tb)
    for epoch, lr, dice in ((0, 0.01, "[np.float32(0.25), np.float32(0.75)]"), (1, 0.009, "[0.5, 0.7]")):
        for line in [f"t: Epoch {epoch}", f"t: Current learning rate: {lr}", "t: train_loss -0.5",
                     "t: val_loss -0.25", f"t: Pseudo dice {dice}", "t: Epoch time: 3.5 s"]:
            p.feed(line + "\n")
    tb.close()
    scalars, _ = tensorboard_scalars(tmp_path / "tb")
    assert scalars["lr"] == [(0, pytest.approx(0.01)), (1, pytest.approx(0.009))]
    assert scalars["pseudo_dice/mean"] == [(0, 0.5), (1, pytest.approx(0.6))]
    assert scalars["pseudo_dice/class_2"][0] == (0, 0.75) and scalars["val_loss"][1] == (1, -0.25)
    assert scalars["epoch_time_s"] == [(0, 3.5), (1, 3.5)]


def test_four_case_target_leave_one_out_fold_all_arms(bundle, new_dataset_id, capsys):
    """A 4-labelled-case target (refused before): 4 leave-one-out folds; fold 0 of 4 trained with the real
    nnUNetv2_train, pretrained and scratch_vanilla (with the smoke trainer the vanilla arm runs the same trainer
    as the scratch arm, which the two-channel test above already trains); progress lines and nnU-Net's log path
    on stdout; the report says there is no verdict from one fold and what it rests on."""
    import glob
    did, name = new_dataset_id("FourCases")
    write_synthetic_dataset(did, "FourCases", n_cases=4, shape=(44, 48, 52), labeled=True, seed=5)
    report = finetune(did, bundle, folds=[0], scratch=["scratch_vanilla"], trainer=TRAINER, device="cpu",
                      num_processes=1, tensorboard=True)
    out = capsys.readouterr().out
    splits = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], name, "splits_final.json")))
    assert len(splits) == 4 and all(len(s["val"]) == 1 for s in splits)
    for arm in ("pretrained", "scratch_vanilla"):
        assert f"[{arm} fold 0] epoch 0: lr " in out and "pseudo Dice [" in out
        assert f"[{arm} fold 0] final validation (nnU-Net, full cases): mean Dice" in out
    logs = [line.split("nnU-Net log: ")[1] for line in out.splitlines() if "nnU-Net log: " in line]
    assert len(logs) == 2 and all(os.path.isfile(f) for f in logs)
    assert report["splits"]["k"] == 4 and report["arms"] == ["pretrained", "scratch_vanilla"]
    assert report["verdict"] is None and "single fold" in report["rests_on"]
    assert "1 validation case(s) in 1 fold(s)" in report["rests_on"]
    root = os.path.join(nnunet_results(), name, "ssl_nnunet_finetune", "Dataset960_FinetuneSource")
    md = open(os.path.join(root, f"report_mae__{TRAINER}", "finetune_report.md")).read()
    assert "4-fold (leave-one-out) over 4 labelled cases" in md and "± 0.0000" not in md
    assert out.rstrip().splitlines()[-1].startswith("Verdict: pretrained − scratch_vanilla")
    # the vanilla arm ran nnU-Net's trainer settings: lr 1e-2 at epoch 0, no warm-up stage
    vanilla_fold = fold_folder(os.path.join(root, "scratch_vanilla"), name, TRAINER, 0)
    log = open(glob.glob(os.path.join(vanilla_fold, "training_log_*.txt"))[0]).read()
    assert "Current learning rate: 0.01" in log and "warmup" not in log
    # --tensorboard: one run per arm and fold with nnU-Net's epoch values
    from helpers import tensorboard_scalars
    for arm in ("pretrained", "scratch_vanilla"):
        tb_dir = os.path.join(root, "tensorboard", "pretrained_mae" if arm == "pretrained" else arm, "fold_0")
        scalars, _ = tensorboard_scalars(tb_dir)
        assert {"lr", "train_loss", "val_loss", "pseudo_dice/mean"} <= set(scalars), (arm, sorted(scalars))
        assert scalars["lr"][0][0] == 0
    assert tensorboard_scalars(os.path.join(root, "tensorboard", "scratch_vanilla", "fold_0"))[0]["lr"][0][1] == \
        pytest.approx(0.01)
    assert "Loading pretrained weights" not in open(os.path.join(vanilla_fold, "ssl_nnunet_finetune_stdout.txt")).read()
    # a -k that contradicts the existing split is refused, naming the file
    from ssl_nnunet.utilities.errors import SSLInputError
    with pytest.raises(SSLInputError, match="splits_final.json has 4 folds"):
        finetune(did, bundle, folds=[0], trainer=TRAINER, device="cpu", num_processes=1, k=2)


def test_finetune_cli_arguments(monkeypatch):
    """--scratch without a value trains both scratch arms, with values only those; -k and -tr_vanilla pass on."""
    import ssl_nnunet.finetune.finetune as ft
    calls = []
    monkeypatch.setattr(ft, "finetune", lambda *a: calls.append(a))
    ft.main(["-d", "901", "-w", "b", "--scratch", "-device", "cpu"])
    ft.main(["-d", "901", "-w", "b", "--scratch", "scratch_vanilla", "-k", "3", "-f", "0", "1", "-device", "cpu"])
    ft.main(["-d", "901", "-w", "b", "-tr_vanilla", "nnUNetTrainer", "-device", "cpu"])
    assert calls[0][3] is True and calls[0][2] is None and calls[0][8] is None
    assert calls[1][3] == ["scratch_vanilla"] and calls[1][8] == 3 and calls[1][2] == [0, 1]
    assert calls[2][3] is False and calls[2][9] == "nnUNetTrainer"
    with pytest.raises(SystemExit):
        ft.main(["-d", "901", "-w", "b", "--scratch", "vanilla"])
