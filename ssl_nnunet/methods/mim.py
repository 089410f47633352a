"""MiM — Mask in Mask (METHODS.md §6): hierarchical masked reconstruction + cross-level alignment on a CNN U-Net.

Views (all built on the batch's device from one native level-1 region per sample; L = 3 levels):

* ``X1 (B, C, R1)`` with ``R1 = r1 ⊙ P`` (``layout.level1_region``, cut natively by the loader);
  ``x1 = avgpool_{r1}(X1) (B, C, P)``; level-1 unit grid ``g1 = P / level1_unit`` (n1 = ∏ g1 units: the
  places a level-2 volume can come from). The level-1 *mask* is finer: cells ``level1_mask_unit`` (≈ P/6 per
  axis, the paper's 6³ token grid), grid ``gm = P / level1_mask_unit``, ratio ρ1 (0.6).
* level 2: per sample γ *mostly hidden* level-1 units (≥ half of their mask cells hidden), drawn uniformly
  without replacement among those; ``x2 (B·γ, C, P)`` is the native
  region ``R2 = R1 / g1`` of ``X1`` under the unit (bit-exact slice when ``R2 = P``; upsampled by
  ``level2_zoom = P / R2`` otherwise, see the small-image fallback in ``documentation/methods/mim.md``);
  ``label12 (B·γ,)`` = index of that unit (C order over ``g1``). Unit ``u2``, grid ``n2 = P / u2``, ratio ρ2.
* level 3: per level-2 volume β *hidden* level-2 units; ``x3 (B·γ·β, C, P)`` = trilinear upsampling by
  ``P / u2`` of the ``u2`` region of ``x2``; ``label23 (B·γ·β,)``. Unit ``u2`` (in x3 coordinates), ratio ρ3.

Volume ``i`` of level l+1 comes from volume ``i // k`` of level l (k = γ for l = 1, β for l = 2).

Network: one SparK-style sparse U-Net (:func:`ssl_nnunet.methods.sparse.sparse_masked_forward`, shared with
MAE) with one :class:`Densify`. All levels go through the network in one batch of ``B (1 + γ + γβ)`` volumes
when their masks can be written on a common unit grid without changing which encoder maps are re-masked
(``fused``); otherwise one masked forward per level. Instance norms are per sample, so both are the same.

Loss (float32)::

    L_R^l  = Σ_v (1 − m_v) (ŷ_v − t_v)² / Σ_v (1 − m_v)          (hidden voxels of all level-l volumes)
    t      = per-unit normalised input (``target = per_unit``, units = that level's mask units) or the input
    p_j    = Proj( sg( mean of the tap map of the coarser volume over unit j ) + e_j )  (n candidates, D)
    e_j    = a learnable embedding of unit position j (one table per level pair; ``candidate_position``)
    c_i    = Agg( tap map of the finer volume i averaged onto a coarse ``context_grid``, flattened )  (D)
    s_ij   = cos(c_i, p_j) = c·p / (‖c‖‖p‖ + 1e-8)
    L_C    = mean_i −log( exp(s_{i,label_i}/τ) / Σ_{j ∈ C_i} exp(s_ij/τ) )
    C_i    = the real candidates: the parent's mostly hidden level-1 units (L_C^{1,2}) / hidden level-2 units
             (L_C^{2,3}). Visible units are no negatives: the positive is always hidden, so "hidden vs visible"
             would solve part of the task without content. Chance level (logged ``*_chance``) = mean log |C_i|.
    L      = w1 L_R^1 + w2 L_R^2 + w3 L_R^3 + α (L_C^{1,2} + L_C^{2,3})

The tap is the decoder map whose stride equals ``align_stride`` (default q → ``dec_first``, METHODS §6.2 step 7):
the positive candidate is a *hidden* unit of the coarser volume, so its features must come from the decoder
(after densification), not the encoder. Proj and Agg are ``Linear(C, D) → GELU → Linear(D, D)`` with separate
weights, shared by both level pairs.

Layout keys (``method_plan["layout"]``; every size per axis (a0, a1, a2)):
    r1             downsampling factor of the level-1 region (``level1_region = r1 ⊙ P``)
    level1_region  native size of X1 = the loader's patch (``required_patch_size``)
    level1_unit    level-1 unit in x1 coordinates (``g1 = P / level1_unit``; a level-2 region's footprint)
    level1_mask_unit  level-1 mask cell in x1 coordinates (divides level1_unit; default level1_unit)
    level2_zoom    optional; ``P / (level1_region / g1)`` (1 = native level 2); checked if present
    u2             level-2 and level-3 mask unit (also the size of the region a level-3 volume is cut from)
    level3_zoom    optional; ``P / u2``; checked if present
    ratios         [ρ1, ρ2, ρ3] (default [0.6, 0.6, 0.5])
    gamma, beta    level-2 volumes per level-1 volume (at most the mostly hidden level-1 units every mask has),
                   level-3 volumes per level-2 volume (β = 0: two levels)
    alpha, tau     alignment weight (0.1) and InfoNCE temperature (0.2)
    proj_dim       D
    align_stride   stride of the decoder map used for alignment (q)
    target         "per_unit" | "none"
    level_weights  optional [w1, w2, w3] (default [1, 1, 1])
    candidate_position  add a learnable unit-position embedding to the candidates (default true). The paper's
                   candidates are ViT decoder tokens, which carry the decoder's position embedding; a CNN
                   decoder's unit means of mostly hidden units do not (its guesses for two hidden halves are
                   nearly the same vector), so without it the alignment stayed at chance (mim.md, Measured).
    context_grid   the finer volume's tap map is averaged onto this grid (per axis, default [2, 2, 2]) and
                   flattened for the aggregator. A ViT's token average still carries the layout through the
                   position embedding; a CNN map's global mean does not (measured: a linear probe of the global
                   mean told which level-1 half an x2 came from at chance, of the 2³ average perfectly), so the
                   coarse layout is kept; [1, 1, 1] is the global mean.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_nnunet.methods import register
from ssl_nnunet.methods.base import PlanningContext, SSLMethod, divides
from ssl_nnunet.methods.features import check_unet, cumulative_strides
from ssl_nnunet.methods.helpers import per_axis_ints, split_into_cells, uniform
from ssl_nnunet.methods.mae import (PRIMUS_DECODER_DEFAULTS, build_primus_decoder, primus_pixels,
                                    primus_untrained_up_projection)
from ssl_nnunet.methods.masking import (expand_mask, masked_mse, num_hidden_units, per_unit_target,
                                        random_block_mask, unit_grid)
from ssl_nnunet.methods.sparse import Densify, convert_encoder_to_sparse, derive_remask_strides, sparse_masked_forward
from ssl_nnunet.utilities.errors import SSLInputError

TARGETS = ("none", "per_unit")

__all__ = ["MiM", "PrimusMiM", "MiMViews", "unit_boxes", "sample_hidden_units", "unit_mean_features",
           "info_nce", "resize_to"]


# ------------------------------------------------------------------------------------------------------------
# tensor helpers (any number of spatial axes; docstrings use 3D)

def unit_boxes(index: torch.Tensor, grid: Sequence[int], unit: Sequence[int]) -> torch.Tensor:
    """Boxes of units ``index (...,)`` (C order over ``grid``) of size ``unit`` → ``(..., 2, n_ax)`` long:
    ``[..., 0, :]`` start, ``[..., 1, :]`` stop (exclusive), in the coordinates of the split volume."""
    coords = []
    rest = index.long()
    for g in reversed([int(v) for v in grid]):
        coords.append(rest % g)
        rest = rest // g
    coords = torch.stack(coords[::-1], dim=-1)
    size = torch.tensor([int(u) for u in unit], device=index.device, dtype=torch.long)
    start = coords * size
    return torch.stack([start, start + size], dim=-2)


def sample_hidden_units(mask: torch.Tensor, k: int, generator: Optional[torch.Generator] = None,
                        hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``k`` distinct hidden units per sample of a unit mask ``(N, 1, n0, n1, n2)`` (1 = visible) → ``(N, k)`` long.

    Uniform without replacement among the hidden units (random scores drawn with ``generator`` on its device;
    visible units get scores above every hidden one). ``hidden (N, n)`` bool, if given, replaces ``mask == 0``
    as the set to draw from. Raises ``ValueError`` if a sample has fewer than k.
    """
    flat = mask.reshape(mask.shape[0], -1)
    hidden = (flat == 0) if hidden is None else hidden.reshape(flat.shape).bool()
    if k > 0 and int(hidden.sum(1).min()) < k:
        raise ValueError(f"cannot pick {k} hidden units: a sample hides only {int(hidden.sum(1).min())}")
    scores = uniform(flat.shape, flat.device, generator)
    scores = torch.where(hidden, scores, scores + 2.0)
    return scores.argsort(dim=1)[:, :k]


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear (trilinear in 3D) resampling of ``x (N, C, *s)`` to ``(N, C, *size)``; identity if sizes match."""
    size = [int(s) for s in size]
    if list(x.shape[2:]) == size:
        return x
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def _avg_pool(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    factor = [int(f) for f in factor]
    if all(f == 1 for f in factor):
        return x
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(factor)]
    return pool(x, kernel_size=factor, stride=factor)


def unit_mean_features(fmap: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Mean of a feature map ``(N, C, f0, f1, f2)`` over each unit of ``grid`` → ``(N, n, C)`` (float32)."""
    return split_into_cells(fmap.float(), grid).flatten(3).mean(dim=3)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (N, D)``, ``b (N, n, D)`` → ``(N, n)``: a·b / (‖a‖‖b‖ + 1e-8) in float32."""
    a, b = a.float(), b.float()
    dot = (b * a[:, None, :]).sum(-1)
    return dot / (a.norm(dim=-1)[:, None] * b.norm(dim=-1) + 1e-8)


def info_nce(context: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, tau: float,
             valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over units (METHODS §6.1, paper Eq. 4–6).

    Args:
        context: ``(N, D)`` context vectors of the finer volumes.
        candidates: ``(N, n, D)`` unit features of each finer volume's parent (coarser) volume.
        labels: ``(N,)`` index of the positive unit.
        tau: temperature.
        valid: optional ``(N, n)`` bool, the real candidates (the label must be one); the others get logit −inf,
            so they are neither negatives nor part of the normaliser.
    Returns:
        ``(loss, logits)``: float32 scalar ``mean_i −log softmax(s_i / τ)[label_i]`` and the logits ``(N, n)``
        (−inf where not valid).
    """
    logits = _cosine(context, candidates) / float(tau)
    if valid is not None:
        logits = logits.masked_fill(~valid.bool(), float("-inf"))
    return F.cross_entropy(logits, labels.long()), logits


