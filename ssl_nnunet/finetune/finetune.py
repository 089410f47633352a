"""``ssl_nnunet_finetune``: pretrained weights -> nnU-Net fine-tuning on a labeled target, against scratch.

1. The bundle's fine-tuning plan is transferred to the target with nnunetv2's plan-transfer API (dataset
   name, reader and label manager come from the target) and the target is preprocessed with it
   (:func:`ssl_nnunet.export.transfer.transfer_and_preprocess`). When the target has another number of input
   channels, the plan gets the target's normalisation and a target-specific weights file is written whose
   first convolution is repeated over the new channels and divided by their number.
2. nnU-Net's ``splits_final.json`` is written once: k-fold with ``k = min(5, cases)`` (leave-one-out below
   5 labelled cases) or a user-set ``-k``. Every requested fold is trained with the real ``nnUNetv2_train``
   (subprocess) and ``-pretrained_weights``; its epoch lines are shown condensed with an ``[arm fold F]``
   prefix. With ``--scratch`` the same plan and folds are trained from random initialisation twice: arm
   ``scratch`` with the same trainer (the arms differ only in initialisation) and arm ``scratch_vanilla``
   with nnU-Net's own learning rate and schedule at the same budget. Every arm has its own result root.
3. Folds with a final checkpoint and validation summary are skipped, interrupted folds continue with
   nnU-Net's ``--c``; finally the comparison report with paired per-case statistics is written
   (:mod:`ssl_nnunet.finetune.report`, :mod:`ssl_nnunet.finetune.statistics`).
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from ssl_nnunet.constants import CONFIGURATION, FINETUNE_PLANS, SCRATCH_ARMS
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
    source_info = plans.get("ssl_pretraining_source", {})
    return {"folder": folder, "checkpoint": checkpoint, "plans": plans, "source": plans["dataset_name"],
            "method": method, "num_input_channels": adaptation.get("pretrain_num_input_channels"),
            # the fine-tuning plan's own identifier (sslFinetunePlans, sslFinetunePlans_primus_m, ...) and trainer
            "plans_identifier": plans.get("plans_name", FINETUNE_PLANS),
            "trainer": source_info.get("finetune_trainer")}


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
    (``encoder_only``). Primus: always a target-specific copy (pretrained ``down_projection`` + ``eva``, a fresh
    ``up_projection`` for the target's classes, ``eva.pos_embed`` interpolated to the target's patch).
    Returns ``(path, notes)``."""
    plans_identifier = bundle.get("plans_identifier", FINETUNE_PLANS)
    plans = load_json(os.path.join(nnunet_preprocessed(), target_name, plans_identifier + ".json"), "plans")
    dataset_json = load_json(os.path.join(nnunet_preprocessed(), target_name, "dataset.json"), "dataset.json")
    torch.manual_seed(seed)
    fresh = _target_network(plans, dataset_json).state_dict()
    ckpt = torch.load(bundle["checkpoint"], map_location="cpu", weights_only=False)
    weights = dict(ckpt["network_weights"])
    notes = []
    from ssl_nnunet.backbones.primus import adapt_primus_weights, is_primus_plan
    if is_primus_plan(plans):
        kw = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
        pretrain_patch = bundle["plans"]["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]["input_shape"]
        weights, notes = adapt_primus_weights(weights, fresh, pretrain_patch, kw["input_shape"], kw["patch_embed_size"])
        if encoder_only:
            notes.append("encoder-only transfer is what a Primus transfer always is (up_projection is fresh)")
        encoder_only = False
        fresh = {}
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


def preprocessed_case_ids(target_name: str, plans_identifier: str = FINETUNE_PLANS) -> List[str]:
    plans = load_json(os.path.join(nnunet_preprocessed(), target_name, plans_identifier + ".json"), "plans")
    folder = os.path.join(nnunet_preprocessed(), target_name, plans["configurations"][CONFIGURATION]["data_identifier"])
    return sorted({f.split(".")[0] for f in os.listdir(folder) if f.endswith(".pkl")})


def make_splits(ids: Sequence[str], k: Optional[int] = None, repeats: int = 1) -> List[dict]:
    """nnU-Net's k-fold split (its own function and seed) of ``ids``: ``k = min(5, cases)`` by default, so a
    target with fewer than 5 labelled cases gets leave-one-out. ``repeats`` > 1 appends further k-fold splits
    drawn with other seeds (folds ``k .. k * repeats - 1``; the first k folds are nnU-Net's own split), so a
    target with very few cases gets more training runs per arm: each fold is one run, and the verdict's interval
    resamples runs. With leave-one-out every repeat has the same folds, retrained from a new initialisation."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    n = len(ids)
    if n < 2:
        raise SSLInputError(f"{n} labelled training case(s): cross-validation needs at least 2.")
    k = min(5, n) if k is None else int(k)
    if not 2 <= k <= n:
        raise SSLInputError(f"-k {k}: k-fold cross-validation of {n} case(s) needs 2 <= k <= {n}.")
    if int(repeats) < 1:
        raise SSLInputError(f"-repeats {repeats}: needs at least 1.")
    return [split for r in range(int(repeats)) for split in generate_crossval_split(list(ids), seed=12345 + r,
                                                                                        n_splits=k)]


def split_repeats(splits: List[dict]) -> int:
    """How many times each case is a validation case in ``splits`` (the ``repeats`` of :func:`make_splits`)."""
    counts = {}
    for s in splits:
        for c in s["val"]:
            counts[c] = counts.get(c, 0) + 1
    return max(1, min(counts.values())) if counts else 1


def ensure_splits(target_name: str, k: Optional[int] = None, repeats: Optional[int] = None,
                  plans_identifier: str = FINETUNE_PLANS) -> List[dict]:
    """Write nnU-Net's ``splits_final.json`` (:func:`make_splits`) if missing, so all arms and every later run
    use the same folds; an existing file is used as it is (nnU-Net does the same) unless ``k`` or ``repeats``
    contradict it."""
    path = os.path.join(nnunet_preprocessed(), target_name, "splits_final.json")
    if os.path.isfile(path):
        splits = load_json(path, "splits")
        have_repeats = split_repeats(splits)
        have_k = len(splits) // have_repeats
        if (k is not None and k != have_k) or (repeats is not None and repeats != have_repeats):
            raise SSLInputError(f"{path} has {len(splits)} folds ({have_k}-fold x {have_repeats} repeat(s)) but "
                                f"-k {k if k is not None else have_k} -repeats {repeats or have_repeats} was given; "
                                f"delete the file (and the fold folders trained on it) to re-split, or drop "
                                f"-k/-repeats.")
        return splits
    ids = preprocessed_case_ids(target_name) if plans_identifier == FINETUNE_PLANS else \
        preprocessed_case_ids(target_name, plans_identifier)
    splits = make_splits(ids, k, repeats or 1)
    atomic_save_json(splits, path)
    return splits


def describe_splits(splits: List[dict]) -> str:
    """What a verdict over these folds rests on, e.g. '4-fold (leave-one-out) over 4 labelled cases ...'."""
    cases = sorted({c for s in splits for c in s["val"]} | {c for s in splits for c in s["train"]})
    repeats = split_repeats(splits)
    k = len(splits) // repeats
    n_val = sorted({len(s["val"]) for s in splits})
    kind = " (leave-one-out)" if n_val == [1] and k == len(cases) else ""
    times = f" x {repeats} repeats ({len(splits)} folds, each one training run per arm)" if repeats > 1 else ""
    return (f"{k}-fold{kind}{times} over {len(cases)} labelled cases, {'-'.join(map(str, n_val))} validation "
            f"case(s) and {'-'.join(map(str, sorted({len(s['train']) for s in splits})))} training case(s) per "
            f"fold (nnU-Net's splits_final.json)")


def model_folder(results_root: str, target_name: str, trainer: str, plans_identifier: str = FINETUNE_PLANS) -> str:
    """nnU-Net's model folder of ``trainer`` on ``target_name`` under the arm's results root."""
    return os.path.join(results_root, target_name, f"{trainer}__{plans_identifier}__{CONFIGURATION}")


def fold_folder(results_root: str, target_name: str, trainer: str, fold: int,
                plans_identifier: str = FINETUNE_PLANS) -> str:
    return os.path.join(model_folder(results_root, target_name, trainer, plans_identifier), f"fold_{fold}")


def fold_finished(folder: str) -> bool:
    """The fold trained to the end and nnU-Net's final validation wrote its summary."""
    return os.path.isfile(os.path.join(folder, "validation", "summary.json")) and \
        os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))


