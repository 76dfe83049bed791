"""The PSF-matching record of a subtraction (apfast.diffim.diagnostics) and the candidate bookkeeping it reads.

Synthetic truth: a grid of Gaussian stars, the template sharper than the science, and one star
three times brighter in the science only (a variable), which the fit must reject.
"""

from __future__ import annotations

import numpy as np
import pytest

from apfast.diffim.diagnostics import kernel_positions, psfmatch_diagnostics, residual_stamps
from apfast.diffim.psfmatch import STAMP_STATUS, PsfMatchConfig
from apfast.diffim.subtract import SubtractionResult, subtract_images
from apfast.exposure import Exposure
from apfast.psf import GaussianPsf
from apfast.psfmatch_diag import KERNEL_LABELS
from apfast.psfmatch_diag import STAMP_STATUS as RECORD_STATUS

N = 256
VARIABLE = (120, 120)


def _scene(rng: np.random.Generator, sigma: float, *, variable_gain: float) -> np.ndarray:
    yy, xx = np.mgrid[0:N, 0:N]
    img = np.zeros((N, N))
    for x0 in range(24, N - 16, 24):
        for y0 in range(24, N - 16, 24):
            f = 3e4 * (variable_gain if (x0, y0) == VARIABLE else 1.0)
            img += f * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / sigma**2) / (2 * np.pi * sigma**2)
    return img + rng.normal(0, 5, img.shape)


@pytest.fixture(scope="module")
def subtraction() -> SubtractionResult:
    rng = np.random.default_rng(7)
    var = np.full((N, N), 25.0)
    sci = Exposure(_scene(rng, 2.0, variable_gain=3.0), variance=var, psf=GaussianPsf(2.0, 25))
    tmp = Exposure(_scene(rng, 1.5, variable_gain=1.0), variance=var, psf=GaussianPsf(1.5, 25))
    grid = [(x, y) for x in range(24, N - 16, 24) for y in range(24, N - 16, 24)]
    cat = {"x": np.array([g[0] for g in grid], float), "y": np.array([g[1] for g in grid], float),
           "snr": np.array([200.0 if g == VARIABLE else 100.0 for g in grid])}
    return subtract_images(sci, tmp, sources=cat, config=PsfMatchConfig(size_cell=64))


def test_solution_keeps_every_candidate_and_why_it_was_rejected(subtraction: SubtractionResult) -> None:
    sol = subtraction.solution
    n = sol.n_candidates
    for a in (sol.candidate_x, sol.candidate_y, sol.candidate_status, sol.candidate_kernel_sums,
              sol.candidate_residual_std):
        assert a.shape == (n,)
    kept = sol.candidate_status == 0
    np.testing.assert_array_equal(sol.candidate_x[kept], sol.stamp_x)
    np.testing.assert_array_equal(sol.candidate_y[kept], sol.stamp_y)
    np.testing.assert_array_equal(sol.candidate_kernel_sums[kept], sol.kernel_sums)
    np.testing.assert_array_equal(sol.candidate_residual_std[kept], sol.residual_std)
    assert subtraction.n_stamps_used == kept.sum()
    assert set(np.unique(sol.candidate_status)) <= set(range(len(STAMP_STATUS)))
    assert STAMP_STATUS == RECORD_STATUS
    var = np.nonzero((sol.candidate_x == VARIABLE[0]) & (sol.candidate_y == VARIABLE[1]))[0]
    assert var.size == 1, "the variable star must be offered to the fit (highest S/N of its cell)"
    assert sol.candidate_status[var[0]] != 0
    assert sol.candidate_residual_std[var[0]] > 3 * np.median(sol.residual_std)


def test_record_from_the_subtraction(subtraction: SubtractionResult) -> None:
    d = psfmatch_diagnostics(subtraction)
    sol, kern = subtraction.solution, subtraction.kernel
    assert d.mode == subtraction.mode == "convolveTemplate" and d.shape == (N, N)
    x, y = kernel_positions(N, N)
    np.testing.assert_array_equal(d.kernel_x, x)
    np.testing.assert_array_equal(d.kernel_y, y)
    assert d.kernels.shape == (len(KERNEL_LABELS), kern.size, kern.size) and d.kernels.dtype == np.float32
    np.testing.assert_allclose(d.kernels[4], kern.evaluate((N - 1) / 2, (N - 1) / 2), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(d.kernel_sums, d.kernels.sum(axis=(1, 2)), rtol=1e-5)
    assert d.kernel_sums[4] == pytest.approx(1.0, abs=0.02)  # same flux scale in both images
    np.testing.assert_allclose(d.background, subtraction.background.evaluate(x, y))
    assert d.n_used == subtraction.n_stamps_used and d.stamp_x.size == sol.n_candidates
    # every candidate fits in 50 stamps here: all are stored, cropped to the 16-px half-size
    assert d.residuals.shape == (sol.n_candidates, 33, 33)
    assert sorted(d.stamp_residual_index.tolist()) == list(range(sol.n_candidates))
    kept = d.residuals[d.stamp_residual_index[d.kept]]
    assert 0.85 < float(np.nanstd(kept)) < 1.2  # a good fit leaves noise
    bad = d.residual_stamp(int(np.nonzero(~d.kept)[0][0]))
    assert bad is not None and float(np.nanmax(np.abs(bad[12:21, 12:21]))) > 20  # the variable's residual


def test_record_keeps_the_rejected_stamps_first(subtraction: SubtractionResult) -> None:
    d = psfmatch_diagnostics(subtraction, max_stamps=6, max_half=5)
    assert d.residuals.shape == (6, 11, 11)
    stored = d.stamp_residual_index >= 0
    assert stored.sum() == 6 and sorted(d.stamp_residual_index[stored].tolist()) == list(range(6))
    n_rej, n_kept = int((~d.kept).sum()), int(d.kept.sum())
    assert n_rej > 3 and n_kept > 6  # the variable's stamp and its neighbours' (they contain it) are rejected
    assert stored[~d.kept].sum() == 3  # half of the stamps are rejected ones, spread over the list
    assert np.all(stored[(d.stamp_x == VARIABLE[0]) & (d.stamp_y == VARIABLE[1])])  # the first rejected one
    assert d.stamp_x.size == subtraction.solution.n_candidates  # the table still has every candidate
    for i in np.nonzero(stored)[0][:3]:  # each stored stamp is the difference / sigma around its candidate
        cx, cy = int(d.stamp_x[i]), int(d.stamp_y[i])
        diff = subtraction.difference
        expect = diff.image[cy - 5 : cy + 6, cx - 5 : cx + 6] / np.sqrt(diff.variance[cy - 5 : cy + 6, cx - 5 : cx + 6])
        np.testing.assert_allclose(d.residual_stamp(int(i)), expect, rtol=1e-5)


def test_residual_stamps_off_the_edge_and_bad_variance() -> None:
    img = np.arange(36, dtype=np.float32).reshape(6, 6)
    var = np.full((6, 6), 4.0, np.float32)
    var[5, 5] = 0.0
    r = residual_stamps(img, var, np.array([5, 20]), np.array([5, 2]), 1)
    assert r.shape == (2, 3, 3)
    assert np.isnan(r[0, 1, 1])  # zero variance
    assert np.isnan(r[0, 2]).all() and np.isnan(r[0, :, 2]).all()  # beyond the last row / column
    assert r[0, 0, 0] == pytest.approx(img[4, 4] / 2)
    assert np.isnan(r[1]).all()  # entirely outside
