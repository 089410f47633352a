"""Import an nnssl / OpenMind checkpoint as an ssl_nnunet bundle (``ssl_nnunet_import``).

Input (``-i``): an nnssl ``checkpoint_final.pth``, a folder holding one (and optionally nnssl's
``adaptation_plan.json``), or a Hugging Face model id (``owner/name`` or ``https://huggingface.co/owner/name``),
downloaded with ``huggingface_hub`` when it is installed and the hub is reachable.

The checkpoint is read with ``torch.load(weights_only=True)`` (``--trust-checkpoint`` allows a full unpickle for
a file you trust). Its ``nnssl_adaptation_plan`` (schema: :mod:`ssl_nnunet.export.adaptation_schema`) gives

* the architecture: ``architecture_plans.arch_class_name`` as a preset (``ResEncL``) or a dynamic class
  (``ResidualEncoderUNet``/``PlainConvUNet``) with ``arch_kwargs``; ``-a``/``--arch-kwargs`` override it;
* spacing, normalisation, resampling and transposes: the first configuration of ``pretrain_plan``;
* input channels, the recommended fine-tuning patch size and the encoder/stem keys.

Output (``-o``): a bundle like :func:`ssl_nnunet.export.exporter.export_bundle` writes, so that
``ssl_nnunet_finetune -w BUNDLE`` and ``nnUNetv2_train -pretrained_weights`` take it: an nnU-Net ``plans.json``
(``sslFinetunePlans``, ``3d_fullres``) that makes nnU-Net build the pretraining network, the complete
``network_weights`` of that network (loaded with ``strict=True``; checkpoints that hold only the encoder -- nnssl's
VoCo, SimCLR -- get the decoder from a fresh, seeded initialisation and are marked encoder-only), a stub
``dataset.json`` and fingerprint, the adaptation plan, ``config.json``, citations and a model card.

Primus presets are refused: nnU-Net 2.8.1 builds networks from plans with ``num_classes``-style U-Net kwargs, which
Primus does not take; use nnU-Net master's ``nnUNetv2_train_pretrained`` for those checkpoints.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
from typing import Dict, List, Optional, Tuple

from ssl_nnunet.constants import CONFIGURATION, FINETUNE_PLANS
from ssl_nnunet.export.adaptation_schema import DYNAMIC_ARCHITECTURES, require_valid_adaptation_plan
from ssl_nnunet.export.exporter import (bundle_config, check_output_folder, load_weights_strict,
                                        _strip_wrapper_prefixes, write_bundle)
from ssl_nnunet.export.model_card import citations_markdown
from ssl_nnunet.utilities.errors import SSLInputError, run_cli
from ssl_nnunet.utilities.file_io import load_json
from ssl_nnunet.utilities.network import build_network_from_plans

_CONV3D = "torch.nn.modules.conv.Conv3d"
_INSTANCENORM3D = "torch.nn.modules.instancenorm.InstanceNorm3d"
_LEAKYRELU = "torch.nn.modules.activation.LeakyReLU"
_ARCH_MODULE = "dynamic_network_architectures.architectures.unet"
_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]

# nnssl's ResEnc-L ("Revisiting MAE pre-training ..."): nnssl architecture_registry.get_res_enc_l
PRESETS: Dict[str, Tuple[str, dict]] = {
    "ResEncL": ("ResidualEncoderUNet", {
        "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": _CONV3D,
        "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
        "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
        "norm_op": _INSTANCENORM3D, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
        "dropout_op_kwargs": None, "nonlin": _LEAKYRELU, "nonlin_kwargs": {"inplace": True}}),
}
UNSUPPORTED_PRESETS = ("NoSkipResEncL", "PrimusS", "PrimusB", "PrimusM", "PrimusL")
HF_PREFIX = "https://huggingface.co/"


# ------------------------------------------------------------------------------------------------ input

def download_from_hub(model_id: str, cache_dir: Optional[str] = None) -> str:
    """Folder with ``checkpoint_final.pth`` (and ``adaptation_plan.json`` when the repository has one) of a
    Hugging Face model repository. Needs ``huggingface_hub`` and network access."""
    repo_id = model_id[len(HF_PREFIX):].strip("/") if model_id.startswith(HF_PREFIX) else model_id
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise SSLInputError(f"'{model_id}' is no local file or folder, and huggingface_hub is not installed to "
                            f"download it (pip install huggingface_hub), or download the repository by hand and "
                            f"pass its folder with -i.") from e
    try:
        ckpt = hf_hub_download(repo_id=repo_id, filename="checkpoint_final.pth", cache_dir=cache_dir)
    except Exception as e:
        raise SSLInputError(f"Could not download checkpoint_final.pth of the Hugging Face model '{repo_id}' "
                            f"({type(e).__name__}: {e}). Check the id and the network, or pass a local "
                            f"checkpoint with -i.") from e
    try:
        hf_hub_download(repo_id=repo_id, filename="adaptation_plan.json", cache_dir=cache_dir)
    except Exception:
        pass  # the plan inside the checkpoint is the one that counts
    return os.path.dirname(ckpt)


def resolve_input(source: str) -> Tuple[str, Optional[str]]:
    """``(checkpoint file, adaptation_plan.json or None)`` for a file, a folder or a Hugging Face id."""
    if not os.path.exists(source):
        if source.startswith(HF_PREFIX) or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            source = download_from_hub(source)
        else:
            raise SSLInputError(f"Input {source} does not exist. Pass an nnssl checkpoint (.pth), a folder with "
                                f"checkpoint_final.pth, or a Hugging Face model id (owner/name).")
    if os.path.isdir(source):
        candidates = [os.path.join(source, n) for n in ("checkpoint_final.pth", "checkpoint_latest.pth")]
        checkpoint = next((c for c in candidates if os.path.isfile(c)), None)
        if checkpoint is None:
            raise SSLInputError(f"Folder {source} has no checkpoint_final.pth (nor checkpoint_latest.pth).")
    else:
        checkpoint = source
    plan_json = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "adaptation_plan.json")
    return os.path.abspath(checkpoint), plan_json if os.path.isfile(plan_json) else None


def load_nnssl_checkpoint(path: str, trust: bool = False) -> dict:
    """The checkpoint dict, read weights-only unless ``trust``."""
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:
        hint = ("" if trust else " If it holds other Python objects and you trust its source, rerun with "
                "--trust-checkpoint.")
        raise SSLInputError(f"Cannot read checkpoint {path} with torch.load(weights_only={not trust}) "
                            f"({type(e).__name__}: {e}).{hint}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise SSLInputError(f"{path} is not an nnssl/nnU-Net checkpoint (no 'network_weights' dict).")
    return ckpt


def adaptation_plan_of(ckpt: dict, path: str, plan_json: Optional[str]) -> dict:
    """The checkpoint's ``nnssl_adaptation_plan``, else the ``adaptation_plan.json`` next to it."""
    if isinstance(ckpt.get("nnssl_adaptation_plan"), dict):
        return copy.deepcopy(ckpt["nnssl_adaptation_plan"])
    if plan_json is not None:
        return load_json(plan_json, "adaptation plan")
    raise SSLInputError(f"{path} has no 'nnssl_adaptation_plan' and there is no adaptation_plan.json next to it; "
                        f"it was not written by nnssl (or its adaptation plan was removed).")


