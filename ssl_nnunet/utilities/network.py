"""The network nnU-Net builds from a plans file, for every part of ssl_nnunet that needs one.

The SSL trainer (``num_classes = C_in``, no deep supervision), the exporter (the same network, to load the
SSL weights strictly) and fine-tuning (the target's segmentation heads, deep supervision) all build it here,
with nnunetv2's own builder, so they cannot drift from what ``nnUNetv2_train`` builds.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from ssl_nnunet.constants import CONFIGURATION

if TYPE_CHECKING:
    from torch import nn


def build_network_from_plans(plans: dict, num_input_channels: int, num_output_channels: int,
                             deep_supervision: bool = False, configuration: str = CONFIGURATION) -> nn.Module:
    """nnunetv2's ``get_network_from_plans`` for ``plans``' ``configuration`` (``plans`` is not modified).

    A Primus plan (``ssl_nnunet.backbones.primus``) builds ``Primus(**arch_kwargs)`` as nnunetv2's Primus
    trainers do; Primus has no deep supervision, so ``deep_supervision`` does not apply to it."""
    from ssl_nnunet.backbones.primus import build_primus, is_primus_plan
    if is_primus_plan(plans, configuration):
        arch = plans["configurations"][configuration]["architecture"]
        return build_primus(arch["arch_kwargs"], num_input_channels, num_output_channels)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cm = PlansManager(copy.deepcopy(plans)).get_configuration(configuration)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
                                  allow_init=True, deep_supervision=deep_supervision)
