"""Common interface of every SSL objective.

A method owns (1) how a batch of preprocessed patches becomes its views (torch ops on the batch's
device), (2) its heads and (3) its loss. The trainer (``ssl_nnunet.training``) owns everything else.

Data contract: the trainer's loader delivers a float tensor of shape ``(B, C, *data_patch_size)`` where
``data_patch_size`` is what the method asks for (``required_patch_size``), cut from ``cases_per_sample``
*different* cases per batch element (``cases_per_sample = 2`` gives shape ``(B, 2, C, *size)``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ssl_nnunet.data.samplers import SamplerSpec, UnlabeledPatchSampler


class SSLMethod(nn.Module):
    """Base class. Subclasses set ``name`` and implement ``forward``.

    Args:
        network: the dynamic-network-architectures U-Net built from the plan (``num_classes = C_in``,
            no deep supervision). Its ``state_dict()`` is what export writes as ``network_weights``.
        method_plan: ``plans["ssl"]["methods"][name]`` (``pretrain_patch_size``, ``layout``, ...).
        ssl_plan: the whole ``plans["ssl"]`` block (``total_stride``, ``mask_quantum``, ...).
        num_input_channels: C_in.
    """

    name: str = ""
    #: number of different cases combined into one batch element (GVSL and Alice use pairs)
    cases_per_sample: int = 1
    #: what an exported bundle of this objective holds trained (the model card's "trained parts" line)
    trained_parts: str = "see the method's documentation"

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        super().__init__()
        self.network = network
        self.method_plan = method_plan
        self.ssl_plan = ssl_plan
        self.layout = method_plan["layout"]
        self.num_input_channels = num_input_channels

    @classmethod
    def required_patch_size(cls, method_plan: dict) -> List[int]:
        """Spatial size (a0, a1, a2) of the patch the data loader must cut for this method."""
        return list(method_plan["pretrain_patch_size"])

    @classmethod
    def make_sampler(cls, spec: SamplerSpec):
        """The data sampler (an object with ``next_batch() -> Tensor``) for ``spec``. Default: random body-box
        patches of ``cases_per_sample`` different cases (:class:`ssl_nnunet.data.samplers.UnlabeledPatchSampler`).
        Methods that must choose *where* to cut (e.g. Alice's matched crops) override this."""
        return UnlabeledPatchSampler(spec.dataset, spec.identifiers, spec.patch_size, spec.batch_size,
                                     cls.cases_per_sample, seed=spec.seed)

    def forward(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Build the views from ``batch`` and return ``{"loss": total, "<term>": value, ...}``.

        All values are float32 scalars; ``loss`` carries the gradient, the other terms may be detached.
        """
        raise NotImplementedError

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook for EMA teachers and schedules. Default: nothing."""

    def previews(self, batch: torch.Tensor) -> Dict[str, Sequence[torch.Tensor]]:
        """Optional images for a preview PNG: ``{row_title: [3D tensors (a0, a1, a2)]}``. Default: none."""
        return {}
