"""``ssl_nnunet_finetune``: pretrained weights -> nnU-Net fine-tuning on a labeled target, against scratch.

1. The bundle's fine-tuning plan is transferred to the target with nnunetv2's plan-transfer API (dataset
   name, reader and label manager come from the target) and the target is preprocessed with it
   (:func:`ssl_nnunet.export.transfer.transfer_and_preprocess`). When the target has another number of input
   channels, the plan gets the target's normalisation and a target-specific weights file is written whose
   first convolution is repeated over the new channels and divided by their number.
2. Every requested fold is trained with the real ``nnUNetv2_train`` (subprocess) and ``-pretrained_weights``;
   with ``--scratch`` the same plan, trainer and folds (one ``splits_final.json``) are trained from random
   initialisation, so the two arms differ only in initialisation. The arms write to separate result roots.
3. Folds with a final checkpoint and validation summary are skipped, interrupted folds continue with
   nnU-Net's ``--c``; finally the comparison report is written (:mod:`ssl_nnunet.finetune.report`).
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

import torch

from ssl_nnunet.constants import CONFIGURATION, FINETUNE_PLANS
from ssl_nnunet.paths import nnunet_preprocessed, nnunet_raw, nnunet_results
from ssl_nnunet.utilities.errors import SSLInputError, run_cli
from ssl_nnunet.utilities.file_io import atomic_save_json, atomic_torch_save, dataset_name_from_id, load_json
from ssl_nnunet.utilities.network import build_network_from_plans

DEFAULT_TRAINER = "nnUNetTrainer_SSLFinetune"


def resolve_bundle(weights: str) -> Dict[str, object]:
    """Bundle folder or its ``checkpoint_final.pth`` -> paths, plans and source dataset name."""
    folder = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
    checkpoint = os.path.join(folder, "checkpoint_final.pth") if os.path.isdir(weights) else weights
    if not os.path.isfile(checkpoint):
        raise SSLInputError(f"No checkpoint at {checkpoint}. Pass the folder written by ssl_nnunet_export "
                            f"(or its checkpoint_final.pth) with -w.")
    plans_file = os.path.join(folder, "plans.json")
    if not os.path.isfile(plans_file):
        raise SSLInputError(f"{folder} has no plans.json next to the checkpoint; fine-tuning needs the plan the "
                            f"weights were trained with. Re-export with ssl_nnunet_export.")
    plans = load_json(plans_file, "plans")
    adaptation = load_json(os.path.join(folder, "adaptation_plan.json"), "adaptation plan") \
        if os.path.isfile(os.path.join(folder, "adaptation_plan.json")) else {}
    method = adaptation.get("ssl_method") or _method_from_card(folder)
    return {"folder": folder, "checkpoint": checkpoint, "plans": plans, "source": plans["dataset_name"],
            "method": method, "num_input_channels": adaptation.get("pretrain_num_input_channels")}


def _method_from_card(folder: str) -> str:
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    return str(ckpt.get("ssl_method", "unknown"))


def _target_network(plans: dict, dataset_json: dict):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    n_out = PlansManager(plans).get_label_manager(dataset_json).num_segmentation_heads
    return build_network_from_plans(plans, len(dataset_json["channel_names"]), n_out, deep_supervision=True)


def target_weights(bundle: dict, target_name: str, encoder_only: bool, out_dir: str, seed: int = 0) -> tuple:
    """Weights file for ``-pretrained_weights``: the bundle's checkpoint, or a target-specific copy with the
    input convolution adapted to the target's channel count and/or a freshly initialised decoder
    (``encoder_only``). Returns ``(path, notes)``."""
    plans = load_json(os.path.join(nnunet_preprocessed(), target_name, FINETUNE_PLANS + ".json"), "plans")
    dataset_json = load_json(os.path.join(nnunet_preprocessed(), target_name, "dataset.json"), "dataset.json")
    torch.manual_seed(seed)
    fresh = _target_network(plans, dataset_json).state_dict()
    ckpt = torch.load(bundle["checkpoint"], map_location="cpu", weights_only=False)
    weights = dict(ckpt["network_weights"])
    notes = []
    for key, value in fresh.items():
        if ".seg_layers." in key or key not in weights or weights[key].shape == value.shape:
            continue
        old = weights[key]
        if old.ndim == value.ndim and old.shape[0] == value.shape[0] and old.shape[2:] == value.shape[2:]:
            n_new = value.shape[1]
            weights[key] = old.sum(dim=1, keepdim=True).repeat(1, n_new, *([1] * (old.ndim - 2))) / n_new
            notes.append(f"input channels adapted for {key}: {old.shape[1]} -> {n_new} (weights repeated over "
                         f"the new channels and divided by {n_new})")
    if encoder_only:
        for key, value in fresh.items():
            if key.startswith("decoder.") and not key.startswith("decoder.encoder."):
                weights[key] = value
        notes.append("decoder re-initialised (encoder-only transfer)")
    if not notes:
        return bundle["checkpoint"], notes
    out = copy.copy(ckpt)
    out["network_weights"] = weights
    path = os.path.join(out_dir, f"weights_for_{target_name}{'_encoder_only' if encoder_only else ''}.pth")
    atomic_torch_save(out, path)
    return path, notes


def ensure_splits(target_name: str) -> List[dict]:
    """Write nnU-Net's 5-fold ``splits_final.json`` (its own function and seed) if missing, so both arms and
    every later run use the same folds."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    path = os.path.join(nnunet_preprocessed(), target_name, "splits_final.json")
    if os.path.isfile(path):
        return load_json(path, "splits")
    plans = load_json(os.path.join(nnunet_preprocessed(), target_name, FINETUNE_PLANS + ".json"), "plans")
    folder = os.path.join(nnunet_preprocessed(), target_name, plans["configurations"][CONFIGURATION]["data_identifier"])
    ids = sorted({f.split(".")[0] for f in os.listdir(folder) if f.endswith(".pkl")})
    if len(ids) < 5:
        raise SSLInputError(f"{target_name} has {len(ids)} training case(s); 5-fold cross-validation needs >= 5.")
    splits = generate_crossval_split(ids, seed=12345, n_splits=5)
    atomic_save_json(splits, path)
    return splits


