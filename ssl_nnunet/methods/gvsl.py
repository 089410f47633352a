"""GVSL: geometric visual similarity learning (CVPR 2023 seed; METHODS.md §5, §10 rows 9-10).

One batch element is a *pair* of patches of two different cases, ``batch (B, 2, C, a0, a1, a2)``:
``x_A = batch[:, 0]`` (fixed), ``x_B = batch[:, 1]`` (moving). Per step (all ops on the batch's device):

1. Appearance transform of A (Models Genesis set) in a [0, 1] value range: ``u = (x_A - lo) / (hi - lo)``
   clamped to [0, 1] (``lo, hi`` = per-patch 0.5/99.5 percentiles of A per channel, or a fixed range from the
   plan), then local voxel shuffling (p 0.8), a Bézier intensity curve (p 0.9) and in-painting with U[0, 1)
   noise; mapped back with ``x = lo + u (hi - lo)`` → ``x_A^t (B, C, a0, a1, a2)`` in nnU-Net units.
2. One random spatial augmentation (rotation, scale, shear, translation, elastic) shared by A, A^t and B.
3. Siamese U-Net on ``cat(A^t, B)`` via :func:`forward_features`: global ``f^g = e_{K-1}``
   ``(B, C_g, a/S)`` (bottleneck), local ``f^l = d_{K-2}`` ``(B, C_0, a0, a1, a2)`` (last decoder stage).
4. Z-matching head. Affine: ``concat(f_B^g, f_A^g)`` → DoubleConv(2C_g → H_a) → GAP → linear heads for
   rotation (3), scale (3), translation (3), shear (6), bounded as ``rot = clamp(r, -1, 1)·b_rot``,
   ``scale = 1 + b_scale·clamp(s, -1, 1)``, ``shear = clamp(h, -1, 1)·b_shear``, translation unbounded (in
   normalised units: a fraction of the half-extent of the axis it moves along). The 3×3 matrix
   ``M = Sh·Sc·R_0·R_1·R_2`` is assembled with ``torch.stack`` (differentiable). Deformable:
   ``concat(T_aff(f_B^l), f_A^l)`` → DoubleConv(2C_0 → H_d) → conv 3³ → ``φ (B, 3, a0, a1, a2)`` in voxels.
5. Composed displacement (voxels, channels in (a0, a1, a2) order), centre ``c = (n - 1)/2``:
   ``u(p) = M (p + φ(p) - c) + c + τ ⊙ n/2 - p``; the warped moving image is ``x_B(p + u(p))`` (trilinear,
   one resampling).
6. Losses (float32): ``L_ncc = 1 - mean_v cc(v)`` with ``cc = cross² / (var_I var_J + 1e-5)`` over a local box
   window (``ncc_window``) between warped B and A; ``L_smooth = (1/3) Σ_ax mean((Δ_ax φ)²)``;
   ``L_restore = mean((R(f_A^l) - x_A)²)`` with the restoration head R on A^t's local features and the clean
   A as target. ``L = w_ncc L_ncc + w_smooth L_smooth + w_restore L_restore``.

Warping convention ("pull"): output voxel p reads the moving image at ``p + u(p)``, so a constant field of +1
along axis a moves the content by one voxel towards *lower* indices along a.

Corrected defects of the released code (METHODS.md §5.2-7): the affine matrix is differentiable
(``affine_grad = false`` reproduces the detached original), both warpers are exact identities for a zero
field / identity matrix, translations are normalised by the axis they act on, and the appearance transforms
run in [0, 1] instead of on z-scored values.

Code: the spatial transforms (steps 2, 4, 5) are :mod:`ssl_nnunet.methods.geometry`, the appearance transforms
(step 1) :mod:`ssl_nnunet.methods.appearance`; this module holds the heads, the losses and the method.

Layout keys (``method_plan["layout"]``): ``pair_patch`` [a0, a1, a2]; ``ncc_window`` (odd ints);
``affine_bounds`` [rot, scale, shear]; ``spatial_aug`` {rotation, scale [lo, hi], shear, translation,
elastic_sigma [lo, hi], elastic_alpha [lo, hi]} (null/false: none); ``appearance`` {local_shuffle_p,
nonlinear_p, inpaint, ...}; ``weights`` [ncc, smooth, restore]; ``affine_grad``; ``affine_hidden``;
``deform_hidden``; ``restore_hidden``; ``min_shuffle_windows``; ``intensity`` {mode: per_patch | fixed,
percentiles, range}; ``pair_sampling``: matched | independent.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_nnunet.data.samplers import RelativePositionPairSampler, SamplerSpec
from ssl_nnunet.methods import register
from ssl_nnunet.methods.appearance import (bezier_intensity, from_unit_range, inpaint, intensity_bounds,
                                           local_shuffle, to_unit_range)
from ssl_nnunet.methods.base import PlanningContext, SSLMethod
from ssl_nnunet.methods.features import check_unet, forward_features
from ssl_nnunet.methods.geometry import (affine_matrix, affine_warp, compose_displacement,
                                         random_spatial_displacement, warp)
from ssl_nnunet.utilities.errors import SSLInputError

__all__ = [
    "GVSL", "PrimusGVSL",
    "bound_affine_params", "local_ncc", "ncc_loss", "smoothness_loss",
]

NCC_EPS = 1e-5
DEFAULT_APPEARANCE = {"local_shuffle_p": 0.8, "nonlinear_p": 0.9, "inpaint": True,
                      "shuffle_windows_per_128": 5000, "shuffle_window_fraction": 0.05,
                      "inpaint_max_boxes": 30, "inpaint_continue_p": 0.95, "inpaint_size": [0.1, 0.2],
                      "bezier_points": 1000}
DEFAULT_INTENSITY = {"mode": "per_patch", "percentiles": [0.5, 99.5], "range": None}


# ============================================================================================ affine head outputs

def bound_affine_params(raw: Dict[str, torch.Tensor], bounds: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Bounded parameters from the affine head's raw outputs (§5.1): ``rot = clamp(r)·b_rot``,
    ``scale = 1 + b_scale·clamp(s)``, ``shear = clamp(h)·b_shear``, translation unchanged; clamp to [-1, 1]."""
    b_rot, b_scale, b_shear = (float(b) for b in bounds)
    return {"rotation": raw["rotation"].clamp(-1, 1) * b_rot,
            "scale": 1.0 + b_scale * raw["scale"].clamp(-1, 1),
            "shear": raw["shear"].clamp(-1, 1) * b_shear,
            "translation": raw["translation"]}


