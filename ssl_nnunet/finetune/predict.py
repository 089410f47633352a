"""``ssl_nnunet_predict``: segment new images with a fine-tuned arm of ``ssl_nnunet_finetune``.

Each arm (``pretrained``, ``scratch``, ``scratch_vanilla``) of a comparison is an ordinary nnU-Net model
folder (``<trainer>__sslFinetunePlans__3d_fullres`` with ``plans.json``, ``dataset.json`` and
``fold_F/checkpoint_final.pth``) under ``nnUNet_results/<target>/ssl_nnunet_finetune/<source>/<arm>/<target>/``.
This command finds that folder and predicts with nnU-Net's own ``nnUNetPredictor`` (preprocessing, sliding
window, fold ensemble, mirroring as the trainer allowed it, export) — the same as ``nnUNetv2_predict`` on that
folder with ``nnUNet_extTrainer`` set to the project's trainers. On CPU the network's 3D convolutions run on
oneDNN during prediction (:mod:`ssl_nnunet.utilities.cpu_inference`): nnU-Net predicts batch-1 patches, for
which PyTorch otherwise picks its slow generic kernel.
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import List, Optional, Sequence

import torch

from ssl_nnunet.constants import FINETUNE_ARMS as ARMS
from ssl_nnunet.constants import FINETUNE_PLANS
from ssl_nnunet.finetune.finetune import arm_roots, arm_tag, comparison_root, model_folder, resolve_bundle
from ssl_nnunet.utilities.errors import SSLInputError, run_cli
from ssl_nnunet.utilities.file_io import dataset_name_from_id


def _has_checkpoint(model_folder: str, checkpoint_name: str) -> bool:
    return bool(glob.glob(os.path.join(model_folder, "fold_*", checkpoint_name)))


def find_model_folder(target, arm: str, trainer: Optional[str] = None, source: Optional[str] = None,
                      method: Optional[str] = None, encoder_only: bool = False,
                      checkpoint_name: str = "checkpoint_final.pth") -> str:
    """The nnU-Net model folder of ``arm`` for ``target``; ``trainer`` / ``source`` / ``method`` narrow the
    search when the target was fine-tuned more than once. Refuses (listing the candidates) when none or
    several match."""
    if arm not in ARMS:
        raise SSLInputError(f"-arm {arm}: choose one of {list(ARMS)}")
    target_name = dataset_name_from_id(target)
    roots = arm_roots(comparison_root(target_name, source or "*"), arm_tag(method, encoder_only) if method else "*")
    # any fine-tuning plan: sslFinetunePlans (CNN) or sslFinetunePlans_<arch> (Primus)
    pattern = model_folder(roots[arm], target_name, trainer or "*", FINETUNE_PLANS + "*")
    found = sorted(f for f in glob.glob(pattern) if _has_checkpoint(f, checkpoint_name))
    if arm == "pretrained" and not method:
        found = [f for f in found if f.split(os.sep)[-3].endswith("_encoder_only") == encoder_only]
    if not found:
        existing = sorted(glob.glob(model_folder(os.path.join(comparison_root(target_name, "*"), "*"), target_name,
                                                 "*", FINETUNE_PLANS + "*")))
        raise SSLInputError(f"No fine-tuned '{arm}' model with a {checkpoint_name} for {target_name} matches "
                            f"{pattern}. Fine-tuned model folders there: {existing or 'none'} (run "
                            f"ssl_nnunet_finetune first; --scratch for the scratch arms).")
    if len(found) > 1:
        raise SSLInputError(f"Several fine-tuned '{arm}' models for {target_name}: {found}. Choose with -tr "
                            f"(trainer), -w (bundle: source and method) or -src (source dataset).")
    return found[0]


def _with_project_trainers() -> None:
    """nnU-Net finds the project's trainers (named in the checkpoints) through ``nnUNet_extTrainer``."""
    from ssl_nnunet.nnunet_trainers import trainer_dir
    paths = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainer_dir() not in paths:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*paths, trainer_dir()])