def fold_folder(results_root: str, target_name: str, trainer: str, fold: int) -> str:
    return os.path.join(results_root, target_name, f"{trainer}__{FINETUNE_PLANS}__{CONFIGURATION}", f"fold_{fold}")


def fold_finished(folder: str) -> bool:
    """The fold trained to the end and nnU-Net's final validation wrote its summary."""
    return os.path.isfile(os.path.join(folder, "validation", "summary.json")) and \
        os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))


def run_fold(results_root: str, target_name: str, fold: int, trainer: str, device: str,
             weights: Optional[str], num_processes: int) -> str:
    """Train (or resume, or only validate) one fold with ``nnUNetv2_train``; returns the fold folder. The
    training process gets this process's ``nnUNet_raw`` and ``nnUNet_preprocessed`` as they are now and
    ``results_root`` as its ``nnUNet_results``."""
    from ssl_nnunet.nnunet_trainers import trainer_dir
    folder = fold_folder(results_root, target_name, trainer, fold)
    if fold_finished(folder):
        print(f"  fold {fold}: finished earlier, skipped ({folder})")
        return folder
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    cmd = [exe, target_name, CONFIGURATION, str(fold), "-p", FINETUNE_PLANS, "-tr", trainer, "-device", device]
    if os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
        cmd.append("--val")
    elif os.path.isfile(os.path.join(folder, "checkpoint_latest.pth")):
        cmd.append("--c")
    elif weights is not None:
        cmd += ["-pretrained_weights", weights]
    env = dict(os.environ, nnUNet_results=results_root, nnUNet_extTrainer=trainer_dir(),
               nnUNet_raw=nnunet_raw(), nnUNet_preprocessed=nnunet_preprocessed(),
               nnUNet_def_n_proc=str(num_processes), nnUNet_n_proc_DA=str(num_processes))
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "ssl_nnunet_finetune_stdout.txt")
    print(f"  fold {fold}: {' '.join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd))}")
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-25:])
        raise RuntimeError(f"nnUNetv2_train failed for fold {fold} (exit {proc.returncode}); log: {log_path}\n{tail}")
    return folder