def alignment_stats(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Accuracy of ``logits (N, n)`` on ``labels (N,)`` and the chance levels of a content-free guess over the
    ``valid (N, n)`` candidates: ``chance = mean_i log(n_i)`` (the loss of uniform logits) and
    ``acc_chance = mean_i 1 / n_i`` (float32 scalars, no gradient)."""
    with torch.no_grad():
        n_real = valid.bool().sum(1).float()
        return {"acc": (logits.argmax(1) == labels).float().mean(), "chance": n_real.log().mean(),
                "acc_chance": (1.0 / n_real).mean()}


def mostly_hidden(mask: torch.Tensor, grid: Sequence[int], threshold: float = 0.5) -> torch.Tensor:
    """Coarse units of ``grid`` whose hidden fraction under a finer unit mask ``mask (N, 1, *gm)`` (1 = visible;
    ``gm`` a multiple of ``grid`` per axis) is at least ``threshold`` → ``(N, n)`` bool (C order over ``grid``)."""
    hidden = 1.0 - split_into_cells(mask.float(), grid).flatten(3).mean(3)[..., 0]         # (N, n)
    return hidden >= threshold - 1e-6


def min_mostly_hidden(n_coarse: int, cells_per_unit: int, n_hidden: int, threshold: float = 0.5) -> int:
    """Fewest coarse units that can be mostly hidden (:func:`mostly_hidden`) when ``n_hidden`` of the
    ``n_coarse · cells_per_unit`` fine cells are hidden, whatever the draw (pigeonhole)."""
    below = max(0, math.ceil(threshold * cells_per_unit - 1e-9) - 1)   # most hidden cells of a unit below threshold
    for e in range(n_coarse + 1):
        if e * cells_per_unit + (n_coarse - e) * below >= n_hidden:
            return e
    return n_coarse


def _per_unit_stats(x: torch.Tensor, unit: Sequence[int], eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and sqrt(var + eps) of ``x (N, C, *a)``, broadcast back to ``(N, C, *a)`` (for previews)."""
    grid = unit_grid(x.shape[2:], unit)
    u = split_into_cells(x.float(), grid)
    mean = u.flatten(3).mean(3)
    std = torch.sqrt(u.flatten(3).var(3, unbiased=False) + eps)

    def back(v):  # (N, n, C) -> (N, C, *a) by unit repetition
        n, _, c = v.shape
        v = v.transpose(1, 2).reshape(n, c, *grid)
        return torch.cat([expand_mask(v[:, i:i + 1], x.shape[2:]) for i in range(c)], dim=1)

    return back(mean), back(std)


def _mlp(c_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, dim), nn.GELU(), nn.Linear(dim, dim))