# ============================================================================================ losses

def _box_bounds(n: int, w: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel [lo, hi) of a centred window of odd size ``w`` along an axis of length ``n``, cropped."""
    i = torch.arange(n, device=device)
    return (i - w // 2).clamp(min=0), (i + w // 2 + 1).clamp(max=n)


def _box_sum(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Sum over a centred box ``window`` (odd sizes) with zero padding, ``x (B, K, a0, a1, a2)``.

    Separable, one running sum per axis (sum = cumsum[hi] - cumsum[lo]): the cost does not grow with the
    window, ~3x faster forward+backward than box-averaging pools at 9³ on CPU (float32 round-off ~1e-7
    relative to the sums)."""
    for ax, w in enumerate(window):
        if w <= 1:
            continue
        d = 2 + ax
        c = torch.cumsum(x, dim=d)
        c = torch.cat([torch.zeros_like(c.narrow(d, 0, 1)), c], dim=d)
        lo, hi = _box_bounds(x.shape[d], w, x.device)
        x = c.index_select(d, hi) - c.index_select(d, lo)
    return x


def _box_count(shape: Sequence[int], window: Sequence[int], device) -> torch.Tensor:
    """Number of voxels inside the image of each voxel's window, ``(1, 1, a0, a1, a2)`` (exact, float32)."""
    counts = []
    for n, w in zip(shape, window):
        lo, hi = _box_bounds(n, max(int(w), 1), device)
        counts.append((hi - lo).float())
    return (counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :])[None, None]


