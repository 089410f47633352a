"""Block masks and the masked reconstruction loss (METHODS.md §2.2 and §2.5).

Conventions: image tensors are ``(B, C, a0, a1, a2)``; a *low-resolution* mask is ``(B, 1, n0, n1, n2)``
with one value per mask unit, ``1 = visible`` and ``0 = hidden``; a unit covers ``(u0, u1, u2)`` voxels of
the patch, so ``n_ax = P_ax / u_ax``. The helpers are written for any number of spatial axes (2D works the
same way) but the docstrings use the 3D shapes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "num_hidden_units",
    "unit_grid",
    "random_block_mask",
    "expand_mask",
    "mask_at_resolution",
    "per_unit_target",
    "masked_mse",
]


def num_hidden_units(n_units: int, ratio: float) -> int:
    """Exact number of hidden units: ``floor(ratio * n_units + 0.5)`` (round half up, never banker's rounding)."""
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    return int(math.floor(float(ratio) * int(n_units) + 0.5))


def unit_grid(spatial_shape: Sequence[int], unit: Sequence[int]) -> Tuple[int, ...]:
    """Grid ``(n0, n1, n2) = P / u`` of a patch ``P = (a0, a1, a2)`` split into units ``u``.

    Raises:
        ValueError: when the lengths differ or a unit size does not divide the patch size on some axis.
    """
    spatial_shape = [int(s) for s in spatial_shape]
    unit = [int(u) for u in unit]
    if len(spatial_shape) != len(unit):
        raise ValueError(f"patch size {tuple(spatial_shape)} and mask unit {tuple(unit)} have different lengths")
    bad = [ax for ax, (p, u) in enumerate(zip(spatial_shape, unit)) if u <= 0 or p % u != 0]
    if bad:
        raise ValueError(
            f"mask unit {tuple(unit)} does not divide the patch size {tuple(spatial_shape)} on axis/axes {bad}; "
            f"every patch axis must be an integer multiple of the unit size")
    return tuple(p // u for p, u in zip(spatial_shape, unit))


def random_block_mask(batch_size: int, grid: Sequence[int], ratio: float, device=None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random unit mask with exactly ``floor(ratio * n + 0.5)`` hidden units per sample.

    For each sample a random permutation of the ``n = n0 * n1 * n2`` units is drawn with ``generator`` and the
    first ``n_hidden`` units of it are hidden. Units are numbered in C order over ``(n0, n1, n2)``.

    Args:
        batch_size: B.
        grid: ``(n0, n1, n2)``, units per axis.
        ratio: fraction of hidden units (0.75 for MAE).
        device: device of the returned mask (default: the generator's device, else CPU).
        generator: explicit ``torch.Generator`` for reproducible masks. It may live on another device than
            ``device`` (e.g. a CPU generator for a CUDA batch): the permutations are drawn on the generator's
            device and moved. ``None`` uses the global RNG of ``device``.

    Returns:
        float32 tensor ``(B, 1, n0, n1, n2)`` with values in {0, 1}; 1 = visible, 0 = hidden.
    """
    grid = tuple(int(g) for g in grid)
    if any(g <= 0 for g in grid):
        raise ValueError(f"mask grid must be positive on every axis, got {grid}")
    n = math.prod(grid)
    n_hidden = num_hidden_units(n, ratio)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    draw_device = generator.device if generator is not None else device
    flat = torch.ones(batch_size, n, dtype=torch.float32, device=draw_device)
    for b in range(batch_size):
        perm = torch.randperm(n, generator=generator, device=draw_device)
        flat[b, perm[:n_hidden]] = 0.0
    return flat.to(device).view(batch_size, 1, *grid)


def expand_mask(mask: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Repeat a unit mask ``(B, 1, n0, n1, n2)`` to ``(B, 1, a0, a1, a2)`` by integer repetition.

    Each unit becomes a block of ``a_ax / n_ax`` values per axis (nearest-neighbour, no interpolation).

    Raises:
        ValueError: when some ``a_ax`` is not an integer multiple of ``n_ax`` (the feature map's stride does
            not divide the mask unit on that axis).
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    grid = tuple(mask.shape[2:])
    if len(grid) != len(spatial_shape):
        raise ValueError(f"mask grid {grid} and target shape {spatial_shape} have a different number of axes")
    if any(s % g != 0 for s, g in zip(spatial_shape, grid)):
        raise ValueError(
            f"cannot expand a mask with unit grid {grid} to shape {spatial_shape}: every axis of the target must "
            f"be an integer multiple of the grid (the map's stride must divide the mask unit size)")
    reps = [s // g for s, g in zip(spatial_shape, grid)]
    if all(r == 1 for r in reps):
        return mask
    b, c = mask.shape[:2]
    # interleave a singleton axis after every grid axis, broadcast it to the repetition factor, fold back
    view_shape = [b, c]
    expand_shape = [b, c]
    for g, r in zip(grid, reps):
        view_shape += [g, 1]
        expand_shape += [g, r]
    return mask.reshape(view_shape).expand(expand_shape).reshape(b, c, *spatial_shape)


def mask_at_resolution(mask: Optional[torch.Tensor], spatial_shape: Sequence[int]) -> Optional[torch.Tensor]:
    """Mask ``(B, 1, a0, a1, a2)`` for a feature map of spatial size ``spatial_shape``, or ``None``.

    Returns ``None`` when ``mask`` is ``None`` or when the map is coarser than the unit on some axis
    (``a_ax`` not a multiple of ``n_ax``, i.e. the cumulative stride does not divide the unit): such maps are
    computed densely (METHODS §2.3 (b)). For a map of stride ``s`` of a patch ``P = n * u`` the test
    ``(P / s) % n == 0`` is exactly ``u % s == 0``.
    """
    if mask is None:
        return None
    grid = mask.shape[2:]
    if len(grid) != len(spatial_shape) or any(int(s) % int(g) != 0 for s, g in zip(spatial_shape, grid)):
        return None
    return expand_mask(mask, spatial_shape)


def per_unit_target(x: torch.Tensor, unit: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """Per-unit normalised target (MAE's normalised-pixel target, METHODS §2.5).

    ``t_v = (x_v - mu_U) / sqrt(var_U + eps)`` with mean and (population) variance over the voxels of the mask
    unit ``U`` containing ``v``, separately per sample and channel.

    Args:
        x: ``(B, C, a0, a1, a2)``; every ``a_ax`` must be a multiple of ``unit[ax]``.
        unit: ``(u0, u1, u2)``.

    Returns:
        float32 ``(B, C, a0, a1, a2)``, detached (a target never carries gradient).
    """
    spatial = tuple(x.shape[2:])
    grid = unit_grid(spatial, unit)
    b, c = x.shape[:2]
    split = [b, c]
    for g, u in zip(grid, unit):
        split += [g, int(u)]
    xs = x.detach().float().reshape(split)
    red = tuple(range(3, len(split), 2))  # the within-unit axes
    mean = xs.mean(dim=red, keepdim=True)
    var = xs.var(dim=red, unbiased=False, keepdim=True)
    return ((xs - mean) / torch.sqrt(var + eps)).reshape(x.shape)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the hidden voxels of the whole batch (METHODS §2.5).

    ``L = sum_v (1 - m_v) (pred_v - target_v)^2 / sum_v (1 - m_v)``, summed over all samples and channels.

    Args:
        pred: ``(B, C, a0, a1, a2)`` (any float dtype; computed in float32).
        target: ``(B, C, a0, a1, a2)``.
        mask: full-resolution mask ``(B, 1, a0, a1, a2)`` (or ``(B, C, ...)``), 1 = visible, 0 = hidden.

    Returns:
        float32 scalar; 0 when nothing is hidden.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    hidden = (mask == 0).expand_as(pred)
    sq = (pred.float() - target.float()) ** 2
    # where (not a product) so that non-finite values at visible voxels cannot reach the loss
    total = torch.where(hidden, sq, sq.new_zeros(())).sum()
    return total / hidden.sum().clamp_min(1).to(total.dtype)
