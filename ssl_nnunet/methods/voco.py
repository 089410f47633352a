"""VoCo: volume contrast with contextual-position prediction (METHODS.md §4; Wu et al., CVPR 2024).

Views (all torch ops on the batch's device). The loader cuts one region ``R = g ⊙ c`` per batch element,
placed by ``region_mode`` (:mod:`ssl_nnunet.data.voco_regions`, declared by :meth:`VoCo.make_sampler`):

* ``body_box`` (default): at the plan's spacing, centred at the case's body-box centre with a jitter of
  ±``region_jitter``·R per axis (0.1), so base ``j`` covers roughly the same anatomy in every scan;
* ``body_resized`` (the paper): the whole body box, resized on the CPU to the staging size
  ``S = ceil(resize_stage · R)`` (fixed batch shape), then to ``R`` on the device (trilinear) in
  :meth:`VoCo.make_views`;
* ``native``: centre uniform inside the body box (base indices then mean nothing across scans).

Per region:

* **bases**: the region split into the ``n = g0·g1·g2`` non-overlapping crops of size ``c`` (base grid ``g``,
  ``g = 1`` on the out-of-plane axis). Base ``j`` is grid cell ``(k0, k1, k2)`` with ``j = (k0·g1 + k1)·g2 + k2``
  (C order over the grid, nnU-Net axis order ``a0, a1, a2``);
* **target crops**: ``n_t`` crops of size ``c`` fully inside R, start ``s_ax`` uniform in ``[0, R_ax − c_ax]``;
* **position labels**: ``y_j = |crop ∩ base_j| / |crop| = Π_ax ov_ax(k_ax)`` with
  ``ov_ax(k) = max(0, min(s+c, (k+1)c) − max(s, kc)) / c``; ``Σ_j y_j = 1``, at most ``2^(#split axes)``
  non-zero entries;
* **augmentation** (every base and target crop independently): flips along each axis (p ``p_flip``), rot90 in
  the in-plane plane (the two axes other than the out-of-plane one; p ``p_rot90``, k ∈ {1, 2, 3}, only 180° if
  the in-plane crop is not square) and an intensity shift ``U(−shift, shift)`` (p ``p_shift``).

Network: all ``B·(n + n_t)`` crops ``(N, C, c0, c1, c2)`` pass the **encoder only** in one stacked batch;
embedding = ``concat_k GAP(e_k)`` ``(N, ΣC_k)`` → projector ``Linear → Norm → ReLU → … → Linear``
(``proj_dims``; Norm = BatchNorm1d over all crops of the step, no affine, batch statistics always, or
LayerNorm without affine) → ``(N, D)``. Bases give ``q (B, n, D)``, target crops ``p (B, n_t, D)``.

Loss (float32), ``cos(a, b) = a·b / (‖a‖‖b‖ + 1e-8)``:

* logits ``l (B, n_t, n) = clamp(cos(p, q), 0, 1)`` (ReLU'd cosine). ``base_gradient = "prediction"``
  (default, as the authors' later code): the bases get L_pred's gradient too; ``"stop"`` (the paper's Eq. 1):
  ``cos(p, sg(q))``, the bases learn only from L_reg;
* ``loss_variant = "paper"`` (default): Eq. 2–3 ``d = clamp(|y − l|, 0, 1)``,
  ``L_pred = −mean_{b,t,j} log(1 − d + 1e-6)``; Eq. 4–5 ``s_jk = cos(q_j, q_k)`` (bases carry gradient),
  ``L_reg = mean_b 2/(n(n−1)) Σ_{j<k} |s_jk|``;
* ``loss_variant = "official"`` (the authors' later code): ``L_pred = mean_{b,t} Σ_{j: y_j>0} y_j·(−log(1 − d_j
  + 1e-6)) + mean_{(b,t,j): y_j=0} l²``; ``L_reg = mean_{b, j<k} ReLU(s_jk)²``;
* total ``L = L_pred + λ·L_reg`` (``lambda_reg``, 1 by default).

Optional EMA teacher (``use_ema_teacher``; the v2 code and the fix nnssl users reported): a copy of encoder +
projector, updated after every optimizer step ``θ_t ← μ·θ_t + (1 − μ)·θ_s``; logits become
``½[clamp(cos(p_s, sg(q_t))) + clamp(cos(sg(p_t), q_s))]``, so in this mode the student bases also receive a
prediction gradient (none with ``base_gradient = "stop"``); ``L_reg`` stays on the student bases.

Logged terms: ``L_pred``, ``L_reg``, ``pos_acc`` (:func:`position_accuracy` on the *raw* cosines, before the
clamp, so clamped zeros do not tie; tied maxima get fractional credit), ``pos_acc_chance = 1/n`` and
``L_pred_zero`` = L_pred of all-zero logits on the same labels: the value of the trivial solution (every
embedding orthogonal to every base). L_pred below it means the positions are being predicted; L_pred falling
*to* it means the embeddings are collapsing to orthogonal.

Export: only the encoder is trained. The decoder's own modules (``transpconvs``, ``stages``, ``seg_layers``) are
frozen (``requires_grad = False``) so they stay bit-exactly at their initialisation — also under weight decay
and DDP — and are exported as such (nnU-Net needs every key).

Layout keys (``method_plan["layout"]``):
    crop_size        [c0, c1, c2] base/target crop = network input (multiple of the total stride)
    base_grid        [g0, g1, g2]
    region_size      [R0, R1, R2] = base_grid ⊙ crop_size (what the loader cuts)
    n_target_crops   n_t (4; CPU 2)
    lambda_reg       λ (1.0)
    loss_variant     "paper" | "official"
    region_mode      "body_box" | "body_resized" | "native" (see Views)
    region_jitter    0.1: body_box centre jitter, fraction of the region per axis
    resize_stage     2: body_resized staging size S = ceil(stage · R) (loader → device)
    base_gradient    "prediction" | "stop" (stop-gradient on the bases in L_pred, Eq. 1)
    proj_dims        [2048, 2048, 2048] (CPU [256, 256, 256])
    projector_norm   "batch" | "layer" ("batch" falls back to "layer" below 8 crops per step)
    logit_clamp      "hard" (ReLU'd cosine, the reference code) | "straight_through" (same value, identity gradient)
    pool             "avg" (GAP per encoder stage) | "avgmax" (GAP and global max pool concatenated)
    use_ema_teacher  false
    ema_momentum     0.9 (constant) or [μ0, μ1] (cosine schedule μ0 → μ1 over the run)
    augmentation     {"p_flip": 0.2, "p_rot90": 0.2, "p_shift": 0.1, "shift": 0.1}

Primus (:class:`PrimusVoCo`, ``VoCo.variant_for("primus")``): the same views and losses; every crop is resized
to the plan's patch P (Primus' fixed input) and embedded as the mean of its encoded tokens
(documentation/methods/voco.md, "Primus").
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ssl_nnunet.data.samplers import SamplerSpec
from ssl_nnunet.data.voco_regions import REGION_MODES, AnchoredRegionSampler, resize_regions, staging_size
from ssl_nnunet.methods import register
from ssl_nnunet.methods.base import PlanningContext, SSLMethod, divides
from ssl_nnunet.methods.ema import frozen_copy
from ssl_nnunet.methods.features import check_unet, cumulative_strides, encoder_forward
from ssl_nnunet.methods.helpers import per_axis_ints, split_into_cells, uniform
from ssl_nnunet.utilities.errors import SSLInputError

LOSS_VARIANTS = ("paper", "official")
BASE_GRADIENTS = ("prediction", "stop")
LOGIT_CLAMPS = ("hard", "straight_through")
PROJECTOR_NORMS = ("batch", "layer")
POOLS = ("avg", "avgmax")
#: below this many crops per step a BatchNorm1d projector is replaced by LayerNorm (METHODS.md §4.4)
MIN_CROPS_FOR_BATCHNORM = 8
DEFAULT_AUGMENTATION = {"p_flip": 0.2, "p_rot90": 0.2, "p_shift": 0.1, "shift": 0.1}
LOG_EPS = 1e-6
COS_EPS = 1e-8

__all__ = [
    "VoCo",
    "Projector",
    "random_crop_starts",
    "extract_crops",
    "position_labels",
    "augment_crops",
    "pairwise_cosine",
    "prediction_loss",
    "regularisation_loss",
    "position_accuracy",
]


# ------------------------------------------------------------------------------------------------ views

def random_crop_starts(batch_size: int, n_crops: int, region: Sequence[int], crop: Sequence[int], device=None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Integer starts ``(B, n_t, 3)`` (int64), uniform in ``[0, R_ax − c_ax]``: every crop lies fully inside R."""
    hi = torch.tensor([int(r) - int(c) for r, c in zip(region, crop)], dtype=torch.float32, device=device)
    if bool((hi < 0).any()):
        raise ValueError(f"crop {tuple(crop)} is larger than the region {tuple(region)}")
    u = uniform((batch_size, n_crops, len(crop)), device, generator)
    return torch.clamp(torch.floor(u * (hi + 1)), max=hi).long()


