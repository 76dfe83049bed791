"""``stamp_normal_equations`` against a plain NumPy/SciPy reference (convolve2d per basis image, then C^T W C).

Tolerances are rounding bounds, not guesses: every float64 sum of ``n`` products
``x_p y_p`` is exact to ``~n eps sum |x_p y_p|``, so each element of ``M``, ``b`` and
``sws`` is compared with ``1e-12`` times the sum of the absolute terms (the
``|C|^T W |C|`` products), with ``n eps ~ 1e-12`` for the largest stamps here.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from apfast.diffim.psfmatch import make_basis
from apfast.kernels.psfmatch import stamp_normal_equations


def _reference(ref, tgt, wgt, var_ref, cx, cy, half, row_filt, col_filt, pairs, with_bg):
    """Per stamp: C from scipy.signal.convolve2d of the window with every outer(col, row) basis image."""
    k = row_filt.shape[1]
    r = (k - 1) // 2
    s = 2 * half + 1
    nb = pairs.shape[0]
    nu = nb + int(with_bg)
    ns = cx.size
    out = {
        "m": np.zeros((ns, nu, nu)), "b": np.zeros((ns, nu)), "sws": np.zeros(ns), "wvr": np.zeros(ns),
        "npix": np.zeros(ns, np.int64), "m_abs": np.zeros((ns, nu, nu)), "b_abs": np.zeros((ns, nu)),
    }
    for si in range(ns):
        y0, x0 = cy[si] - half, cx[si] - half
        win = ref[y0 - r : y0 + s + r, x0 - r : x0 + s + r].astype(np.float64)
        cols = [signal.convolve2d(win, np.outer(col_filt[g], row_filt[f]), mode="valid").ravel() for f, g in pairs]
        if with_bg:
            cols.append(np.ones(s * s))
        c = np.stack(cols, axis=1)  # (s*s, nu)
        w = wgt[y0 : y0 + s, x0 : x0 + s].astype(np.float64).ravel()
        w = np.where(w > 0, w, 0.0)
        t = tgt[y0 : y0 + s, x0 : x0 + s].astype(np.float64).ravel()
        out["m"][si] = c.T @ (w[:, None] * c)
        out["b"][si] = c.T @ (w * t)
        out["sws"][si] = np.sum(w * t * t)
        out["wvr"][si] = np.sum(w * var_ref[y0 : y0 + s, x0 : x0 + s].astype(np.float64).ravel())
        out["npix"][si] = np.count_nonzero(w > 0)
        out["m_abs"][si] = np.abs(c).T @ (w[:, None] * np.abs(c))
        out["b_abs"][si] = np.abs(c).T @ (w * np.abs(t))
    return out


def _run(ref, tgt, wgt, var_ref, cx, cy, half, row_filt, col_filt, pairs, with_bg):
    ns = cx.size
    nu = pairs.shape[0] + int(with_bg)
    m, b = np.full((ns, nu, nu), np.nan), np.full((ns, nu), np.nan)
    sws, wvr, npix = np.full(ns, np.nan), np.full(ns, np.nan), np.full(ns, -1, np.int64)
    stamp_normal_equations(ref, tgt, wgt, var_ref, cx, cy, half, row_filt, col_filt, pairs, with_bg,
                           m, b, sws, wvr, npix)
    return {"m": m, "b": b, "sws": sws, "wvr": wvr, "npix": npix}


def _images(rng, shape, zero_frac=0.02):
    ref = rng.normal(50.0, 10.0, shape).astype(np.float32)
    tgt = rng.normal(0.0, 10.0, shape).astype(np.float32)
    wgt = rng.uniform(0.2, 2.0, shape).astype(np.float32)
    wgt[rng.random(shape) < zero_frac] = 0.0
    wgt[rng.random(shape) < zero_frac] = -1.0  # negative weights count as 0
    var_ref = rng.uniform(0.5, 3.0, shape).astype(np.float32)
    return ref, tgt, wgt, var_ref


def _centres(rng, shape, half, r, ns):
    m = half + r
    cx = rng.integers(m, shape[1] - m, ns).astype(np.int64)
    cy = rng.integers(m, shape[0] - m, ns).astype(np.int64)
    return cx, cy


def _check(got, exp):
    tol = 1e-12
    assert np.all(np.abs(got["m"] - exp["m"]) <= tol * exp["m_abs"] + 1e-300)
    assert np.all(np.abs(got["b"] - exp["b"]) <= tol * exp["b_abs"] + 1e-300)
    np.testing.assert_allclose(got["sws"], exp["sws"], rtol=tol, atol=0)
    np.testing.assert_allclose(got["wvr"], exp["wvr"], rtol=tol, atol=0)
    np.testing.assert_array_equal(got["npix"], exp["npix"])
    np.testing.assert_array_equal(got["m"], np.swapaxes(got["m"], 1, 2))  # exactly symmetric


@pytest.mark.parametrize("with_bg", [True, False])
def test_realistic_size_matches_reference(rng, with_bg):
    """27 Alard-Lupton bases (3 Gaussians, degrees 4, 2, 2), k = 21, S = 57, as a DECam CCD solve uses."""
    basis = make_basis((1.1, 2.2, 4.4), (4, 2, 2), 21)
    shape = (260, 240)
    ref, tgt, wgt, var_ref = _images(rng, shape)
    cx, cy = _centres(rng, shape, 28, 10, 5)
    args = (ref, tgt, wgt, var_ref, cx, cy, 28, basis.row_filt, basis.col_filt, basis.pairs, with_bg)
    got, exp = _run(*args), _reference(*args)
    _check(got, exp)
    assert got["m"].shape == (5, 27 + with_bg, 27 + with_bg)
    # the comparison can fail: a one-pixel shift of the stamps changes M far beyond the tolerance
    shifted = _run(ref, tgt, wgt, var_ref, cx + 1, cy, 28, basis.row_filt, basis.col_filt, basis.pairs, with_bg)
    assert np.max(np.abs(shifted["m"] - exp["m"]) - 1e-12 * exp["m_abs"]) > 0


@pytest.mark.parametrize(
    ("half", "size", "degrees", "with_bg"),
    [
        (0, 3, (0,), True),  # S = 1: one pixel
        (1, 3, (1,), False),  # 3 bases (not a multiple of 4 unknowns)
        (2, 3, (2, 1), True),
        (3, 5, (1, 1, 0), False),
        (5, 9, (3,), True),
        (13, 7, (2, 2), False),
    ],
)
def test_edge_sizes_match_reference(rng, half, size, degrees, with_bg):
    sigmas = tuple(0.8 * 2.0**i for i in range(len(degrees)))
    basis = make_basis(sigmas, degrees, size)
    shape = (2 * half + size + 12, 2 * half + size + 9)
    ref, tgt, wgt, var_ref = _images(rng, shape, zero_frac=0.1)
    cx, cy = _centres(rng, shape, half, size // 2, 4)
    args = (ref, tgt, wgt, var_ref, cx, cy, half, basis.row_filt, basis.col_filt, basis.pairs, with_bg)
    _check(_run(*args), _reference(*args))


def test_asymmetric_and_distinct_filters_match_reference(rng):
    """Row and column factor sets differ, some filters are neither even nor odd, one row filter is unused."""
    k = 7
    u = np.arange(k) - 3.0
    g = np.exp(-0.5 * (u / 1.3) ** 2)
    row_filt = np.ascontiguousarray(np.stack([g, g * u, g * (u + 0.7), rng.normal(size=k), g * u**2]))
    col_filt = np.ascontiguousarray(np.stack([g * u, g, rng.normal(size=k)]))
    pairs = np.array([[0, 0], [0, 1], [0, 2], [1, 1], [2, 0], [2, 2], [3, 1], [1, 2]], np.int64)  # row 4 unused
    shape = (70, 64)
    ref, tgt, wgt, var_ref = _images(rng, shape)
    cx, cy = _centres(rng, shape, 9, 3, 6)
    for with_bg in (True, False):
        args = (ref, tgt, wgt, var_ref, cx, cy, 9, row_filt, col_filt, pairs, with_bg)
        _check(_run(*args), _reference(*args))


def test_single_tap_filters_match_reference(rng):
    """k = 1 (no folding at all): the basis columns are the reference pixels times the tap products."""
    row_filt = np.array([[0.5], [-2.0]])
    col_filt = np.array([[3.0]])
    pairs = np.array([[0, 0], [1, 0]], np.int64)
    shape = (20, 22)
    ref, tgt, wgt, var_ref = _images(rng, shape)
    cx, cy = _centres(rng, shape, 4, 0, 3)
    args = (ref, tgt, wgt, var_ref, cx, cy, 4, row_filt, col_filt, pairs, True)
    _check(_run(*args), _reference(*args))


def test_zero_weight_stamp_gives_zero_equations(rng):
    basis = make_basis((1.0, 2.0), (2, 1), 9)
    shape = (60, 60)
    ref, tgt, wgt, var_ref = _images(rng, shape)
    cx = np.array([20, 40], np.int64)
    cy = np.array([20, 38], np.int64)
    wgt[cy[1] - 6 : cy[1] + 7, cx[1] - 6 : cx[1] + 7] = 0.0
    args = (ref, tgt, wgt, var_ref, cx, cy, 6, basis.row_filt, basis.col_filt, basis.pairs, True)
    got = _run(*args)
    _check(got, _reference(*args))
    assert got["npix"][1] == 0 and got["npix"][0] > 0
    assert np.all(got["m"][1] == 0.0) and np.all(got["b"][1] == 0.0) and got["sws"][1] == 0.0 and got["wvr"][1] == 0.0
    assert np.all(np.diag(got["m"][0]) > 0)