def local_ncc(i: torch.Tensor, j: torch.Tensor, window: Sequence[int], eps: float = NCC_EPS) -> torch.Tensor:
    """Squared local normalised cross-correlation ``cc (B, C, a0, a1, a2)`` in float32.

    ``cc(v) = cross² / (var_I · var_J + eps)`` with ``cross = Σ IJ - Σ I Σ J / N``,
    ``var_I = Σ I² - (Σ I)² / N`` over the box window around v; N = number of window voxels *inside* the
    image (the window is cropped at the border instead of zero-padded, so cc is invariant to affine
    intensity changes everywhere). Each image is centred by its global mean first (fp32 cancellation).
    """
    with torch.autocast(device_type=i.device.type, enabled=False):
        i = i.float()
        j = j.float()
        i = i - i.mean(dim=(2, 3, 4), keepdim=True)
        j = j - j.mean(dim=(2, 3, 4), keepdim=True)
        c = i.shape[1]
        sums = _box_sum(torch.cat([i, j, i * i, j * j, i * j], dim=1), window)
        count = _box_count(i.shape[2:], window, i.device)
        si, sj, sii, sjj, sij = sums.split(c, dim=1)
        cross = sij - si * sj / count
        var_i = (sii - si * si / count).clamp(min=0)
        var_j = (sjj - sj * sj / count).clamp(min=0)
        return cross * cross / (var_i * var_j + eps)


