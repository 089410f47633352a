"""Export a pretrained network as an nnU-Net ``-pretrained_weights`` bundle (``ssl_nnunet_export``).

Input: the SSL trainer's checkpoint ``nnUNet_results/<Dataset>/SSL_<method>__<plans>__3d_fullres/
checkpoint_final.pth`` (``checkpoint_latest.pth`` if training has not finished) and the plans of the
pretraining dataset in ``nnUNet_preprocessed/<Dataset>/``.

Output: one folder (built under a temporary sibling name and renamed into place, so a failed export leaves
nothing half-written; a rerun replaces an earlier bundle) with

* ``checkpoint_final.pth`` – nnU-Net's checkpoint format. ``network_weights`` is the full ``state_dict()`` of
  the U-Net built from ``sslFinetunePlans.json`` (same class and kwargs as nnU-Net builds for
  ``nnUNetv2_train ... -p sslFinetunePlans``), CPU tensors, loaded from the SSL checkpoint with
  ``strict=True``; plus ``init_args``, ``trainer_name``, ``logging``, ``current_epoch`` and the nnssl
  ``nnssl_adaptation_plan``;
* ``plans.json`` (the fine-tuning plan), ``dataset.json``, ``dataset_fingerprint.json``;
* ``adaptation_plan.json`` (the same dict as ``nnssl_adaptation_plan``);
* ``README.md`` – a model card with the fine-tuning commands.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import shutil
import subprocess
from typing import Dict, List, Optional, Union

from ssl_nnunet.paths import nnunet_preprocessed, nnunet_raw
from ssl_nnunet.utilities.errors import SSLInputError, run_cli
from ssl_nnunet.utilities.file_io import atomic_directory, atomic_save_json, dataset_name_from_id, load_json, ssl_output_folder

CONFIGURATION = "3d_fullres"
PRETRAIN_PLANS = "sslPlans"
FINETUNE_PLANS = "sslFinetunePlans"
BUNDLE_FILES = ("checkpoint_final.pth", "plans.json", "dataset.json", "dataset_fingerprint.json",
                "adaptation_plan.json", "README.md")

#: what each objective trains (METHODS.md); unknown methods are described as "see the method's documentation"
TRAINED_PARTS = {
    "mae": "encoder and decoder (the reconstruction decoder is the nnU-Net decoder)",
    "mim": "encoder and reconstruction decoder (the MiM paper transfers the encoder only: use "
           "ssl_nnunet_finetune --encoder-only for that protocol)",
    "gvsl": "encoder and decoder (the whole U-Net, as in the GVSL paper)",
    "alice": "online encoder and online (reconstruction) decoder; the EMA target encoder and heads are not exported "
             "(the Alice paper transfers the online encoder only: ssl_nnunet_finetune --encoder-only)",
    "voco": "encoder only; the decoder is exported at its random initialisation",
}


# ------------------------------------------------------------------------------------------------ inputs

def find_ssl_checkpoint(dataset_name: str, method: str, plans_identifier: str = PRETRAIN_PLANS,
                        checkpoint: Optional[str] = None, dataset_arg: Union[int, str, None] = None) -> str:
    """Path of the SSL checkpoint to export.

    ``checkpoint``: ``None`` (``checkpoint_final.pth``, else ``checkpoint_latest.pth``), a file name inside the
    training folder, or a path to a file.
    """
    folder = ssl_output_folder(dataset_name, method, plans_identifier, CONFIGURATION)
    hint = (f"Run ssl_nnunet_pretrain -d {dataset_arg if dataset_arg is not None else dataset_name} -m {method}"
            + ("" if plans_identifier == PRETRAIN_PLANS else f" -p {plans_identifier}") + " first")
    if checkpoint is None:
        final = os.path.join(folder, "checkpoint_final.pth")
        latest = os.path.join(folder, "checkpoint_latest.pth")
        if os.path.isfile(final):
            return final
        if os.path.isfile(latest):
            print(f"Note: {final} not found (pretraining not finished?); exporting {latest}.")
            return latest
        raise SSLInputError(f"No pretrained checkpoint for method '{method}' on {dataset_name}: expected {final} "
                            f"(or checkpoint_latest.pth in the same folder). {hint}.")
    candidates = [checkpoint] if os.path.isabs(checkpoint) else [os.path.join(folder, checkpoint), checkpoint]
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise SSLInputError(f"Checkpoint '{checkpoint}' not found (looked for {' and '.join(candidates)}). {hint}, "
                        f"or pass an existing file with -chk.")


def _load_plans(pp_folder: str, identifier: str, dataset: Union[int, str]) -> dict:
    path = os.path.join(pp_folder, identifier + ".json")
    if not os.path.isfile(path):
        raise SSLInputError(f"Plans file {path} not found. Run ssl_nnunet_plan_and_preprocess -d {dataset} "
                            f"first (it writes {PRETRAIN_PLANS}.json and {FINETUNE_PLANS}.json).")
    plans = load_json(path, "plans")
    if CONFIGURATION not in plans.get("configurations", {}):
        raise SSLInputError(f"{path} has no '{CONFIGURATION}' configuration; re-run ssl_nnunet_plan_experiment.")
    return plans


def _load_checkpoint(path: str) -> dict:
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt / truncated file
        raise SSLInputError(f"Cannot read checkpoint {path} ({type(e).__name__}: {e}). Re-run the pretraining "
                            f"or pass another checkpoint with -chk.") from e
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise SSLInputError(f"{path} is not an ssl_nnunet/nnU-Net checkpoint (no 'network_weights' entry).")
    return ckpt


def _strip_wrapper_prefixes(state: Dict[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
    """Remove DDP ``module.`` and torch.compile ``_orig_mod.`` prefixes if a foreign checkpoint has them."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------ network

