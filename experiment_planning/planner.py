"""SSL planner (``ssl_nnunet_plan_experiment``).

Runs one of nnunetv2's experiment planners (``-pl ResEncM|ResEncL|ResEncXL|ResEnc|default``) for spacing,
normalisation, transpose, architecture and patch size, keeps its ``3d_fullres`` configuration, applies the
``-profile`` (``cpu_smoke`` / ``cpu_bench`` replace the network and patch by the small presets of
``plans/profiles.json``; ``gpu`` keeps the nnU-Net plan) and adds the ``ssl`` block
(:mod:`ssl_nnunet.experiment_planning.ssl_layout`). Writes, atomically, into ``nnUNet_preprocessed/DatasetXXX/``:

* ``sslPlans.json`` – the pretraining plan (a valid nnU-Net plans file + ``ssl``);
* ``sslFinetunePlans.json`` – the fine-tuning plan: nnU-Net plans with the same architecture, spacing and
  normalisation and the recommended downstream patch size (transfer it to the target dataset); its
  ``ssl_pretraining_source.finetune_trainer`` names the nnU-Net trainer to fine-tune with.

``-arch primus_s|primus_b|primus_m|primus_l`` replaces the CNN by nnunetv2's Primus of that size (sizes read from
nnunetv2's Primus trainers; the CPU profiles shrink it to the ``primus`` preset of ``plans/profiles.json``), with
a patch that is a multiple of the 8³ token, and writes ``sslPlans_<arch>.json`` / ``sslFinetunePlans_<arch>.json``
(CNN and Primus plans of one dataset side by side). The ``ssl`` block then holds the objectives that have a
Primus realisation, their layouts in tokens.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Optional, Sequence

import numpy as np

from ssl_nnunet.experiment_planning.dataset_checks import list_cases, load_dataset_json
from ssl_nnunet.experiment_planning.ssl_layout import compute_ssl_block
from ssl_nnunet.plans import load_shipped
from ssl_nnunet.constants import ARCHS, CONFIGURATION, FINETUNE_PLANS, PROFILES, SSL_PLANS, plans_identifiers
from ssl_nnunet.paths import nnunet_preprocessed, nnunet_raw
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.file_io import atomic_copy, atomic_save_json, dataset_name_from_id, load_json

PLANNER_PRESETS = {
    "ResEncM": "nnUNetPlannerResEncM", "ResEncL": "nnUNetPlannerResEncL", "ResEncXL": "nnUNetPlannerResEncXL",
    "ResEnc": "ResEncUNetPlanner", "default": "ExperimentPlanner",
}


def _planner_class(preset: str):
    if preset not in PLANNER_PRESETS:
        raise SSLInputError(f"Unknown planner preset -pl {preset}. Choose one of {', '.join(PLANNER_PRESETS)}.")
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners as r
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    name = PLANNER_PRESETS[preset]
    base = ExperimentPlanner if name == "ExperimentPlanner" else getattr(r, name)

    class CapturingPlanner(base):
        """nnU-Net's planner, but ``save_plans`` keeps the result in memory; we write it ourselves."""

        def save_plans(self, plans):
            from nnunetv2.utilities.json_export import recursive_fix_for_json_export
            recursive_fix_for_json_export(plans)
            self.plans = plans

    CapturingPlanner.__name__ = base.__name__
    return CapturingPlanner


@contextlib.contextmanager
def _planner_uses_case_list(dataset_name: str, dataset_json: dict):
    """With nnU-Net v2's explicit file list (``dataset`` key of dataset.json), nnunetv2's planner requires a
    ``label`` per case; ssl_nnunet datasets may be unlabeled. Inside this block the planner lists the cases
    through :func:`list_cases` (labels optional) — it only reads the first image to pick the reader."""
    if "dataset" not in dataset_json:
        yield
        return
    from nnunetv2.experiment_planning.experiment_planners import default_experiment_planner as dep
    cases = list_cases(dataset_name, dataset_json)
    original = dep.get_filenames_of_train_images_and_targets
    dep.get_filenames_of_train_images_and_targets = lambda *_a, **_k: {
        k: {"images": list(v["images"]), "label": v["label"]} for k, v in cases.items()}
    try:
        yield
    finally:
        dep.get_filenames_of_train_images_and_targets = original