def ncc_loss(warped: torch.Tensor, fixed: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``L_ncc = 1 - mean cc(warped, fixed)`` (float32 scalar; minimum 0 for identical textured images)."""
    return 1.0 - local_ncc(warped, fixed, window).mean()


def smoothness_loss(field: torch.Tensor) -> torch.Tensor:
    """``(1/3) Σ_ax mean((φ[.., i+1, ..] - φ[.., i, ..])²)`` of ``field (B, 3, a0, a1, a2)`` (float32)."""
    f = field.float()
    terms = [torch.diff(f, dim=2 + ax).pow(2).mean() for ax in range(3) if f.shape[2 + ax] > 1]
    return torch.stack(terms).sum() / 3.0 if terms else f.new_zeros(())


# ============================================================================================ appearance geometry

def _shuffle_geometry(shape: Sequence[int], layout: dict) -> Tuple[List[int], int]:
    app = layout["appearance"]
    window = [max(2, int(round(float(app["shuffle_window_fraction"]) * s))) for s in shape]
    n = int(round(float(app["shuffle_windows_per_128"]) * float(np.prod([s / 128.0 for s in shape]))))
    return window, max(int(layout["min_shuffle_windows"]), n)


# ============================================================================================ heads

def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """The full-resolution heads run channels-last: their convs' backward is ~1.5x faster on CPU (oneDNN) and
    channels-last suits cuDNN; the values are the same up to float round-off."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


def _groups(channels: int, per_group: int = 8) -> int:
    g = max(1, channels // per_group)
    while channels % g:
        g -= 1
    return g


class DoubleConv(nn.Sequential):
    """(conv 3³ → GroupNorm(C/8 groups) → LeakyReLU 0.2) × 2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv3d(c_in, c_out, 3, padding=1), nn.GroupNorm(_groups(c_out), c_out), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1), nn.GroupNorm(_groups(c_out), c_out), nn.LeakyReLU(0.2, inplace=True))


class AffineHead(nn.Module):
    """``concat(f_B^g, f_A^g) (B, 2C_g, ...)`` → DoubleConv → GAP → raw rotation (B, 3), scale (B, 3),
    translation (B, 3), shear (B, 6). The linear layers start near zero (≈ identity transform)."""

    def __init__(self, c_global: int, hidden: int):
        super().__init__()
        self.trunk = DoubleConv(2 * c_global, hidden)
        self.rotation = nn.Linear(hidden, 3)
        self.scale = nn.Linear(hidden, 3)
        self.translation = nn.Linear(hidden, 3)
        self.shear = nn.Linear(hidden, 6)
        for lin in (self.rotation, self.scale, self.translation, self.shear):
            nn.init.normal_(lin.weight, std=1e-3)
            nn.init.zeros_(lin.bias)

    def forward(self, f_moving: torch.Tensor, f_fixed: torch.Tensor) -> Dict[str, torch.Tensor]:
        h = self.trunk(torch.cat([f_moving, f_fixed], dim=1)).mean(dim=(2, 3, 4))
        return {k: getattr(self, k)(h).float() for k in ("rotation", "scale", "translation", "shear")}


class DeformHead(nn.Module):
    """``concat(T_aff(f_B^l), f_A^l) (B, 2C_l, a0, a1, a2)`` → DoubleConv → conv 3³ → φ (B, 3, a0, a1, a2),
    voxels; the last conv is initialised N(0, 1e-5), bias 0 (initial field ≈ 0)."""

    def __init__(self, c_local: int, hidden: int):
        super().__init__()
        self.trunk = DoubleConv(2 * c_local, hidden)
        self.flow = nn.Conv3d(hidden, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, f_moving: torch.Tensor, f_fixed: torch.Tensor) -> torch.Tensor:
        return self.flow(self.trunk(_channels_last(torch.cat([f_moving, f_fixed], dim=1)))).contiguous()


class RestoreHead(nn.Sequential):
    """``f_A^l (B, C_l, ...)`` → conv 3³ → GroupNorm(4) → LeakyReLU 0.2 → conv 1³ → ``(B, C_in, ...)``."""

    def __init__(self, c_local: int, hidden: int, c_out: int):
        super().__init__(nn.Conv3d(c_local, hidden, 3, padding=1), nn.GroupNorm(4 if hidden % 4 == 0 else 1, hidden),
                         nn.LeakyReLU(0.2, inplace=True), nn.Conv3d(hidden, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_channels_last(x)).contiguous()


# ============================================================================================ planning

def gvsl_intensity(normalization_schemes: Sequence[str], intensity_properties: dict) -> dict:
    """GVSL's map to [0, 1] (METHODS.md §5.3): for CT — every channel ``CTNormalization`` — a fixed range per
    channel, the fingerprint's foreground 0.5/99.5 percentiles expressed in nnU-Net-normalised units
    ``(p − mean) / std``; otherwise (MR, mixed) per-patch 0.5/99.5 percentiles."""
    per_patch = copy.deepcopy(DEFAULT_INTENSITY)
    if not normalization_schemes or any(s != "CTNormalization" for s in normalization_schemes):
        return per_patch
    ranges = []
    for c in range(len(normalization_schemes)):
        props = intensity_properties.get(str(c)) or intensity_properties.get(c)
        if not props or not all(k in props for k in ("mean", "std", "percentile_00_5", "percentile_99_5")):
            return per_patch
        std = max(float(props["std"]), 1e-8)
        ranges.append([(float(props["percentile_00_5"]) - float(props["mean"])) / std,
                       (float(props["percentile_99_5"]) - float(props["mean"])) / std])
    return {"mode": "fixed", "percentiles": [0.5, 99.5], "range": ranges}


def gvsl_layout(patch: List[int]) -> dict:
    """GVSL (METHODS.md §5.5; keys in the module docstring and documentation/methods/gvsl.md).

    Sizes in voxels of the pair patch P; angles in radians; ``weights`` = [ncc, smooth, restore]. The intensity
    map is per-patch here; :meth:`GVSL.default_layout` replaces it by the plan's (:func:`gvsl_intensity`).
    """
    return {"pair_patch": list(patch), **copy.deepcopy(GVSL.layout_defaults),
            "ncc_window": [min(9, 2 * (P // 8) + 1) for P in patch]}


# ============================================================================================ method

def _require(cond: bool, key: str, what: str) -> None:
    if not cond:
        raise SSLInputError(f"ssl layout of 'gvsl', key '{key}': {what}")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@register
class GVSL(SSLMethod):
    """Geometric visual similarity learning on a nnU-Net U-Net (see module docstring for the formulas).

    Attributes:
        affine_head, deform_head, restore_head: the Z-matching and restoration heads (not exported).
        window: NCC window (w0, w1, w2); weights: (w_ncc, w_smooth, w_restore).
    """

    name = "gvsl"
    trained_parts = "encoder and decoder (the whole U-Net, as in the GVSL paper)"
    cases_per_sample = 2

    @classmethod
    def variant_for(cls, architecture_family: str):
        """CNN: :class:`GVSL`; Primus: :class:`PrimusGVSL` (global = token map, local = the patch decoder's map)."""
        return {"cnn": GVSL, "primus": PrimusGVSL}.get(architecture_family)

    layout_defaults = {"ncc_window": 9, "affine_bounds": [math.pi / 9, 0.25, math.pi / 18],
                       "spatial_aug": {"rotation": math.pi / 9, "scale": [0.75, 1.25], "shear": math.pi / 18,
                                       "translation": 0.1, "elastic_sigma": [10, 13], "elastic_alpha": [0, 512]},
                       "appearance": dict(DEFAULT_APPEARANCE), "intensity": dict(DEFAULT_INTENSITY),
                       "pair_sampling": "matched", "weights": [1.0, 1.0, 1.0], "affine_grad": True,
                       "affine_hidden": 256, "deform_hidden": 16, "restore_hidden": 16, "min_shuffle_windows": 50}

    # ---------------------------------------------------------------------------------------------- planning
    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        layout = gvsl_layout(list(ctx.patch_size))
        layout["intensity"] = gvsl_intensity(ctx.normalization_schemes, ctx.intensity_properties)
        return list(ctx.patch_size), layout

    @classmethod
    def check_layout(cls, method_plan: dict, ssl_plan: dict):
        window = method_plan["layout"]["ncc_window"]
        if any(w > P for w, P in zip(window, method_plan["pretrain_patch_size"])):
            raise cls.layout_error(ssl_plan, "ncc_window", "window larger than the patch")
        if any(int(w) % 2 == 0 for w in window):
            raise cls.layout_error(ssl_plan, "ncc_window", "window sizes must be odd (centred box)")
        return []

    def untrained_parameters(self):
        """GVSL reads the last decoder stage d_{K-2}, never the 1x1 output head: every ``seg_layers`` entry is
        untrained (frozen, exported at initialisation)."""
        return [f"network.decoder.seg_layers.{name}" for name, _ in self.network.decoder.seg_layers.named_parameters()]

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        super().__init__(network, method_plan, ssl_plan, num_input_channels)
        layout = self.layout
        self.patch = [int(p) for p in self.required_patch_size(method_plan)]
        _require(len(self.patch) == 3, "pair_patch", f"needs 3 axes, got {self.patch}")
        win = layout["ncc_window"]
        win = [int(win)] * 3 if _is_num(win) else [int(w) for w in win]
        _require(len(win) == 3 and all(w >= 1 and w % 2 == 1 for w in win), "ncc_window",
                 f"needs 3 odd sizes >= 1, got {win}")
        _require(all(w <= p for w, p in zip(win, self.patch)), "ncc_window",
                 f"window {win} larger than the patch {self.patch}")
        self.window = win
        bounds = layout["affine_bounds"]
        _require(len(bounds) == 3 and all(_is_num(b) and b >= 0 for b in bounds), "affine_bounds",
                 f"needs [rotation, scale, shear] >= 0, got {bounds}")
        _require(bounds[1] < 1, "affine_bounds", "scale bound must be < 1 (scale 1 ± bound)")
        self.affine_bounds = [float(b) for b in bounds]
        weights = layout["weights"]
        _require(len(weights) == 3 and all(_is_num(w) and w >= 0 for w in weights), "weights",
                 f"needs [ncc, smooth, restore] >= 0, got {weights}")
        self.weights = [float(w) for w in weights]
        self.affine_grad = bool(layout["affine_grad"])
        self.spatial_aug = layout["spatial_aug"] or None
        if self.spatial_aug is not None:
            for key in ("rotation", "scale", "shear", "translation"):
                _require(key in self.spatial_aug, f"spatial_aug.{key}", "missing")
        self.appearance = {**DEFAULT_APPEARANCE, **(layout["appearance"] or {})}
        self.intensity = {**DEFAULT_INTENSITY, **(layout["intensity"] or {})}
        _require(self.intensity["mode"] in ("per_patch", "fixed"), "intensity.mode",
                 f"must be per_patch or fixed, got {self.intensity['mode']!r}")
        _require(self.intensity["mode"] != "fixed" or self.intensity.get("range") is not None, "intensity.range",
                 "mode 'fixed' needs a range [lo, hi] (or one per channel) in normalised units")
        self.pair_sampling = str(layout["pair_sampling"])
        _require(self.pair_sampling in ("matched", "independent"), "pair_sampling",
                 f"must be matched or independent, got {self.pair_sampling!r}")
        self.shuffle_window, self.shuffle_count = _shuffle_geometry(self.patch, {**layout,
                                                                                 "appearance": self.appearance})

        c_global, c_local = self.feature_channels(network)
        self.affine_head = AffineHead(c_global, int(layout["affine_hidden"]))
        self.deform_head = DeformHead(c_local, int(layout["deform_hidden"]))
        self.restore_head = RestoreHead(c_local, int(layout["restore_hidden"]), num_input_channels)

    def feature_channels(self, network: nn.Module) -> Tuple[int, int]:
        """``(C_g, C_l)`` of the global and local maps of :meth:`global_local_features` (the network checked):
        the bottleneck's and the last decoder stage's channels of a 3D U-Net."""
        check_unet(network)
        if len(network.encoder.strides[0]) != 3:
            raise SSLInputError("gvsl supports 3D networks only (the plan's network is not 3D)")
        return int(network.encoder.output_channels[-1]), int(network.encoder.output_channels[0])

    def global_local_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x (N, C, a0, a1, a2)`` → global ``f^g = e_{K-1} (N, C_g, a/S)`` (bottleneck) and local
        ``f^l = d_{K-2} (N, C_l, a0, a1, a2)`` (last decoder stage)."""
        enc, dec, _ = forward_features(self.network, x)
        return enc[-1], dec[-1]

    @classmethod
    def required_patch_size(cls, method_plan: dict) -> List[int]:
        return list(method_plan["layout"].get("pair_patch") or method_plan["pretrain_patch_size"])

    @classmethod
    def make_sampler(cls, spec: SamplerSpec):
        """:class:`ssl_nnunet.data.samplers.RelativePositionPairSampler` (``pair_sampling = "matched"``) or
        two independent random patches of different cases (``"independent"``)."""
        if cls.resolved_layout(spec.method_plan)["pair_sampling"] == "independent":
            return super().make_sampler(spec)
        return RelativePositionPairSampler(spec.dataset, spec.identifiers, spec.patch_size, spec.batch_size,
                                           seed=spec.seed, **spec.case_options)

    # ------------------------------------------------------------------------------------------------ views
    def appearance_transform(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``x_A (B, C, a0, a1, a2)`` (normalised) → ``x_A^t``: map to [0, 1], shuffle / Bézier / in-paint, map
        back (float32)."""
        app = self.appearance
        lo, hi = intensity_bounds(x, self.intensity)
        u = to_unit_range(x, lo, hi)
        if float(app["local_shuffle_p"]) > 0:
            u = local_shuffle(u, self.shuffle_window, self.shuffle_count, float(app["local_shuffle_p"]), generator)
        if float(app["nonlinear_p"]) > 0:
            u = bezier_intensity(u, float(app["nonlinear_p"]), int(app["bezier_points"]), generator)
        if app["inpaint"]:
            u = inpaint(u, int(app["inpaint_max_boxes"]), float(app["inpaint_continue_p"]), app["inpaint_size"],
                        generator)
        return from_unit_range(u, lo, hi)

    def make_views(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``batch (B, 2, C, a0, a1, a2)`` → ``{"A", "At", "B"}`` each ``(B, C, a0, a1, a2)`` float32 (the same
        spatial augmentation applied to all three; appearance transform on A before it)."""
        if batch.dim() != 6 or batch.shape[1] != 2:
            raise ValueError(f"GVSL expects a batch (B, 2, C, a0, a1, a2), got shape {tuple(batch.shape)}")
        with torch.no_grad(), torch.autocast(device_type=batch.device.type, enabled=False):
            a, b = batch[:, 0].float(), batch[:, 1].float()
            at = self.appearance_transform(a, generator)
            if self.spatial_aug is not None:
                disp = random_spatial_displacement(a.shape[0], a.shape[2:], self.spatial_aug, a.device, generator)
                a, at, b = (warp(v, disp, padding="min") for v in (a, at, b))
        return {"A": a, "At": at, "B": b}

    # ------------------------------------------------------------------------------------------------ model
    def match_pair(self, views: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Network + heads on the views. Returns float32 tensors: ``warped`` (B, C, a0, a1, a2) (moving B
        registered to A), ``displacement`` u and ``phi`` (B, 3, a0, a1, a2), ``restored`` (B, C, a0, a1, a2),
        ``matrix`` (B, 3, 3), ``translation`` (B, 3), ``params`` (bounded, dict)."""
        a, at, b = views["A"], views["At"], views["B"]
        n = a.shape[0]
        f_g, f_l = self.global_local_features(torch.cat([at, b], dim=0))
        fa_g, fb_g = f_g[:n], f_g[n:]
        fa_l, fb_l = f_l[:n], f_l[n:]
        params = bound_affine_params(self.affine_head(fb_g, fa_g), self.affine_bounds)
        if not self.affine_grad:  # the released code's behaviour: no gradient reaches the affine head
            params = {k: v.detach() for k, v in params.items()}
        with torch.autocast(device_type=a.device.type, enabled=False):
            matrix = affine_matrix(params["rotation"], params["scale"], params["shear"])
            fb_aff = affine_warp(fb_l.float(), matrix, params["translation"])
        phi = self.deform_head(fb_aff, fa_l.float()).float()
        restored = self.restore_head(fa_l).float()
        with torch.autocast(device_type=a.device.type, enabled=False):
            disp = compose_displacement(matrix, params["translation"], a.shape[2:], phi)
            warped = warp(b, disp, padding="min")
        return {"warped": warped, "displacement": disp, "phi": phi, "restored": restored, "matrix": matrix,
                "translation": params["translation"], "params": params}

    def losses(self, views: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Loss terms (float32 scalars): ``loss`` (weighted total, with gradient), ``ncc``, ``smooth``,
        ``restore`` (unweighted, detached), ``sim`` = mean local cc(warped B, A) and ``sim_gain`` = sim minus
        the same for the unregistered B (how much registration helps; > 0 once it is learned)."""
        with torch.autocast(device_type=views["A"].device.type, enabled=False):
            a = views["A"]
            ncc = ncc_loss(out["warped"], a, self.window)
            smooth = smoothness_loss(out["phi"])
            restore = F.mse_loss(out["restored"], a)
            w = self.weights
            total = w[0] * ncc + w[1] * smooth + w[2] * restore
            with torch.no_grad():
                sim = 1.0 - ncc.detach()
                sim0 = local_ncc(views["B"], a, self.window).mean()
        return {"loss": total, "ncc": ncc.detach(), "smooth": smooth.detach(), "restore": restore.detach(),
                "sim": sim, "sim_gain": sim - sim0}

    def forward(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``batch (B, 2, C, a0, a1, a2)`` → ``{"loss", "ncc", "smooth", "restore", "sim", "sim_gain"}``."""
        views = self.make_views(batch, generator)
        return self.losses(views, self.match_pair(views))

    @torch.no_grad()
    def previews(self, batch: torch.Tensor) -> Dict[str, Sequence[torch.Tensor]]:
        """Pair 0, channel 0 (fixed seed, so comparable over epochs): row 1 = A (fixed), B (moving), B warped
        onto A, |u| (composed displacement, voxels); row 2 = A^t (network input), restoration, A."""
        gen = torch.Generator(device=batch.device).manual_seed(0)
        views = self.make_views(batch[:1], gen)
        out = self.match_pair(views)

        def cpu(t):
            return t[0, 0].float().cpu()

        mag = out["displacement"][0].float().norm(dim=0).cpu()
        return {f"registration: A (fixed) | B (moving) | B warped to A | |field| (voxels, max {float(mag.max()):.2f})":
                [cpu(views["A"]), cpu(views["B"]), cpu(out["warped"]), mag],
                "restoration: A^t (input) | restored | A": [cpu(views["At"]), cpu(out["restored"]), cpu(views["A"])]}


LOCAL_FEATURES = ("patch_decoder", "tokens")


class PrimusGVSL(GVSL):
    """GVSL on Primus (documentation/methods/gvsl.md, "Primus"): GVSL's views, heads and losses on Primus' features.

    * global ``f^g (N, E, *P/t)``: every token encoded (:func:`~ssl_nnunet.backbones.primus.token_map`), the
      stride-t counterpart of the CNN's bottleneck; the affine head pools it after its conv trunk, as on the CNN.
    * local ``f^l (N, C_l, *P)`` (layout key ``local_features``):

      - ``patch_decoder`` (default): the network's own patch decoder ``up_projection`` without its last
        projection (transposed convolutions t → t/2 → … → 2 with LayerNorm and GELU; ``C_l`` its last hidden
        width, e.g. 8 at the cpu_smoke Primus, 16 at Primus-M), trilinearly upsampled by the last stride (2) to
        full resolution. The last projection never runs: it is frozen.
      - ``tokens``: the token map through a learned 1×1×1 convolution ``E → C_l`` (a head, not exported),
        trilinearly upsampled by t; ``up_projection`` never runs (frozen).

      The deformable and restoration heads read it.

    The appearance transform, the shared spatial augmentation, the pair sampling and the other layout keys are
    :class:`GVSL`'s; ``pair_patch`` must be the plan's patch (Primus' position embedding fixes the input).
    Export keeps ``down_projection`` + ``eva``; ``up_projection`` is not transferred, the target gets a fresh
    one for its classes.
    """

    trained_parts = ("down_projection and eva (GVSL's heads read the token map and the patch decoder's features); "
                     "up_projection is not transferred (the target gets a fresh one for its classes)")
    layout_defaults = {**GVSL.layout_defaults, "local_features": "patch_decoder"}

    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        patch, layout = super().default_layout(ctx)
        return patch, {**layout, "local_features": cls.layout_defaults["local_features"]}

    def feature_channels(self, network: nn.Module) -> Tuple[int, int]:
        """``(E, C_l)``: the token width and the patch decoder's last hidden width; the pair patch checked
        against the network's token grid."""
        from ssl_nnunet.backbones.primus import is_primus, token_grid
        if not is_primus(network):
            raise SSLInputError(f"the Primus GVSL needs a Primus network, got {type(network).__name__}")
        token = [int(t) for t in network.down_projection.proj.kernel_size]
        try:
            grid = token_grid(self.patch, token)
        except SSLInputError as e:
            raise SSLInputError(f"ssl layout of 'gvsl', key 'pair_patch': {e}") from None
        n_pos = network.eva.pos_embed.shape[1] if network.eva.pos_embed is not None else math.prod(grid)
        _require(n_pos == math.prod(grid), "pair_patch", f"{self.patch} gives {math.prod(grid)} tokens, the network's "
                 f"position embedding has {n_pos}: the pair patch must be the plan's patch_size (Primus input_shape)")
        self.local_features = str(self.layout["local_features"])
        _require(self.local_features in LOCAL_FEATURES, "local_features",
                 f"must be one of {LOCAL_FEATURES}, got {self.local_features!r}")
        c_local = int(network.up_projection.decode[-1].in_channels)
        self.local_proj = nn.Conv3d(int(network.embed_dim), c_local, 1) if self.local_features == "tokens" else None
        return int(network.embed_dim), c_local

    def global_local_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x (N, C, a0, a1, a2)`` → the token map ``(N, E, *a/t)`` and the local map ``(N, C_l, a0, a1, a2)``."""
        from ssl_nnunet.backbones.primus import token_map
        tokens = token_map(self.network, x)
        if self.local_proj is not None:
            hidden = self.local_proj(tokens)                                            # (N, C_l, *a/t)
        else:
            hidden = self.network.up_projection.decode[:-1](tokens)                     # (N, C_l, *a/2)
        return tokens, F.interpolate(hidden, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)

    def untrained_parameters(self):
        """The patch decoder's last projection (to C_in) never runs; with ``tokens`` none of it does."""
        decode = self.network.up_projection.decode
        first = 0 if self.local_proj is not None else len(decode) - 1
        return [f"network.up_projection.decode.{i}.{n}" for i in range(first, len(decode))
                for n, _ in decode[i].named_parameters()]
