"""Prepare a labeled target dataset for fine-tuning from an ssl_nnunet pretraining (nnU-Net's own tools).

:func:`transfer_and_preprocess` does what a user would do by hand with nnU-Net's commands:

1. ``nnUNetv2_extract_fingerprint -d TGT`` if the target has no fingerprint yet (``nnUNetv2_train`` copies
   ``dataset_fingerprint.json`` from ``nnUNet_preprocessed/TGT`` and fails without it);
2. ``nnUNetv2_move_plans_between_datasets -s SRC -t TGT -sp sslFinetunePlans -tp sslFinetunePlans``, so the
   target is trained with the pretraining architecture, spacing and normalisation;
3. copies the target's ``dataset.json`` to ``nnUNet_preprocessed/TGT`` (nnU-Net's planner normally does this
   and its preprocessor reads it from there);
4. ``nnUNetv2_preprocess -d TGT -plans_name sslFinetunePlans -c 3d_fullres`` (also copies the reference
   segmentations to ``gt_segmentations`` for the final validation).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from typing import Union

from ssl_nnunet.constants import CONFIGURATION, FINETUNE_PLANS
from ssl_nnunet.paths import nnunet_preprocessed, nnunet_raw
from ssl_nnunet.utilities.errors import SSLInputError, run_cli
from ssl_nnunet.utilities.file_io import atomic_copy, atomic_save_json, dataset_name_from_id, load_json, load_plans


def _dataset_number(dataset_name: str) -> int:
    return int(dataset_name[len("Dataset"):len("Dataset") + 3])


def _check_target(target_name: str, source_plans: dict, source_name: str, adapt_channels: bool = False) -> dict:
    raw = os.path.join(nnunet_raw(), target_name)
    dataset_json = load_json(os.path.join(raw, "dataset.json"), "dataset.json")
    labels_dir = os.path.join(raw, "labelsTr")
    if not os.path.isdir(labels_dir) or not os.listdir(labels_dir):
        raise SSLInputError(f"{target_name} has no labels ({labels_dir} is missing or empty); fine-tuning needs a "
                            f"labeled nnU-Net dataset.")
    n_target = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    n_source = len(source_plans["configurations"][CONFIGURATION]["normalization_schemes"])
    if n_target != n_source and not adapt_channels:
        raise SSLInputError(f"{target_name} has {n_target} input channel(s) but the network pretrained on "
                            f"{source_name} expects {n_source}; the pretrained first convolution cannot be loaded. "
                            f"Use a target with {n_source} channel(s).")
    return dataset_json


def adapt_plans_to_target_channels(plans_file: str, target_dataset_json: dict, target_fingerprint_file: str) -> bool:
    """When the target has another number of input channels than the pretraining data, give the transferred
    plans one normalisation scheme per *target* channel (nnU-Net's choice from the channel name) and the
    target's intensity statistics. Returns True when the plans were changed (written atomically)."""
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme
    plans = load_json(plans_file, "plans")
    config = plans["configurations"][CONFIGURATION]
    names = [target_dataset_json["channel_names"][k] for k in sorted(target_dataset_json["channel_names"], key=int)]
    if len(names) == len(config["normalization_schemes"]):
        return False
    config["normalization_schemes"] = [get_normalization_scheme(n).__name__ for n in names]
    config["use_mask_for_norm"] = [bool(config["use_mask_for_norm"][0])] * len(names)
    fingerprint = load_json(target_fingerprint_file, "fingerprint")
    plans["foreground_intensity_properties_per_channel"] = fingerprint["foreground_intensity_properties_per_channel"]
    atomic_save_json(plans, plans_file)
    return True


def transfer_and_preprocess(source_dataset: Union[int, str], target_dataset: Union[int, str],
                            plans_identifier: str = FINETUNE_PLANS, num_processes: int = 1,
                            verbose: bool = False, adapt_channels: bool = False) -> str:
    """Transfer ``plans_identifier`` from the pretraining dataset to the target and preprocess the target.

    Returns the path of the target's plans file (``nnUNet_preprocessed/<target>/<plans_identifier>.json``).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, \
        preprocess_dataset
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets

    source_name = dataset_name_from_id(source_dataset)
    target_name = dataset_name_from_id(target_dataset)
    source_plans = load_plans(os.path.join(nnunet_preprocessed(), source_name, plans_identifier + ".json"),
                              source_dataset)
    target_json = _check_target(target_name, source_plans, source_name, adapt_channels)
    target_id = _dataset_number(target_name)
    target_pp = os.path.join(nnunet_preprocessed(), target_name)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())

    with quiet:
        if not os.path.isfile(os.path.join(target_pp, "dataset_fingerprint.json")):
            extract_fingerprint_dataset(target_id, num_processes=num_processes, check_dataset_integrity=False,
                                        clean=False, verbose=verbose, show_progress_bar=verbose)
        os.makedirs(target_pp, exist_ok=True)
        move_plans_between_datasets(source_name, target_name, plans_identifier, plans_identifier)
        if adapt_channels:
            adapt_plans_to_target_channels(os.path.join(target_pp, plans_identifier + ".json"), target_json,
                                           os.path.join(target_pp, "dataset_fingerprint.json"))
        atomic_copy(os.path.join(nnunet_raw(), target_name, "dataset.json"), os.path.join(target_pp, "dataset.json"))
        preprocess_dataset(target_id, plans_identifier, configurations=(CONFIGURATION,),
                           num_processes=[num_processes], verbose=verbose, show_progress_bar=verbose)
    target_plans = os.path.join(target_pp, plans_identifier + ".json")
    if verbose:
        print(f"{target_name}: plans {target_plans} (from {source_name}), preprocessed data in "
              f"{os.path.join(target_pp, load_json(target_plans)['configurations'][CONFIGURATION]['data_identifier'])}")
    return target_plans


def main() -> None:
    def _run():
        p = argparse.ArgumentParser(
            prog="ssl_nnunet_transfer",
            description="Transfer the fine-tuning plan of a pretraining dataset to a labeled target dataset and "
                        "preprocess the target with it (nnU-Net's move_plans_between_datasets + preprocess).")
        p.add_argument("-s", required=True, help="pretraining (source) dataset id or name")
        p.add_argument("-t", required=True, help="labeled target dataset id or name")
        p.add_argument("-p", default=FINETUNE_PLANS, help=f"plans identifier (default {FINETUNE_PLANS})")
        p.add_argument("-np", type=int, default=2, help="worker processes (default 2)")
        args = p.parse_args()
        path = transfer_and_preprocess(args.s, args.t, args.p, args.np, verbose=True)
        print(f"Done. Train with: nnUNetv2_train {args.t} {CONFIGURATION} 0 -p {args.p} "
              f"-pretrained_weights <bundle>/checkpoint_final.pth  (plans: {path})")
    run_cli(_run)


if __name__ == "__main__":
    main()