# ------------------------------------------------------------------------------------------------ plans

def resolve_architecture(adaptation: dict, arch: Optional[str], arch_kwargs: Optional[dict],
                         source: str) -> Tuple[str, dict]:
    """``(dynamic class name, nnU-Net arch_kwargs)``: the override (``arch``/``arch_kwargs``), else the plan's
    ``architecture_plans`` (a preset name or a dynamic class with kwargs)."""
    plan_arch = adaptation["architecture_plans"]
    name = arch or plan_arch["arch_class_name"]
    kwargs = arch_kwargs if arch_kwargs is not None else (plan_arch.get("arch_kwargs") if arch is None else None)
    if name in PRESETS:
        cls, preset = PRESETS[name]
        return cls, copy.deepcopy(preset)
    if name in UNSUPPORTED_PRESETS:
        raise SSLInputError(f"{source}: architecture '{name}' cannot be built by nnU-Net 2.8.1 from a plans file "
                            f"(supported: {', '.join(PRESETS)} and {', '.join(DYNAMIC_ARCHITECTURES)} with kwargs). "
                            f"Fine-tune it with nnU-Net master's nnUNetv2_preprocess_like_nnssl + "
                            f"nnUNetv2_train_pretrained (documentation/finetuning.md).")
    if name not in DYNAMIC_ARCHITECTURES:
        raise SSLInputError(f"{source}: unknown architecture '{name}'; pass -a with one of "
                            f"{', '.join(list(PRESETS) + list(DYNAMIC_ARCHITECTURES))}.")
    if not isinstance(kwargs, dict):
        raise SSLInputError(f"{source}: architecture '{name}' needs its kwargs (architecture_plans.arch_kwargs is "
                            f"empty); pass them with --arch-kwargs JSON or use a preset with -a.")
    return name, copy.deepcopy(kwargs)