_EPOCH_FIELDS = {
    "epoch": re.compile(r": Epoch (\d+)\s*$"),
    "lr": re.compile(r"Current learning rate: (\S+)"),
    "train_loss": re.compile(r": train_loss (\S+)"),
    "val_loss": re.compile(r": val_loss (\S+)"),
    "pseudo Dice": re.compile(r": Pseudo dice (\[.*\])"),
    "time": re.compile(r"Epoch time: (\S+) s"),
}
_NUMPY_SCALAR = re.compile(r"np\.\w+\(([^()]*)\)")  # numpy >= 2 prints np.float32(0.61)
_VALIDATION_DICE = re.compile(r"Mean Validation Dice:\s+(\S+)")


class EpochProgress:
    """Turns nnU-Net's training output (``print_to_log_file`` lines) into one progress line per epoch,
    ``[label] epoch 3: lr 0.00946 train_loss -0.41 val_loss -0.38 pseudo Dice [0.61, 0.52] (12.3 s)``, plus
    the final validation Dice; every other line only goes to the log file. With ``tb`` (a
    :class:`ssl_nnunet.utilities.tensorboard.TensorBoardLog`) each epoch's values also become TensorBoard scalars
    (step: nnU-Net's epoch)."""

    def __init__(self, label: str, emit=print, tb=None):
        self.label, self.emit, self.fields, self.tb = label, emit, {}, tb

    def _to_tensorboard(self, f: Dict[str, str], dice: str) -> None:
        def number(text):
            try:
                return float(text)
            except (TypeError, ValueError):
                return None
        try:
            per_class = [float(v) for v in dice.strip("[]").split(",") if v.strip()]
        except ValueError:
            per_class = []
        values = {"lr": number(f.get("lr")), "train_loss": number(f.get("train_loss")),
                  "val_loss": number(f.get("val_loss")), "epoch_time_s": number(f.get("time")),
                  **{f"pseudo_dice/class_{i + 1}": v for i, v in enumerate(per_class)}}
        if per_class:
            values["pseudo_dice/mean"] = sum(per_class) / len(per_class)
        epoch = number(f.get("epoch"))
        if epoch is not None:
            self.tb.scalars(values, int(epoch))
            self.tb.flush()

    def feed(self, line: str) -> None:
        line = line.rstrip()
        for name, pattern in _EPOCH_FIELDS.items():
            m = pattern.search(line)
            if m:
                if name == "epoch":
                    self.fields = {}
                self.fields[name] = m.group(1)
                if name == "time":
                    f = self.fields
                    dice = _NUMPY_SCALAR.sub(r"\1", f.get("pseudo Dice", "?"))
                    self.emit(f"  [{self.label}] epoch {f.get('epoch', '?')}: lr {f.get('lr', '?')} train_loss "
                              f"{f.get('train_loss', '?')} val_loss {f.get('val_loss', '?')} pseudo Dice "
                              f"{dice} ({f['time']} s)")
                    if self.tb is not None:
                        self._to_tensorboard(f, dice)
                return
        m = _VALIDATION_DICE.search(line)
        if m:
            try:
                value = f"{float(m.group(1)):.4f}"
            except ValueError:
                value = m.group(1)
            self.emit(f"  [{self.label}] final validation (nnU-Net, full cases): mean Dice {value}")