# ------------------------------------------------------------------------------------------------------------

#: the quantum multiples a MiM unit may be, most preferred first. CNN: 2q (the bottleneck is then masked too), else
#: q; Primus: q (a token), documentation/methods/mim.md "Primus"
CNN_UNIT_MULTIPLES = (2, 1)
PRIMUS_UNIT_MULTIPLES = (1,)


def _closest_divisor(P: int, limit: int, q: int, multiples: Sequence[int]) -> int:
    """The divisor of ``limit`` that is a multiple of ``m·q`` for the first ``m`` of ``multiples`` that has one,
    closest to P/6 (ties: the smaller); ``limit`` itself when none is."""
    for m in multiples:
        candidates = [d for d in range(m * q, limit + 1, m * q) if limit % d == 0]
        if candidates:
            return min(candidates, key=lambda d: (abs(d - P / 6), d))
    return limit


def _mim_u2(P: int, q: int, multiples: Sequence[int] = CNN_UNIT_MULTIPLES) -> int:
    """u2 per axis: a divisor of P, a multiple of q (2q preferred on the CNN), closest to P/6."""
    return _closest_divisor(P, P, q, multiples)


def _level1_mask_unit(P: int, unit1: int, q: int, multiples: Sequence[int] = CNN_UNIT_MULTIPLES) -> int:
    """Level-1 mask unit per axis: a divisor of the level-1 unit, multiple of q (2q preferred on the CNN), closest
    to P/6 (the paper masks a 6³ grid of level-1 tokens)."""
    return _closest_divisor(P, unit1, q, multiples)


