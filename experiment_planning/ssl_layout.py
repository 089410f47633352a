"""The ``ssl`` block of ``sslPlans.json``: every registered objective's patch layout (METHODS.md §8).

Each method derives its own layout from a :class:`~ssl_nnunet.methods.base.PlanningContext` (pretraining
patch P, the network's strides, spacing, median shape, profile, normalisation and intensities) through
:meth:`~ssl_nnunet.methods.base.SSLMethod.default_layout`, and checks a written one through
:meth:`~ssl_nnunet.methods.base.SSLMethod.check_layout`. This module only loops over the registry, merges the
shipped per-profile settings of ``plans/method_defaults.json`` and checks the rules shared by all methods.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence

from ssl_nnunet.plans import load_shipped
from ssl_nnunet.constants import PROFILES
from ssl_nnunet.methods import all_methods
from ssl_nnunet.methods.base import PlanningContext, divides, merge_layout
from ssl_nnunet.utilities.errors import SSLInputError


def method_entry(method_cls, ctx: PlanningContext, defaults: dict) -> dict:
    """``ssl.methods.<name>``: the method's layout with the shipped overrides merged in, and the training
    settings (``optimizer`` / ``lr_schedule`` entries of a method replace the common ones whole)."""
    shipped = defaults.get(method_cls.name, {})
    patch, layout = method_cls.default_layout(ctx)
    layout = method_cls.finalize_layout(list(patch), merge_layout(layout, shipped.get("layout", {})), ctx)
    settings = {**copy.deepcopy(defaults["common"]),
                **{k: copy.deepcopy(v) for k, v in shipped.items() if k != "layout"}}
    return {"pretrain_patch_size": [int(p) for p in patch], "layout": layout, **settings}


def compute_ssl_block(patch_size: Sequence[int], strides: Sequence[Sequence[int]], spacing: Sequence[float],
                      median_shape: Sequence[float], profile: str, downstream_patch_size: Sequence[int],
                      verbose: bool = True, normalization_schemes: Sequence[str] = (),
                      intensity_properties: Optional[dict] = None,
                      token_size: Optional[Sequence[int]] = None) -> dict:
    """Build the ``ssl`` block for a CNN U-Net plan (see module docstring and METHODS.md §8).

    ``token_size`` (a Primus plan): total stride and mask quantum are the token size, and the block holds the
    methods with a Primus realisation (:meth:`~ssl_nnunet.methods.base.SSLMethod.variant_for`)."""
    if profile not in PROFILES:
        raise SSLInputError(f"Unknown profile '{profile}'. Choose one of {', '.join(PROFILES)}.")
    ctx = PlanningContext(patch_size=tuple(int(p) for p in patch_size),
                          strides=tuple(tuple(int(v) for v in s) for s in strides),
                          spacing=tuple(float(s) for s in spacing), median_shape=tuple(float(m) for m in median_shape),
                          profile=profile, normalization_schemes=tuple(normalization_schemes),
                          intensity_properties=dict(intensity_properties or {}),
                          token_size=None if token_size is None else tuple(int(t) for t in token_size))
    defaults = load_shipped("method_defaults.json")["cpu" if ctx.is_cpu else "gpu"]
    family = ctx.architecture_family
    variants = {name: cls.variant_for(family) for name, cls in all_methods().items()}
    methods = {name: method_entry(cls, ctx, defaults) for name, cls in variants.items() if cls is not None}
    block = {"architecture_family": family, "profile": profile, "total_stride": ctx.total_stride,
             "mask_quantum": ctx.mask_quantum, "out_of_plane_axis": ctx.out_of_plane_axis,
             "recommended_downstream_patchsize": [int(p) for p in downstream_patch_size],
             "median_shape": [float(m) for m in median_shape], "methods": methods}
    validate_ssl_block(block, patch_size, warn=verbose)
    return block


def validate_ssl_block(block: dict, patch: Sequence[int], warn: bool = False) -> List[str]:
    """Check the rules shared by all methods (METHODS.md §8), then each registered method's own
    (:meth:`check_layout`); raise :class:`SSLInputError` naming the method and key, return warnings."""
    S, q = block["total_stride"], block["mask_quantum"]

    def fail(method, key, what):
        raise SSLInputError(f"Invalid SSL layout for '{method}', key '{key}': {what}. Sizes must be derived from a "
                            f"patch that is a multiple of the network's total stride {S} and units that are "
                            f"multiples of the mask quantum {q}; fix the plan or re-plan with another -profile.")

    for name, entry in block["methods"].items():
        if not divides(S, entry["pretrain_patch_size"]):
            fail(name, "pretrain_patch_size", f"{entry['pretrain_patch_size']} is not a multiple of {S}")
    if not divides(q, S):
        fail("all", "mask_quantum", f"{q} does not divide the total stride {S}")
    registered = all_methods()
    family = block.get("architecture_family", "cnn")
    warnings = []
    for name, entry in block["methods"].items():
        variant = registered[name].variant_for(family) if name in registered else None
        if variant is not None:
            warnings += variant.check_layout(entry, block)
    if warn:
        for w in warnings:
            print(f"WARNING: {w}")
    return warnings
