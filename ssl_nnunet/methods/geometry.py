"""Spatial transforms of 3D patches on the batch's device (GVSL's geometry; Alice's rotations use
:func:`affine_theta`).

Conventions: tensors ``(B, C, a0, a1, a2)`` in nnU-Net's array-axis order; matrices, translations and
displacements in array-axis order too (``grid_sample`` wants ``(x, y, z) = (a2, a1, a0)``, the functions
here reorder). An affine map acts in voxels about the patch centre ``c = (n - 1)/2``:
``q = M (p - c) + c + τ ⊙ n/2`` (``τ`` a fraction of the half-extent of each axis). Warping "pulls": output
voxel p reads the moving image at ``p + u(p)``, so a constant field of +1 along axis a moves the content by
one voxel towards *lower* indices along a. Zero fields and identity matrices are exact identities.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ssl_nnunet.methods.helpers import uniform

__all__ = ["affine_matrix", "affine_theta", "affine_warp", "voxel_grid", "compose_displacement", "warp",
           "gaussian_smooth", "random_spatial_displacement"]


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
    rot = uniform((batch_size, 3), device, g, -cfg["rotation"], cfg["rotation"])
    scale = uniform((batch_size, 3), device, g, cfg["scale"][0], cfg["scale"][1])
    shear = uniform((batch_size, 6), device, g, -cfg["shear"], cfg["shear"])
    tau = uniform((batch_size, 3), device, g, -2 * cfg["translation"], 2 * cfg["translation"])
    elastic = None
    alpha_hi = float(cfg.get("elastic_alpha", [0, 0])[1])
    if alpha_hi > 0:
        sig_lo, sig_hi = cfg["elastic_sigma"]
        sigma = uniform((batch_size,), device, g, sig_lo, sig_hi)
        alpha = uniform((batch_size,), device, g, cfg["elastic_alpha"][0], alpha_hi)
        noise = uniform((batch_size, 3, *shape), device, g, -1.0, 1.0)
        elastic = gaussian_smooth(noise, sigma) * alpha.view(-1, 1, 1, 1, 1)
    return compose_displacement(affine_matrix(rot, scale, shear), tau, shape, elastic)