def _resampling_kwargs(kwargs: dict, is_seg: bool, order: int) -> dict:
    out = dict(kwargs or {})
    out.update({"is_seg": is_seg, "order": order})
    out.setdefault("order_z", 0)
    out.setdefault("force_separate_z", None)
    return out


def build_plans(adaptation: dict, arch_class: str, arch_kwargs: dict, dataset_name: str,
                spacing_override: Optional[List[float]] = None) -> dict:
    """nnU-Net plans (``sslFinetunePlans``/``3d_fullres``) that reproduce the pretraining network, spacing and
    normalisation of ``adaptation``."""
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import channel_name_to_normalization_mapping
    pretrain = adaptation["pretrain_plan"]
    cname, cfg = next(iter(pretrain["configurations"].items()))
    spacing = spacing_override or cfg.get("spacing")
    if spacing is None or any(s is None for s in spacing):
        raise SSLInputError(f"The adaptation plan's configuration '{cname}' has no spacing (spacing_style "
                            f"'{cfg.get('spacing_style')}'); nnU-Net needs one: pass --spacing Z Y X (the spacing "
                            f"the network was pretrained at).")
    known = {c.__name__ for c in channel_name_to_normalization_mapping.values()} | {"ZScoreNormalization"}
    for scheme in cfg["normalization_schemes"]:
        if scheme not in known:
            raise SSLInputError(f"Normalisation '{scheme}' of the adaptation plan is not one of nnU-Net's "
                                f"({', '.join(sorted(known))}).")
        if scheme == "CTNormalization":
            raise SSLInputError("The adaptation plan uses CTNormalization, but nnssl plans carry no intensity "
                                "statistics to reproduce it; fine-tune with nnU-Net master's route or re-plan.")
    n_channels = int(adaptation["pretrain_num_input_channels"])
    if len(cfg["normalization_schemes"]) != n_channels:
        raise SSLInputError(f"The adaptation plan has {len(cfg['normalization_schemes'])} normalisation scheme(s) "
                            f"but pretrain_num_input_channels = {n_channels}.")
    patch = [int(p) for p in adaptation["recommended_downstream_patchsize"]]
    data_kwargs = cfg.get("resampling_fn_data_kwargs") or {}
    return {
        "dataset_name": dataset_name,
        "plans_name": FINETUNE_PLANS,
        "original_median_spacing_after_transp": [float(s) for s in pretrain.get(
            "original_median_spacing_after_transp") or spacing],
        "original_median_shape_after_transp": patch,
        "image_reader_writer": "SimpleITKIO",  # the transfer to a target sets the target's reader
        "transpose_forward": list(pretrain.get("transpose_forward") or [0, 1, 2]),
        "transpose_backward": list(pretrain.get("transpose_backward") or [0, 1, 2]),
        "configurations": {CONFIGURATION: {
            "data_identifier": f"{FINETUNE_PLANS}_{CONFIGURATION}",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": patch,
            "median_image_size_in_voxels": patch,
            "spacing": [float(s) for s in spacing],
            "normalization_schemes": list(cfg["normalization_schemes"]),
            "use_mask_for_norm": [bool(m) for m in cfg["use_mask_for_norm"]],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": _resampling_kwargs(data_kwargs, False, int(data_kwargs.get("order", 3))),
            "resampling_fn_seg_kwargs": _resampling_kwargs(data_kwargs, True, 1),
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": _resampling_kwargs(data_kwargs, False, 1),
            "architecture": {"network_class_name": f"{_ARCH_MODULE}.{arch_class}", "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": [k for k in _REQUIRES_IMPORT if k in arch_kwargs]},
            "batch_dice": False,
        }},
        "experiment_planner_used": "ssl_nnunet_import",
        "label_manager": "LabelManager",
        # nnU-Net's preprocessor looks up one entry per channel; z-score normalisation reads none of it
        "foreground_intensity_properties_per_channel": {str(c): {} for c in range(n_channels)},
        "ssl_pretraining_source": {"imported_from": "nnssl", "pretrain_dataset": pretrain.get("dataset_name"),
                                   "pretrain_plans": pretrain.get("plans_name"), "pretrain_configuration": cname,
                                   "spacing_style": cfg.get("spacing_style")},
    }