def level1_gamma_cap(patch: Sequence[int], level1_unit: Sequence[int], mask_unit: Sequence[int], ratio: float) -> int:
    """Most level-2 volumes per sample that every level-1 mask allows: the fewest mostly hidden level-1 units."""
    n1 = int(np.prod([P // u for P, u in zip(patch, level1_unit)]))
    cells = int(np.prod([u // m for u, m in zip(level1_unit, mask_unit)]))
    return min_mostly_hidden(n1, cells, num_hidden_units(n1 * cells, ratio))


def mim_layout(patch: List[int], quantum: List[int], median_shape: Sequence[float],
               unit_multiples: Sequence[int] = CNN_UNIT_MULTIPLES) -> dict:
    """MiM (METHODS.md §6.4): X1 = r1 ⊙ P (r1 = 2, or 1 where 2P exceeds the median shape), level-1 grid g1 = r1
    (units of P/r1 in x1 = native P-sized level-2 regions), u2 ≈ P/6 (multiple of 2q), level 3 = a u2 region
    zoomed to P. ``unit_multiples``: the quantum multiples u2 and the level-1 mask unit may be
    (:data:`CNN_UNIT_MULTIPLES` / :data:`PRIMUS_UNIT_MULTIPLES`).

    Small-image fallback: when r1 = 1 on every axis (images smaller than 2P everywhere) a single level-1 unit
    would leave nothing visible next to the hidden one. Then X1 = P is split into halves (g1 = 2 wherever P/2 is
    still a multiple of q) and a level-2 volume is a hidden half upsampled to P (``level2_zoom`` = g1 / r1).
    """
    d = MiM.layout_defaults
    r1 = [1 if 2 * P > m else 2 for P, m in zip(patch, median_shape)]
    grid1 = list(r1)
    if int(np.prod(r1)) == 1:
        grid1 = [2 if P % (2 * q) == 0 else 1 for P, q in zip(patch, quantum)]
    u2 = [_mim_u2(P, q, unit_multiples) for P, q in zip(patch, quantum)]
    unit1 = [P // g for P, g in zip(patch, grid1)]
    mask_unit1 = [_level1_mask_unit(P, u, q, unit_multiples) for P, u, q in zip(patch, unit1, quantum)]
    cap = level1_gamma_cap(patch, unit1, mask_unit1, d["ratios"][0])
    return {"r1": r1, "level1_region": [r * P for r, P in zip(r1, patch)],
            "level1_unit": unit1, "level1_mask_unit": mask_unit1, "level2_zoom": [g // r for g, r in zip(grid1, r1)],
            "u2": u2, "level3_zoom": [P // u for P, u in zip(patch, u2)],
            "gamma": max(1, min(4, cap)), "align_stride": list(quantum), **copy.deepcopy(d)}


@dataclass
class MiMViews:
    """The three levels of one batch (shapes with B samples, γ, β from the layout, P the network input).

    Attributes:
        x1, x2, x3: ``(B, C, *P)``, ``(B·γ, C, *P)``, ``(B·γ·β, C, *P)`` network inputs.
        mask1, mask2, mask3: unit masks ``(B, 1, *gm)`` (``gm = P / level1_mask_unit``), ``(B·γ, 1, *n2)``,
            ``(B·γ·β, 1, *n2)``; 1 = visible.
        label12: ``(B·γ,)`` level-1 unit each x2 was cut from; label23: ``(B·γ·β,)`` level-2 unit of each x3.
        valid12: ``(B·γ, n1)`` bool, the alignment candidates of each x2 = the mostly hidden level-1 units of its
            parent; valid23: ``(B·γ·β, n2)`` bool, the hidden level-2 units of each x3's parent.
        box12: ``(B·γ, 2, 3)`` start/stop of each x2's region in X1 (native) coordinates.
        box23: ``(B·γ·β, 2, 3)`` start/stop of each x3's region in x2 coordinates.
    """
    x1: torch.Tensor
    mask1: torch.Tensor
    x2: torch.Tensor
    mask2: torch.Tensor
    label12: torch.Tensor
    box12: torch.Tensor
    x3: Optional[torch.Tensor]
    mask3: Optional[torch.Tensor]
    label23: Optional[torch.Tensor]
    box23: Optional[torch.Tensor]
    valid12: Optional[torch.Tensor] = None
    valid23: Optional[torch.Tensor] = None


@register
class MiM(SSLMethod):
    """Mask in Mask on a nnU-Net U-Net (``ResidualEncoderUNet`` / ``PlainConvUNet``), see module docstring.

    Attributes:
        patch: P (network input of every level); region: R1; r1; grid1: g1; unit1: level-1 unit (x1 coords);
        region2: native size R2 of a level-2 region; u2; grid2: n2 = P / u2; ratios; gamma; beta; alpha; tau;
        level_weights; target; fused: whether all levels share one masked forward.
        densify: :class:`Densify`; projector, aggregator: the alignment MLPs (C_tap → D → D).
    """

    name = "mim"
    trained_parts = ("encoder and reconstruction decoder (the MiM paper transfers the encoder only: use "
                     "ssl_nnunet_finetune --encoder-only for that protocol)")
    layout_defaults = {"ratios": [0.6, 0.6, 0.5], "beta": 2, "alpha": 0.1, "tau": 0.2, "proj_dim": 2048,
                       "target": "per_unit", "level_weights": [1.0, 1.0, 1.0], "candidate_position": True,
                       "context_grid": [2, 2, 2]}

    required_layout_keys = ("r1", "level1_region", "level1_unit", "u2", "gamma", "align_stride")

    @classmethod
    def variant_for(cls, architecture_family: str):
        """CNN: :class:`MiM` (sparse U-Net); Primus: :class:`PrimusMiM` (visible tokens through EVA)."""
        return {"cnn": MiM, "primus": PrimusMiM}.get(architecture_family)

    # ---------------------------------------------------------------------------------------------- planning
    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        """:func:`mim_layout` of the plan's patch; on the GPU profile the patch is capped at
        ``plans/profiles.json``'s ``mim_max_patch_size`` (a multiple of the total stride)."""
        patch, S = list(ctx.patch_size), ctx.total_stride
        if not ctx.is_cpu:
            from ssl_nnunet.plans import load_shipped
            cap = load_shipped("profiles.json")["gpu"]["mim_max_patch_size"]
            patch = [min(P, max(s, (cap // s) * s)) for P, s in zip(patch, S)]
        return patch, mim_layout(patch, ctx.mask_quantum, ctx.median_shape)

    @classmethod
    def finalize_layout(cls, pretrain_patch_size, layout, ctx):
        """gamma never exceeds the mostly hidden level-1 units that every mask has (the shipped overrides may ask
        for more)."""
        mask_unit = layout.get("level1_mask_unit", layout["level1_unit"])
        cap = level1_gamma_cap(pretrain_patch_size, layout["level1_unit"], mask_unit, layout["ratios"][0])
        layout["gamma"] = max(1, min(layout["gamma"], cap))
        return layout

    @classmethod
    def check_layout(cls, method_plan: dict, ssl_plan: dict):
        q = ssl_plan["mask_quantum"]
        median = ssl_plan.get("median_shape", [float("inf")] * 3)
        mi, mp = method_plan["layout"], method_plan["pretrain_patch_size"]
        warnings = []

        def fail(key, what):
            raise cls.layout_error(ssl_plan, key, what)

        if not divides(q, mi["level1_unit"]) or not divides(mi["level1_unit"], mp):
            fail("level1_unit", f"{mi['level1_unit']} must divide the patch {mp} and be a multiple of {q}")
        if not divides(mi["u2"], mp) or not divides(q, mi["u2"]):
            fail("u2", f"{mi['u2']} must divide the patch {mp} and be a multiple of {q}")
        if list(mi["level1_region"]) != [r * P for r, P in zip(mi["r1"], mp)]:
            fail("level1_region", f"{mi['level1_region']} must equal r1 {mi['r1']} times the patch {mp}")
        if any(r > md for r, md in zip(mi["level1_region"], median)):
            warnings.append(f"mim level-1 region {mi['level1_region']} exceeds the median image shape {median}")
        grid1 = [P // u for P, u in zip(mp, mi["level1_unit"])]
        region2 = [R // g for R, g in zip(mi["level1_region"], grid1)]
        if not divides(grid1, mi["level1_region"]) or not divides(region2, mp):
            fail("level1_unit", f"the native level-2 region level1_region / (patch / level1_unit) = {region2} "
                                f"must divide the patch {mp}")
        ratios = mi["ratios"]
        if len(ratios) != 3 or not all(0 < r < 1 for r in ratios):
            fail("ratios", f"{ratios} must be three mask ratios in (0, 1)")
        mask_unit = mi.get("level1_mask_unit", mi["level1_unit"])
        if not divides(q, mask_unit) or not divides(mask_unit, mi["level1_unit"]):
            fail("level1_mask_unit", f"{mask_unit} must divide level1_unit {mi['level1_unit']} and be a multiple of "
                                     f"{q}")
        n1, n2 = int(np.prod(grid1)), int(np.prod([P // u for P, u in zip(mp, mi["u2"])]))
        cap = level1_gamma_cap(mp, mi["level1_unit"], mask_unit, ratios[0])
        if n1 < 2:
            warnings.append(f"mim: the level-1 region {mi['level1_region']} has a single unit; 'ssl_nnunet_pretrain "
                            f"-m mim' will refuse this plan (use a smaller patch)")
        elif not 1 <= mi["gamma"] <= cap:
            fail("gamma", f"gamma {mi['gamma']} must lie in [1, {cap}] (level-1 units of {n1} that every mask leaves "
                          f"mostly hidden)")
        if not 0 <= mi["beta"] <= math.floor(ratios[1] * n2 + 0.5):
            fail("beta", f"beta {mi['beta']} exceeds the hidden level-2 units")
        return warnings

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        super().__init__(network, method_plan, ssl_plan, num_input_channels)
        check_unet(network)
        self._read_layout(len(network.encoder.strides[0]))

        n_out = getattr(network.decoder, "num_classes", num_input_channels)
        if n_out != num_input_channels:
            raise SSLInputError(f"MiM needs a network with num_classes = C_in = {num_input_channels}, got {n_out}")

        # sparse encoder: which stages are re-masked for each level's unit (input coordinates)
        cum = [list(s) for s in cumulative_strides(network)]
        rem1 = derive_remask_strides(network, self.mask_unit1)
        rem2 = derive_remask_strides(network, self.u2)
        if not rem1 or not rem2:
            raise SSLInputError(f"ssl layout of 'mim': level1_mask_unit {self.mask_unit1} and u2 {self.u2} must be "
                                f"multiples of the first stage's stride {cum[0]}")
        # one forward for all levels when mask 1 can be written on the u2 grid with the same re-masked stages
        self.fused = (all(a % b == 0 for a, b in zip(self.mask_unit1, self.u2))
                      and sorted(map(tuple, rem1)) == sorted(map(tuple, rem2)))
        convert_encoder_to_sparse(network)
        masked = [s in rem1 or s in rem2 for s in cum]
        self.densify = Densify(network.encoder.output_channels, network.encoder.conv_op, masked_stages=masked)

        # alignment tap: decoder map d_j with stride align_stride (d_j has the stride of encoder stage K-2-j)
        K = len(cum)
        taps = [j for j in range(K - 1) if cum[K - 2 - j] == self.align_stride]
        if not taps:
            raise SSLInputError(f"ssl layout of 'mim': align_stride {self.align_stride} is not the stride of a decoder "
                                f"stage (available: {[cum[K - 2 - j] for j in range(K - 1)]})")
        self.tap = taps[0]
        if any(u % a for u, a in zip(self.unit1, self.align_stride)) or any(
                u % a for u, a in zip(self.u2, self.align_stride)):
            raise SSLInputError(f"ssl layout of 'mim': align_stride {self.align_stride} must divide level1_unit "
                                f"{self.unit1} and u2 {self.u2}")
        c_tap = int(network.encoder.output_channels[K - 2 - self.tap])
        self._build_alignment_heads(c_tap)

    def _read_layout(self, ndim: int) -> None:
        """Sizes, grids, ratios, γ/β, α/τ, level weights and target of the layout (every backbone), checked."""
        lay = self.layout
        self.patch = per_axis_ints(self.method_plan["pretrain_patch_size"], ndim, "pretrain_patch_size", "mim")
        self.r1 = per_axis_ints(lay["r1"], ndim, "r1", "mim")
        self.region = per_axis_ints(lay["level1_region"], ndim, "level1_region", "mim")
        self.unit1 = per_axis_ints(lay["level1_unit"], ndim, "level1_unit", "mim")
        self.mask_unit1 = per_axis_ints(lay.get("level1_mask_unit", lay["level1_unit"]), ndim, "level1_mask_unit",
                                        "mim")
        self.u2 = per_axis_ints(lay["u2"], ndim, "u2", "mim")
        self.align_stride = per_axis_ints(lay["align_stride"], ndim, "align_stride", "mim")
        P = self.patch
        if self.region != [r * p for r, p in zip(self.r1, P)]:
            raise SSLInputError(f"ssl layout of 'mim': level1_region {self.region} must equal r1 {self.r1} times the "
                                f"patch {P}")
        try:
            self.grid1 = list(unit_grid(P, self.unit1))
            self.mask_grid1 = list(unit_grid(P, self.mask_unit1))
            self.grid2 = list(unit_grid(P, self.u2))
        except ValueError as e:
            raise SSLInputError(f"ssl layout of 'mim': {e}") from None
        if any(u % m for u, m in zip(self.unit1, self.mask_unit1)):
            raise SSLInputError(f"ssl layout of 'mim': level1_mask_unit {self.mask_unit1} must divide level1_unit "
                                f"{self.unit1}")
        if any(R % g for R, g in zip(self.region, self.grid1)):
            raise SSLInputError(f"ssl layout of 'mim': the level-1 grid {self.grid1} does not divide the level-1 "
                                f"region {self.region}")
        self.region2 = [R // g for R, g in zip(self.region, self.grid1)]
        if any(p % r for p, r in zip(P, self.region2)):
            raise SSLInputError(f"ssl layout of 'mim': the native level-2 region {self.region2} must divide the patch "
                                f"{P} (integral level-2 zoom)")
        zoom2 = [p // r for p, r in zip(P, self.region2)]
        if "level2_zoom" in lay and per_axis_ints(lay["level2_zoom"], ndim, "level2_zoom", "mim") != zoom2:
            raise SSLInputError(f"ssl layout of 'mim': level2_zoom {lay['level2_zoom']} != patch / (level1_region / "
                                f"grid) = {zoom2}")
        if "level3_zoom" in lay and per_axis_ints(lay["level3_zoom"], ndim, "level3_zoom", "mim") != self.grid2:
            raise SSLInputError(f"ssl layout of 'mim': level3_zoom {lay['level3_zoom']} != patch / u2 = {self.grid2}")
        n1, n2, nm = math.prod(self.grid1), math.prod(self.grid2), math.prod(self.mask_grid1)
        if n1 < 2:
            raise SSLInputError(
                f"ssl layout of 'mim': the level-1 region {self.region} has a single unit (level1_unit "
                f"{self.unit1} = patch {P}), so there is no hidden unit to cut level 2 from next to a visible one. "
                f"The images are smaller than two patches on every axis; re-run the SSL planner (it then splits "
                f"the patch into halves, the zoom fallback) or use a smaller patch / another -profile.")

        self.ratios = [float(r) for r in lay["ratios"]]
        if len(self.ratios) != 3 or not all(0.0 < r < 1.0 for r in self.ratios):
            raise SSLInputError(f"ssl layout of 'mim': ratios must be three values in (0, 1), got {self.ratios}")
        self.gamma, self.beta = int(lay["gamma"]), int(lay["beta"])
        self.n_hidden = [num_hidden_units(nm, self.ratios[0]), num_hidden_units(n2, self.ratios[1]),
                         num_hidden_units(n2, self.ratios[2])]
        for lvl, (n, h) in enumerate(zip((nm, n2, n2), self.n_hidden), start=1):
            if not 1 <= h < n:
                raise SSLInputError(f"ssl layout of 'mim': level {lvl} hides {h} of {n} units with ratio "
                                    f"{self.ratios[lvl - 1]}; at least one hidden and one visible unit are needed")
        self.gamma_cap = min_mostly_hidden(n1, nm // n1, self.n_hidden[0])
        if not 1 <= self.gamma <= self.gamma_cap:
            raise SSLInputError(f"ssl layout of 'mim': gamma = {self.gamma} must lie in [1, {self.gamma_cap}] "
                                f"(level-1 units that every level-1 mask leaves mostly hidden)")
        if not 0 <= self.beta <= self.n_hidden[1]:
            raise SSLInputError(f"ssl layout of 'mim': beta = {self.beta} must lie in [0, {self.n_hidden[1]}] "
                                f"(hidden level-2 units)")
        self.alpha = float(lay["alpha"])
        self.tau = float(lay["tau"])
        if self.tau <= 0:
            raise SSLInputError(f"ssl layout of 'mim': tau must be > 0, got {self.tau}")
        self.level_weights = [float(w) for w in lay["level_weights"]]
        if len(self.level_weights) != 3:
            raise SSLInputError(f"ssl layout of 'mim': level_weights must have 3 entries, got {self.level_weights}")
        self.target = str(lay["target"])
        if self.target not in TARGETS:
            raise SSLInputError(f"ssl layout of 'mim': target must be one of {TARGETS}, got '{self.target}'")

    def _build_alignment_heads(self, c_tap: int) -> None:
        """Projector (candidates: the coarser volume's units, ``Linear(c_tap, D) → GELU → Linear(D, D)``),
        aggregator (context: the finer volume's tap map averaged onto ``context_grid``, flattened, same MLP
        shape) and the optional unit-position embeddings of the candidates (``candidate_position``)."""
        lay = self.layout
        self.proj_dim = int(lay["proj_dim"])
        self.projector = _mlp(c_tap, self.proj_dim)   # candidates (coarser volume's units)
        self.context_grid = per_axis_ints(lay["context_grid"], len(self.patch), "context_grid", "mim")
        tap_size = [p // a for p, a in zip(self.patch, self.align_stride)]
        if any(g < 1 or t % g for g, t in zip(self.context_grid, tap_size)):
            raise SSLInputError(f"ssl layout of 'mim': context_grid {self.context_grid} must divide the alignment map "
                                f"{tap_size} (patch / align_stride)")
        self.aggregator = _mlp(c_tap * math.prod(self.context_grid), self.proj_dim)  # context vector (finer volume)
        # unit-position embeddings of the candidates (the role of a ViT decoder's position embedding)
        self.candidate_position = bool(lay["candidate_position"])
        self.position12 = self.position23 = None
        if self.candidate_position:
            self.position12 = nn.Parameter(0.1 * torch.randn(math.prod(self.grid1), c_tap))
            if self.beta > 0:
                self.position23 = nn.Parameter(0.1 * torch.randn(math.prod(self.grid2), c_tap))

    # --------------------------------------------------------------------------------------------------------
    @classmethod
    def required_patch_size(cls, method_plan: dict) -> List[int]:
        """The level-1 region ``r1 ⊙ P``: the loader cuts X1 at native resolution."""
        return [int(v) for v in method_plan["layout"]["level1_region"]]

    def num_passes(self) -> int:
        """Network passes (volumes through the U-Net) per input sample: 1 + γ + γβ."""
        return 1 + self.gamma + self.gamma * self.beta

    def make_views(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> MiMViews:
        """Build the three levels from ``batch (B, C, *level1_region)`` on ``batch.device`` (see :class:`MiMViews`).

        Random draws, in this order, all with ``generator`` (on its own device, results moved to the batch's):
        mask1, the γ hidden level-1 units, mask2, the β hidden level-2 units, mask3.
        """
        if batch.dim() != 2 + len(self.patch) or list(batch.shape[2:]) != self.region:
            raise ValueError(f"MiM expects a batch (B, C, *level1_region) = (B, C, {', '.join(map(str, self.region))}),"
                             f" got shape {tuple(batch.shape)}")
        dev = batch.device
        B = batch.shape[0]
        x1 = _avg_pool(batch, self.r1)
        mask1 = random_block_mask(B, self.mask_grid1, self.ratios[0], device=dev, generator=generator)
        eligible1 = mostly_hidden(mask1, self.grid1)                                           # (B, n1)
        idx2 = sample_hidden_units(eligible1, self.gamma, generator, hidden=eligible1)         # (B, γ)
        units1 = split_into_cells(batch, self.grid1)                                          # (B, n1, C, *R2)
        x2 = torch.gather(units1, 1, idx2.view(B, self.gamma, *([1] * (units1.dim() - 2))).expand(
            B, self.gamma, *units1.shape[2:]))
        x2 = resize_to(x2.reshape(B * self.gamma, *units1.shape[2:]), self.patch)
        label12 = idx2.reshape(-1)
        box12 = unit_boxes(label12, self.grid1, self.region2)
        n2v = B * self.gamma
        mask2 = random_block_mask(n2v, self.grid2, self.ratios[1], device=dev, generator=generator)
        x3 = mask3 = label23 = box23 = valid23 = None
        valid12 = eligible1.repeat_interleave(self.gamma, dim=0)
        if self.beta > 0:
            idx3 = sample_hidden_units(mask2, self.beta, generator)                      # (Bγ, β)
            units2 = split_into_cells(x2, self.grid2)                                         # (Bγ, n2, C, *u2)
            x3 = torch.gather(units2, 1, idx3.view(n2v, self.beta, *([1] * (units2.dim() - 2))).expand(
                n2v, self.beta, *units2.shape[2:]))
            x3 = resize_to(x3.reshape(n2v * self.beta, *units2.shape[2:]), self.patch)
            label23 = idx3.reshape(-1)
            box23 = unit_boxes(label23, self.grid2, self.u2)
            mask3 = random_block_mask(n2v * self.beta, self.grid2, self.ratios[2], device=dev, generator=generator)
            valid23 = (mask2.flatten(1) == 0).repeat_interleave(self.beta, dim=0)
        return MiMViews(x1, mask1, x2, mask2, label12, box12, x3, mask3, label23, box23, valid12, valid23)

    def _levels(self, views: MiMViews):
        """``[(x_l, mask_l, unit_l)]`` for the levels that exist (unit in x_l coordinates)."""
        out = [(views.x1, views.mask1, self.mask_unit1), (views.x2, views.mask2, self.u2)]
        if views.x3 is not None:
            out.append((views.x3, views.mask3, self.u2))
        return out

    def masked_forward(self, views: MiMViews, fused: Optional[bool] = None
                       ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Sparse masked forward of every level → ``[(tap_l (N_l, C_tap, *P/align_stride), rec_l (N_l, C, *P))]``.

        ``fused`` (default: ``self.fused``) runs all levels as one batch, the level-1 mask repeated onto the u2
        grid; otherwise one forward per level. Both give the same result (instance norms are per sample).
        """
        levels = self._levels(views)
        fused = self.fused if fused is None else fused
        if fused:
            x = torch.cat([lv[0] for lv in levels])
            masks = [expand_mask(views.mask1, self.grid2)] + [lv[1] for lv in levels[1:]]
            _, dec, rec = sparse_masked_forward(self.network, x, torch.cat(masks), self.densify)
            sizes = [lv[0].shape[0] for lv in levels]
            return list(zip(dec[self.tap].split(sizes), rec.split(sizes)))
        out = []
        for x, m, _ in levels:
            _, dec, rec = sparse_masked_forward(self.network, x, m, self.densify)
            out.append((dec[self.tap], rec))
        return out

    def make_target(self, x: torch.Tensor, unit: Sequence[int]) -> torch.Tensor:
        """Reconstruction target of one level, float32 ``(N, C, *P)``."""
        if self.target == "per_unit":
            return per_unit_target(x, unit)
        return x.detach().float()

    def alignment(self, tap_coarse: torch.Tensor, grid_coarse: Sequence[int], tap_fine: torch.Tensor,
                  labels: torch.Tensor, valid: Optional[torch.Tensor] = None,
                  position: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE between the finer volumes' contexts and their parents' unit candidates.

        Args:
            tap_coarse: ``(N_c, C_tap, *f)`` tap maps of the coarser volumes (stop-gradient applied here).
            grid_coarse: unit grid of the coarser level (g1 or n2).
            tap_fine: ``(N_f, C_tap, *f)`` tap maps of the finer volumes, ``N_f = k N_c``; volume i's parent is i // k.
            labels: ``(N_f,)`` unit of the parent each finer volume was cut from.
            valid: ``(N_f, n)`` bool, the real candidates (``views.valid12`` / ``valid23``); None = all units.
            position: optional ``(n, C_tap)`` unit-position embedding added to the candidates' unit means.
        Returns:
            ``(loss, logits (N_f, n))``.
        """
        k = tap_fine.shape[0] // tap_coarse.shape[0]
        units = unit_mean_features(tap_coarse.detach(), grid_coarse)                          # (N_c, n, C_tap)
        if position is not None:
            units = units + position.float()
        candidates = self.projector(units)                                                     # (N_c, n, D)
        context = self.aggregator(split_into_cells(tap_fine.float(), self.context_grid).flatten(3).mean(3)
                                  .flatten(1))                                                  # (N_f, D)
        return info_nce(context, candidates.repeat_interleave(k, dim=0), labels, self.tau, valid)

    def forward(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``batch (B, C_in, *level1_region)`` → ``{"loss", "rec_l1", "rec_l2", "rec_l3", "align_12", "align_23"}``
        plus, per alignment term ``a``, ``a_chance`` (its value for content-free logits: mean log of the number
        of real candidates), ``a_acc`` and ``a_acc_chance`` (float32 scalars; only ``loss`` carries gradient)."""
        views = self.make_views(batch, generator)
        outs = self.masked_forward(views)
        rec_terms = []
        for (x, m, unit), (_, rec) in zip(self._levels(views), outs):
            rec_terms.append(masked_mse(rec.float(), self.make_target(x, unit), expand_mask(m, x.shape[2:])))
        align12, logits12 = self.alignment(outs[0][0], self.grid1, outs[1][0], views.label12, views.valid12,
                                           self.position12)
        stats = {"align_12": alignment_stats(logits12, views.label12, views.valid12)}
        zero = batch.new_zeros((), dtype=torch.float32)
        if views.x3 is not None:
            align23, logits23 = self.alignment(outs[1][0], self.grid2, outs[2][0], views.label23, views.valid23,
                                               self.position23)
            stats["align_23"] = alignment_stats(logits23, views.label23, views.valid23)
        else:
            rec_terms.append(zero)
            align23 = zero
            stats["align_23"] = {"acc": zero, "chance": zero, "acc_chance": zero}
        loss = sum(w * r for w, r in zip(self.level_weights, rec_terms)) + self.alpha * (align12 + align23)
        out = {"loss": loss, "rec_l1": rec_terms[0].detach(), "rec_l2": rec_terms[1].detach(),
               "rec_l3": rec_terms[2].detach(), "align_12": align12.detach(), "align_23": align23.detach()}
        for term, st in stats.items():
            out.update({f"{term}_{k}": v for k, v in st.items()})
        return out

    @torch.no_grad()
    def previews(self, batch: torch.Tensor) -> Dict[str, Sequence[torch.Tensor]]:
        """Paper Fig. 9: one row per level, columns input / masked input / reconstruction (first volume of the
        level, sample 0, channel 0; 3D tensors (a0, a1, a2), float32 on CPU).

        The reconstruction shows the input at visible voxels and the prediction at hidden ones; with the
        ``per_unit`` target the prediction is mapped back to intensities with each unit's mean and std (display
        only). Masks and sampled units use a fixed seed so previews are comparable across epochs.
        """
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0)
        views = self.make_views(batch[:1], gen)
        outs = self.masked_forward(views)
        rows = {}
        for lvl, ((x, m, unit), (_, rec)) in enumerate(zip(self._levels(views), outs), start=1):
            x, rec = x[:1].float(), rec[:1].float()
            visible = expand_mask(m[:1], x.shape[2:]).bool()
            if self.target == "per_unit":
                mean, std = _per_unit_stats(x, unit)
                rec = rec * std + mean
            rows[f"level {lvl}: input | masked | reconstruction"] = [
                x[0, 0].cpu(), torch.where(visible, x, 0.0)[0, 0].cpu(), torch.where(visible, x, rec)[0, 0].cpu()]
        return rows


class PrimusMiM(MiM):
    """Mask in Mask on Primus (documentation/methods/mim.md, "Primus"): the paper's native setting, token masks.

    The views, the reconstruction terms, the alignment and the logged terms are :class:`MiM`'s; only the network
    pass differs. Every unit (``level1_unit``, ``level1_mask_unit``, ``u2``) is a multiple of the token size
    ``t`` (the planner's mask quantum), so each level's mask is a token mask ``(N_l, 1, *P/t)``. Per level
    (one call each, as the levels keep different numbers of tokens):

    * ``keep (N_l, K_l)`` = the visible tokens; ``down_projection`` + EVA on those ``K_l`` tokens only
      (:func:`~ssl_nnunet.backbones.primus.encode_tokens`);
    * a light :class:`~ssl_nnunet.backbones.primus.TokenDecoder` shared by the levels (width ``decoder_width · E``,
      ``decoder_depth`` blocks; mask token at the hidden tokens) → decoded tokens ``(N_l, N, d)``;
    * the pixel head of the Primus MAE (:func:`~ssl_nnunet.methods.mae.primus_pixels`, ``pixel_head`` linear
      | up_projection) → the reconstruction ``(N_l, C, *P)``; ``L_R^l`` on the hidden voxels, i.e. the hidden
      tokens (``target`` per_unit: normalised per mask unit, MAE's ``norm_pix_loss`` when the unit is a token);
    * the alignment tap = the decoded tokens as a map ``(N_l, d, *P/t)`` (before the pixel head): candidates are
      its means over the coarser volume's units (stop-gradient, hidden units only), the context its mean over
      all tokens of the finer volume (defaults ``context_grid`` [1, 1, 1], ``candidate_position`` false: the
      decoder tokens carry the decoder's position embedding, as the paper's do).

    Primus' position embedding is for the plan's grid, so every level enters at exactly the plan's patch P
    (``pretrain_patch_size`` must be the network's input; no GPU patch cap as on the CNN).

    Layout keys: :class:`MiM`'s (``align_stride`` = the token size) and ``decoder_width`` 0.5, ``decoder_depth``
    1, ``decoder_heads`` 4, ``pixel_head`` linear. Export keeps ``down_projection`` + ``eva``.
    """

    trained_parts = ("down_projection and eva (each level's encoder saw its visible tokens only); the pretraining "
                     "decoder and up_projection are not transferred (the target gets a fresh up_projection)")
    #: the decoder tokens carry the TokenDecoder's position embedding (the paper's setting), so the candidates need
    #: no extra unit-position embedding and the context is the mean over all tokens
    alignment_defaults = {"candidate_position": False, "context_grid": [1, 1, 1]}
    layout_defaults = {**MiM.layout_defaults, **alignment_defaults, **PRIMUS_DECODER_DEFAULTS}

    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        """:func:`mim_layout` of the plan's patch with token-multiple units (:data:`PRIMUS_UNIT_MULTIPLES`)."""
        patch = list(ctx.patch_size)
        layout = mim_layout(patch, ctx.mask_quantum, ctx.median_shape, PRIMUS_UNIT_MULTIPLES)
        return patch, {**layout, **copy.deepcopy(cls.alignment_defaults), **copy.deepcopy(PRIMUS_DECODER_DEFAULTS)}

    @classmethod
    def check_layout(cls, method_plan: dict, ssl_plan: dict):
        warnings = super().check_layout(method_plan, ssl_plan)
        if list(method_plan["layout"]["align_stride"]) != list(ssl_plan["mask_quantum"]):
            raise cls.layout_error(ssl_plan, "align_stride", f"{method_plan['layout']['align_stride']} must be the "
                                                             f"Primus token size {ssl_plan['mask_quantum']}")
        return warnings

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        from ssl_nnunet.backbones.primus import is_primus, token_grid
        SSLMethod.__init__(self, network, method_plan, ssl_plan, num_input_channels)
        if not is_primus(network):
            raise SSLInputError(f"the Primus MiM needs a Primus network, got {type(network).__name__}")
        self._read_layout(3)
        self.token = [int(t) for t in network.down_projection.proj.kernel_size]
        for key, unit in (("level1_unit", self.unit1), ("level1_mask_unit", self.mask_unit1), ("u2", self.u2)):
            if any(u % t for u, t in zip(unit, self.token)):
                raise SSLInputError(f"ssl layout of 'mim' (Primus): {key} {unit} is not a multiple of the token size "
                                    f"{self.token}; re-run the SSL planner on the Primus plan")
        if self.align_stride != self.token:
            raise SSLInputError(f"ssl layout of 'mim' (Primus): align_stride {self.align_stride} must be the token "
                                f"size {self.token} (the alignment reads the decoded tokens)")
        try:
            self.token_grid = list(token_grid(self.patch, self.token))
        except SSLInputError as e:
            raise SSLInputError(f"ssl plan of 'mim': {e}") from None
        n_pos = network.eva.pos_embed.shape[1] if network.eva.pos_embed is not None else math.prod(self.token_grid)
        if n_pos != math.prod(self.token_grid):
            raise SSLInputError(f"ssl plan of 'mim' (Primus): pretrain_patch_size {self.patch} gives "
                                f"{math.prod(self.token_grid)} tokens, the network's position embedding has {n_pos}; "
                                f"the patch must be the plan's patch_size (the Primus input_shape)")
        self.fused = False
        self.densify = None
        self.decoder, self.pixel_head = build_primus_decoder(network, self.layout, self.token_grid,
                                                             num_input_channels, "mim")
        self._build_alignment_heads(int(self.decoder.norm.normalized_shape[0]))

    def untrained_parameters(self):
        """With the linear pixel head the network's ``up_projection`` never runs in pretraining."""
        return primus_untrained_up_projection(self.network, self.pixel_head)

    def masked_forward(self, views: MiMViews, fused: Optional[bool] = None
                       ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Every level through the visible-token encoder, the token decoder and the pixel head →
        ``[(tap_l (N_l, d, *P/t), rec_l (N_l, C, *P))]`` (``fused`` does not apply: one pass per level)."""
        from ssl_nnunet.backbones.primus import encode_tokens, token_indices, tokens_to_volume
        out = []
        for x, m, _ in self._levels(views):
            keep = token_indices(expand_mask(m, self.token_grid))
            feats = self.decoder.features(encode_tokens(self.network, x, keep), keep)     # (N_l, N, d)
            rec = primus_pixels(self.network, self.decoder.out(feats), self.token_grid, self.token, self.pixel_head)
            out.append((tokens_to_volume(feats, self.token_grid), rec))
        return out