def apply_cpu_profile(configuration: dict, profile: str) -> None:
    """Replace network size and patch of a ``3d_fullres`` configuration by a CPU preset (in place)."""
    preset = load_shipped("profiles.json")[profile]
    kw = configuration["architecture"]["arch_kwargs"]
    n = len(preset["features_per_stage"])
    kw.update({"n_stages": n, "features_per_stage": list(preset["features_per_stage"]),
               "kernel_sizes": [[3, 3, 3]] * n, "strides": [list(s) for s in preset["strides"]],
               "n_conv_per_stage_decoder": list(preset["n_conv_per_stage_decoder"])})
    block_key = "n_blocks_per_stage" if "n_blocks_per_stage" in kw else "n_conv_per_stage"
    kw[block_key] = list(preset["n_blocks_per_stage"])
    configuration["patch_size"] = list(preset["patch_size"])
    configuration["batch_size"] = int(preset["batch_size"])


def apply_primus(configuration: dict, arch: str, profile: str) -> dict:
    """Replace the CNN of a ``3d_fullres`` configuration by the Primus ``arch`` (in place); returns the
    Primus hyper-parameters. GPU profile: nnunetv2's trainer sizes and the nnU-Net patch rounded down to a
    multiple of the token size; CPU profiles: the ``primus`` preset of ``plans/profiles.json``."""
    from ssl_nnunet.backbones.primus import primus_architecture, primus_hyperparameters
    hp = primus_hyperparameters(arch)
    if profile == "gpu":
        token = hp["patch_embed_size"]
        patch = [max(t, (int(p) // t) * t) for p, t in zip(configuration["patch_size"], token)]
    else:
        preset = load_shipped("profiles.json")[profile]["primus"]
        hp.update({k: preset[k] for k in ("embed_dim", "eva_depth", "eva_numheads", "drop_path_rate")})
        patch = list(preset["patch_size"])
        configuration["batch_size"] = int(preset["batch_size"])
    configuration["architecture"] = primus_architecture(hp, patch)
    configuration["patch_size"] = [int(p) for p in patch]
    return hp


def finetune_trainer_name(arch: str, profile: str) -> str:
    """The nnU-Net trainer the fine-tuning plan names (``ssl_pretraining_source.finetune_trainer``)."""
    if arch == "cnn":
        return "nnUNetTrainer_SSLFinetune"
    from ssl_nnunet.backbones.primus import PRIMUS_CPU_TRAINER, PRIMUS_TRAINERS
    return PRIMUS_TRAINERS[arch] if profile == "gpu" else PRIMUS_CPU_TRAINER


def plan_experiment(dataset: str | int, profile: str = "gpu", preset: str = "ResEncM",
                    gpu_memory_target: Optional[float] = None, spacing: Optional[Sequence[float]] = None,
                    isotropic: bool = False, verbose: bool = True, arch: str = "cnn") -> dict:
    """Plan ``dataset`` (fingerprint must exist) and write ``sslPlans.json`` + ``sslFinetunePlans.json``
    (``arch`` a Primus size: ``sslPlans_<arch>.json`` + ``sslFinetunePlans_<arch>.json``).

    Returns the pretraining plans dict.
    """
    if profile not in PROFILES:
        raise SSLInputError(f"Unknown profile -profile {profile}. Choose one of {', '.join(PROFILES)}.")
    if arch not in ARCHS:
        raise SSLInputError(f"Unknown backbone -arch {arch}. Choose one of {', '.join(ARCHS)}.")
    ssl_id, ft_id = plans_identifiers(arch)
    dataset_name = dataset_name_from_id(dataset)
    dataset_json = load_dataset_json(dataset_name, verbose)  # readable error before nnU-Net's asserts
    pp_folder = os.path.join(nnunet_preprocessed(), dataset_name)
    fingerprint_file = os.path.join(pp_folder, "dataset_fingerprint.json")
    if not os.path.isfile(fingerprint_file):
        raise SSLInputError(f"{dataset_name}: no fingerprint at {fingerprint_file}. Run "
                            f"ssl_nnunet_extract_fingerprint -d {dataset} (or ssl_nnunet_plan_and_preprocess).")
    fingerprint = load_json(fingerprint_file, "fingerprint")
    if isotropic and spacing is None:
        spacing = [float(np.min(np.median(fingerprint["spacings"], 0)))] * 3
    planner_cls = _planner_class(preset)
    kwargs = {"plans_name": ssl_id}
    if gpu_memory_target is not None:
        kwargs["gpu_memory_target_in_gb"] = float(gpu_memory_target)
    if spacing is not None:
        kwargs["overwrite_target_spacing"] = [float(s) for s in spacing]
    with _planner_uses_case_list(dataset_name, dataset_json):
        planner = planner_cls(dataset_name, **kwargs)
    planner.dataset_json = dataset_json  # nnU-Net's planner re-reads the raw file, which may lack 'labels'
    if not verbose:
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            planner.plan_experiment()
    else:
        planner.plan_experiment()
    plans = copy.deepcopy(planner.plans)
    if CONFIGURATION not in plans["configurations"]:
        raise SSLInputError(f"{dataset_name}: nnU-Net planned no 3d_fullres configuration (2D data?). "
                            f"ssl_nnunet needs 3D images.")
    config = plans["configurations"][CONFIGURATION]
    plans["configurations"] = {CONFIGURATION: config}
    config["data_identifier"] = f"{ssl_id}_{CONFIGURATION}"  # ResEnc planners would share nnUNetPlans' data
    token = None
    if arch != "cnn":
        token = apply_primus(config, arch, profile)["patch_embed_size"]
    elif profile != "gpu":
        apply_cpu_profile(config, profile)
    downstream_patch = list(config["patch_size"])
    kw = config["architecture"]["arch_kwargs"]
    median_shape = config["median_image_size_in_voxels"]
    plans["ssl"] = compute_ssl_block(config["patch_size"], kw["strides"] if token is None else [token],
                                     config["spacing"], median_shape,
                                     profile, downstream_patch, verbose=verbose,
                                     normalization_schemes=config.get("normalization_schemes", []),
                                     intensity_properties=plans.get("foreground_intensity_properties_per_channel",
                                                                    {}), token_size=token)
    plans["ssl"]["planner_preset"] = preset
    plans["ssl"]["arch"] = arch

    finetune = copy.deepcopy(plans)
    del finetune["ssl"]
    finetune["plans_name"] = ft_id
    ft_config = finetune["configurations"][CONFIGURATION]
    ft_config["data_identifier"] = f"{ft_id}_{CONFIGURATION}"
    ft_config["patch_size"] = downstream_patch
    finetune["ssl_pretraining_source"] = {"dataset_name": dataset_name, "plans_name": ssl_id,
                                          "profile": profile, "planner_preset": preset, "arch": arch,
                                          "finetune_trainer": finetune_trainer_name(arch, profile)}

    raw_json = os.path.join(nnunet_raw(), dataset_name, "dataset.json")
    if "labels" in load_json(raw_json, "dataset.json"):
        atomic_copy(raw_json, os.path.join(pp_folder, "dataset.json"))
    else:  # unlabeled: the copy nnU-Net's preprocessor and trainer read gets background-only labels
        atomic_save_json(dataset_json, os.path.join(pp_folder, "dataset.json"))
    atomic_save_json(plans, os.path.join(pp_folder, ssl_id + ".json"))
    atomic_save_json(finetune, os.path.join(pp_folder, ft_id + ".json"))
    if verbose:
        print(f"SSL plans written to {os.path.join(pp_folder, ssl_id + '.json')} "
              f"(profile {profile}, patch {config['patch_size']}, spacing {config['spacing']}); "
              f"fine-tuning plans to {os.path.join(pp_folder, ft_id + '.json')}")
    return plans


def _write_preprocessed_dataset_json(dataset_name: str, dataset_json: dict, pp_folder: str) -> None:
    """The dataset.json that nnU-Net's preprocessor and trainer read (background-only labels when unlabeled)."""
    raw_json = os.path.join(nnunet_raw(), dataset_name, "dataset.json")
    if "labels" in load_json(raw_json, "dataset.json"):
        atomic_copy(raw_json, os.path.join(pp_folder, "dataset.json"))
    else:
        atomic_save_json(dataset_json, os.path.join(pp_folder, "dataset.json"))


def transfer_shared_plan(reference: str | int, targets: Sequence[str | int], verbose: bool = True,
                         arch: str = "cnn") -> list:
    """Several datasets, one pretraining plan: the plan of ``reference`` (planned before, the first ``-d``) is
    transferred to every target as nnU-Net's ``nnUNetv2_move_plans_between_datasets`` does (same spacing,
    normalisation, intensity properties, network and ``ssl`` block; the target's name and image reader), and
    ``ssl.shared_plan`` of every plan records the group. Targets with other input channels or modalities raise
    :class:`SSLInputError`. Writes the pretraining and fine-tuning plans of backbone ``arch`` (``sslPlans.json``,
    ``sslFinetunePlans.json`` for the CNN) and ``dataset.json`` into each target's ``nnUNet_preprocessed`` folder;
    returns all dataset names (reference first)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from ssl_nnunet.data.multi_dataset import check_compatible
    ref_name = dataset_name_from_id(reference)
    ref_folder = os.path.join(nnunet_preprocessed(), ref_name)
    ssl_plans_name, finetune_plans_name = plans_identifiers(arch)
    ref_plans = load_json(os.path.join(ref_folder, ssl_plans_name + ".json"), "plans")
    ref_finetune = load_json(os.path.join(ref_folder, finetune_plans_name + ".json"), "plans")
    ref_json = load_dataset_json(ref_name, verbose=False)
    names = [ref_name] + [dataset_name_from_id(t) for t in targets]
    if len(set(names)) != len(names):
        raise SSLInputError(f"-d lists a dataset twice ({', '.join(names)}).")
    shared = {"reference": ref_name, "datasets": names,
              "rule": "the reference (first -d) is planned; its plan is transferred to the others"}
    for name in names[1:]:
        dataset_json = load_dataset_json(name, verbose)
        check_compatible(ref_name, ref_json, name, dataset_json)
        cases = list_cases(name, dataset_json)
        example = cases[next(iter(cases))]["images"][0]
        reader = determine_reader_writer_from_dataset_json(dataset_json, example, allow_nonmatching_filename=True,
                                                           verbose=False).__name__
        folder = os.path.join(nnunet_preprocessed(), name)
        os.makedirs(folder, exist_ok=True)
        for source, plans_name in ((ref_plans, ssl_plans_name), (ref_finetune, finetune_plans_name)):
            plans = copy.deepcopy(source)
            plans["dataset_name"] = name
            plans["image_reader_writer"] = reader
            if "ssl" in plans:
                plans["ssl"]["shared_plan"] = shared
            atomic_save_json(plans, os.path.join(folder, plans_name + ".json"))
        _write_preprocessed_dataset_json(name, dataset_json, folder)
        if verbose:
            print(f"{name}: pretraining plan of {ref_name} transferred ({len(cases)} case(s), reader {reader})")
    ref_plans["ssl"]["shared_plan"] = shared  # ssl is not part of the preprocessing hash: no re-preprocessing
    atomic_save_json(ref_plans, os.path.join(ref_folder, ssl_plans_name + ".json"))
    return names
