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

Layout keys (``method_plan["layout"]``): ``pair_patch`` [a0, a1, a2]; ``ncc_window`` (odd ints);
``affine_bounds`` [rot, scale, shear]; ``spatial_aug`` {rotation, scale [lo, hi], shear, translation,
elastic_sigma [lo, hi], elastic_alpha [lo, hi]} (null/false: none); ``appearance`` {local_shuffle_p,
nonlinear_p, inpaint, ...}; ``weights`` [ncc, smooth, restore]; ``affine_grad``; ``affine_hidden``;
``deform_hidden``; ``restore_hidden``; ``min_shuffle_windows``; ``intensity`` {mode: per_patch | fixed,
percentiles, range}; ``pair_sampling``: matched | independent.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_nnunet.data.samplers import RelativePositionPairSampler, SamplerSpec
from ssl_nnunet.methods import register
from ssl_nnunet.methods.base import SSLMethod
from ssl_nnunet.methods.features import check_unet, forward_features
from ssl_nnunet.utilities.errors import SSLInputError

__all__ = [
    "GVSL",
    "affine_matrix", "bound_affine_params", "affine_theta", "affine_warp", "voxel_grid", "compose_displacement",
    "warp", "local_ncc", "ncc_loss", "smoothness_loss", "intensity_bounds", "to_unit_range", "from_unit_range",
    "local_shuffle", "bezier_intensity", "inpaint", "gaussian_smooth", "random_spatial_displacement",
]

NCC_EPS = 1e-5
DEFAULT_APPEARANCE = {"local_shuffle_p": 0.8, "nonlinear_p": 0.9, "inpaint": True,
                      "shuffle_windows_per_128": 5000, "shuffle_window_fraction": 0.05,
                      "inpaint_max_boxes": 30, "inpaint_continue_p": 0.95, "inpaint_size": [0.1, 0.2],
                      "bezier_points": 1000}
DEFAULT_INTENSITY = {"mode": "per_patch", "percentiles": [0.5, 99.5], "range": None}


# ============================================================================================ random helpers

def _rand(shape, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=generator, dtype=torch.float32)


def _uniform(lo: float, hi: float, shape, device, generator) -> torch.Tensor:
    return lo + (hi - lo) * _rand(shape, device, generator)


# ============================================================================================ geometry

def affine_matrix(rotation: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor) -> torch.Tensor:
    """Linear part ``M = Sh · Sc · R_0 · R_1 · R_2`` (B, 3, 3) in array-axis order (a0, a1, a2).

    Built with ``torch.stack`` so every entry stays differentiable w.r.t. the parameters.

    Args:
        rotation: (B, 3) angles (rad); ``R_k`` rotates in the plane of the two axes other than a_k
            (R_0 = "R_z", R_1 = "R_y", R_2 = "R_x" with z, y, x = a0, a1, a2).
        scale: (B, 3) factors per axis.
        shear: (B, 6) angles (rad) for the off-diagonal entries (01, 02, 10, 12, 20, 21); entry = tan(angle).
    Zero rotation/shear and unit scale give the identity.
    """
    one, zero = torch.ones_like(rotation[:, 0]), torch.zeros_like(rotation[:, 0])
    c, s = torch.cos(rotation), torch.sin(rotation)

    def mat(*entries):
        return torch.stack(entries, dim=-1).reshape(-1, 3, 3)

    r0 = mat(one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0])
    r1 = mat(c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1])
    r2 = mat(c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one)
    sc = torch.diag_embed(scale)
    t = torch.tan(shear)
    sh = mat(one, t[:, 0], t[:, 1], t[:, 2], one, t[:, 3], t[:, 4], t[:, 5], one)
    return sh @ sc @ r0 @ r1 @ r2


