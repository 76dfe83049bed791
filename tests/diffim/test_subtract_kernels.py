"""Fused whole-image passes of the subtraction (kernels/convolve.py) against their numpy definitions."""

from __future__ import annotations

import numpy as np
import pytest

from apfast.kernels.convolve import difference_masks, or_masks_any, planes_finite


@pytest.mark.parametrize("shape, r", [((37, 53), 4), ((5, 6), 3), ((64, 40), 0)])
def test_difference_masks_match_numpy(rng: np.random.Generator, shape: tuple[int, int], r: int) -> None:
    ny, nx = shape
    tgt = rng.integers(0, 1 << 20, shape, dtype=np.int32)
    grown = rng.integers(0, 1 << 20, shape, dtype=np.int32)
    edge_bit, not_grown = 1 << 4, (1 << 5) | (1 << 9)
    m1, m2 = np.empty(shape, np.int32), np.empty(shape, np.int32)
    difference_masks(tgt, grown, r, edge_bit, not_grown, m1, m2)
    edge = np.zeros(shape, bool)
    if r:
        edge[:r, :] = edge[ny - r:, :] = True
        edge[:, :r] = edge[:, nx - r:] = True
    e = np.where(edge, edge_bit, 0).astype(np.int32)
    np.testing.assert_array_equal(m1, grown | e)
    np.testing.assert_array_equal(m2, tgt | (grown & ~not_grown) | e)


def test_or_masks_any_and_planes_finite(rng: np.random.Generator) -> None:
    a = rng.integers(0, 64, (30, 41), dtype=np.int32)
    b = rng.integers(0, 64, (30, 41), dtype=np.int32)
    out = np.empty(a.shape, bool)
    or_masks_any(a, b, 0b100010, out)
    np.testing.assert_array_equal(out, ((a | b) & 0b100010) != 0)
    img = rng.normal(size=(30, 41)).astype(np.float32)
    var = np.ones_like(img)
    assert planes_finite(img, var)
    for bad in (np.nan, np.inf, -np.inf):
        v = var.copy()
        v[29, 40] = bad
        assert not planes_finite(img, v)
        i = img.copy()
        i[0, 0] = bad
        assert not planes_finite(i, var)