def build_network_from_plans(plans: dict, num_input_channels: int, num_output_channels: int,
                             deep_supervision: bool = False):
    """The network nnU-Net builds for ``plans``' 3d_fullres configuration (nnunetv2's own builder)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cm = PlansManager(copy.deepcopy(plans)).get_configuration(CONFIGURATION)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
                                  allow_init=True, deep_supervision=deep_supervision)


def num_input_channels(plans: dict, dataset_json: dict) -> int:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(copy.deepcopy(plans))
    return int(determine_num_input_channels(pm, pm.get_configuration(CONFIGURATION), dataset_json))


def load_weights_strict(network, weights: dict, source: str) -> None:
    """``network.load_state_dict(weights, strict=True)`` with a readable :class:`SSLInputError` on mismatch."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong_shape = [f"{k} (checkpoint {tuple(weights[k].shape)}, plan {tuple(expected[k].shape)})"
                   for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        def head(keys: List[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in total)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches: {head(wrong_shape)}")
        raise SSLInputError(f"The weights in {source} do not fit the network of {FINETUNE_PLANS}.json "
                            f"({'; '.join(parts)}). The checkpoint was probably trained with other plans: re-plan "
                            f"and re-run the pretraining, or export with the matching -p.")
    network.load_state_dict(weights, strict=True)


# ------------------------------------------------------------------------------------------------ adaptation plan

def _in_projection_keys(state: dict) -> List[str]:
    """Module paths of the first convolution of the encoder and of its aliases (same tensor, other name)."""
    first = next((k for k, v in state.items() if k.startswith("encoder.") and k.endswith(".weight")
                  and getattr(v, "ndim", 0) >= 4), None)
    if first is None:
        return []
    ptr = state[first].data_ptr()
    keys = [first[:-len(".weight")]]
    for k, v in state.items():
        if k != first and k.startswith("encoder.") and k.endswith(".weight") and v.data_ptr() == ptr:
            keys.append(k[:-len(".weight")])
    return keys


def build_adaptation_plan(pretrain_plans: dict, finetune_plans: dict, method: str, n_channels: int,
                          state: dict) -> dict:
    """The nnssl ``adaptation_plan`` (INTEROP.md §4) for the exported network."""
    arch = finetune_plans["configurations"][CONFIGURATION]["architecture"]
    pre_cfg = pretrain_plans["configurations"][CONFIGURATION]
    ft_cfg = finetune_plans["configurations"][CONFIGURATION]
    method_plan = pretrain_plans.get("ssl", {}).get("methods", {}).get(method, {})
    pretrain_patch = list(method_plan.get("pretrain_patch_size", pre_cfg["patch_size"]))
    arch_kwargs = copy.deepcopy(arch["arch_kwargs"])
    for k in arch.get("_kw_requires_import", []):  # plans already hold dotted strings; keep them strings
        if arch_kwargs.get(k) is not None and not isinstance(arch_kwargs[k], str):
            obj = arch_kwargs[k]
            arch_kwargs[k] = f"{obj.__module__}.{obj.__qualname__}"
    has_stem = any(k.startswith("encoder.stem.") for k in state)
    return {
        "architecture_plans": {
            "arch_class_name": arch["network_class_name"].split(".")[-1],
            "arch_kwargs": arch_kwargs,
            "arch_kwargs_requiring_import": list(arch.get("_kw_requires_import", [])),
        },
        "pretrain_plan": {
            "dataset_name": pretrain_plans["dataset_name"],
            "plans_name": pretrain_plans["plans_name"],
            "original_median_spacing_after_transp": pretrain_plans.get("original_median_spacing_after_transp"),
            "image_reader_writer": pretrain_plans.get("image_reader_writer"),
            "transpose_forward": pretrain_plans.get("transpose_forward"),
            "transpose_backward": pretrain_plans.get("transpose_backward"),
            "experiment_planner_used": pretrain_plans.get("experiment_planner_used"),
            "configurations": {
                CONFIGURATION: {
                    "data_identifier": pre_cfg.get("data_identifier"),
                    "preprocessor_name": pre_cfg.get("preprocessor_name"),
                    # nnU-Net's planner chose the target spacing (median, anisotropy rule or user override)
                    "spacing_style": "nnunet_planner",
                    "normalization_schemes": pre_cfg.get("normalization_schemes"),
                    "use_mask_for_norm": pre_cfg.get("use_mask_for_norm"),
                    "resampling_fn_data": pre_cfg.get("resampling_fn_data"),
                    "resampling_fn_data_kwargs": pre_cfg.get("resampling_fn_data_kwargs"),
                    "resampling_fn_mask": pre_cfg.get("resampling_fn_seg"),
                    "resampling_fn_mask_kwargs": pre_cfg.get("resampling_fn_seg_kwargs"),
                    "spacing": list(pre_cfg["spacing"]) if pre_cfg.get("spacing") is not None else None,
                    "patch_size": pretrain_patch,
                }
            },
        },
        "pretrain_num_input_channels": int(n_channels),
        "recommended_downstream_patchsize": [int(p) for p in ft_cfg["patch_size"]],
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem" if has_stem else None,
        "keys_to_in_proj": _in_projection_keys(state),
        "key_to_lpe": None,
    }


# ------------------------------------------------------------------------------------------------ model card

def project_git_commit() -> Optional[str]:
    """``git rev-parse HEAD`` of the checkout this package runs from (``+dirty`` with local changes)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def final_losses(logging: dict) -> Dict[str, float]:
    """Last finite value of every ``train_*`` / ``val_*`` / ``*loss*`` series of the SSL logger."""
    out = {}
    for key, series in (logging or {}).items():
        if not (key.startswith(("train_", "val_")) or "loss" in key) or not isinstance(series, (list, tuple)):
            continue
        finite = [float(v) for v in series if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if finite:
            out[key] = finite[-1]
    return out


def model_card(dataset_name: str, method: str, plans_identifier: str, pretrain_plans: dict, finetune_plans: dict,
               ckpt: dict, checkpoint_path: str, adaptation: dict, bundle_dir: str) -> str:
    source_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    src_info = finetune_plans.get("ssl_pretraining_source", {})
    ssl_block = pretrain_plans.get("ssl", {})
    profile = src_info.get("profile", ssl_block.get("profile", "unknown"))
    preset = src_info.get("planner_preset", ssl_block.get("planner_preset", "unknown"))
    cfg = finetune_plans["configurations"][CONFIGURATION]
    arch = cfg["architecture"]
    kw = arch["arch_kwargs"]
    blocks = kw.get("n_blocks_per_stage", kw.get("n_conv_per_stage"))
    losses = final_losses(ckpt.get("logging", {}))
    loss_lines = "\n".join(f"| `{k}` | {v:.6g} |" for k, v in sorted(losses.items())) or "| (none logged) | |"
    iterations = ckpt.get("iterations_done")
    total = ckpt.get("total_iterations")
    iter_text = "unknown" if iterations is None else (f"{iterations}" + (f" of {total}" if total else ""))
    trained = TRAINED_PARTS.get(method, "see the documentation of the method")
    commit = project_git_commit() or "not available"
    bundle = os.path.abspath(bundle_dir)
    ckpt_name = os.path.basename(checkpoint_path)
    partial = "" if ckpt_name == "checkpoint_final.pth" else (
        f"\n**Note:** exported from `{ckpt_name}` – the pretraining had not finished.\n")
    return f"""# ssl_nnunet pretrained U-Net: `{method}` on {dataset_name}
{partial}
| | |
| --- | --- |
| method | `{method}` |
| source dataset | {dataset_name} (unlabeled pretraining data) |
| pretraining plan | `{plans_identifier}` / `{CONFIGURATION}` (profile `{profile}`, nnU-Net planner preset `{preset}`) |
| fine-tuning plan | `{FINETUNE_PLANS}` (`plans.json` in this folder) |
| network | `{arch['network_class_name']}`, {kw.get('n_stages')} stages, features {kw.get('features_per_stage')}, blocks {blocks} |
| strides | {kw.get('strides')} |
| input channels | {adaptation['pretrain_num_input_channels']} |
| spacing | {cfg.get('spacing')} (nnU-Net axis order) |
| pretraining patch | {adaptation['pretrain_plan']['configurations'][CONFIGURATION]['patch_size']} |
| fine-tuning patch | {adaptation['recommended_downstream_patchsize']} |
| iterations | {iter_text} (epochs: {ckpt.get('current_epoch', 'unknown')}) |
| trained by the objective | {trained} |
| source checkpoint | `{checkpoint_path}` |
| project commit | `{commit}` |
| exported | {datetime.datetime.now().isoformat(timespec='seconds')} |

## Final losses

| series | last value |
| --- | --- |
{loss_lines}

## Contents

* `checkpoint_final.pth` – nnU-Net checkpoint; `network_weights` holds every key of the U-Net that nnU-Net builds
  from `{FINETUNE_PLANS}` (the segmentation head `decoder.seg_layers.*` is the pretraining output layer and
  is not loaded by nnU-Net). Also `nnssl_adaptation_plan` for nnssl-aware tools.
* `plans.json` – the fine-tuning plan `{FINETUNE_PLANS}` (same network, spacing and normalisation as the
  pretraining); `dataset.json`, `dataset_fingerprint.json` – of the source dataset.
* `adaptation_plan.json` – the nnssl adaptation plan (same as in the checkpoint).

## Fine-tuning with nnU-Net (target dataset `TGT`, e.g. `901`)

The easy way is `ssl_nnunet_finetune -d TGT -w <this folder> --scratch` (plan transfer, preprocessing, 5 folds
pretrained vs scratch, report; it also adapts the first convolution when the target has another number of
input channels). By hand, the target must have the same number of input channels
({adaptation['pretrain_num_input_channels']}) and be preprocessed with the transferred plan, so that nnU-Net
builds exactly this network:

`TGT` is the target's id and `DatasetTGT_Name` its folder name.

```bash
# 1. fingerprint of the target; creates nnUNet_preprocessed/DatasetTGT_Name/ (needed by step 2, and
#    nnUNetv2_train copies dataset_fingerprint.json from there)
nnUNetv2_extract_fingerprint -d TGT
# 2. transfer the fine-tuning plan from the source dataset to the target. It reads
#    nnUNet_preprocessed/{dataset_name}/{FINETUNE_PLANS}.json; with only this bundle at hand, create that
#    folder and copy plans.json into it as {FINETUNE_PLANS}.json first
nnUNetv2_move_plans_between_datasets -s {source_id} -t TGT -sp {FINETUNE_PLANS} -tp {FINETUNE_PLANS}
# 3. nnU-Net's preprocessing reads dataset.json from nnUNet_preprocessed (its planner normally copies it)
cp "$nnUNet_raw/DatasetTGT_Name/dataset.json" "$nnUNet_preprocessed/DatasetTGT_Name/"
nnUNetv2_preprocess -d TGT -plans_name {FINETUNE_PLANS} -c {CONFIGURATION}
# 4. train from the pretrained weights (add -device cpu without a GPU)
nnUNetv2_train TGT {CONFIGURATION} 0 -p {FINETUNE_PLANS} -pretrained_weights {bundle}/checkpoint_final.pth
```

Steps 1–3 in one call: `python -c "from ssl_nnunet.export.transfer import transfer_and_preprocess as t;
t({source_id}, TGT)"`. A quick smoke run uses the trainer variant shipped with ssl_nnunet:
`export nnUNet_extTrainer=$(python -c "import ssl_nnunet.nnunet_trainers as t; print(t.trainer_dir())")` and
`-tr nnUNetTrainer_SSLSmoke` (1 epoch of 2 iterations, no mirroring).
"""


# ------------------------------------------------------------------------------------------------ export

def _is_replaceable_bundle(folder: str) -> bool:
    """Only an empty folder or an earlier bundle may be replaced (never an arbitrary directory)."""
    entries = set(os.listdir(folder))
    return not entries or ("adaptation_plan.json" in entries and entries <= set(BUNDLE_FILES))


def export_bundle(dataset: Union[int, str], method: str, output_dir: str, plans_identifier: str = PRETRAIN_PLANS,
                  checkpoint: Optional[str] = None) -> str:
    """Write the nnU-Net pretrained-weights bundle of ``method`` pretrained on ``dataset`` to ``output_dir``.

    Returns the absolute bundle folder. Raises :class:`SSLInputError` for a missing checkpoint or plans, for
    weights that do not fit the fine-tuning plan's network, and for an ``output_dir`` that exists and is
    neither empty nor an earlier bundle.
    """
    import torch
    dataset_name = dataset_name_from_id(dataset)
    pp_folder = os.path.join(nnunet_preprocessed(), dataset_name)
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or not _is_replaceable_bundle(output_dir)):
        raise SSLInputError(f"Output folder {output_dir} exists and is not an ssl_nnunet bundle; choose a new or "
                            f"empty folder (an earlier bundle there would be replaced).")
    ckpt_path = find_ssl_checkpoint(dataset_name, method, plans_identifier, checkpoint, dataset)
    pretrain_plans = _load_plans(pp_folder, plans_identifier, dataset)
    finetune_plans = _load_plans(pp_folder, FINETUNE_PLANS, dataset)
    if (pretrain_plans["configurations"][CONFIGURATION]["architecture"]
            != finetune_plans["configurations"][CONFIGURATION]["architecture"]):
        raise SSLInputError(f"{FINETUNE_PLANS}.json and {plans_identifier}.json in {pp_folder} describe different "
                            f"networks; re-run ssl_nnunet_plan_experiment -d {dataset} so both come from one "
                            f"planning run.")
    dataset_json_path = os.path.join(pp_folder, "dataset.json")
    if not os.path.isfile(dataset_json_path):
        dataset_json_path = os.path.join(nnunet_raw(), dataset_name, "dataset.json")
    dataset_json = load_json(dataset_json_path, "dataset.json")
    fingerprint_path = os.path.join(pp_folder, "dataset_fingerprint.json")
    if not os.path.isfile(fingerprint_path):
        raise SSLInputError(f"Fingerprint {fingerprint_path} not found. Run ssl_nnunet_extract_fingerprint "
                            f"-d {dataset}.")

    ckpt = _load_checkpoint(ckpt_path)
    saved_method = ckpt.get("ssl_method")
    if saved_method is not None and saved_method != method:
        raise SSLInputError(f"{ckpt_path} was written by method '{saved_method}', not '{method}'.")
    n_channels = num_input_channels(finetune_plans, dataset_json)
    network = build_network_from_plans(finetune_plans, n_channels, n_channels, deep_supervision=False)
    weights = _strip_wrapper_prefixes(ckpt["network_weights"])
    load_weights_strict(network, weights, ckpt_path)
    state = {k: v.detach().to("cpu") for k, v in network.state_dict().items()}
    adaptation = build_adaptation_plan(pretrain_plans, finetune_plans, method, n_channels, state)

    exported = {
        "network_weights": state,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": copy.deepcopy(ckpt.get("logging", {})),
        "_best_ema": None,
        "current_epoch": int(ckpt.get("current_epoch", 0)),
        "init_args": {"plans": finetune_plans, "configuration": CONFIGURATION, "fold": 0,
                      "dataset_json": dataset_json, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": None,
        "nnssl_adaptation_plan": adaptation,
        "ssl_method": method,
        "iterations_done": ckpt.get("iterations_done"),
    }

    with atomic_directory(output_dir) as tmp:
        torch.save(exported, os.path.join(tmp, "checkpoint_final.pth"))
        atomic_save_json(finetune_plans, os.path.join(tmp, "plans.json"))
        atomic_save_json(dataset_json, os.path.join(tmp, "dataset.json"))
        shutil.copyfile(fingerprint_path, os.path.join(tmp, "dataset_fingerprint.json"))
        atomic_save_json(adaptation, os.path.join(tmp, "adaptation_plan.json"))
        card = model_card(dataset_name, method, plans_identifier, pretrain_plans, finetune_plans, ckpt, ckpt_path,
                          adaptation, output_dir)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
    return output_dir


def main() -> None:
    def _run():
        p = argparse.ArgumentParser(
            prog="ssl_nnunet_export",
            description="Export a pretrained network as an nnU-Net pretrained-weights bundle "
                        "(checkpoint_final.pth for nnUNetv2_train -pretrained_weights, plans, adaptation plan, "
                        "model card).")
        p.add_argument("-d", required=True, help="pretraining dataset id or name, e.g. -d 900")
        p.add_argument("-m", required=True, help="SSL method, e.g. mae")
        p.add_argument("-o", required=True, help="output folder of the bundle (replaced if it is an earlier bundle)")
        p.add_argument("-p", default=PRETRAIN_PLANS, help=f"pretraining plans identifier (default {PRETRAIN_PLANS})")
        p.add_argument("-chk", default=None,
                       help="checkpoint file name in the training folder or a path "
                            "(default: checkpoint_final.pth, else checkpoint_latest.pth)")
        args = p.parse_args()
        out = export_bundle(args.d, args.m, args.o, args.p, args.chk)
        print(f"Bundle written to {out}. Fine-tune with: nnUNetv2_train TGT {CONFIGURATION} 0 -p {FINETUNE_PLANS} "
              f"-pretrained_weights {os.path.join(out, 'checkpoint_final.pth')} (see {out}/README.md).")
    run_cli(_run)


if __name__ == "__main__":
    main()
