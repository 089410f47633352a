"""Small pieces shared by the method modules: per-axis layout integers, uniform draws, grid tiling."""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence

import torch

from ssl_nnunet.utilities.errors import SSLInputError

__all__ = ["per_axis_ints", "uniform", "split_into_cells"]


def _as_int(value) -> Optional[int]:
    """``value`` as an int when it is an integer (an int, or a float with an integral value), else ``None``;
    bools are not integers here (``true`` in a layout is a typo, not 1)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    return None


def per_axis_ints(value, ndim: int, key: str, method: Optional[str] = None) -> List[int]:
    """A layout value given per axis: an int (the same on every axis) or a list of ``ndim`` ints → ``ndim`` ints.

    Integral floats (``16.0``) are accepted; bools and non-integers are not.

    Raises:
        SSLInputError: naming ``key`` (and the ``method`` whose layout holds it, when given).
    """
    single = _as_int(value)
    if single is not None:
        return [single] * ndim
    if isinstance(value, (list, tuple)) and len(value) == ndim:
        ints = [_as_int(v) for v in value]
        if all(v is not None for v in ints):
            return ints
    where = f"ssl layout of '{method}': key" if method else "ssl layout key"
    raise SSLInputError(f"{where} '{key}' must be an int or a list of {ndim} ints, got {value!r}")


def uniform(shape: Sequence[int], device, generator: Optional[torch.Generator] = None, low: float = 0.0,
            high: float = 1.0) -> torch.Tensor:
    """``U[low, high)`` float32 of ``shape`` on ``device``.

    With a ``generator`` the numbers are drawn on the generator's device (which may differ from ``device``, e.g.
    a CPU generator for a CUDA batch) and moved, so a seeded generator gives the same values on every device;
    without one, the global RNG of ``device`` is used.
    """
    draw = generator.device if generator is not None else device
    u = torch.rand(tuple(shape), generator=generator, device=draw, dtype=torch.float32)
    if low != 0.0 or high != 1.0:
        u = u * (high - low) + low
    return u.to(device)


def split_into_cells(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``x (N, C, a0, a1, a2)`` cut into the cells of a ``grid (n0, n1, n2)`` → ``(N, n, C, a0/n0, a1/n1, a2/n2)``.

    Cell ``j = (k0·n1 + k1)·n2 + k2`` (C order over the grid, as :func:`ssl_nnunet.methods.masking.random_block_mask`
    numbers its units) covers ``[k_ax·c_ax, (k_ax+1)·c_ax)`` on every axis, ``c = a / n``; the cells tile ``x``
    exactly. A pure reshape/permute: every cell is a bit-exact slice of ``x``. Any number of spatial axes.

    Raises:
        ValueError: when the grid has another number of axes than ``x`` or does not divide its shape.
    """
    n, ch = x.shape[:2]
    spatial = [int(s) for s in x.shape[2:]]
    grid = [int(g) for g in grid]
    if len(grid) != len(spatial) or any(g <= 0 or s % g for s, g in zip(spatial, grid)):
        raise ValueError(f"shape {tuple(spatial)} cannot be split into a grid {tuple(grid)}")
    cell = [s // g for s, g in zip(spatial, grid)]
    shape = [n, ch]
    for g, c in zip(grid, cell):
        shape += [g, c]
    n_ax = len(grid)
    # (N, C, n0, c0, n1, c1, n2, c2) -> (N, n0, n1, n2, C, c0, c1, c2)
    perm = [0] + [2 + 2 * i for i in range(n_ax)] + [1] + [3 + 2 * i for i in range(n_ax)]
    return x.reshape(shape).permute(perm).reshape(n, math.prod(grid), ch, *cell)