def extract_crops(region: torch.Tensor, starts: torch.Tensor, crop: Sequence[int]) -> torch.Tensor:
    """Cut crops of size ``c`` at ``starts (B, n_t, 3)`` from ``region (B, C, R0, R1, R2)`` → ``(B, n_t, C, *c)``.

    One gather by advanced indexing (no Python loop over crops, no host synchronisation).
    """
    b, n_t = starts.shape[:2]
    dev = region.device
    starts = starts.to(dev)
    c0, c1, c2 = (int(c) for c in crop)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1, 1)
    i0 = starts[..., 0].view(b, n_t, 1, 1, 1) + torch.arange(c0, device=dev).view(1, 1, c0, 1, 1)
    i1 = starts[..., 1].view(b, n_t, 1, 1, 1) + torch.arange(c1, device=dev).view(1, 1, 1, c1, 1)
    i2 = starts[..., 2].view(b, n_t, 1, 1, 1) + torch.arange(c2, device=dev).view(1, 1, 1, 1, c2)
    channels_last = region.permute(0, 2, 3, 4, 1)          # (B, R0, R1, R2, C)
    crops = channels_last[bi, i0, i1, i2]                  # (B, n_t, c0, c1, c2, C)
    return crops.permute(0, 1, 5, 2, 3, 4).contiguous()