def nnunet_training_log(folder: str, since: float = 0.0) -> Optional[str]:
    """The newest ``training_log_*.txt`` nnU-Net wrote in ``folder`` (modified after ``since``), or None."""
    logs = [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("training_log_")] \
        if os.path.isdir(folder) else []
    logs = [f for f in logs if os.path.getmtime(f) >= since]
    return max(logs, key=os.path.getmtime) if logs else None


def run_fold(results_root: str, target_name: str, fold: int, trainer: str, device: str,
             weights: Optional[str], num_processes: int, label: Optional[str] = None,
             tensorboard_dir: Optional[str] = None, plans_identifier: str = FINETUNE_PLANS) -> str:
    """Train (or resume, or only validate) one fold with ``nnUNetv2_train``; returns the fold folder. The
    training process gets this process's ``nnUNet_raw`` and ``nnUNet_preprocessed`` as they are now and
    ``results_root`` as its ``nnUNet_results``. Its output goes in full to ``ssl_nnunet_finetune_stdout.txt``
    in the fold folder and, condensed to one line per epoch, to this process's stdout (prefix ``label``,
    default ``<arm folder> fold F``); the path of nnU-Net's own training log is printed too. ``tensorboard_dir``:
    the epoch values also go to TensorBoard there."""
    from ssl_nnunet.nnunet_trainers import trainer_dir
    folder = fold_folder(results_root, target_name, trainer, fold, plans_identifier)
    label = label or f"{os.path.basename(os.path.normpath(results_root))} fold {fold}"
    if fold_finished(folder):
        print(f"  fold {fold}: finished earlier, skipped ({folder})")
        return folder
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    cmd = [exe, target_name, CONFIGURATION, str(fold), "-p", plans_identifier, "-tr", trainer, "-device", device]
    if os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
        cmd.append("--val")
    elif os.path.isfile(os.path.join(folder, "checkpoint_latest.pth")):
        cmd.append("--c")
    elif weights is not None:
        cmd += ["-pretrained_weights", weights]
    env = dict(os.environ, nnUNet_results=results_root, nnUNet_extTrainer=trainer_dir(),
               nnUNet_raw=nnunet_raw(), nnUNet_preprocessed=nnunet_preprocessed(),
               nnUNet_def_n_proc=str(num_processes), nnUNet_n_proc_DA=str(num_processes), PYTHONUNBUFFERED="1")
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "ssl_nnunet_finetune_stdout.txt")
    print(f"  fold {fold}: {' '.join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd))}")
    print(f"  [{label}] output: {log_path}", flush=True)
    started = time.time()
    from ssl_nnunet.utilities.tensorboard import open_log
    tb = open_log(tensorboard_dir)
    progress = EpochProgress(label, lambda text: print(text, flush=True), tb)
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        announced = False
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if not announced and _EPOCH_FIELDS["epoch"].search(line):
                nnunet_log = nnunet_training_log(folder, started - 1)
                if nnunet_log:
                    print(f"  [{label}] nnU-Net log: {nnunet_log}", flush=True)
                announced = True
            progress.feed(line)
        returncode = proc.wait()
    if tb is not None:
        tb.close()
    if returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-25:])
        raise RuntimeError(f"nnUNetv2_train failed for fold {fold} (exit {returncode}); log: {log_path}\n{tail}")
    return folder


