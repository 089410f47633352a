"""Appearance transforms of 3D patches in a [0, 1] value range (the Models Genesis set GVSL uses), on the
batch's device.

``intensity_bounds`` / ``to_unit_range`` map nnU-Net-normalised values to [0, 1] (per-patch percentiles or
a fixed range) and ``from_unit_range`` maps back; ``local_shuffle``, ``bezier_intensity`` and ``inpaint``
act on ``u (B, C, a0, a1, a2)`` in [0, 1] and return the same shape.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ssl_nnunet.methods.helpers import uniform

__all__ = ["intensity_bounds", "to_unit_range", "from_unit_range", "local_shuffle", "bezier_intensity", "inpaint"]


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
    off = [min(int(o * v), v - 1) for o, v in zip(uniform((3,), dev, generator).tolist(), w)]
    m = [(s - o) // v for s, o, v in zip(shape, off, w)]
    n_cells, vol = int(np.prod(m)), int(np.prod(w))
    if n_cells == 0 or vol < 2:
        return u
    region = u[:, :, off[0]:off[0] + m[0] * w[0], off[1]:off[1] + m[1] * w[1], off[2]:off[2] + m[2] * w[2]]
    cells = region.reshape(b, c, m[0], w[0], m[1], w[1], m[2], w[2]).permute(0, 1, 2, 4, 6, 3, 5, 7)
    cells = cells.reshape(b, c, n_cells, vol)
    perm = uniform((b, n_cells, vol), dev, generator).argsort(dim=-1)
    shuffled = cells.gather(3, perm.unsqueeze(1).expand(b, c, n_cells, vol))
    k = min(int(n_windows), n_cells)
    chosen_idx = uniform((b, n_cells), dev, generator).topk(k, dim=1).indices
    chosen = torch.zeros(b, n_cells, dtype=torch.bool, device=dev).scatter_(1, chosen_idx, True)
    chosen &= (uniform((b, 1), dev, generator) < p)
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
    ctrl = uniform((b, 2, 2), dev, generator)  # two control points (x, y)
    zeros, ones = torch.zeros(b, 1, device=dev), torch.ones(b, 1, device=dev)
    t = torch.linspace(0, 1, n_points, device=dev)
    xs = _bernstein_curve(torch.cat([zeros, ctrl[:, :, 0], ones], 1), t).sort(dim=1).values.contiguous()
    ys = _bernstein_curve(torch.cat([zeros, ctrl[:, :, 1], ones], 1), t).sort(dim=1).values
    invert = uniform((b, 1), dev, generator) < 0.5
    ys = torch.where(invert, ys.flip(1), ys)
    flat = u.reshape(b, -1).float().contiguous()
    idx = torch.searchsorted(xs, flat).clamp(1, n_points - 1)
    x0, x1 = xs.gather(1, idx - 1), xs.gather(1, idx)
    y0, y1 = ys.gather(1, idx - 1), ys.gather(1, idx)
    wgt = ((flat - x0) / (x1 - x0).clamp(min=1e-12)).clamp(0, 1)
    mapped = (y0 + wgt * (y1 - y0)).reshape(u.shape)
    apply = (uniform((b,), dev, generator) < p).view(b, *([1] * (u.dim() - 1)))
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
    active = (uniform((b, k), dev, generator) < continue_p).cumprod(dim=1).bool()
    inside = []
    for ax, n in enumerate(shape):
        lo_s, hi_s = float(size[0]) * n, float(size[1]) * n
        side = (lo_s + (hi_s - lo_s) * uniform((b, k), dev, generator)).floor().clamp(1, n)
        start = ((n - side + 1) * uniform((b, k), dev, generator)).floor()
        coord = torch.arange(n, device=dev, dtype=torch.float32).view(1, 1, n)
        inside.append((coord >= start[..., None]) & (coord < (start + side)[..., None]))  # (b, k, n)
    mask = torch.zeros(b, 1, *shape, dtype=torch.bool, device=dev)
    for j in range(k):
        box = (inside[0][:, j, :, None, None] & inside[1][:, j, None, :, None] & inside[2][:, j, None, None, :])
        mask |= (box & active[:, j, None, None, None]).unsqueeze(1)
    return torch.where(mask, uniform(u.shape, dev, generator), u)