def position_labels(starts: torch.Tensor, crop: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Overlap fractions ``y (B, n_t, n)`` (float32) of crops at ``starts (B, n_t, 3)`` with the base grid.

    ``y_j = Π_ax ov_ax(k_ax(j))``, ``ov_ax(k) = max(0, min(s + c, (k+1)·c) − max(s, k·c)) / c``, base order as in
    :func:`ssl_nnunet.methods.helpers.split_into_cells`.
    """
    s = starts.float()
    out = None
    for ax, (c, g) in enumerate(zip(crop, grid)):
        k = torch.arange(int(g), device=s.device, dtype=torch.float32)
        lo = torch.maximum(s[..., ax:ax + 1], k * c)
        hi = torch.minimum(s[..., ax:ax + 1] + c, (k + 1) * c)
        ov = torch.clamp(hi - lo, min=0) / float(c)        # (B, n_t, g_ax)
        out = ov if out is None else (out.unsqueeze(-1) * ov.unsqueeze(-2)).flatten(-2)
    return out


def augment_crops(crops: torch.Tensor, in_plane_axes: Tuple[int, int], p_flip: float = 0.2, p_rot90: float = 0.2,
                  p_shift: float = 0.1, shift: float = 0.1,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Independent augmentation of every crop of ``crops (N, C, c0, c1, c2)`` (same shape back).

    Flip along each spatial axis with probability ``p_flip``; with probability ``p_rot90`` a rotation by
    k·90°, k ∈ {1, 2, 3}, in the plane of ``in_plane_axes`` (spatial axis indices; only k = 2 when the crop is
    not square in that plane); with probability ``p_shift`` add ``U(−shift, shift)`` to all voxels of the crop.
    Implemented with ``torch.where`` over the whole stack, so there is no per-crop Python branching.
    """
    n = crops.shape[0]
    dev = crops.device
    bshape = (n,) + (1,) * (crops.dim() - 1)
    x = crops
    for ax in range(crops.dim() - 2):
        if p_flip > 0:
            flag = uniform((n,), dev, generator) < p_flip
            x = torch.where(flag.view(bshape), x.flip(2 + ax), x)
    if p_rot90 > 0:
        a, b = (2 + in_plane_axes[0], 2 + in_plane_axes[1])
        flag = uniform((n,), dev, generator) < p_rot90
        k = torch.floor(uniform((n,), dev, generator) * 3).long() + 1  # 1, 2 or 3
        square = x.shape[a] == x.shape[b]
        if square:
            rotated = torch.where((k == 1).view(bshape), torch.rot90(x, 1, (a, b)),
                                  torch.where((k == 2).view(bshape), torch.rot90(x, 2, (a, b)),
                                              torch.rot90(x, 3, (a, b))))
        else:
            rotated = torch.rot90(x, 2, (a, b))
        x = torch.where(flag.view(bshape), rotated, x)
    if p_shift > 0 and shift > 0:
        flag = (uniform((n,), dev, generator) < p_shift).to(x.dtype)
        offset = (uniform((n,), dev, generator) * 2 - 1).to(x.dtype) * shift * flag
        x = x + offset.view(bshape)
    return x


# ------------------------------------------------------------------------------------------------ heads

class Projector(nn.Module):
    """``Linear(d_in, d_0) → Norm → ReLU → … → Linear(d_{L-2}, d_{L-1})``: ``(N, d_in)`` → ``(N, d_{L-1})``.

    ``norm = "batch"``: ``BatchNorm1d`` without affine and without running statistics (batch statistics in
    train and eval mode, computed over all N crops of the step); ``"layer"``: ``LayerNorm`` without affine
    (each embedding normalised over its own features).
    """

    def __init__(self, in_dim: int, dims: Sequence[int], norm: str = "batch"):
        super().__init__()
        if norm not in PROJECTOR_NORMS:
            raise ValueError(f"projector norm must be one of {PROJECTOR_NORMS}, got '{norm}'")
        layers: List[nn.Module] = []
        prev = int(in_dim)
        for i, d in enumerate(dims):
            layers.append(nn.Linear(prev, int(d)))
            if i < len(dims) - 1:
                layers.append(nn.BatchNorm1d(int(d), affine=False, track_running_stats=False) if norm == "batch"
                              else nn.LayerNorm(int(d), elementwise_affine=False))
                layers.append(nn.ReLU(inplace=True))
            prev = int(d)
        self.norm = norm
        self.net = nn.Sequential(*layers)
        self.out_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def pooled_encoder_features(net: nn.Module, crops: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """``concat_k pool(e_k)`` over all encoder stages: ``crops (N, C, c0, c1, c2)`` → ``(N, ΣC_k)`` (``avg``: global
    average pool) or ``(N, 2·ΣC_k)`` (``avgmax``: average and max pool concatenated per stage)."""
    feats = []
    for e in encoder_forward(net, crops):
        flat = e.flatten(2)
        feats.append(flat.mean(-1))
        if pool == "avgmax":
            feats.append(flat.amax(-1))
    return torch.cat(feats, dim=1)


# ------------------------------------------------------------------------------------------------ losses

def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cos(a_i, b_j) = a_i·b_j / (‖a_i‖‖b_j‖ + 1e-8)`` in float32: ``(B, m, D), (B, n, D)`` → ``(B, m, n)``."""
    a = a.float()
    b = b.float()
    dots = torch.einsum("bmd,bnd->bmn", a, b)
    norms = a.norm(dim=-1).unsqueeze(-1) * b.norm(dim=-1).unsqueeze(-2)
    return dots / (norms + COS_EPS)


def clamp_logits(cos: torch.Tensor, mode: str = "hard") -> torch.Tensor:
    """Logits in [0, 1] from cosines: the value is always ``clamp(cos, 0, 1)``.

    ``"hard"``: plain clamp (the reference code's ReLU): a positive pair (y > 0) whose cosine is negative gets no
    gradient at all. ``"straight_through"``: same value, identity gradient, so such a pair is still pulled up
    (a negative pair with l = 0 stays gradient-free because d = |0 − 0| has zero subgradient).
    """
    clamped = torch.clamp(cos, 0.0, 1.0)
    if mode == "hard":
        return clamped
    if mode == "straight_through":
        return cos + (clamped - cos).detach()
    raise ValueError(f"unknown logit clamp '{mode}'")


def prediction_loss(logits: torch.Tensor, labels: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """``L_pred`` for ``logits, labels (B, n_t, n)`` (float32 scalar).

    ``paper`` (Eq. 2–3): ``−mean log(1 − clamp(|y − l|, 0, 1) + 1e-6)`` over all entries.
    ``official``: ``mean_{crops} Σ_{y>0} y·(−log(1 − d + 1e-6)) + mean_{y=0} l²``.
    """
    logits = logits.float()
    labels = labels.float()
    d = torch.clamp((labels - logits).abs(), 0.0, 1.0)
    nll = -torch.log(1.0 - d + LOG_EPS)
    if variant == "paper":
        return nll.mean()
    if variant == "official":
        pos = (labels * nll).sum(-1).mean()
        neg_mask = (labels <= 0).float()
        neg = (neg_mask * logits ** 2).sum() / neg_mask.sum().clamp(min=1.0)
        return pos + neg
    raise ValueError(f"unknown loss variant '{variant}'")


def regularisation_loss(bases: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """``L_reg`` over the base embeddings ``bases (B, n, D)`` (float32 scalar; bases carry gradient).

    ``paper`` (Eq. 4–5): ``mean_b 2/(n(n−1)) Σ_{j<k} |cos(q_j, q_k)|`` — 0 for mutually orthogonal bases, 1 for
    identical ones. ``official``: ``mean_{b, j<k} ReLU(cos(q_j, q_k))²``.
    """
    n = bases.shape[1]
    if n < 2:
        return bases.new_zeros((), dtype=torch.float32)
    s = pairwise_cosine(bases, bases)
    iu = torch.triu_indices(n, n, offset=1, device=bases.device)
    pairs = s[:, iu[0], iu[1]]                              # (B, n(n-1)/2)
    if variant == "paper":
        return pairs.abs().mean()
    if variant == "official":
        return torch.relu(pairs).pow(2).mean()
    raise ValueError(f"unknown loss variant '{variant}'")


@torch.no_grad()
def position_accuracy(scores: torch.Tensor, labels: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Share of target crops whose most similar base is a base they overlap most: ``(B, n_t, n)`` → scalar.

    Pass the *raw* cosines: after the clamp every negative cosine is 0 and ``argmax`` would resolve such ties to
    base 0. Ties are scored exactly: per crop, with ``P`` the bases of maximal score and ``T`` those of maximal
    overlap (both within ``tol``), the credit is ``|P ∩ T| / |P|`` — the accuracy of a random tie-break, so
    all-equal scores give ``|T| / n`` (chance) and never a free hit on base 0.
    """
    scores = scores.float()
    labels = labels.float()
    pred = scores >= scores.amax(-1, keepdim=True) - tol
    true = labels >= labels.amax(-1, keepdim=True) - tol
    return ((pred & true).sum(-1).float() / pred.sum(-1).float()).mean()


# ------------------------------------------------------------------------------------------------ planning

def voco_layout(patch: List[int], total_stride: List[int], median_shape: Sequence[float], a_op: int,
                cpu: bool, crop: Optional[Sequence[int]] = None) -> dict:
    """Crop c = P / 2 (a multiple of the total stride S; ``crop`` when given), a base grid g of 2 (CPU profiles)
    or up to 4 crops per in-plane axis (as many as the median image holds, halving c on an axis that holds fewer
    than 2; g = 1 on the out-of-plane axis ``a_op``), region R = g ⊙ c, and the constants of
    :attr:`VoCo.layout_defaults` (METHODS.md §8)."""
    crop = ([max(S, (P // (2 * S)) * S) for P, S in zip(patch, total_stride)] if crop is None
            else [int(c) for c in crop])
    grid = [1, 1, 1]
    for ax in range(3):
        if ax == a_op:
            continue
        while True:
            g = 2 if cpu else min(4, int(median_shape[ax] // crop[ax]))
            if g >= 2 or crop[ax] // 2 < total_stride[ax] or (crop[ax] // 2) % total_stride[ax]:
                grid[ax] = max(g, 2)
                break
            crop[ax] //= 2
    region = [g * c for g, c in zip(grid, crop)]
    return {"crop_size": crop, "base_grid": grid, "region_size": region, **copy.deepcopy(VoCo.layout_defaults)}


# ------------------------------------------------------------------------------------------------ method

class _EncoderHolder(nn.Module):
    """Holds copies of a network's encoder modules under their own names (a U-Net's ``.encoder``; Primus'
    ``.down_projection`` and ``.eva``), so that the functions reading a network's encoder accept it."""

    def __init__(self, **parts: nn.Module):
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)


@register
class VoCo(SSLMethod):
    """VoCo on a nnU-Net U-Net (``ResidualEncoderUNet`` / ``PlainConvUNet``); see the module docstring.

    Attributes:
        crop, grid, region: per-axis crop size ``c``, base grid ``g`` and region ``R = g ⊙ c``.
        n_bases, n_targets: ``n = Π g`` and ``n_t``.
        projector: :class:`Projector` (dropped at export).
        teacher_encoder, teacher_projector: EMA copies (only with ``use_ema_teacher``).
    """

    name = "voco"
    trained_parts = "encoder only; the decoder is exported at its random initialisation"
    layout_defaults = {"n_target_crops": 4, "lambda_reg": 1.0, "loss_variant": "paper", "region_mode": "body_box",
                       "region_jitter": 0.1, "resize_stage": 2, "base_gradient": "prediction",
                       "proj_dims": [2048, 2048, 2048], "projector_norm": "batch", "logit_clamp": "hard",
                       "use_ema_teacher": False, "ema_momentum": 0.9, "augmentation": dict(DEFAULT_AUGMENTATION),
                       "pool": "avg"}

    required_layout_keys = ("crop_size", "base_grid")

    @classmethod
    def variant_for(cls, architecture_family: str):
        """CNN: :class:`VoCo`; Primus: :class:`PrimusVoCo` (crops encoded at the plan's patch, token pooling)."""
        return {"cnn": VoCo, "primus": PrimusVoCo}.get(architecture_family)

    # ---------------------------------------------------------------------------------------------- planning
    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        """:func:`voco_layout`; the network input is one crop."""
        layout = voco_layout(list(ctx.patch_size), ctx.total_stride, ctx.median_shape, ctx.out_of_plane_axis,
                             ctx.is_cpu)
        return list(layout["crop_size"]), layout

    @classmethod
    def check_layout(cls, method_plan: dict, ssl_plan: dict):
        S = ssl_plan["total_stride"]
        median = ssl_plan.get("median_shape", [float("inf")] * 3)
        a_op = int(ssl_plan.get("out_of_plane_axis", 0))
        v = method_plan["layout"]
        if not divides(S, v["crop_size"]):
            raise cls.layout_error(ssl_plan, "crop_size", f"{v['crop_size']} is not a multiple of {S}")
        if list(v["region_size"]) != [g * c for g, c in zip(v["base_grid"], v["crop_size"])]:
            raise cls.layout_error(ssl_plan, "region_size", "must equal base_grid x crop_size")
        if int(v["base_grid"][a_op]) != 1:
            raise cls.layout_error(ssl_plan, "base_grid", f"{v['base_grid']} splits the out-of-plane axis {a_op}")
        lay = cls.resolved_layout(method_plan)
        if lay["region_mode"] not in REGION_MODES:
            raise cls.layout_error(ssl_plan, "region_mode", f"'{lay['region_mode']}' is not one of {REGION_MODES}")
        if lay["base_gradient"] not in BASE_GRADIENTS:
            raise cls.layout_error(ssl_plan, "base_gradient",
                                   f"'{lay['base_gradient']}' is not one of {BASE_GRADIENTS}")
        if lay["region_mode"] == "body_resized":
            return []  # the body box is resized to the region: never padded
        if any(r > md for r, md in zip(v["region_size"], median)):
            return [f"voco region {v['region_size']} exceeds the median image shape {median}; regions get padded"]
        return []

    #: the network's encoder modules: what VoCo trains, what an EMA teacher copies
    encoder_parts: Tuple[str, ...] = ("encoder",)

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        super().__init__(network, method_plan, ssl_plan, num_input_channels)
        check_unet(network)
        self.read_layout(len(network.encoder.strides[0]))
        total_stride = cumulative_strides(network)[-1]
        if any(c % s for c, s in zip(self.crop, total_stride)):
            raise SSLInputError(f"ssl layout of 'voco': crop_size {self.crop} is not a multiple of the network's "
                                f"total stride {list(total_stride)}")
        if "pretrain_patch_size" in method_plan and [int(p) for p in method_plan["pretrain_patch_size"]] != self.crop:
            raise SSLInputError(f"ssl plan of 'voco': pretrain_patch_size {method_plan['pretrain_patch_size']} must "
                                f"equal crop_size {self.crop} (the network input)")
        in_dim = sum(int(c) for c in network.encoder.output_channels) * (2 if self.pool == "avgmax" else 1)
        # the decoder gets no gradient from VoCo: freeze its own modules so it stays exactly at initialisation
        # (the encoder is shared with decoder.encoder and stays trainable)
        for part in (network.decoder.transpconvs, network.decoder.stages, network.decoder.seg_layers):
            for p in part.parameters():
                p.requires_grad_(False)
        self.build_heads(in_dim)

    def read_layout(self, ndim: int) -> None:
        """Parse and check the backbone-independent layout keys (crops, grid, losses, views, projector, EMA)."""
        layout, method_plan, ssl_plan = self.layout, self.method_plan, self.ssl_plan
        if ndim != 3:
            raise SSLInputError("VoCo is implemented for 3D networks only")
        self.crop = per_axis_ints(layout["crop_size"], ndim, "crop_size", "voco")
        self.grid = per_axis_ints(layout["base_grid"], ndim, "base_grid", "voco")
        self.region = [g * c for g, c in zip(self.grid, self.crop)]
        if "region_size" in layout and per_axis_ints(layout["region_size"], ndim, "region_size", "voco") != self.region:
            raise SSLInputError(f"ssl layout of 'voco': region_size {layout['region_size']} != base_grid "
                                f"{self.grid} x crop_size {self.crop}")
        if any(g < 1 for g in self.grid) or math.prod(self.grid) < 2:
            raise SSLInputError(f"ssl layout of 'voco': base_grid {self.grid} must have at least 2 bases")
        self.n_bases = math.prod(self.grid)
        self.n_targets = int(layout["n_target_crops"])
        if self.n_targets < 1:
            raise SSLInputError("ssl layout of 'voco': n_target_crops must be >= 1")
        self.lambda_reg = float(layout["lambda_reg"])
        self.loss_variant = str(layout["loss_variant"])
        if self.loss_variant not in LOSS_VARIANTS:
            raise SSLInputError(f"ssl layout of 'voco': loss_variant must be one of {LOSS_VARIANTS}, got "
                                f"'{self.loss_variant}'")
        self.logit_clamp = str(layout["logit_clamp"])
        if self.logit_clamp not in LOGIT_CLAMPS:
            raise SSLInputError(f"ssl layout of 'voco': logit_clamp must be one of {LOGIT_CLAMPS}, got "
                                f"'{self.logit_clamp}'")
        self.region_mode = str(layout["region_mode"])
        if self.region_mode not in REGION_MODES:
            raise SSLInputError(f"ssl layout of 'voco': region_mode must be one of {REGION_MODES}, got "
                                f"'{self.region_mode}'")
        self.data_size = type(self).required_patch_size(method_plan)
        self.base_gradient = str(layout["base_gradient"])
        if self.base_gradient not in BASE_GRADIENTS:
            raise SSLInputError(f"ssl layout of 'voco': base_gradient must be one of {BASE_GRADIENTS}, got "
                                f"'{self.base_gradient}'")
        jitter = float(layout["region_jitter"])
        if not 0.0 <= jitter <= 0.5:
            raise SSLInputError(f"ssl layout of 'voco': region_jitter must lie in [0, 0.5] (a fraction of the "
                                f"region per axis), got {jitter}")
        a_op = int(ssl_plan.get("out_of_plane_axis", 0)) if ssl_plan else 0
        self.in_plane_axes = tuple(ax for ax in range(ndim) if ax != a_op)
        aug = {**type(self).layout_defaults["augmentation"], **(layout["augmentation"] or {})}
        self.augmentation = {k: float(aug[k]) for k in DEFAULT_AUGMENTATION}

        # projector: BN over all crops of the step, LayerNorm when there are too few crops (METHODS.md §10 row 3)
        norm = str(layout["projector_norm"])
        if norm not in PROJECTOR_NORMS:
            raise SSLInputError(f"ssl layout of 'voco': projector_norm must be one of {PROJECTOR_NORMS}, got "
                                f"'{norm}'")
        crops_per_step = int(method_plan["batch_size"]) * (self.n_bases + self.n_targets)
        if norm == "batch" and crops_per_step < MIN_CROPS_FOR_BATCHNORM:
            warnings.warn(f"voco: {crops_per_step} crops per step < {MIN_CROPS_FOR_BATCHNORM}; the projector uses "
                          f"LayerNorm instead of BatchNorm1d")
            norm = "layer"
        proj_dims = layout["proj_dims"]
        if not isinstance(proj_dims, (list, tuple)) or not proj_dims or any(int(d) < 1 for d in proj_dims):
            raise SSLInputError(f"ssl layout of 'voco': proj_dims must be a non-empty list of ints, got {proj_dims!r}")
        self.proj_dims = [int(d) for d in proj_dims]
        self.projector_norm = norm
        self.pool = str(layout["pool"])
        if self.pool not in POOLS:
            raise SSLInputError(f"ssl layout of 'voco': pool must be one of {POOLS}, got '{self.pool}'")
        self.use_ema_teacher = bool(layout["use_ema_teacher"])
        mom = layout["ema_momentum"]
        self.ema_momentum = [float(mom), float(mom)] if isinstance(mom, (int, float)) else [float(m) for m in mom]
        if len(self.ema_momentum) != 2 or not all(0.0 <= m <= 1.0 for m in self.ema_momentum):
            raise SSLInputError(f"ssl layout of 'voco': ema_momentum must be a number or [start, end] in [0, 1], "
                                f"got {mom!r}")

    def build_heads(self, in_dim: int) -> None:
        """The projector ``(N, in_dim) -> (N, D)`` and, with ``use_ema_teacher``, the frozen teacher copies of the
        encoder parts (:attr:`encoder_parts`) and of the projector."""
        self.projector = Projector(in_dim, self.proj_dims, self.projector_norm)
        if self.use_ema_teacher:
            self.teacher = _EncoderHolder(**{n: frozen_copy(getattr(self.network, n)) for n in self.encoder_parts})
            self.teacher_projector = frozen_copy(self.projector)
        else:
            self.teacher = None
            self.teacher_projector = None

    @staticmethod
    def region_of(layout: dict) -> List[int]:
        """``R = base_grid ⊙ crop_size`` (``region_size`` when the layout states it)."""
        if "region_size" in layout:
            return [int(r) for r in layout["region_size"]]
        return [int(g) * int(c) for g, c in zip(layout["base_grid"], layout["crop_size"])]

    @classmethod
    def required_patch_size(cls, method_plan: dict) -> List[int]:
        """What the loader hands over per element: the region ``R`` (``native``, ``body_box``) or the staging
        size ``ceil(resize_stage · R)`` (``body_resized``; resized to ``R`` on the device)."""
        layout = cls.resolved_layout(method_plan)
        region = cls.region_of(layout)
        if str(layout["region_mode"]) == "body_resized":
            try:
                return staging_size(region, float(layout["resize_stage"]))
            except ValueError as e:
                raise SSLInputError(f"ssl layout of 'voco': resize_stage: {e}") from e
        return region

    @classmethod
    def make_sampler(cls, spec: SamplerSpec):
        """``native``: the default uniform body-box sampler; ``body_box`` / ``body_resized``:
        :class:`ssl_nnunet.data.voco_regions.AnchoredRegionSampler`."""
        layout = cls.resolved_layout(spec.method_plan)
        mode = str(layout["region_mode"])
        if mode == "native":
            return super().make_sampler(spec)
        return AnchoredRegionSampler(spec.dataset, spec.identifiers, spec.patch_size, spec.batch_size, mode=mode,
                                     jitter=float(layout["region_jitter"]), seed=spec.seed, **spec.case_options)

    # -------------------------------------------------------------------------------------------- views
    def make_views(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None):
        """``batch (B, C, R0, R1, R2)`` (``body_resized``: ``(B, C, S0, S1, S2)``, resized to R here, on the
        batch's device) → ``(crops, labels, starts)``.

        ``crops (B·(n + n_t), C, c0, c1, c2)``: per volume its n bases then its n_t target crops (volume-major),
        augmented; ``labels (B, n_t, n)`` float32; ``starts (B, n_t, 3)`` int64.
        """
        if batch.dim() != 5:
            raise ValueError(f"VoCo expects a batch (B, C, a0, a1, a2), got shape {tuple(batch.shape)}")
        if self.region_mode == "body_resized":
            if list(batch.shape[2:]) != self.data_size:
                raise ValueError(f"VoCo (body_resized) expects resized body boxes of size {self.data_size}, got "
                                 f"{list(batch.shape[2:])}")
            batch = resize_regions(batch, self.region)
        if list(batch.shape[2:]) != self.region:
            raise ValueError(f"VoCo expects regions of size {self.region} (layout region_size), got "
                             f"{list(batch.shape[2:])}")
        b, ch = batch.shape[:2]
        bases = split_into_cells(batch, self.grid)                                     # (B, n, C, *c)
        starts = random_crop_starts(b, self.n_targets, self.region, self.crop, batch.device, generator)
        targets = extract_crops(batch, starts, self.crop)                              # (B, n_t, C, *c)
        labels = position_labels(starts, self.crop, self.grid)                         # (B, n_t, n)
        crops = torch.cat([bases, targets], dim=1).reshape(b * (self.n_bases + self.n_targets), ch, *self.crop)
        crops = augment_crops(crops, self.in_plane_axes, generator=generator, **self.augmentation)
        # rot90 / flips leave permuted strides; a strided input makes every conv and norm of the encoder slower
        return crops.contiguous(), labels, starts

    def embed(self, crops: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        """Encoder-only forward of the stacked crops + projector: ``(N, C, *c)`` → ``(N, D)`` (float32)."""
        net = self.teacher if teacher else self.network
        proj = self.teacher_projector if teacher else self.projector
        return proj(self.pooled_features(net, crops)).float()

    def pooled_features(self, net: nn.Module, crops: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled features ``(N, F)`` of ``crops (N, C, *c)`` (:func:`pooled_encoder_features`);
        ``net`` is the network or the teacher holding copies of its encoder parts."""
        return pooled_encoder_features(net, crops, self.pool)

    def _split(self, emb: torch.Tensor, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        emb = emb.view(b, self.n_bases + self.n_targets, -1)
        return emb[:, :self.n_bases], emb[:, self.n_bases:]

    def logits_and_bases(self, crops: torch.Tensor, b: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits (B, n_t, n), raw cosines (B, n_t, n), student base embeddings q (B, n, D))``; the raw
        cosines are the unclamped counterpart of the logits (detached, for :func:`position_accuracy`);
        ``base_gradient`` as in the module docstring."""
        q, p = self._split(self.embed(crops), b)
        q_pred = q if self.base_gradient == "prediction" else q.detach()
        if self.teacher is None:
            cos = pairwise_cosine(p, q_pred)
            return clamp_logits(cos, self.logit_clamp), cos.detach(), q
        with torch.no_grad():
            q_t, p_t = self._split(self.embed(crops, teacher=True), b)
        cos_s, cos_t = pairwise_cosine(p, q_t), pairwise_cosine(p_t, q_pred)
        logits = 0.5 * (clamp_logits(cos_s, self.logit_clamp) + clamp_logits(cos_t, self.logit_clamp))
        return logits, (0.5 * (cos_s + cos_t)).detach(), q

    # -------------------------------------------------------------------------------------------- loss
    def forward(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``batch`` (as :meth:`make_views`) → ``{"loss", "L_pred", "L_pred_zero", "L_reg", "pos_acc",
        "pos_acc_chance"}`` (float32 scalars; ``L_pred_zero`` is L_pred of all-zero logits on the same labels —
        the trivial solution; ``pos_acc_chance = 1/n``)."""
        crops, labels, _ = self.make_views(batch, generator)
        logits, cos, q = self.logits_and_bases(crops, batch.shape[0])
        l_pred = prediction_loss(logits, labels, self.loss_variant)
        l_reg = regularisation_loss(q, self.loss_variant)
        loss = l_pred + self.lambda_reg * l_reg
        with torch.no_grad():
            # the trivial solution's value: all logits 0 (every embedding orthogonal to every base)
            l_pred_zero = prediction_loss(torch.zeros_like(logits), labels, self.loss_variant)
        return {"loss": loss, "L_pred": l_pred.detach(), "L_pred_zero": l_pred_zero, "L_reg": l_reg.detach(),
                "pos_acc": position_accuracy(cos, labels),
                "pos_acc_chance": torch.tensor(1.0 / self.n_bases, dtype=torch.float32, device=loss.device)}

    def ema_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """(encoder part, its teacher copy) for every part of :attr:`encoder_parts` and (projector, teacher
        projector) with ``use_ema_teacher``, else none."""
        if self.teacher is None:
            return []
        return [(getattr(self.network, n), getattr(self.teacher, n)) for n in self.encoder_parts] + \
            [(self.projector, self.teacher_projector)]

    def ema_momentum_range(self) -> Tuple[float, float]:
        """``(μ0, μ1)`` from ``layout.ema_momentum`` (a constant μ gives ``(μ, μ)``)."""
        return self.ema_momentum[0], self.ema_momentum[1]

    # -------------------------------------------------------------------------------------------- previews
    @torch.no_grad()
    def previews(self, batch: torch.Tensor) -> Dict[str, Sequence[torch.Tensor]]:
        """Sample 0, channel 0, float32 on CPU: the region, its bases and its target crops (as the network sees
        them, augmented). The target row's title lists ``true base → predicted base`` per crop."""
        x = batch[:1]
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0)
        crops, labels, _ = self.make_views(x, gen)
        _, cos, _ = self.logits_and_bases(crops, 1)
        if self.region_mode == "body_resized":
            x = resize_regions(x, self.region)
        crops = crops.float().cpu()
        pairs = ", ".join(f"{int(t)}→{int(p)}" for t, p in zip(labels[0].argmax(-1).tolist(),
                                                                 cos[0].argmax(-1).tolist()))
        return {
            "region": [x[0, 0].float().cpu()],
            f"bases 0..{self.n_bases - 1}": [crops[j, 0] for j in range(min(self.n_bases, 16))],
            f"target crops (true base → predicted): {pairs}": [crops[self.n_bases + t, 0]
                                                              for t in range(self.n_targets)],
        }


class PrimusVoCo(VoCo):
    """VoCo on Primus (METHODS.md §4.5): the views, position labels, losses and logged terms of :class:`VoCo`;
    only the encoder pass differs.

    Primus' position embedding is built for one token grid, so every crop enters the network at the plan's
    patch ``P`` (``pretrain_patch_size``, the network's ``input_shape``): the ``B·(n + n_t)`` augmented crops
    ``(N, C, *c)`` are resized trilinearly on the device to ``(N, C, *P)`` (no-op when ``c = P``, the default
    wherever the median image holds the region), encoded by ``down_projection`` + ``eva`` over all ``prod(P/8)``
    tokens (:func:`ssl_nnunet.backbones.primus.encode_tokens`) and pooled: embedding = mean over the encoded
    tokens ``(N, E)`` (``pool = "avgmax"``: mean and max concatenated, ``(N, 2E)``) -> the same
    :class:`Projector`. The optional EMA teacher copies ``down_projection`` + ``eva`` + the projector.

    Layout keys: as :class:`VoCo`; ``crop_size`` is the crop's native size in voxels (a multiple of the token
    size), ``region_size = base_grid ⊙ crop_size`` what the loader cuts. ``up_projection`` never runs: it is
    frozen (:meth:`untrained_parameters`) and not transferred (the target gets a fresh one).
    """

    trained_parts = ("down_projection and eva (every crop encoded at the plan's patch, embedding = mean of the "
                     "encoded tokens); the projector is dropped, up_projection never runs and is not transferred")
    encoder_parts = ("down_projection", "eva")

    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        """Network input = the plan's patch P; crop ``c = P / z`` for the smallest zoom ``z`` in 1, 2, 4, 8 (``c`` a
        multiple of the token) whose region ``g ⊙ c`` (grid of :func:`voco_layout`, which must keep ``c``) fits the
        median image, so crops are seen at the fine-tuning scale whenever the images allow. One zoom for all axes,
        never a per-axis stretch: when no zoom fits, the smallest crop tried with a grid of 2 per in-plane axis
        (:meth:`check_layout` then warns that regions get padded)."""
        patch, token = [int(p) for p in ctx.patch_size], ctx.total_stride
        args = (patch, token, ctx.median_shape, ctx.out_of_plane_axis)
        crop = patch
        for zoom in (1, 2, 4, 8):
            if any(p % (zoom * t) for p, t in zip(patch, token)):
                break
            crop = [p // zoom for p in patch]
            layout = voco_layout(*args, ctx.is_cpu, crop=crop)
            if layout["crop_size"] == crop and all(r <= m for r, m in zip(layout["region_size"], ctx.median_shape)):
                return patch, layout
        return patch, voco_layout(*args, True, crop=crop)

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        from ssl_nnunet.backbones.primus import is_primus, token_grid
        SSLMethod.__init__(self, network, method_plan, ssl_plan, num_input_channels)
        if not is_primus(network):
            raise SSLInputError(f"the Primus VoCo needs a Primus network, got {type(network).__name__}")
        self.read_layout(3)
        token = [int(t) for t in network.down_projection.proj.kernel_size]
        if any(c % t for c, t in zip(self.crop, token)):
            raise SSLInputError(f"ssl layout of 'voco' (Primus): crop_size {self.crop} is not a multiple of the "
                                f"token size {token}")
        self.input_size = [int(p) for p in method_plan["pretrain_patch_size"]]
        try:
            grid = token_grid(self.input_size, token)
        except SSLInputError as e:
            raise SSLInputError(f"ssl plan of 'voco' (Primus): {e}") from None
        pos_embed = getattr(network.eva, "pos_embed", None)
        if pos_embed is not None and int(pos_embed.shape[1]) != math.prod(grid):
            raise SSLInputError(f"ssl plan of 'voco' (Primus): pretrain_patch_size {self.input_size} gives "
                                f"{math.prod(grid)} tokens, the network's position embedding has "
                                f"{int(pos_embed.shape[1])}; pretrain_patch_size must be the plan's patch (the "
                                f"network's input_shape). Re-run the SSL planner.")
        self.build_heads(int(network.embed_dim) * (2 if self.pool == "avgmax" else 1))

    def make_views(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None):
        """:meth:`VoCo.make_views`, the crops then resized to the network input: ``(crops (B·(n + n_t), C, *P),
        labels (B, n_t, n), starts (B, n_t, 3))``."""
        crops, labels, starts = super().make_views(batch, generator)
        return resize_regions(crops, self.input_size).contiguous(), labels, starts

    def pooled_features(self, net: nn.Module, crops: torch.Tensor) -> torch.Tensor:
        """``crops (N, C, *P)`` -> mean over the encoded tokens ``(N, E)`` (``avgmax``: ``(N, 2E)``, mean and max)."""
        from ssl_nnunet.backbones.primus import encode_tokens
        tokens = encode_tokens(net, crops)                                               # (N, T, E)
        return torch.cat([tokens.mean(1), tokens.amax(1)], 1) if self.pool == "avgmax" else tokens.mean(1)

    def untrained_parameters(self) -> List[str]:
        """``up_projection`` never runs in VoCo pretraining."""
        return [f"network.up_projection.{n}" for n, _ in self.network.up_projection.named_parameters()]
