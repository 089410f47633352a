"""Names shared by every command: plans identifiers, the configuration, profiles, demo datasets.

One home for them, so that a command's default, a folder name and a help text can never drift apart.
"""
from __future__ import annotations

#: the pretraining plan written by ``ssl_nnunet_plan_experiment`` (a valid nnU-Net plans file + ``ssl``)
SSL_PLANS = "sslPlans"
#: the fine-tuning plan (nnU-Net plans with the pretraining architecture, spacing and normalisation)
FINETUNE_PLANS = "sslFinetunePlans"
#: backbones of ``ssl_nnunet_plan_and_preprocess -arch``: the nnU-Net CNN (default) or a Primus size
PRIMUS_ARCHS = ("primus_s", "primus_b", "primus_m", "primus_l")
ARCHS = ("cnn",) + PRIMUS_ARCHS


def plans_identifiers(arch: str = "cnn"):
    """``(pretraining plans, fine-tuning plans)`` identifiers of backbone ``arch``: ``sslPlans`` /
    ``sslFinetunePlans`` for the CNN, ``sslPlans_<arch>`` / ``sslFinetunePlans_<arch>`` for a Primus, so the
    plans of several backbones of one dataset live side by side."""
    if arch == "cnn":
        return SSL_PLANS, FINETUNE_PLANS
    return f"{SSL_PLANS}_{arch}", f"{FINETUNE_PLANS}_{arch}"


def finetune_plans_for(plans_identifier: str) -> str:
    """The fine-tuning plans identifier written next to pretraining plans ``plans_identifier``
    (``sslPlans`` -> ``sslFinetunePlans``, ``sslPlans_primus_m`` -> ``sslFinetunePlans_primus_m``)."""
    if plans_identifier.startswith(SSL_PLANS):
        return FINETUNE_PLANS + plans_identifier[len(SSL_PLANS):]
    return FINETUNE_PLANS


#: the only nnU-Net configuration ssl_nnunet plans and pretrains
CONFIGURATION = "3d_fullres"

#: planning profiles (``-profile``); the CPU ones replace network and patch by ``plans/profiles.json`` presets
PROFILES = ("cpu_smoke", "cpu_bench", "gpu")
CPU_PROFILES = ("cpu_smoke", "cpu_bench")

#: the arms of a fine-tuning comparison (``ssl_nnunet_finetune``, ``ssl_nnunet_predict``, the report): the
#: pretrained weights, scratch with the same recipe, and vanilla nnU-Net scratch at the same budget
FINETUNE_ARMS = ("pretrained", "scratch", "scratch_vanilla")
SCRATCH_ARMS = FINETUNE_ARMS[1:]

#: the built-in demo datasets (``ssl_nnunet_make_demo_dataset``)
DEMO_UNLABELED_ID = 900
DEMO_UNLABELED_DATASET = "Dataset900_DemoBrainSSL"
DEMO_LABELED_ID = 901
DEMO_LABELED_DATASET = "Dataset901_DemoBrainSeg"