def finetune(target, weights: str, folds: Sequence[int] = (0, 1, 2, 3, 4), scratch: bool = False,
             trainer: str = DEFAULT_TRAINER, device: str = "cpu", num_processes: int = 2,
             encoder_only: bool = False) -> dict:
    """Run the comparison; returns the report dict (also written as markdown/JSON/PNG)."""
    from ssl_nnunet.export.transfer import transfer_and_preprocess
    from ssl_nnunet.finetune.report import write_report
    target_name = dataset_name_from_id(target)
    bundle = resolve_bundle(weights)
    source_name = bundle["source"]
    root = os.path.join(nnunet_results(), target_name, "ssl_nnunet_finetune", source_name)
    tag = f"{bundle['method']}{'_encoder_only' if encoder_only else ''}"
    print(f"Fine-tuning {target_name} from {source_name} ({bundle['method']}) with {trainer}, folds {list(folds)}"
          f"{' + scratch baseline' if scratch else ''}")
    target_pp = os.path.join(nnunet_preprocessed(), target_name)
    source_plans = os.path.join(nnunet_preprocessed(), source_name, FINETUNE_PLANS + ".json")
    if not os.path.isfile(source_plans):
        # bundle from another machine: its plans.json is the source plan
        atomic_save_json(bundle["plans"], source_plans)
    transfer_and_preprocess(source_name, target_name, FINETUNE_PLANS, num_processes, verbose=False, adapt_channels=True)
    ensure_splits(target_name)
    os.makedirs(root, exist_ok=True)
    weights_file, notes = target_weights(bundle, target_name, encoder_only, root)
    for note in notes:
        print(f"NOTE: {note}")
    arms = {"pretrained": (os.path.join(root, f"pretrained_{tag}"), weights_file)}
    if scratch:
        arms["scratch"] = (os.path.join(root, "scratch"), None)
    folders: Dict[str, Dict[int, str]] = {arm: {} for arm in arms}
    for arm, (results_root, arm_weights) in arms.items():
        print(f"[{arm}]")
        for fold in folds:
            folders[arm][fold] = run_fold(results_root, target_name, fold, trainer, device, arm_weights,
                                          num_processes)
    if not scratch:
        scratch_root = os.path.join(root, "scratch")
        folders["scratch"] = {f: fold_folder(scratch_root, target_name, trainer, f) for f in folds}
    dataset_json = load_json(os.path.join(target_pp, "dataset.json"), "dataset.json")
    names = {str(v): k for k, v in dataset_json["labels"].items() if not isinstance(v, (list, tuple))}
    report_dir = os.path.join(root, f"report_{tag}__{trainer}")
    extra = {"target": target_name, "source": source_name, "method": bundle["method"], "trainer": trainer,
             "encoder_only": encoder_only, "weights": weights_file, "notes": notes}
    report = write_report(folders, report_dir, f"{target_name}: {bundle['method']} pretrained vs scratch "
                                                f"({trainer})", names, extra)
    print(f"Report: {report_dir}/finetune_report.md")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description="Fine-tune pretrained weights with nnU-Net (5-fold CV) and compare "
                                            "with training from scratch.")
    p.add_argument("-d", required=True, help="labeled target dataset id or name")
    p.add_argument("-w", required=True, help="bundle folder from ssl_nnunet_export (or its checkpoint_final.pth)")
    p.add_argument("-f", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default 0 1 2 3 4)")
    p.add_argument("--scratch", action="store_true", help="also train the same plan/trainer/folds from scratch")
    p.add_argument("-tr", default=DEFAULT_TRAINER,
                   help="nnU-Net trainer for both arms (default nnUNetTrainer_SSLFinetune; CPU budgets: "
                        "nnUNetTrainer_SSLFinetune_CPU300 / _CPU1000)")
    p.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-np", type=int, default=2, help="worker processes for preprocessing/augmentation")
    p.add_argument("--encoder-only", action="store_true", help="re-initialise the decoder before fine-tuning")
    a = p.parse_args()
    run_cli(lambda: finetune(a.d, a.w, a.f, a.scratch, a.tr, a.device, a.np, a.encoder_only))