def bound_affine_params(raw: Dict[str, torch.Tensor], bounds: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Bounded parameters from the affine head's raw outputs (§5.1): ``rot = clamp(r)·b_rot``,
    ``scale = 1 + b_scale·clamp(s)``, ``shear = clamp(h)·b_shear``, translation unchanged; clamp to [-1, 1]."""
    b_rot, b_scale, b_shear = (float(b) for b in bounds)
    return {"rotation": raw["rotation"].clamp(-1, 1) * b_rot,
            "scale": 1.0 + b_scale * raw["scale"].clamp(-1, 1),
            "shear": raw["shear"].clamp(-1, 1) * b_shear,
            "translation": raw["translation"]}


def affine_theta(matrix: torch.Tensor, translation: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``theta (B, 3, 4)`` for ``F.affine_grid(..., align_corners=False)``.

    In voxels the map is ``q = M (p - c) + c + τ ⊙ n/2`` (c = (n-1)/2). With ``align_corners=False`` a voxel
    index i has normalised coordinate ``(i - c)·2/n``, hence ``theta = D⁻¹ M D`` with ``D = diag(n/2)`` plus
    the translation τ (already normalised per axis), both reordered to grid_sample's (x, y, z) = (a2, a1, a0).
    """
    n = torch.tensor([float(s) for s in shape], device=matrix.device, dtype=matrix.dtype)
    m_norm = matrix * n[None, None, :] / n[None, :, None]
    lin = m_norm.flip(1).flip(2)
    return torch.cat([lin, translation.flip(-1).unsqueeze(-1)], dim=2)


def affine_warp(x: torch.Tensor, matrix: torch.Tensor, translation: torch.Tensor,
                padding_mode: str = "zeros") -> torch.Tensor:
    """Trilinear affine warp of ``x (B, C, a0, a1, a2)``: ``out(p) = x(M (p - c) + c + τ ⊙ n/2)``.

    ``affine_grid`` + ``grid_sample`` with ``align_corners=False`` on both (identity → exact identity).
    """
    theta = affine_theta(matrix.float(), translation.float(), x.shape[2:])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=False)