def comparison_root(target_name: str, source_name: str) -> str:
    """The folder of every comparison of ``source_name``'s weights on ``target_name``."""
    return os.path.join(nnunet_results(), target_name, "ssl_nnunet_finetune", source_name)


def arm_tag(method: str, encoder_only: bool) -> str:
    """What distinguishes the pretrained arms of one comparison folder: the method and the transfer protocol."""
    return f"{method}{'_encoder_only' if encoder_only else ''}"


def arm_roots(root: str, tag: str) -> Dict[str, str]:
    """Results root (``nnUNet_results`` of the training process) of every arm under the comparison folder."""
    return {"pretrained": os.path.join(root, f"pretrained_{tag}"), **{a: os.path.join(root, a) for a in SCRATCH_ARMS}}


def finetune(target, weights: str, folds: Optional[Sequence[int]] = None, scratch=False,
             trainer: Optional[str] = None, device: str = "cpu", num_processes: int = 2,
             encoder_only: bool = False, k: Optional[int] = None, vanilla_trainer: Optional[str] = None,
             tensorboard: bool = False, repeats: Optional[int] = None) -> dict:
    """Run the comparison; returns the report dict (also written as markdown/JSON/PNG).

    ``trainer``: default the trainer the fine-tuning plan names (``ssl_pretraining_source.finetune_trainer``:
    ``nnUNetTrainer_SSLFinetune`` for the CNN, nnunetv2's Primus trainer of the planned size, or
    ``nnUNet_Primus_SSLSmoke_Trainer`` for a CPU-profile Primus), else ``nnUNetTrainer_SSLFinetune``. The plans
    identifier is the bundle plan's own (``sslFinetunePlans`` or ``sslFinetunePlans_<arch>``).
    ``folds``: default all folds of the target's split (``k`` folds, ``k = min(5, cases)`` unless given, times
    ``repeats`` for repeated k-fold, see :func:`make_splits`).
    ``scratch``: ``True`` trains both scratch arms (``scratch``: the same trainer as the pretrained arm;
    ``scratch_vanilla``: ``vanilla_trainer``, default the trainer's vanilla counterpart from
    :data:`ssl_nnunet.nnunet_trainers.VANILLA_TRAINERS`), or a list of the arm names to train; scratch folds
    finished by an earlier run are compared either way. ``tensorboard``: every fold's epoch curves also go to
    ``<comparison folder>/tensorboard/<arm>/fold_<F>``."""
    from ssl_nnunet.export.transfer import transfer_and_preprocess
    from ssl_nnunet.finetune.report import write_report
    from ssl_nnunet.finetune.statistics import comparison_sentence
    from ssl_nnunet.nnunet_trainers import VANILLA_TRAINERS, vanilla_trainer as default_vanilla
    bundle = resolve_bundle(weights)
    trainer = trainer or bundle.get("trainer") or DEFAULT_TRAINER
    pid = bundle["plans_identifier"]
    scratch_arms = list(SCRATCH_ARMS) if scratch is True else list(scratch or [])
    unknown = sorted(set(scratch_arms) - set(SCRATCH_ARMS))
    if unknown:
        raise SSLInputError(f"unknown scratch arm(s) {unknown}; choose from {list(SCRATCH_ARMS)}")
    if vanilla_trainer is None:  # the known counterpart; required only when the vanilla arm is trained
        vanilla_trainer = default_vanilla(trainer) if "scratch_vanilla" in scratch_arms \
            else VANILLA_TRAINERS.get(trainer)
    trainers = {"pretrained": trainer, "scratch": trainer, "scratch_vanilla": vanilla_trainer}
    target_name = dataset_name_from_id(target)
    source_name = bundle["source"]
    root = comparison_root(target_name, source_name)
    tag = arm_tag(bundle["method"], encoder_only)
    target_pp = os.path.join(nnunet_preprocessed(), target_name)
    source_plans = os.path.join(nnunet_preprocessed(), source_name, pid + ".json")
    if not os.path.isfile(source_plans):
        # bundle from another machine: its plans.json is the source plan
        atomic_save_json(bundle["plans"], source_plans)
    transfer_and_preprocess(source_name, target_name, pid, num_processes, verbose=False, adapt_channels=True)
    splits = ensure_splits(target_name, k, repeats, pid)
    folds = list(range(len(splits))) if folds is None else list(folds)
    bad = [f for f in folds if not 0 <= f < len(splits)]
    if bad:
        raise SSLInputError(f"fold(s) {bad} do not exist: {os.path.join(target_pp, 'splits_final.json')} has "
                            f"{len(splits)} folds (0..{len(splits) - 1}).")
    split_text = describe_splits(splits)
    print(f"Fine-tuning {target_name} from {source_name} ({bundle['method']}) with {trainer}, folds {folds} of "
          f"{split_text}" + (f"; scratch arms: {', '.join(f'{a} ({trainers[a]})' for a in scratch_arms)}"
                             if scratch_arms else ""))
    os.makedirs(root, exist_ok=True)
    weights_file, notes = target_weights(bundle, target_name, encoder_only, root)
    for note in notes:
        print(f"NOTE: {note}")
    roots = arm_roots(root, tag)
    run_arms = ["pretrained", *[a for a in SCRATCH_ARMS if a in scratch_arms]]
    folders: Dict[str, Dict[int, str]] = {}
    for arm in run_arms:
        print(f"[{arm}] {trainers[arm]}")
        folders[arm] = {fold: run_fold(roots[arm], target_name, fold, trainers[arm], device,
                                       weights_file if arm == "pretrained" else None, num_processes,
                                       label=f"{arm} fold {fold}",
                                       tensorboard_dir=os.path.join(root, "tensorboard", os.path.basename(roots[arm]),
                                                                    f"fold_{fold}") if tensorboard else None,
                                       plans_identifier=pid)
                        for fold in folds}
    for arm in SCRATCH_ARMS:  # scratch folds of an earlier run are compared too
        if arm not in folders and trainers[arm]:
            folders[arm] = {f: fold_folder(roots[arm], target_name, trainers[arm], f, pid) for f in folds}
    dataset_json = load_json(os.path.join(target_pp, "dataset.json"), "dataset.json")
    names = {str(v): k for k, v in dataset_json["labels"].items() if not isinstance(v, (list, tuple))}
    report_dir = os.path.join(root, f"report_{tag}__{trainer}")
    extra = {"target": target_name, "source": source_name, "method": bundle["method"], "trainer": trainer,
             "trainers": {a: trainers[a] for a in folders}, "encoder_only": encoder_only, "weights": weights_file,
             "splits": {"k": len(splits), "folds_run": folds, "description": split_text}, "notes": notes}
    report = write_report(folders, report_dir, f"{target_name}: {bundle['method']} pretrained vs scratch "
                                                f"({trainer})", names, extra)
    print(f"Report: {report_dir}/finetune_report.md")
    for base, by_class in report.get("comparisons", {}).items():
        print(f"Verdict: {comparison_sentence(by_class['mean'])}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Fine-tune pretrained weights with nnU-Net (k-fold CV) and compare "
                                            "with training from scratch (paired per-case statistics).")
    p.add_argument("-d", required=True, help="labeled target dataset id or name")
    p.add_argument("-w", required=True, help="bundle folder from ssl_nnunet_export (or its checkpoint_final.pth)")
    p.add_argument("-f", nargs="+", type=int, default=None,
                   help="folds (default: all k folds of the target's splits_final.json)")
    p.add_argument("-k", type=int, default=None,
                   help="folds of a new split (default min(5, labelled cases): leave-one-out below 5 cases); "
                        "an existing splits_final.json is used as it is")
    p.add_argument("--scratch", nargs="*", choices=SCRATCH_ARMS, default=None, metavar="ARM",
                   help="also train from scratch on the same folds: both arms without a value, or name them "
                        "(scratch: the same trainer; scratch_vanilla: nnU-Net's own lr and schedule, same budget)")
    p.add_argument("-tr", default=None,
                   help="nnU-Net trainer of the pretrained and scratch arms (default: the one the bundle's "
                        "fine-tuning plan names, e.g. nnUNet_Primus_M_Trainer for a Primus-M plan, else "
                        "nnUNetTrainer_SSLFinetune; "
                        "CPU budgets: nnUNetTrainer_SSLFinetune_CPU300 / _CPU1000)")
    p.add_argument("-tr_vanilla", default=None,
                   help="trainer of the scratch_vanilla arm (default: the -tr trainer's vanilla counterpart, "
                        "e.g. nnUNetTrainer_SSLVanilla_CPU300 for nnUNetTrainer_SSLFinetune_CPU300)")
    p.add_argument("-repeats", type=int, default=None,
                   help="repeated k-fold for very few cases: R k-fold splits with different seeds (k x R folds, "
                        "the first k are nnU-Net's); default 1")
    p.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-np", type=int, default=2, help="worker processes for preprocessing/augmentation")
    p.add_argument("--encoder-only", action="store_true", help="re-initialise the decoder before fine-tuning")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each arm's and fold's epoch curves to <comparison folder>/tensorboard "
                        "(needs the tensorboard extra)")
    a = p.parse_args(argv)
    scratch = False if a.scratch is None else (True if a.scratch == [] else a.scratch)
    run_cli(lambda: finetune(a.d, a.w, a.f, scratch, a.tr, a.device, a.np, a.encoder_only, a.k, a.tr_vanilla,
                                 a.tensorboard, a.repeats))