def make_predictor(model_folder: str, folds: Optional[Sequence] = None, checkpoint_name: str = "checkpoint_final.pth",
                   device: str = "cpu", use_mirroring: bool = True, tile_step_size: float = 0.5,
                   verbose: bool = False):
    """nnU-Net's ``nnUNetPredictor`` initialised from ``model_folder`` (``folds`` None: every fold there)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    _with_project_trainers()
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=True, device=torch.device(device), verbose=verbose,
                                allow_tqdm=True)
    predictor.initialize_from_trained_model_folder(model_folder, tuple(folds) if folds is not None else None,
                                                   checkpoint_name)
    return predictor


def predict(input_folder: str, output_folder: str, target, arm: str, folds: Optional[Sequence] = None,
            trainer: Optional[str] = None, weights: Optional[str] = None, source: Optional[str] = None,
            encoder_only: bool = False, checkpoint_name: str = "checkpoint_final.pth", device: str = "cpu",
            num_processes_preprocessing: int = 2, num_processes_export: int = 2, use_mirroring: bool = True,
            tile_step_size: float = 0.5, save_probabilities: bool = False) -> str:
    """Predict every case of ``input_folder`` (nnU-Net raw naming, ``CASE_XXXX.<ending>``) into
    ``output_folder`` with the fine-tuned ``arm``; returns the model folder used."""
    from ssl_nnunet.utilities.cpu_inference import onednn_conv3d_inference
    if not os.path.isdir(input_folder):
        raise SSLInputError(f"-i {input_folder}: no such folder (images named CASE_0000.nii.gz etc., as imagesTr).")
    method = None
    if weights is not None:
        bundle = resolve_bundle(weights)
        source, method = source or bundle["source"], bundle["method"]
    model_folder = find_model_folder(target, arm, trainer, source, method, encoder_only, checkpoint_name)
    if folds is not None:
        missing = [f for f in folds if not os.path.isfile(os.path.join(model_folder, f"fold_{f}", checkpoint_name))]
        if missing:
            raise SSLInputError(f"fold(s) {missing} of {model_folder} have no {checkpoint_name}; trained folds: "
                                f"{sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(model_folder, 'fold_*', checkpoint_name)))}")
    print(f"Predicting {input_folder} -> {output_folder} with {arm} ({model_folder}, folds "
          f"{list(folds) if folds is not None else 'all trained'}, {checkpoint_name}, device {device})")
    predictor = make_predictor(model_folder, folds, checkpoint_name, device, use_mirroring, tile_step_size)
    with onednn_conv3d_inference(predictor.network, enabled=torch.device(device).type == "cpu"):
        predictor.predict_from_files(input_folder, output_folder, save_probabilities=save_probabilities,
                                     overwrite=True, num_processes_preprocessing=num_processes_preprocessing,
                                     num_processes_segmentation_export=num_processes_export)
    print(f"Predictions written to {output_folder}")
    return model_folder


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Predict with a fine-tuned arm of ssl_nnunet_finetune (nnU-Net's "
                                            "nnUNetPredictor; oneDNN convolutions on CPU).")
    p.add_argument("-i", required=True, help="input folder, nnU-Net raw naming (CASE_0000.nii.gz, ...)")
    p.add_argument("-o", required=True, help="output folder for the segmentations")
    p.add_argument("-d", required=True, help="target dataset id or name the arm was fine-tuned on")
    p.add_argument("-arm", required=True, choices=ARMS, help="which fine-tuned arm predicts")
    p.add_argument("-f", nargs="+", default=None, help="folds to ensemble (default: every trained fold)")
    p.add_argument("-tr", default=None, help="trainer of the arm, when the target was fine-tuned with several")
    p.add_argument("-w", default=None, help="bundle the pretrained arm came from (selects source and method)")
    p.add_argument("-src", default=None, help="pretraining source dataset name (folder under ssl_nnunet_finetune)")
    p.add_argument("--encoder-only", action="store_true", help="the pretrained arm fine-tuned with --encoder-only")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-npp", type=int, default=2, help="processes for preprocessing")
    p.add_argument("-nps", type=int, default=2, help="processes for exporting the segmentations")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    p.add_argument("--save_probabilities", action="store_true", help="also write the softmax (.npz + .pkl)")
    a = p.parse_args(argv)
    folds = None if a.f is None else [f if f == "all" else int(f) for f in a.f]
    run_cli(lambda: predict(a.i, a.o, a.d, a.arm, folds, a.tr, a.w, a.src, a.encoder_only, a.chk, a.device,
                            a.npp, a.nps, not a.disable_tta, a.step_size, a.save_probabilities))
