"""Shared method helpers (ssl_nnunet/methods/helpers.py): per-axis layout ints, uniform draws, grid tiling."""
import numpy as np
import pytest
import torch

from ssl_nnunet.methods.helpers import per_axis_ints, split_into_cells, uniform
from ssl_nnunet.utilities.errors import SSLInputError


def test_per_axis_ints_accepts_ints_and_lists_of_ints():
    assert per_axis_ints(4, 3, "mask_unit") == [4, 4, 4]
    assert per_axis_ints([1, 2, 3], 3, "mask_unit") == [1, 2, 3]
    assert per_axis_ints((8, 8), 2, "mask_unit") == [8, 8]
    assert per_axis_ints(16.0, 3, "crop_size") == [16, 16, 16]            # integral floats (JSON 16.0)
    assert per_axis_ints([np.int64(2), 4.0, 8], 3, "u2") == [2, 4, 8]
    assert all(type(v) is int for v in per_axis_ints([np.int64(2), 4.0, 8], 3, "u2"))


@pytest.mark.parametrize("bad", [True, [1, True, 1], 16.5, [16, 16.5, 16], [4, 4], [4, 4, 4, 4], "4", None,
                                 {"a": 1}, [[4], 4, 4]])
def test_per_axis_ints_rejects_bools_non_integers_and_wrong_lengths(bad):
    with pytest.raises(SSLInputError, match="'mim': key 'level1_unit' must be an int or a list of 3 ints"):
        per_axis_ints(bad, 3, "level1_unit", "mim")
    with pytest.raises(SSLInputError, match="^ssl layout key 'level1_unit'"):
        per_axis_ints(bad, 3, "level1_unit")


def test_uniform_range_device_and_generator():
    g = torch.Generator().manual_seed(3)
    u = uniform((1000,), "cpu", g, -2.0, 3.0)
    assert u.dtype == torch.float32 and float(u.min()) >= -2.0 and float(u.max()) < 3.0
    # [0, 1) draws are exactly torch.rand of the generator; a range is the affine map of the same draws
    assert torch.equal(uniform((5, 2), "cpu", torch.Generator().manual_seed(1)),
                       torch.rand((5, 2), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(uniform((5,), "cpu", torch.Generator().manual_seed(1), 1.0, 3.0),
                       torch.rand(5, generator=torch.Generator().manual_seed(1)) * 2.0 + 1.0)
    assert uniform((2, 3), "cpu").shape == (2, 3)                          # global RNG without a generator


def test_split_into_cells_tiles_in_c_order_and_rejects_non_dividing_grids():
    x = torch.arange(2 * 3 * 4 * 6 * 8, dtype=torch.float32).reshape(2, 3, 4, 6, 8)
    cells = split_into_cells(x, (2, 3, 2))
    assert cells.shape == (2, 12, 3, 2, 2, 4)
    j = (1 * 3 + 2) * 2 + 1                                                 # cell (k0, k1, k2) = (1, 2, 1)
    assert torch.equal(cells[:, j], x[:, :, 2:4, 4:6, 4:8])
    assert torch.equal(split_into_cells(x[:, :, 0], (2, 4))[:, 5], x[:, :, 0, 3:6, 2:4])   # any number of axes
    for bad in ((3, 3, 2), (2, 3), (0, 3, 2)):
        with pytest.raises(ValueError):
            split_into_cells(x, bad)