def voxel_grid(shape: Sequence[int], device) -> torch.Tensor:
    """Voxel index coordinates ``(3, a0, a1, a2)`` (float32), channel k = index along a_k."""
    axes = [torch.arange(int(s), device=device, dtype=torch.float32) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def compose_displacement(matrix: torch.Tensor, translation: torch.Tensor, shape: Sequence[int],
                         field: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Displacement ``u (B, 3, a0, a1, a2)`` (voxels) of the affine map applied after ``field``.

    ``u(p) = M (p + φ(p) - c) + c + τ ⊙ n/2 - p``: sampling the moving image at ``p + u`` equals warping it
    by the affine map first and then by φ (``x_B(A(p + φ(p)))``), in one resampling.
    """
    device = matrix.device
    p = voxel_grid(shape, device)[None]
    n = torch.tensor([float(s) for s in shape], device=device)
    c = ((n - 1) / 2).view(1, 3, 1, 1, 1)
    pts = p - c if field is None else p + field.float() - c
    moved = torch.einsum("bij,bj...->bi...", matrix.float(), pts)
    shift = (translation.float() * n / 2).view(-1, 3, 1, 1, 1)
    return moved + c + shift - p


def _fill_min(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).amin(dim=2).view(*x.shape[:2], *([1] * (x.dim() - 2)))


def warp(moving: torch.Tensor, displacement: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Spatial transformer: ``out(p) = moving(p + u(p))`` (trilinear), ``u (B, 3, a0, a1, a2)`` in voxels.

    Coordinates are normalised as ``2 q / (n - 1) - 1`` and sampled with ``align_corners=True`` (so u = 0 is an
    exact identity; corrects §5.2-7-ii). ``padding``: ``"zeros"``, ``"border"`` or ``"min"`` (outside voxels
    get the per-sample, per-channel minimum of ``moving``).
    """
    shape = moving.shape[2:]
    q = voxel_grid(shape, moving.device)[None] + displacement.float()
    n = torch.tensor([float(s) for s in shape], device=moving.device).view(1, 3, 1, 1, 1)
    grid = torch.where(n > 1, 2 * q / (n - 1).clamp(min=1) - 1, torch.zeros_like(q))
    grid = grid.permute(0, 2, 3, 4, 1).flip(-1).to(moving.dtype).contiguous()
    if padding == "min":
        m = _fill_min(moving)
        return F.grid_sample(moving - m, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + m
    return F.grid_sample(moving, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def gaussian_smooth(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian smoothing of ``x (B, K, a0, a1, a2)`` with a per-sample ``sigma (B,)`` (voxels).

    Kernel truncated at ``ceil(3 σ)`` and normalised to sum 1, zero padding (scipy's ``gaussian_filter``
    with ``mode="constant"``). Applied as one (n × n) banded matrix per axis and sample (a matmul: far faster
    than a 3σ-wide convolution for σ of 10+ voxels).
    """
    out = x.float()
    b, k = x.shape[:2]
    sig = sigma.float().clamp(min=1e-3).view(-1, 1, 1)
    radius = torch.ceil(3 * sig)
    t_max = int(radius.max().item())  # one host scalar: the length of the normalising tap range
    taps = torch.arange(-t_max, t_max + 1, device=x.device, dtype=torch.float32).view(1, 1, -1)
    norm = (torch.exp(-taps ** 2 / (2 * sig ** 2)) * (taps.abs() <= radius)).sum(-1, keepdim=True)  # (B, 1, 1)
    for ax in range(3):
        n = x.shape[2 + ax]
        idx = torch.arange(n, device=x.device, dtype=torch.float32)
        dist = idx.view(1, n, 1) - idx.view(1, 1, n)
        mat = torch.exp(-dist ** 2 / (2 * sig ** 2)) * (dist.abs() <= radius) / norm  # (B, n, n): out_i = Σ_j m_ij x_j
        moved = torch.movedim(out, 2 + ax, -1)
        shape = moved.shape
        out = torch.movedim(torch.bmm(moved.reshape(b, -1, n), mat.transpose(1, 2)).reshape(shape), -1, 2 + ax)
    return out


def random_spatial_displacement(batch_size: int, shape: Sequence[int], cfg: dict, device,
                                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random spatial augmentation as a displacement ``(B, 3, a0, a1, a2)`` (voxels, for :func:`warp`).

    Per sample: rotation U(±rotation) and shear U(±shear) per angle, scale U(scale) per axis, translation
    U(±translation)·n voxels per axis, elastic field = α·Gauss_σ(U(-1, 1) noise) with σ ~ U(elastic_sigma),
    α ~ U(elastic_alpha); composed as ``u(p) = M (p + e(p) - c) + c + t - p``.
    """
    g = generator
    rot = _uniform(-cfg["rotation"], cfg["rotation"], (batch_size, 3), device, g)
    scale = _uniform(cfg["scale"][0], cfg["scale"][1], (batch_size, 3), device, g)
    shear = _uniform(-cfg["shear"], cfg["shear"], (batch_size, 6), device, g)
    tau = _uniform(-2 * cfg["translation"], 2 * cfg["translation"], (batch_size, 3), device, g)
    elastic = None
    alpha_hi = float(cfg.get("elastic_alpha", [0, 0])[1])
    if alpha_hi > 0:
        sig_lo, sig_hi = cfg["elastic_sigma"]
        sigma = _uniform(sig_lo, sig_hi, (batch_size,), device, g)
        alpha = _uniform(cfg["elastic_alpha"][0], alpha_hi, (batch_size,), device, g)
        noise = _uniform(-1.0, 1.0, (batch_size, 3, *shape), device, g)
        elastic = gaussian_smooth(noise, sigma) * alpha.view(-1, 1, 1, 1, 1)
    return compose_displacement(affine_matrix(rot, scale, shear), tau, shape, elastic)


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


# ============================================================================================ appearance

def intensity_bounds(x: torch.Tensor, cfg: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """``lo, hi (B, C, 1, 1, 1)`` of the map to [0, 1]: per-patch percentiles of ``x`` or a fixed range.

    ``cfg["mode"] == "fixed"`` uses ``cfg["range"]``: ``[lo, hi]`` or one ``[lo, hi]`` per channel (in nnU-Net
    normalised units). Degenerate ranges (hi - lo < 1e-6) are widened to 1.
    """
    b, c = x.shape[:2]
    if cfg.get("mode", "per_patch") == "fixed":
        rng = torch.as_tensor(cfg["range"], dtype=torch.float32, device=x.device).reshape(-1, 2)
        rng = rng.expand(c, 2) if rng.shape[0] == 1 else rng
        lo = rng[:, 0].view(1, c, 1, 1, 1).expand(b, c, 1, 1, 1)
        hi = rng[:, 1].view(1, c, 1, 1, 1).expand(b, c, 1, 1, 1)
    else:
        flat = x.detach().float().reshape(b * c, -1)
        step = max(1, math.ceil(flat.shape[1] / 2 ** 20))  # percentiles of a strided subsample when large
        flat = flat[:, ::step]
        n = flat.shape[1]
        p_lo, p_hi = (float(p) / 100.0 for p in cfg.get("percentiles", [0.5, 99.5]))
        lo = flat.kthvalue(int(round(p_lo * (n - 1))) + 1, dim=1).values.view(b, c, 1, 1, 1)
        hi = flat.kthvalue(int(round(p_hi * (n - 1))) + 1, dim=1).values.view(b, c, 1, 1, 1)
    hi = torch.where(hi - lo < 1e-6, lo + 1.0, hi)
    return lo, hi


def to_unit_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``clamp((x - lo) / (hi - lo), 0, 1)``."""
    return ((x.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def from_unit_range(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_unit_range` on [0, 1]: ``lo + u (hi - lo)``."""
    return lo + u * (hi - lo)


def _shuffle_geometry(shape: Sequence[int], layout: dict) -> Tuple[List[int], int]:
    app = layout["appearance"]
    window = [max(2, int(round(float(app["shuffle_window_fraction"]) * s))) for s in shape]
    n = int(round(float(app["shuffle_windows_per_128"]) * float(np.prod([s / 128.0 for s in shape]))))
    return window, max(int(layout.get("min_shuffle_windows", 50)), n)


def local_shuffle(u: torch.Tensor, window: Sequence[int], n_windows: int, p: float,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Local voxel shuffling of ``u (B, C, a0, a1, a2)``: with probability ``p`` per sample, the voxels inside
    ``n_windows`` non-overlapping boxes of size ``window`` are randomly permuted (same permutation for every
    channel). Boxes are cells of a grid with a random offset (one per batch), drawn without replacement."""
    b, c = u.shape[:2]
    shape = u.shape[2:]
    dev = u.device
    w = [min(int(v), int(s)) for v, s in zip(window, shape)]
    # random grid offset in [0, w) per axis (three host scalars per step: they fix the slicing shapes)
    off = [min(int(o * v), v - 1) for o, v in zip(_rand((3,), dev, generator).tolist(), w)]
    m = [(s - o) // v for s, o, v in zip(shape, off, w)]
    n_cells, vol = int(np.prod(m)), int(np.prod(w))
    if n_cells == 0 or vol < 2:
        return u
    region = u[:, :, off[0]:off[0] + m[0] * w[0], off[1]:off[1] + m[1] * w[1], off[2]:off[2] + m[2] * w[2]]
    cells = region.reshape(b, c, m[0], w[0], m[1], w[1], m[2], w[2]).permute(0, 1, 2, 4, 6, 3, 5, 7)
    cells = cells.reshape(b, c, n_cells, vol)
    perm = _rand((b, n_cells, vol), dev, generator).argsort(dim=-1)
    shuffled = cells.gather(3, perm.unsqueeze(1).expand(b, c, n_cells, vol))
    k = min(int(n_windows), n_cells)
    chosen_idx = _rand((b, n_cells), dev, generator).topk(k, dim=1).indices
    chosen = torch.zeros(b, n_cells, dtype=torch.bool, device=dev).scatter_(1, chosen_idx, True)
    chosen &= (_rand((b, 1), dev, generator) < p)
    cells = torch.where(chosen[:, None, :, None], shuffled, cells)
    cells = cells.reshape(b, c, m[0], m[1], m[2], w[0], w[1], w[2]).permute(0, 1, 2, 5, 3, 6, 4, 7)
    out = u.clone()
    out[:, :, off[0]:off[0] + m[0] * w[0], off[1]:off[1] + m[1] * w[1], off[2]:off[2] + m[2] * w[2]] = \
        cells.reshape(region.shape)
    return out


def _bernstein_curve(ctrl: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cubic Bézier points (B, N) of control values ``ctrl (B, 4)`` at ``t (N,)``."""
    t = t[None]
    basis = [(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3]
    return sum(ctrl[:, k:k + 1] * basis[k] for k in range(4))


def bezier_intensity(u: torch.Tensor, p: float, n_points: int = 1000,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Non-linear intensity map of ``u (B, C, ...)`` in [0, 1], with probability ``p`` per sample.

    A cubic Bézier curve through (0, 0), two random control points in [0, 1)², (1, 1) is sampled at
    ``n_points``; its x and y values are sorted to a monotone lookup table y = f(x), reversed (decreasing map,
    Models Genesis' inversion) with probability 0.5, and applied by linear interpolation.
    """
    b = u.shape[0]
    dev = u.device
    ctrl = _rand((b, 2, 2), dev, generator)  # two control points (x, y)
    zeros, ones = torch.zeros(b, 1, device=dev), torch.ones(b, 1, device=dev)
    t = torch.linspace(0, 1, n_points, device=dev)
    xs = _bernstein_curve(torch.cat([zeros, ctrl[:, :, 0], ones], 1), t).sort(dim=1).values.contiguous()
    ys = _bernstein_curve(torch.cat([zeros, ctrl[:, :, 1], ones], 1), t).sort(dim=1).values
    invert = _rand((b, 1), dev, generator) < 0.5
    ys = torch.where(invert, ys.flip(1), ys)
    flat = u.reshape(b, -1).float().contiguous()
    idx = torch.searchsorted(xs, flat).clamp(1, n_points - 1)
    x0, x1 = xs.gather(1, idx - 1), xs.gather(1, idx)
    y0, y1 = ys.gather(1, idx - 1), ys.gather(1, idx)
    wgt = ((flat - x0) / (x1 - x0).clamp(min=1e-12)).clamp(0, 1)
    mapped = (y0 + wgt * (y1 - y0)).reshape(u.shape)
    apply = (_rand((b,), dev, generator) < p).view(b, *([1] * (u.dim() - 1)))
    return torch.where(apply, mapped, u)


def inpaint(u: torch.Tensor, max_boxes: int, continue_p: float, size: Sequence[float],
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """In-painting of ``u (B, C, a0, a1, a2)``: box k (k < max_boxes) is drawn while consecutive draws stay
    below ``continue_p`` (so the first box has probability ``continue_p``); sides U[size_lo·n, size_hi·n) voxels
    per axis (at least 1), positions uniform inside the patch; boxes are filled with U[0, 1) noise per voxel."""
    b = u.shape[0]
    shape = u.shape[2:]
    dev = u.device
    k = int(max_boxes)
    if k < 1:
        return u
    active = (_rand((b, k), dev, generator) < continue_p).cumprod(dim=1).bool()
    inside = []
    for ax, n in enumerate(shape):
        lo_s, hi_s = float(size[0]) * n, float(size[1]) * n
        side = (lo_s + (hi_s - lo_s) * _rand((b, k), dev, generator)).floor().clamp(1, n)
        start = ((n - side + 1) * _rand((b, k), dev, generator)).floor()
        coord = torch.arange(n, device=dev, dtype=torch.float32).view(1, 1, n)
        inside.append((coord >= start[..., None]) & (coord < (start + side)[..., None]))  # (b, k, n)
    mask = torch.zeros(b, 1, *shape, dtype=torch.bool, device=dev)
    for j in range(k):
        box = (inside[0][:, j, :, None, None] & inside[1][:, j, None, :, None] & inside[2][:, j, None, None, :])
        mask |= (box & active[:, j, None, None, None]).unsqueeze(1)
    return torch.where(mask, _rand(u.shape, dev, generator), u)


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
    trained_parts = ("encoder and decoder (the whole U-Net, as in the GVSL paper)")
    cases_per_sample = 2

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        super().__init__(network, method_plan, ssl_plan, num_input_channels)
        check_unet(network)
        if len(network.encoder.strides[0]) != 3:
            raise SSLInputError("gvsl supports 3D networks only (the plan's network is not 3D)")
        layout = self.layout
        self.patch = [int(p) for p in self.required_patch_size(method_plan)]
        _require(len(self.patch) == 3, "pair_patch", f"needs 3 axes, got {self.patch}")
        win = layout.get("ncc_window", 9)
        win = [int(win)] * 3 if _is_num(win) else [int(w) for w in win]
        _require(len(win) == 3 and all(w >= 1 and w % 2 == 1 for w in win), "ncc_window",
                 f"needs 3 odd sizes >= 1, got {win}")
        _require(all(w <= p for w, p in zip(win, self.patch)), "ncc_window",
                 f"window {win} larger than the patch {self.patch}")
        self.window = win
        bounds = layout.get("affine_bounds", [math.pi / 9, 0.25, math.pi / 18])
        _require(len(bounds) == 3 and all(_is_num(b) and b >= 0 for b in bounds), "affine_bounds",
                 f"needs [rotation, scale, shear] >= 0, got {bounds}")
        _require(bounds[1] < 1, "affine_bounds", "scale bound must be < 1 (scale 1 ± bound)")
        self.affine_bounds = [float(b) for b in bounds]
        weights = layout.get("weights", [1.0, 1.0, 1.0])
        _require(len(weights) == 3 and all(_is_num(w) and w >= 0 for w in weights), "weights",
                 f"needs [ncc, smooth, restore] >= 0, got {weights}")
        self.weights = [float(w) for w in weights]
        self.affine_grad = bool(layout.get("affine_grad", True))
        self.spatial_aug = layout.get("spatial_aug") or None
        if self.spatial_aug is not None:
            for key in ("rotation", "scale", "shear", "translation"):
                _require(key in self.spatial_aug, f"spatial_aug.{key}", "missing")
        self.appearance = {**DEFAULT_APPEARANCE, **(layout.get("appearance") or {})}
        self.intensity = {**DEFAULT_INTENSITY, **(layout.get("intensity") or {})}
        _require(self.intensity["mode"] in ("per_patch", "fixed"), "intensity.mode",
                 f"must be per_patch or fixed, got {self.intensity['mode']!r}")
        _require(self.intensity["mode"] != "fixed" or self.intensity.get("range") is not None, "intensity.range",
                 "mode 'fixed' needs a range [lo, hi] (or one per channel) in normalised units")
        self.pair_sampling = str(layout.get("pair_sampling", "matched"))
        _require(self.pair_sampling in ("matched", "independent"), "pair_sampling",
                 f"must be matched or independent, got {self.pair_sampling!r}")
        self.shuffle_window, self.shuffle_count = _shuffle_geometry(self.patch, {**layout,
                                                                                 "appearance": self.appearance})

        c_global = int(network.encoder.output_channels[-1])
        c_local = int(network.encoder.output_channels[0])
        self.affine_head = AffineHead(c_global, int(layout.get("affine_hidden", 256)))
        self.deform_head = DeformHead(c_local, int(layout.get("deform_hidden", 16)))
        self.restore_head = RestoreHead(c_local, int(layout.get("restore_hidden", 16)), num_input_channels)

    @classmethod
    def required_patch_size(cls, method_plan: dict) -> List[int]:
        return list(method_plan.get("layout", {}).get("pair_patch") or method_plan["pretrain_patch_size"])

    @classmethod
    def make_sampler(cls, spec: SamplerSpec):
        """:class:`ssl_nnunet.data.samplers.RelativePositionPairSampler` (``pair_sampling = "matched"``) or
        two independent random patches of different cases (``"independent"``)."""
        if spec.method_plan.get("layout", {}).get("pair_sampling", "matched") == "independent":
            return super().make_sampler(spec)
        return RelativePositionPairSampler(spec.dataset, spec.identifiers, spec.patch_size, spec.batch_size,
                                           seed=spec.seed)

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
        enc, dec, _ = forward_features(self.network, torch.cat([at, b], dim=0))
        f_g, f_l = enc[-1], dec[-1]
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
