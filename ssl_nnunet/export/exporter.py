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
* ``config.json`` – a short description of the weights (nnU-Net master downloads it with the checkpoint and
  the adaptation plan from a Hugging Face model repository) including the ``citations``;
* ``README.md`` – a model card with the fine-tuning commands (:mod:`ssl_nnunet.export.model_card`).

The checkpoint holds only tensors and plain Python values, so ``torch.load(..., weights_only=True)`` (nnU-Net
master, torch's default) reads it; :func:`write_bundle` checks that before the bundle is renamed into place.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import Dict, List, Optional, Sequence, Union

from ssl_nnunet.constants import CONFIGURATION, FINETUNE_PLANS, SSL_PLANS, finetune_plans_for
from ssl_nnunet.export.adaptation_schema import require_valid_adaptation_plan, to_weights_only_safe
from ssl_nnunet.export.citations import bundle_citations
from ssl_nnunet.export.model_card import citations_markdown, render_model_card
from ssl_nnunet.methods import method_names
from ssl_nnunet.paths import nnunet_preprocessed, nnunet_raw
from ssl_nnunet.utilities.errors import SSLInputError, run_cli
from ssl_nnunet.utilities.file_io import (atomic_directory, atomic_save_json, dataset_name_from_id, load_json,
                                          load_plans, ssl_output_folder)
from ssl_nnunet.utilities.network import build_network_from_plans

BUNDLE_FILES = ("checkpoint_final.pth", "plans.json", "dataset.json", "dataset_fingerprint.json",
                "adaptation_plan.json", "config.json", "README.md")


# ------------------------------------------------------------------------------------------------ inputs

def find_ssl_checkpoint(dataset_name: str, method: str, plans_identifier: str = SSL_PLANS,
                        checkpoint: Optional[str] = None, dataset_arg: Union[int, str, None] = None,
                        datasets: Sequence[str] = ()) -> str:
    """Path of the SSL checkpoint to export.

    ``checkpoint``: ``None`` (``checkpoint_final.pth``, else ``checkpoint_latest.pth``), a file name inside the
    training folder, or a path to a file. ``datasets``: all dataset names of a multi-dataset run.
    """
    folder = ssl_output_folder(dataset_name, method, plans_identifier, CONFIGURATION, datasets)
    hint = (f"Run ssl_nnunet_pretrain -d {dataset_arg if dataset_arg is not None else dataset_name} -m {method}"
            + ("" if plans_identifier == SSL_PLANS else f" -p {plans_identifier}") + " first")
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

def _spacing_style(spacing) -> str:
    """nnssl's ``spacing_style`` for a spacing chosen by nnU-Net's planner (median-based, anisotropy rule):
    ``onemmiso`` when it is 1 mm isotropic, else ``median``."""
    if spacing is not None and all(abs(float(s) - 1.0) < 1e-6 for s in spacing):
        return "onemmiso"
    return "median"


def build_adaptation_plan(pretrain_plans: dict, finetune_plans: dict, method: str, n_channels: int,
                          network) -> dict:
    """The nnssl ``adaptation_plan`` of the exported ``network`` (the fields of
    :mod:`ssl_nnunet.export.adaptation_schema`, no others). Encoder, stem and input-projection keys are the
    architecture's own (``key_to_encoder``, ``key_to_stem``, ``keys_to_in_proj`` of dynamic-network-architectures:
    ``encoder.stem`` for ``ResidualEncoderUNet``, ``encoder.stages.0`` for ``PlainConvUNet``)."""
    arch = finetune_plans["configurations"][CONFIGURATION]["architecture"]
    pre_cfg = pretrain_plans["configurations"][CONFIGURATION]
    ft_cfg = finetune_plans["configurations"][CONFIGURATION]
    method_plan = pretrain_plans.get("ssl", {}).get("methods", {}).get(method, {})
    pretrain_patch = [int(p) for p in method_plan.get("pretrain_patch_size", pre_cfg["patch_size"])]
    arch_class_name, arch_kwargs = _adaptation_architecture(pretrain_plans, arch)
    for k in arch.get("_kw_requires_import", []):  # plans already hold dotted strings; keep them strings
        if arch_kwargs.get(k) is not None and not isinstance(arch_kwargs[k], str):
            obj = arch_kwargs[k]
            arch_kwargs[k] = f"{obj.__module__}.{obj.__qualname__}"
    # nnssl lists the kwargs that hold an import string (an op that is None needs no import)
    requiring_import = [k for k in arch.get("_kw_requires_import", []) if isinstance(arch_kwargs.get(k), str)]
    spacing = [float(s) for s in pre_cfg["spacing"]] if pre_cfg.get("spacing") is not None else None
    return {
        "architecture_plans": {
            "arch_class_name": arch_class_name,
            "arch_kwargs": arch_kwargs,
            "arch_kwargs_requiring_import": requiring_import,
        },
        "pretrain_plan": {
            "dataset_name": pretrain_plans["dataset_name"],
            "plans_name": pretrain_plans["plans_name"],
            "original_median_spacing_after_transp": pretrain_plans.get("original_median_spacing_after_transp"),
            "image_reader_writer": pretrain_plans.get("image_reader_writer"),
            "transpose_forward": pretrain_plans.get("transpose_forward"),
            "transpose_backward": pretrain_plans.get("transpose_backward"),
            "configurations": {
                CONFIGURATION: {
                    "data_identifier": pre_cfg.get("data_identifier"),
                    "preprocessor_name": pre_cfg.get("preprocessor_name"),
                    "spacing_style": _spacing_style(spacing),
                    "normalization_schemes": pre_cfg.get("normalization_schemes"),
                    "use_mask_for_norm": pre_cfg.get("use_mask_for_norm"),
                    "resampling_fn_data": pre_cfg.get("resampling_fn_data"),
                    "resampling_fn_data_kwargs": pre_cfg.get("resampling_fn_data_kwargs"),
                    "resampling_fn_mask": pre_cfg.get("resampling_fn_seg"),
                    "resampling_fn_mask_kwargs": pre_cfg.get("resampling_fn_seg_kwargs"),
                    "spacing": spacing,
                    "patch_size": pretrain_patch,
                }
            },
            "experiment_planner_used": pretrain_plans.get("experiment_planner_used"),
        },
        "pretrain_num_input_channels": int(n_channels),
        "recommended_downstream_patchsize": [int(p) for p in ft_cfg["patch_size"]],
        "key_to_encoder": network.key_to_encoder,
        "key_to_stem": network.key_to_stem,
        "keys_to_in_proj": list(network.keys_to_in_proj),
        "key_to_lpe": getattr(network, "key_to_lpe", None),
    }


def _adaptation_architecture(pretrain_plans: dict, arch: dict):
    """``(arch_class_name, arch_kwargs)`` of the adaptation plan. CNN: the class and the plan's kwargs. Primus:
    nnssl's preset name of the planned size (``PrimusM`` for ``-arch primus_m``) with ``arch_kwargs`` None when
    the plan has the preset's sizes (GPU profile), else the plan's own Primus kwargs (CPU profiles' tiny Primus)."""
    name = arch["network_class_name"].split(".")[-1]
    kwargs = copy.deepcopy(arch["arch_kwargs"])
    size = str(pretrain_plans.get("ssl", {}).get("arch", ""))
    if name != "Primus" or not size.startswith("primus_"):
        return name, kwargs
    from ssl_nnunet.backbones.primus import primus_hyperparameters
    preset = primus_hyperparameters(size)
    same = all(kwargs.get(k) == preset[k] for k in ("embed_dim", "eva_depth", "eva_numheads", "patch_embed_size"))
    return "Primus" + size[len("primus_"):].upper(), (None if same else kwargs)


def primus_target_weights(state: Dict[str, "torch.Tensor"], finetune_plans: dict, n_channels: int,
                          num_classes: int, patch_size: Optional[List[int]] = None, seed: int = 0):
    """A Primus ``network_weights`` for a target with ``num_classes`` outputs (and fine-tuning ``patch_size``,
    default the plan's): ``down_projection`` + ``eva`` from ``state``, a freshly initialised ``up_projection``
    (seeded), ``eva.pos_embed`` interpolated when the patch differs. Returns ``(weights, notes)``."""
    import torch
    from ssl_nnunet.backbones.primus import adapt_primus_weights, build_primus
    kw = copy.deepcopy(finetune_plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"])
    pretrain_patch = list(kw["input_shape"])
    if patch_size is not None:
        kw["input_shape"] = [int(p) for p in patch_size]
    torch.manual_seed(seed)
    fresh = build_primus(kw, n_channels, num_classes).state_dict()
    return adapt_primus_weights(state, fresh, pretrain_patch, kw["input_shape"], kw["patch_embed_size"])


# ------------------------------------------------------------------------------------------------ export

def _is_replaceable_bundle(folder: str) -> bool:
    """Only an empty folder or an earlier bundle may be replaced (never an arbitrary directory)."""
    entries = set(os.listdir(folder))
    return not entries or ("adaptation_plan.json" in entries and entries <= set(BUNDLE_FILES))


def check_output_folder(output_dir: str) -> str:
    """Absolute ``output_dir``; refuses an existing folder that is neither empty nor an earlier bundle."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or not _is_replaceable_bundle(output_dir)):
        raise SSLInputError(f"Output folder {output_dir} exists and is not an ssl_nnunet bundle; choose a new or "
                            f"empty folder (an earlier bundle there would be replaced).")
    return output_dir


def bundle_config(checkpoint: dict, method: str, encoder_only: bool, source: str) -> dict:
    """``config.json``: what the weights are, in a few keys (the details are in plans.json and README.md)."""
    plans = checkpoint["init_args"]["plans"]
    adaptation = checkpoint["nnssl_adaptation_plan"]
    cfg = plans["configurations"][CONFIGURATION]
    return {
        "library_name": "ssl_nnunet",
        "format": "nnU-Net v2 checkpoint (network_weights) with nnssl_adaptation_plan",
        "architecture": cfg["architecture"]["network_class_name"],
        "arch_class_name": adaptation["architecture_plans"]["arch_class_name"],
        "pretraining_method": method,
        "pretraining_dataset": plans["dataset_name"],
        "pretraining_datasets": [e["name"] for e in checkpoint.get("source_datasets") or []]
        or [plans["dataset_name"]],
        "source": source,
        "num_input_channels": adaptation["pretrain_num_input_channels"],
        "spacing": cfg["spacing"],
        "normalization_schemes": cfg["normalization_schemes"],
        "recommended_downstream_patchsize": adaptation["recommended_downstream_patchsize"],
        "encoder_only": bool(encoder_only),
        "files": {"checkpoint": "checkpoint_final.pth", "plans": "plans.json",
                  "adaptation_plan": "adaptation_plan.json", "model_card": "README.md"},
        "citations": checkpoint.get("citations", []),
    }


def write_bundle(output_dir: str, checkpoint: dict, dataset_json: dict, fingerprint: dict, card: str,
                 config: dict) -> str:
    """Write a bundle folder atomically (temporary sibling, renamed when complete). ``checkpoint`` is nnU-Net's
    dict with ``init_args.plans`` and ``nnssl_adaptation_plan``; it is made weights-only safe and re-read with
    ``torch.load(weights_only=True)`` before the folder is renamed into place."""
    import torch
    checkpoint = to_weights_only_safe(checkpoint)
    adaptation = checkpoint["nnssl_adaptation_plan"]
    with atomic_directory(output_dir) as tmp:
        ckpt_file = os.path.join(tmp, "checkpoint_final.pth")
        torch.save(checkpoint, ckpt_file)
        try:
            torch.load(ckpt_file, map_location="cpu", weights_only=True)
        except Exception as e:  # a non-tensor object slipped in: fail before the bundle exists
            raise RuntimeError(f"Bundle checkpoint is not loadable with weights_only=True: {e}") from e
        atomic_save_json(checkpoint["init_args"]["plans"], os.path.join(tmp, "plans.json"))
        atomic_save_json(dataset_json, os.path.join(tmp, "dataset.json"))
        atomic_save_json(fingerprint, os.path.join(tmp, "dataset_fingerprint.json"))
        atomic_save_json(adaptation, os.path.join(tmp, "adaptation_plan.json"))
        atomic_save_json(to_weights_only_safe(config), os.path.join(tmp, "config.json"))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
    return output_dir


def export_bundle(dataset: Union[int, str, Sequence[Union[int, str]]], method: str, output_dir: str, plans_identifier: str = SSL_PLANS,
                  checkpoint: Optional[str] = None, num_classes: Optional[int] = None,
                  patch_size: Optional[List[int]] = None) -> str:
    """Write the nnU-Net pretrained-weights bundle of ``method`` pretrained on ``dataset`` to ``output_dir``.

    The fine-tuning plan is the one written next to ``plans_identifier`` (``sslFinetunePlans`` /
    ``sslFinetunePlans_<arch>``). Primus plans: ``num_classes`` (segmentation heads of the target, background
    included) makes the file target-specific — ``down_projection`` + ``eva`` transferred, a fresh
    ``up_projection`` of that width (nnU-Net's shape check would refuse the pretraining one) and, with
    ``patch_size``, ``eva.pos_embed`` interpolated to that fine-tuning patch and the plan's patch set to it.

    Returns the absolute bundle folder. Raises :class:`SSLInputError` for a missing checkpoint or plans, for
    weights that do not fit the fine-tuning plan's network, and for an ``output_dir`` that exists and is
    neither empty nor an earlier bundle.
    """
    import torch
    datasets = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
    names = [dataset_name_from_id(d) for d in datasets]
    dataset, dataset_name = datasets[0], names[0]
    pp_folder = os.path.join(nnunet_preprocessed(), dataset_name)
    output_dir = check_output_folder(output_dir)
    ckpt_path = find_ssl_checkpoint(dataset_name, method, plans_identifier, checkpoint,
                                    " ".join(map(str, datasets)), names)
    pretrain_plans = load_plans(os.path.join(pp_folder, plans_identifier + ".json"), dataset)
    finetune_identifier = finetune_plans_for(plans_identifier)
    finetune_plans = load_plans(os.path.join(pp_folder, finetune_identifier + ".json"), dataset)
    if (pretrain_plans["configurations"][CONFIGURATION]["architecture"]
            != finetune_plans["configurations"][CONFIGURATION]["architecture"]):
        raise SSLInputError(f"{finetune_identifier}.json and {plans_identifier}.json in {pp_folder} describe different "
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
    adaptation = build_adaptation_plan(pretrain_plans, finetune_plans, method, n_channels, network)
    transfer_notes: List[str] = []
    from ssl_nnunet.backbones.primus import is_primus_plan
    if is_primus_plan(finetune_plans):
        if num_classes is not None or patch_size is not None:
            state, transfer_notes = primus_target_weights(state, finetune_plans, n_channels,
                                                          n_channels if num_classes is None else int(num_classes),
                                                          patch_size)
            if patch_size is not None:
                finetune_plans = copy.deepcopy(finetune_plans)
                ft_cfg = finetune_plans["configurations"][CONFIGURATION]
                ft_cfg["patch_size"] = [int(p) for p in patch_size]
                ft_cfg["architecture"]["arch_kwargs"]["input_shape"] = [int(p) for p in patch_size]
                adaptation["recommended_downstream_patchsize"] = [int(p) for p in patch_size]
        else:
            transfer_notes = [f"down_projection.* and eva.* are the pretrained encoder; up_projection.* has "
                              f"{n_channels} output channel(s) (the pretraining reconstruction head): for a target "
                              f"with other classes use ssl_nnunet_finetune, or export with -num_classes K"]
    elif num_classes is not None or patch_size is not None:
        raise SSLInputError("-num_classes / -patch apply to Primus plans only (a CNN bundle loads into any class "
                            "count: nnU-Net skips its .seg_layers.)")
    require_valid_adaptation_plan(adaptation, "the exported bundle", state, exact=True)

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
        "citations": bundle_citations(method, adaptation["architecture_plans"]["arch_class_name"]),
        "ssl_method": method,
        "iterations_done": ckpt.get("iterations_done"),
        # every pretraining dataset (name, cases, sampling weight, split); older checkpoints: the -d datasets
        "source_datasets": copy.deepcopy(ckpt.get("source_datasets")) or [{"name": n} for n in names],
    }
    card = render_model_card(dataset_name, method, plans_identifier, pretrain_plans, finetune_plans, ckpt,
                             ckpt_path, adaptation, output_dir, exported["source_datasets"])
    if transfer_notes:
        card += "\n## Primus transfer\n\n" + "".join(f"* {n}\n" for n in transfer_notes)
    card += citations_markdown(exported["citations"])
    config = bundle_config(exported, method, encoder_only=False, source=ckpt_path)
    return write_bundle(output_dir, exported, dataset_json, load_json(fingerprint_path, "fingerprint"), card, config)


def main() -> None:
    def _run():
        p = argparse.ArgumentParser(
            prog="ssl_nnunet_export",
            description="Export a pretrained network as an nnU-Net pretrained-weights bundle "
                        "(checkpoint_final.pth for nnUNetv2_train -pretrained_weights, plans, adaptation plan, "
                        "model card).")
        p.add_argument("-d", nargs="+", required=True,
                       help="pretraining dataset id or name, e.g. -d 900; a multi-dataset run: all of them, in the "
                            "order given to ssl_nnunet_pretrain")
        p.add_argument("-m", required=True, choices=method_names(), help="SSL method")
        p.add_argument("-o", required=True, help="output folder of the bundle (replaced if it is an earlier bundle)")
        p.add_argument("-p", default=SSL_PLANS, help=f"pretraining plans identifier (default {SSL_PLANS})")
        p.add_argument("-num_classes", type=int, default=None,
                       help="Primus plans: write the weights for a target with this many segmentation heads "
                            "(background included): fresh up_projection, pretrained down_projection + eva")
        p.add_argument("-patch", type=int, nargs=3, default=None,
                       help="Primus plans: fine-tuning patch; eva.pos_embed is interpolated to its token grid")
        p.add_argument("-chk", default=None,
                       help="checkpoint file name in the training folder or a path "
                            "(default: checkpoint_final.pth, else checkpoint_latest.pth)")
        args = p.parse_args()
        out = export_bundle(args.d if len(args.d) > 1 else args.d[0], args.m, args.o, args.p, args.chk,
                            args.num_classes, args.patch)
        print(f"Bundle written to {out}. Fine-tune with: nnUNetv2_train TGT {CONFIGURATION} 0 -p "
              f"{finetune_plans_for(args.p)} "
              f"-pretrained_weights {os.path.join(out, 'checkpoint_final.pth')} (see {out}/README.md).")
    run_cli(_run)


if __name__ == "__main__":
    main()
