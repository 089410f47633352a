"""Common interface of every SSL objective.

A method owns (1) its plan layout: the defaults it derives from a :class:`PlanningContext`
(:meth:`SSLMethod.default_layout`) and the checks of a written layout (:meth:`SSLMethod.check_layout`),
(2) its sampler when the default one does not fit, (3) how a batch of preprocessed patches becomes its views
(torch ops on the batch's device), (4) its heads, (5) its loss and (6) what its export trains
(``trained_parts``). The planner, the trainer (``ssl_nnunet.training``) and the exporter only loop over the
registry (:mod:`ssl_nnunet.methods`).

Data contract: the trainer's loader delivers a float tensor of shape ``(B, C, *data_patch_size)`` where
``data_patch_size`` is what the method asks for (``required_patch_size``), cut from ``cases_per_sample``
*different* cases per batch element (``cases_per_sample = 2`` gives shape ``(B, 2, C, *size)``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ssl_nnunet.data.samplers import SamplerSpec, UnlabeledPatchSampler
from ssl_nnunet.methods import ema
from ssl_nnunet.methods.features import cumulative_strides
from ssl_nnunet.utilities.errors import SSLInputError


def merge_layout(base: dict, override: dict) -> dict:
    """``base`` updated by ``override`` (a deep copy); nested dicts are merged key by key, anything else is
    replaced whole (lists included)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge_layout(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def divides(a: Sequence[int], b: Sequence[int]) -> bool:
    """True when every ``a[ax]`` divides ``b[ax]``."""
    return all(int(y) % int(x) == 0 for x, y in zip(a, b))


@dataclass(frozen=True)
class PlanningContext:
    """What a method may derive its default layout from (one dataset's plan, before the ``ssl`` block exists).

    ``patch_size`` is the plan's patch P; ``strides`` the network's per-stage strides; ``spacing`` and
    ``median_shape`` (voxels) of the planned configuration; ``profile`` one of ``constants.PROFILES``;
    ``normalization_schemes`` and ``intensity_properties`` (``foreground_intensity_properties_per_channel``)
    as in nnU-Net's plans.
    """

    patch_size: Tuple[int, ...]
    strides: Tuple[Tuple[int, ...], ...]
    spacing: Tuple[float, ...]
    median_shape: Tuple[float, ...]
    profile: str
    normalization_schemes: Tuple[str, ...] = ()
    intensity_properties: dict = field(default_factory=dict)
    #: a Primus plan: the token size (e.g. (8, 8, 8)); it is then the total stride and the mask quantum
    token_size: Optional[Tuple[int, ...]] = None

    @property
    def architecture_family(self) -> str:
        """``"cnn"`` or ``"primus"``."""
        return "cnn" if self.token_size is None else "primus"

    @property
    def cumulative_strides(self) -> List[List[int]]:
        """Per-stage cumulative stride s_k (per axis)."""
        return [list(s) for s in cumulative_strides([list(s) for s in self.strides])]

    @property
    def total_stride(self) -> List[int]:
        """S: the stride of the deepest stage (Primus: the token size)."""
        if self.token_size is not None:
            return list(self.token_size)
        return self.cumulative_strides[-1]

    @property
    def mask_quantum(self) -> List[int]:
        """q: the stride of the penultimate stage (the unit every mask and crop is a multiple of); Primus: the
        token size."""
        if self.token_size is not None:
            return list(self.token_size)
        return self.cumulative_strides[-2]

    @property
    def out_of_plane_axis(self) -> int:
        """a_op: the axis of the largest spacing (the first on ties)."""
        return max(range(len(self.spacing)), key=lambda ax: (self.spacing[ax], -ax))

    @property
    def is_cpu(self) -> bool:
        return self.profile != "gpu"


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
    #: layout constants that do not depend on the dataset: the one home of each default. The constructor reads
    #: ``merge_layout(layout_defaults, method_plan["layout"])``, and :meth:`default_layout` starts from them.
    layout_defaults: dict = {}
    #: layout keys the plan must give (derived by :meth:`default_layout`; no context-free default exists)
    required_layout_keys: Tuple[str, ...] = ()
    #: True when every training step runs the same autograd graph over the same parameters (DDP's
    #: ``static_graph=True``); a method whose graph changes from step to step sets False
    static_graph: bool = True

    @classmethod
    def variant_for(cls, architecture_family: str) -> Optional[type]:
        """The class that realises this objective on a backbone family (``ssl.architecture_family`` of a plan:
        ``"cnn"`` or ``"primus"``), or ``None`` when the objective has no realisation on it. Planner, trainer and
        benchmarks ask this one question instead of branching per method. Default: the class itself on the CNN,
        none on Primus."""
        return cls if architecture_family == "cnn" else None

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        super().__init__()
        self.network = network
        self.method_plan = method_plan
        self.ssl_plan = ssl_plan
        self.layout = self.resolved_layout(method_plan)
        self.num_input_channels = num_input_channels
        missing = [k for k in type(self).required_layout_keys if k not in self.layout]
        if missing:
            raise SSLInputError(f"ssl layout of '{self.name}' lacks {missing}; re-run the SSL planner")

    @classmethod
    def resolved_layout(cls, method_plan: dict) -> dict:
        """The layout a run uses: :attr:`layout_defaults` updated by the plan's ``layout``."""
        return merge_layout(cls.layout_defaults, method_plan.get("layout", {}))

    # ---------------------------------------------------------------------------------------------- planning
    @classmethod
    def default_layout(cls, ctx: PlanningContext) -> Tuple[List[int], dict]:
        """``(pretrain_patch_size, layout)`` the planner writes for this method, derived from ``ctx``.

        Default: the plan's patch and :attr:`layout_defaults`."""
        return [int(p) for p in ctx.patch_size], copy.deepcopy(cls.layout_defaults)

    @classmethod
    def finalize_layout(cls, pretrain_patch_size: List[int], layout: dict, ctx: PlanningContext) -> dict:
        """The layout after the planner merged the shipped per-profile overrides (``plans/method_defaults.json``)
        into :meth:`default_layout`'s; a method adjusts what depends on both here. Default: unchanged."""
        return layout

    @classmethod
    def check_layout(cls, method_plan: dict, ssl_plan: dict) -> List[str]:
        """Check a written plan entry ``method_plan`` (``ssl.methods.<name>``) against ``ssl_plan``'s
        ``total_stride``, ``mask_quantum``, ``out_of_plane_axis`` and ``median_shape``.

        Raises :class:`~ssl_nnunet.utilities.errors.SSLInputError` naming the key (use :meth:`layout_error`);
        returns warnings. Default: no method-specific rule."""
        return []

    @classmethod
    def layout_error(cls, ssl_plan: dict, key: str, what: str) -> SSLInputError:
        """The :class:`SSLInputError` of an invalid layout key (raise it)."""
        return SSLInputError(
            f"Invalid SSL layout for '{cls.name}', key '{key}': {what}. Sizes must be derived from a patch that "
            f"is a multiple of the network's total stride {ssl_plan.get('total_stride')} and units that are "
            f"multiples of the mask quantum {ssl_plan.get('mask_quantum')}; fix the plan or re-plan with another "
            f"-profile.")

    # ---------------------------------------------------------------------------------------------- data
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
                                     cls.cases_per_sample, seed=spec.seed, **spec.case_options)

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

    def untrained_parameters(self) -> List[str]:
        """Names (as in ``named_parameters()``) of the parameters this objective never gives a gradient. The
        trainer freezes them (``requires_grad = False``: no optimizer entry, no DDP bucket), so DDP runs with
        ``find_unused_parameters=False``; they are exported at their initial values. Default: the decoder's
        deep-supervision heads ``seg_layers[:-1]`` — the network is built without deep supervision, so only
        ``seg_layers[-1]`` runs. Methods whose objective skips more (e.g. a head only used in validation) extend
        it; parameters a method already froze itself (VoCo's decoder) need not be listed."""
        seg_layers = getattr(getattr(self.network, "decoder", None), "seg_layers", None)
        if seg_layers is None:
            return []
        return [f"network.decoder.seg_layers.{i}.{name}" for i in range(len(seg_layers) - 1)
                for name, _ in seg_layers[i].named_parameters()]

    def previews(self, batch: torch.Tensor) -> Dict[str, Sequence[torch.Tensor]]:
        """Optional images for a preview PNG: ``{row_title: [3D tensors (a0, a1, a2)]}``. Default: none."""
        return {}
