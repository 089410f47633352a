"""Common interface of every SSL objective.

A method owns (1) how a batch of preprocessed patches becomes its views (torch ops on the batch's
device), (2) its heads and (3) its loss. The trainer (``ssl_nnunet.training``) owns everything else.

Data contract: the trainer's loader delivers a float tensor of shape ``(B, C, *data_patch_size)`` where
``data_patch_size`` is what the method asks for (``required_patch_size``), cut from ``cases_per_sample``
*different* cases per batch element (``cases_per_sample = 2`` gives shape ``(B, 2, C, *size)``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ssl_nnunet.methods import ema


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
    def make_sampler(cls, dataset, identifiers: List[str], patch_size: List[int], batch_size: int, seed: int,
                     method_plan: dict, preprocessed_folder: str):
        """The data sampler (an object with ``next_batch() -> Tensor``). Default: random body-box patches of
        ``cases_per_sample`` different cases (:class:`ssl_nnunet.training.data.UnlabeledPatchSampler`).
        Methods that must choose *where* to cut (e.g. Alice's matched crops) override this."""
        from ssl_nnunet.training.data import UnlabeledPatchSampler
        return UnlabeledPatchSampler(dataset, identifiers, patch_size, batch_size, cls.cases_per_sample, seed=seed)

    def forward(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Build the views from ``batch`` and return ``{"loss": total, "<term>": value, ...}``.

        All values are float32 scalars; ``loss`` carries the gradient, the other terms may be detached.
        """
        raise NotImplementedError

    def ema_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """The ``(student, teacher)`` module pairs kept by EMA after every optimizer step (see
        :mod:`ssl_nnunet.methods.ema`). Default: none. A teacher is made with
        :func:`ssl_nnunet.methods.ema.frozen_copy` (no gradient, so it stays out of the optimizer)."""
        return []

    def ema_momentum_range(self) -> Tuple[float, float]:
        """``(μ0, μ1)`` of the cosine momentum schedule of :meth:`ema_pairs` (equal values: constant momentum).
        Methods that declare EMA pairs must override this."""
        raise NotImplementedError(f"{type(self).__name__} declares EMA pairs but no ema_momentum_range()")

    def ema_momentum_at(self, step: int, total_steps: int) -> float:
        """Momentum of the EMA update after optimizer step ``step`` (0-based) of ``total_steps``:
        :func:`ssl_nnunet.methods.ema.cosine_momentum` at ``step + 1`` steps done."""
        return ema.cosine_momentum(step + 1, total_steps, *self.ema_momentum_range())

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """``θ_t ← μ·θ_t + (1 − μ)·θ_s`` for every pair of :meth:`ema_pairs` (parameters and float buffers)."""
        for student, teacher in self.ema_pairs():
            ema.ema_update(student, teacher, momentum)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer after every optimizer step: the EMA update of the declared teachers (nothing
        when :meth:`ema_pairs` is empty). Methods with other per-step schedules extend it."""
        if self.ema_pairs():
            self.ema_update(self.ema_momentum_at(step, total_steps))

    def previews(self, batch: torch.Tensor) -> Dict[str, Sequence[torch.Tensor]]:
        """Optional images for a preview PNG: ``{row_title: [3D tensors (a0, a1, a2)]}``. Default: none."""
        return {}