def stub_dataset_json(n_channels: int, dataset_name: str, pretrain_dataset: str) -> dict:
    return {"channel_names": {str(i): f"channel_{i}" for i in range(n_channels)}, "labels": {"background": 0},
            "numTraining": 0, "file_ending": ".nii.gz", "name": dataset_name,
            "description": f"stub written by ssl_nnunet_import; the weights were pretrained with nnssl on "
                           f"{pretrain_dataset}, whose dataset.json is not part of the checkpoint"}


def stub_fingerprint(plans: dict) -> dict:
    cfg = plans["configurations"][CONFIGURATION]
    return {"spacings": [cfg["spacing"]], "shapes_after_crop": [cfg["patch_size"]],
            "foreground_intensity_properties_per_channel": {}, "median_relative_size_after_cropping": 1.0,
            "_stub": "written by ssl_nnunet_import; nnssl checkpoints carry no dataset fingerprint"}


# ------------------------------------------------------------------------------------------------ weights

def complete_weights(network, weights: dict, source: str) -> Tuple[dict, bool, List[str]]:
    """The full state dict of ``network`` from nnssl ``weights``: ``(state, encoder_only, dropped keys)``.

    Every encoder key must be in ``weights``. Decoder keys (``decoder.*`` except the ``decoder.encoder.*``
    aliases) are either all present (a full U-Net; a missing segmentation head is taken from the initialisation)
    or all absent (an encoder-only checkpoint: the decoder keeps ``network``'s initialisation). Keys the network does not have (projection heads of contrastive methods) are dropped and
    returned. The result is loaded into ``network`` with ``strict=True``.
    """
    fresh = {k: v.detach().clone() for k, v in network.state_dict().items()}
    weights = _strip_wrapper_prefixes(weights)
    dropped = sorted(k for k in weights if k not in fresh and not k.startswith(("encoder.", "decoder.")))
    unknown = sorted(k for k in weights if k not in fresh and k.startswith(("encoder.", "decoder.")))
    if unknown:
        raise SSLInputError(f"The weights in {source} do not fit the architecture of the adaptation plan "
                            f"(unexpected keys: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}); "
                            f"pass the right architecture with -a / --arch-kwargs.")
    missing_encoder = [k for k in fresh if k.startswith("encoder.") and k not in weights]
    if missing_encoder:
        raise SSLInputError(f"The weights in {source} lack encoder keys of the architecture "
                            f"({', '.join(missing_encoder[:8])}{' ...' if len(missing_encoder) > 8 else ''}); "
                            f"pass the right architecture with -a / --arch-kwargs.")
    decoder = [k for k in fresh if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    body = [k for k in decoder if ".seg_layers." not in k]
    present = [k for k in body if k in weights]
    encoder_only = not present
    if present and len(present) != len(body):
        missing = [k for k in body if k not in weights]
        raise SSLInputError(f"{source} holds only part of the decoder (missing {', '.join(missing[:8])}); "
                            f"neither a full U-Net nor an encoder-only checkpoint.")
    state = dict(fresh)
    for k in fresh:
        alias = k[len("decoder."):] if k.startswith("decoder.encoder.") else None
        if k in weights:
            state[k] = weights[k]
        elif alias is not None and alias in weights:
            state[k] = weights[alias]
    load_weights_strict(network, state, source)
    return {k: v.detach().to("cpu") for k, v in network.state_dict().items()}, encoder_only, dropped


def _seg_outputs(weights: dict, n_in: int) -> int:
    heads = sorted(k for k in weights if ".seg_layers." in k and k.endswith(".weight"))
    return int(weights[heads[-1]].shape[0]) if heads else n_in


# ------------------------------------------------------------------------------------------------ card

def render_import_card(name: str, source: str, adaptation: dict, plans: dict, encoder_only: bool,
                       dropped: List[str], output_dir: str, citations: List[dict]) -> str:
    cfg = plans["configurations"][CONFIGURATION]
    arch = cfg["architecture"]
    pre = adaptation["pretrain_plan"]
    pre_cfg_name, pre_cfg = next(iter(pre["configurations"].items()))
    transfer = ("**encoder only** – the checkpoint holds no decoder; the decoder in `checkpoint_final.pth` is a "
                "fresh (seeded) initialisation, so fine-tune with `ssl_nnunet_finetune --encoder-only` or treat "
                "the decoder as untrained" if encoder_only else "encoder and decoder (full U-Net)")
    dropped_text = ", ".join(f"`{k}`" for k in dropped[:6]) + (" ..." if len(dropped) > 6 else "") or "none"
    return f"""# Imported nnssl checkpoint: `{name}`

| | |
| --- | --- |
| source | `{source}` |
| pretrained parts | {transfer} |
| pretraining data | {pre.get('dataset_name')} (plans `{pre.get('plans_name')}`, configuration `{pre_cfg_name}`, spacing style `{pre_cfg.get('spacing_style')}`) |
| network | `{arch['network_class_name']}` (adaptation plan: `{adaptation['architecture_plans']['arch_class_name']}`) |
| input channels | {adaptation['pretrain_num_input_channels']} |
| spacing | {cfg['spacing']} (nnU-Net axis order) |
| normalisation | {cfg['normalization_schemes']} |
| pretraining patch | {pre_cfg.get('patch_size')} |
| fine-tuning patch | {cfg['patch_size']} |
| keys not part of the U-Net (dropped) | {dropped_text} |

`plans.json` is an nnU-Net plan (`{FINETUNE_PLANS}`) that builds exactly this network; `dataset.json` and
`dataset_fingerprint.json` are stubs (nnssl checkpoints carry neither).

## Fine-tuning

```bash
ssl_nnunet_finetune -d TGT -w {output_dir} --scratch{' --encoder-only' if encoder_only else ''}
```

or by hand with `nnUNetv2_train TGT {CONFIGURATION} 0 -p {FINETUNE_PLANS} -pretrained_weights
{output_dir}/checkpoint_final.pth` after transferring `plans.json` to the target (documentation/export.md).
""" + citations_markdown(citations)


# ------------------------------------------------------------------------------------------------ import

def import_nnssl_checkpoint(source: str, output_dir: str, arch: Optional[str] = None,
                            arch_kwargs: Optional[dict] = None, name: Optional[str] = None,
                            dataset_name: Optional[str] = None, spacing: Optional[List[float]] = None,
                            trust_checkpoint: bool = False, seed: int = 0) -> str:
    """Write the ssl_nnunet bundle of an nnssl checkpoint to ``output_dir``; returns its absolute path."""
    import torch
    output_dir = check_output_folder(output_dir)
    ckpt_path, plan_json = resolve_input(source)
    ckpt = load_nnssl_checkpoint(ckpt_path, trust_checkpoint)
    adaptation = adaptation_plan_of(ckpt, ckpt_path, plan_json)
    require_valid_adaptation_plan(adaptation, ckpt_path, exact=False)
    adaptation.setdefault("key_to_lpe", None)
    arch_class, kwargs = resolve_architecture(adaptation, arch, arch_kwargs, ckpt_path)
    pretrain_name = adaptation["pretrain_plan"]["dataset_name"]
    if dataset_name is None:
        dataset_name = pretrain_name if re.fullmatch(r"Dataset\d{3}_.+", pretrain_name) else \
            "Dataset000_" + re.sub(r"[^\w-]", "_", pretrain_name)
    elif not re.fullmatch(r"Dataset\d{3}_.+", dataset_name):
        raise SSLInputError(f"--source-name '{dataset_name}' is not an nnU-Net dataset name (DatasetNNN_Name).")
    plans = build_plans(adaptation, arch_class, kwargs, dataset_name, spacing)
    n_in = int(adaptation["pretrain_num_input_channels"])
    weights = ckpt["network_weights"]
    with torch.random.fork_rng():  # the decoder of an encoder-only checkpoint: a reproducible initialisation
        torch.manual_seed(seed)
        network = build_network_from_plans(plans, n_in, _seg_outputs(_strip_wrapper_prefixes(weights), n_in),
                                           deep_supervision=False)
    state, encoder_only, dropped = complete_weights(network, weights, ckpt_path)
    require_valid_adaptation_plan(adaptation, ckpt_path, state, exact=False)
    name = name or str(ckpt.get("trainer_name") or "nnssl")
    dataset_json = stub_dataset_json(n_in, dataset_name, pretrain_name)
    citations = list(ckpt.get("citations") or [])
    bundle = {
        "network_weights": state,
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": int(ckpt.get("current_epoch") or 0),
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": None,
        "nnssl_adaptation_plan": adaptation,
        "citations": citations,
        "ssl_method": re.sub(r"[^\w.-]", "_", name),
        "encoder_only": encoder_only,
        "imported_from": source,
        "nnssl_trainer_name": ckpt.get("trainer_name"),
    }
    card = render_import_card(name, source, adaptation, plans, encoder_only, dropped, output_dir, citations)
    config = bundle_config(bundle, bundle["ssl_method"], encoder_only, source)
    return write_bundle(output_dir, bundle, dataset_json, stub_fingerprint(plans), card, config)


def main(argv: Optional[List[str]] = None) -> None:
    def _run():
        p = argparse.ArgumentParser(
            prog="ssl_nnunet_import",
            description="Turn an nnssl / OpenMind checkpoint (with its nnssl_adaptation_plan) into an ssl_nnunet "
                        "bundle for ssl_nnunet_finetune -w and nnUNetv2_train -pretrained_weights.")
        p.add_argument("-i", required=True, help="nnssl checkpoint (.pth), a folder with checkpoint_final.pth, or a "
                                                 "Hugging Face model id (owner/name; needs huggingface_hub, online)")
        p.add_argument("-o", required=True, help="output bundle folder (an earlier bundle there is replaced)")
        p.add_argument("-a", default=None, help=f"architecture override: preset ({', '.join(PRESETS)}) or class "
                                                f"({', '.join(DYNAMIC_ARCHITECTURES)}, with --arch-kwargs)")
        p.add_argument("--arch-kwargs", default=None, help="JSON object of the class's kwargs (ops as import strings)")
        p.add_argument("-n", default=None, help="name of the pretraining (default: the checkpoint's trainer name); "
                                                "used as the method name by ssl_nnunet_finetune")
        p.add_argument("--source-name", default=None, help="nnU-Net dataset name for the bundle's plans "
                                                           "(default: the pretraining dataset's name)")
        p.add_argument("--spacing", type=float, nargs=3, default=None,
                       help="target spacing (z y x) when the adaptation plan has none")
        p.add_argument("--trust-checkpoint", action="store_true",
                       help="read the checkpoint with weights_only=False (only for files you trust)")
        args = p.parse_args(argv)
        kwargs = None
        if args.arch_kwargs is not None:
            try:
                kwargs = json.loads(args.arch_kwargs)
            except json.JSONDecodeError as e:
                raise SSLInputError(f"--arch-kwargs is not valid JSON ({e}).") from e
        out = import_nnssl_checkpoint(args.i, args.o, args.a, kwargs, args.n, args.source_name, args.spacing,
                                      args.trust_checkpoint)
        print(f"Bundle written to {out}. Fine-tune with: ssl_nnunet_finetune -d TGT -w {out} --scratch "
              f"(see {out}/README.md).")
    run_cli(_run)


if __name__ == "__main__":
    main()
