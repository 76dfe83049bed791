"""Matching DIA sources to fakes and simulated truth (apfast.dia.truth_match) against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from apfast.dia.truth_match import completeness, explained_by_truth, match_nearest, pull_stats, sep_arcsec


def _naive_sep(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    d = np.radians
    c = np.sin(d(dec1)) * np.sin(d(dec2)) + np.cos(d(dec1)) * np.cos(d(dec2)) * np.cos(d(ra1 - ra2))
    return float(np.degrees(np.arccos(np.clip(c, -1, 1))) * 3600.0)


def test_match_nearest_is_brute_force(rng: np.random.Generator) -> None:
    sra, sdec = 150 + rng.uniform(0, 0.01, 300), 2 + rng.uniform(0, 0.01, 300)
    rra, rdec = 150 + rng.uniform(0, 0.01, 200), 2 + rng.uniform(0, 0.01, 200)
    got = match_nearest(sra, sdec, rra, rdec, 1.5)
    for i in range(rra.size):
        seps = np.array([_naive_sep(sra[j], sdec[j], rra[i], rdec[i]) for j in range(sra.size)])
        j = int(np.argmin(seps))
        assert got[i] == (j if seps[j] < 1.5 else -1)
    assert (got >= 0).sum() > 20
    assert match_nearest([], [], rra, rdec, 1.0).tolist() == [-1] * 200
    assert sep_arcsec(359.9999, 0.0, 0.0001, 0.0) == pytest.approx(0.72, rel=1e-6)  # across RA = 0


def test_explained_by_truth() -> None:
    arc = 1 / 3600
    tr = {"visit": np.array([1, 2]), "ra": np.array([10.0, 10.0 + 100 * arc]), "dec": np.array([0.0, 0.0])}
    stars = {"ra": np.array([10.0 + 200 * arc, 10.0 + 300 * arc, 10.0 + 400 * arc]), "dec": np.zeros(3),
             "pmra": np.array([0.0, 30.0, 0.0]), "pmdec": np.zeros(3), "variable": np.array([True, False, False])}
    ra = 10.0 + arc * np.array([1.5, 100.0, 201.0, 302.0, 400.5, 500.0])
    got = explained_by_truth(ra, np.zeros(6), 1, tr, stars)
    # transient of visit 1; not visit 2's; variable; mover; a still star is no explanation; nothing there
    assert got.tolist() == [True, False, True, True, False, False]


def test_completeness_and_pulls() -> None:
    bins = completeness([5.5, 6.0, 12.0, 30.0, 2.0], [True, False, True, True, False], [0, 3, 5, 7, 10, np.inf])
    assert [(b.n, b.n_detected) for b in bins] == [(1, 0), (0, 0), (2, 1), (0, 0), (2, 2)]
    assert bins[2].fraction == 0.5 and np.isnan(bins[1].fraction)
    p = pull_stats([11.0, 9.0, 10.0, np.nan], [10.0, 10.0, 10.0, 10.0], [1.0, 1.0, 1.0, 1.0])
    assert p == {"n": 3, "median": 0.0, "robust_sigma": pytest.approx(1.4826)}
