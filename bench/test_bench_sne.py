"""``stamp_normal_equations`` at the size of one DECam CCD solve (145 stamps, S = 57, k = 21, 27 bases + bg).

Three benchmarks in one group, so old and new are timed in the same run on the same load:

- ``test_sne_apfast``: the kernel in ``apfast.kernels.psfmatch``;
- ``test_sne_v1_reference``: a private copy of the previous kernel (full ``C`` per stamp,
  one serial dot product per element of ``M``), kept here only as the speed reference;
- ``test_sne_numpy_reference``: the obvious NumPy/SciPy version (``convolve2d`` per basis
  image, then ``C^T W C`` with BLAS) on the first 10 stamps only; it is about 15x slower per
  stamp, so multiply its time by 14.5 (``extra_info["scale_to_145_stamps"]``) to compare.

The v1 reference is marked ``slow`` (its compilation alone takes seconds): time all three with
``pytest bench/test_bench_sne.py -m '' --benchmark-enable``. With ``--benchmark-disable`` (the
default run) each selected test runs once; the time is mostly the numba compilation.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import prange
from scipy import signal

from apfast._jit import pjit
from apfast.diffim.psfmatch import make_basis
from apfast.kernels.psfmatch import stamp_normal_equations

SHAPE = (4096, 2048)
NS, HALF, K = 145, 28, 21
N_REF = 10


@pjit
def _sne_v1(ref, tgt, wgt, var_ref, cx, cy, half, row_filt, col_filt, pairs, with_bg,
                           m_out, b_out, sws_out, wvr_out, npix_out):
    """The previous kernel (full C per stamp, one serial dot product per M element): timing reference only."""
    ns = cx.shape[0]
    nb = pairs.shape[0]
    nr = row_filt.shape[0]
    k = row_filt.shape[1]
    r = (k - 1) // 2
    s = 2 * half + 1
    nu = nb + (1 if with_bg else 0)
    for si in prange(ns):
        x0 = cx[si] - half
        y0 = cy[si] - half
        # row pass: tmp[f, yy, i] over window rows y0 - r .. y0 + s - 1 + r (inner loops contiguous in i)
        h = s + 2 * r
        tmp = np.zeros((nr, h, s))
        for f in range(nr):
            for yy in range(h):
                yimg = y0 - r + yy
                for uu in range(k):
                    wf = row_filt[f, uu]
                    xo = x0 + r - uu
                    for i in range(s):
                        tmp[f, yy, i] += wf * ref[yimg, xo + i]
        cols = np.zeros((nu, s * s))
        for bi in range(nb):
            f = pairs[bi, 0]
            g = pairs[bi, 1]
            for j in range(s):
                # output row j (image y0 + j) takes input row y0 + j - (vv - r) = tmp row j + 2r - vv
                for vv in range(k):
                    wg = col_filt[g, vv]
                    tr = j + 2 * r - vv
                    for i in range(s):
                        cols[bi, j * s + i] += wg * tmp[f, tr, i]
        if with_bg:
            for p in range(s * s):
                cols[nb, p] = 1.0
        w = np.empty(s * s)
        t = np.empty(s * s)
        sws = 0.0
        wvr = 0.0
        npix = 0
        for j in range(s):
            for i in range(s):
                p = j * s + i
                wp = wgt[y0 + j, x0 + i]
                if wp <= 0.0:
                    wp = 0.0
                else:
                    npix += 1
                w[p] = wp
                t[p] = tgt[y0 + j, x0 + i]
                sws += wp * t[p] * t[p]
                wvr += wp * var_ref[y0 + j, x0 + i]
        # M = C W C^T, b = C W t with contiguous inner loops (no BLAS: it would oversubscribe the threads)
        npx = s * s
        wcol = np.empty(npx)
        m = np.empty((nu, nu))
        b = np.empty(nu)
        for a in range(nu):
            acc_b = 0.0
            for p in range(npx):
                wcol[p] = w[p] * cols[a, p]
                acc_b += wcol[p] * t[p]
            b[a] = acc_b
            for c in range(a + 1):
                acc = 0.0
                for p in range(npx):
                    acc += wcol[p] * cols[c, p]
                m[a, c] = acc
                m[c, a] = acc
        for a in range(nu):
            b_out[si, a] = b[a]
            for c in range(nu):
                m_out[si, a, c] = m[a, c]
        sws_out[si] = sws
        wvr_out[si] = wvr
        npix_out[si] = npix


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(11)
    basis = make_basis((1.1, 2.2, 4.4), (4, 2, 2), K)
    ref = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
    tgt = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
    wgt = rng.uniform(0.5, 2.0, SHAPE).astype(np.float32)
    wgt[rng.random(SHAPE) < 0.01] = 0.0
    var_ref = rng.uniform(0.5, 2.0, SHAPE).astype(np.float32)
    m = HALF + K // 2 + 1
    cx = rng.integers(m, SHAPE[1] - m, NS).astype(np.int64)
    cy = rng.integers(m, SHAPE[0] - m, NS).astype(np.int64)
    return basis, ref, tgt, wgt, var_ref, cx, cy


def _call(fn, case):
    basis, ref, tgt, wgt, var_ref, cx, cy = case
    nu = basis.n_basis + 1
    out = (np.zeros((NS, nu, nu)), np.zeros((NS, nu)), np.zeros(NS), np.zeros(NS), np.zeros(NS, np.int64))
    fn(ref, tgt, wgt, var_ref, cx, cy, HALF, basis.row_filt, basis.col_filt, basis.pairs, True, *out)
    return out


def _numpy_reference(case, n):
    basis, ref, tgt, wgt, _, cx, cy = case
    r, s = K // 2, 2 * HALF + 1
    ms = []
    for si in range(n):
        y0, x0 = cy[si] - HALF, cx[si] - HALF
        win = ref[y0 - r : y0 + s + r, x0 - r : x0 + s + r].astype(np.float64)
        cols = [signal.convolve2d(win, np.outer(basis.col_filt[g], basis.row_filt[f]), mode="valid").ravel()
                for f, g in basis.pairs]
        cols.append(np.ones(s * s))
        c = np.stack(cols, axis=1)
        w = np.maximum(wgt[y0 : y0 + s, x0 : x0 + s].astype(np.float64).ravel(), 0.0)
        t = tgt[y0 : y0 + s, x0 : x0 + s].astype(np.float64).ravel()
        ms.append((c.T @ (w[:, None] * c), c.T @ (w * t)))
    return ms


@pytest.mark.benchmark(group="psfmatch-stamp-normal-equations")
def test_sne_apfast(benchmark, case):
    if not benchmark.disabled:
        _call(stamp_normal_equations, case)  # compile outside the timing
    m, b, *_ = benchmark(_call, stamp_normal_equations, case)
    ref = _numpy_reference(case, 2)
    for i, (mr, br) in enumerate(ref):
        assert np.max(np.abs(m[i] - mr)) <= 1e-12 * np.max(np.abs(mr))
        assert np.max(np.abs(b[i] - br)) <= 1e-10 * np.max(np.abs(br))


@pytest.mark.slow  # compiles a second parallel kernel; run with -m "" to time old and new together
@pytest.mark.benchmark(group="psfmatch-stamp-normal-equations")
def test_sne_v1_reference(benchmark, case):
    if not benchmark.disabled:
        _call(_sne_v1, case)  # compile outside the timing
    m, *_ = benchmark(_call, _sne_v1, case)
    m_new, *_ = _call(stamp_normal_equations, case)
    assert np.max(np.abs(m - m_new)) <= 1e-12 * np.max(np.abs(m))


@pytest.mark.benchmark(group="psfmatch-stamp-normal-equations")
def test_sne_numpy_reference(benchmark, case):
    benchmark.extra_info["stamps"] = N_REF
    benchmark.extra_info["scale_to_145_stamps"] = NS / N_REF
    out = benchmark.pedantic(_numpy_reference, args=(case, N_REF), rounds=3, iterations=1)
    assert len(out) == N_REF
