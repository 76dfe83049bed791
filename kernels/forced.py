"""Forced PSF photometry and footprint pixel-flag kernels (DIA sources and DIA forced sources).

**Forced PSF flux** (Rubin ``base_PsfFlux`` at a fixed position): the PSF model
``P`` at position ``s`` is assembled from a basis, ``P = sum_b w[s, b] B[b]``
normalised to sum 1 (or ``B[s]`` itself when ``per_source``), shifted to the
sub-pixel position by separable Lanczos-3 interpolation
(:func:`apfast.kernels.measure.lanczos_shift`) and centred on the nearest pixel.
The amplitude is the variance-weighted linear least-squares solution over the
usable pixels ``i`` of the stamp (finite, positive finite variance, no
``bad_bits``)::

    F = sum_i P_i I_i / V_i  /  sum_i P_i^2 / V_i,      err(F) = (sum_i P_i^2 / V_i)^(-1/2),
    chi2 = sum_i (I_i - F P_i)^2 / V_i

which is the minimum-variance unbiased estimator of a point-source flux under
Gaussian noise with known variance (e.g. Zackay & Ofek 2017, eq. 3).

**Footprint pixel flags**: the bitwise OR of the mask over a footprint's pixels
and over the 3x3 pixels around its centroid (Rubin ``base_PixelFlags``).

Pixel ``image[i, j]`` has its centre at ``(x, y) = (j, i)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import jit, pjit
from apfast.kernels.measure import usable
from apfast.kernels.stamps import lanczos3_weights

__all__ = [
    "FLAG_EDGE",
    "FLAG_NO_GOOD_PIXELS",
    "assemble_psf",
    "footprint_mask_bits",
    "footprint_mask_bits_serial",
    "forced_psf_flux",
    "forced_psf_flux_serial",
    "shift_stamp",
]

#: Flag bit: part of the PSF stamp fell off the image (the fit used the rest).
FLAG_EDGE = 1
#: Flag bit: no usable pixel under the stamp (flux and error are NaN).
FLAG_NO_GOOD_PIXELS = 2


@jit
def assemble_psf(basis, weights, per_source, s, out):
    """Write the PSF stamp of position ``s`` into ``out``, normalised to sum 1; return its raw total.

    ``out = basis[s]`` when ``per_source``, else ``out = sum_b weights[s, b] basis[b]``
    (basis stamps with a zero weight are skipped, so sparse weights such as
    bilinear interpolation between grid stamps cost only their non-zero terms).

    Parameters
    ----------
    basis : ndarray, float64, shape (nb, k, k)
    weights : ndarray, float64, shape (n, nb)
        Ignored when ``per_source``.
    per_source : bool
    s : int
    out : ndarray, float64, shape (k, k)
        Written in place (left un-normalised when the total is not positive).

    Returns
    -------
    total : float
        Sum of the stamp before normalisation (<= 0 means no usable PSF).
    """
    k = out.shape[0]
    if per_source:
        for i in range(k):
            for j in range(k):
                out[i, j] = basis[s, i, j]
    else:
        for i in range(k):
            for j in range(k):
                out[i, j] = 0.0
        for b in range(basis.shape[0]):
            w = weights[s, b]
            if w == 0.0:
                continue
            for i in range(k):
                for j in range(k):
                    out[i, j] += w * basis[b, i, j]
    total = 0.0
    for i in range(k):
        for j in range(k):
            total += out[i, j]
    if total > 0.0:
        for i in range(k):
            for j in range(k):
                out[i, j] /= total
    return total


@jit
def shift_stamp(stamp, fx, fy, pad, tmp, out):
    """Shift a centred stamp by ``(fx, fy)``, ``|f| <= 0.5``, with separable normalised Lanczos-3.

    Same result as :func:`apfast.kernels.measure.lanczos_shift` (samples outside the
    stamp are 0, the output is rescaled to the input's sum) but branch-free inner
    loops over a zero-padded copy, so they vectorise: ``out[i, j] = sum_{m,n}
    L(i - fy - m) L(j - fx - n) stamp[m, n]``.

    Parameters
    ----------
    stamp : ndarray, float64, shape (k, k)
    fx, fy : float
        Shift in pixels, in ``[-0.5, 0.5]``.
    pad : ndarray, float64, shape (k + 6, k + 6)
        Scratch whose 3-pixel border must be zero (only the interior is written).
    tmp : ndarray, float64, shape (k + 6, k)
        Scratch whose first and last 3 rows must be zero (only the middle rows are written).
    out : ndarray, float64, shape (k, k)
        Written in place.
    """
    k = stamp.shape[0]
    wx = np.empty(6)
    wy = np.empty(6)
    bx = int(math.floor(fx))
    by = int(math.floor(fy))
    lanczos3_weights(fx - bx, wx)
    lanczos3_weights(fy - by, wy)
    s_in = 0.0
    for i in range(k):
        for j in range(k):
            v = stamp[i, j]
            pad[i + 3, j + 3] = v
            s_in += v
    # along x: tmp[r, j] = sum_m wx[m] pad[r, j + 5 - bx - m]   (pad index = stamp index + 3)
    ox = 5 - bx
    for r in range(3, k + 3):
        for j in range(k):
            tmp[r, j] = (
                wx[0] * pad[r, j + ox] + wx[1] * pad[r, j + ox - 1] + wx[2] * pad[r, j + ox - 2]
                + wx[3] * pad[r, j + ox - 3] + wx[4] * pad[r, j + ox - 4] + wx[5] * pad[r, j + ox - 5]
            )  # fmt: skip
    oy = 5 - by
    s_out = 0.0
    for i in range(k):
        for j in range(k):
            v = (
                wy[0] * tmp[i + oy, j] + wy[1] * tmp[i + oy - 1, j] + wy[2] * tmp[i + oy - 2, j]
                + wy[3] * tmp[i + oy - 3, j] + wy[4] * tmp[i + oy - 4, j] + wy[5] * tmp[i + oy - 5, j]
            )  # fmt: skip
            out[i, j] = v
            s_out += v
    if s_out != 0.0:
        scale = s_in / s_out
        for i in range(k):
            for j in range(k):
                out[i, j] *= scale


@jit
def _fit_amplitude(image, variance, mask, bad_bits, psf, ix, iy):
    """Weighted least-squares amplitude of ``psf`` (k x k, centred on pixel ``(ix, iy)``).

    One pass: ``chi2 = sum I^2/V - (sum P I/V)^2 / sum P^2/V`` (float64 sums; the
    cancellation loses ~1e-16 of ``sum I^2/V``, negligible). Returns ``flux, err,
    chi2, ndata, flags`` with the module's flag bits.
    """
    ny, nx = image.shape
    k = psf.shape[0]
    h = k // 2
    spi = 0.0
    spp = 0.0
    sii = 0.0
    flags = 0
    n = 0
    for a in range(k):
        y = iy + a - h
        if y < 0 or y >= ny:
            flags |= FLAG_EDGE
            continue
        for b in range(k):
            x = ix + b - h
            if x < 0 or x >= nx:
                flags |= FLAG_EDGE
                continue
            if not usable(image, variance, mask, bad_bits, y, x):
                continue
            p = psf[a, b]
            iv = 1.0 / variance[y, x]
            d = image[y, x]
            spi += p * d * iv
            spp += p * p * iv
            sii += d * d * iv
            n += 1
    if n == 0 or not spp > 0.0:
        return math.nan, math.nan, math.nan, 0, flags | FLAG_NO_GOOD_PIXELS
    f = spi / spp
    return f, 1.0 / math.sqrt(spp), max(sii - f * spi, 0.0), n, flags


@pjit
def forced_psf_flux(image, variance, mask, basis, weights, per_source, x, y, bad_bits, flux, err, chi2, ndata, flags):
    """Forced PSF photometry at fixed sub-pixel positions (prange over positions).

    Implements the module docstring's weighted least squares for every position
    ``(x[s], y[s])``. A position whose stamp lies entirely off the image, or has
    no usable pixel, gets NaN flux and error and ``FLAG_NO_GOOD_PIXELS``; a stamp
    partly off the image gets ``FLAG_EDGE`` and is fitted on the pixels that remain.
    Non-finite positions get NaN and ``FLAG_NO_GOOD_PIXELS | FLAG_EDGE``.

    Parameters
    ----------
    image, variance : ndarray, float32, shape (ny, nx)
        Pixels (background-subtracted) and their variance, native byte order.
    mask : ndarray, int32, shape (ny, nx)
    basis : ndarray, float64, shape (nb, k, k), k odd
        PSF basis stamps (see :func:`assemble_psf`).
    weights : ndarray, float64, shape (n, nb)
        Basis weights per position (ignored when ``per_source``).
    per_source : bool
        ``basis`` holds one stamp per position (``nb == n``).
    x, y : ndarray, float64, shape (n,)
        Positions in pixels (pixel centres at integers).
    bad_bits : int
        Mask bits whose pixels are not used.
    flux, err, chi2 : ndarray, float64, shape (n,)
        Outputs, written in place (image units).
    ndata : ndarray, int32, shape (n,)
        Pixels used, written in place.
    flags : ndarray, int32, shape (n,)
        ``FLAG_EDGE`` (1) / ``FLAG_NO_GOOD_PIXELS`` (2) bits, written in place.
    """
    n = x.shape[0]
    k = basis.shape[1]
    ny, nx = image.shape
    h = k // 2
    for s in prange(n):
        stamp = np.empty((k, k))
        shifted = np.empty((k, k))
        pad = np.zeros((k + 6, k + 6))
        tmp = np.zeros((k + 6, k))
        xs = x[s]
        ys = y[s]
        if not (math.isfinite(xs) and math.isfinite(ys)):
            flux[s] = math.nan
            err[s] = math.nan
            chi2[s] = math.nan
            ndata[s] = 0
            flags[s] = FLAG_NO_GOOD_PIXELS | FLAG_EDGE
            continue
        ix = int(math.floor(xs + 0.5))
        iy = int(math.floor(ys + 0.5))
        if ix + h < 0 or ix - h >= nx or iy + h < 0 or iy - h >= ny:
            flux[s] = math.nan
            err[s] = math.nan
            chi2[s] = math.nan
            ndata[s] = 0
            flags[s] = FLAG_NO_GOOD_PIXELS | FLAG_EDGE
            continue
        total = assemble_psf(basis, weights, per_source, s, stamp)
        if not total > 0.0:
            flux[s] = math.nan
            err[s] = math.nan
            chi2[s] = math.nan
            ndata[s] = 0
            flags[s] = FLAG_NO_GOOD_PIXELS
            continue
        shift_stamp(stamp, xs - ix, ys - iy, pad, tmp, shifted)
        f, e, c, nd, fl = _fit_amplitude(image, variance, mask, bad_bits, shifted, ix, iy)
        flux[s] = f
        err[s] = e
        chi2[s] = c
        ndata[s] = nd
        flags[s] = fl


@pjit
def footprint_mask_bits(labels, mask, ids, bbox, x, y, fp_bits, center_bits):
    """OR of the mask over each footprint and over the 3x3 pixels at its centroid (prange over sources).

    Parameters
    ----------
    labels : ndarray, int32, shape (ny, nx)
        Footprint label image (``ids[s]`` inside footprint ``s``).
    mask : ndarray, int32, shape (ny, nx)
    ids : ndarray, int32, shape (n,)
    bbox : ndarray, int32, shape (n, 4)
        ``(y0, y1, x0, x1)`` half-open bounding box of each footprint.
    x, y : ndarray, float64, shape (n,)
        Centroids (pixels); the 3x3 box is centred on the nearest pixel and clipped
        to the image (nothing is ORed for a centroid off the image).
    fp_bits, center_bits : ndarray, int32, shape (n,)
        Outputs, written in place.
    """
    ny, nx = mask.shape
    n = ids.shape[0]
    for s in prange(n):
        fm = 0
        lab = ids[s]
        for yy in range(bbox[s, 0], bbox[s, 1]):
            for xx in range(bbox[s, 2], bbox[s, 3]):
                if labels[yy, xx] == lab:
                    fm |= mask[yy, xx]
        fp_bits[s] = fm
        cm = 0
        if math.isfinite(x[s]) and math.isfinite(y[s]):
            ix = int(math.floor(x[s] + 0.5))
            iy = int(math.floor(y[s] + 0.5))
            for yy in range(max(iy - 1, 0), min(iy + 2, ny)):
                for xx in range(max(ix - 1, 0), min(ix + 2, nx)):
                    cm |= mask[yy, xx]
        center_bits[s] = cm


#: Serial compilations of the two kernels (same code, ``prange`` runs as ``range``): for the few dozen
#: positions of one CCD's DIA sources, waking the thread pool costs more than the work, and much more
#: on a loaded machine.
forced_psf_flux_serial = jit(forced_psf_flux.py_func)
footprint_mask_bits_serial = jit(footprint_mask_bits.py_func)


def _warmup_cases():
    """Tiny calls with the production dtypes, for ``apfast warmup``."""
    ny, nx = 21, 23
    img = np.zeros((ny, nx), np.float32)
    var = np.ones((ny, nx), np.float32)
    mask = np.zeros((ny, nx), np.int32)
    basis = np.ones((1, 5, 5)) / 25.0
    n = 1
    f64 = [np.zeros(n) for _ in range(3)]
    return [
        (
            forced_psf_flux,
            (img, var, mask, basis, np.ones((n, 1)), False, np.array([11.2]), np.array([10.7]), 1,
             *f64, np.zeros(n, np.int32), np.zeros(n, np.int32)),
        ),
        (
            forced_psf_flux_serial,
            (img, var, mask, basis, np.ones((n, 1)), False, np.array([11.2]), np.array([10.7]), 1,
             *f64, np.zeros(n, np.int32), np.zeros(n, np.int32)),
        ),
        (
            footprint_mask_bits_serial,
            (np.ones((ny, nx), np.int32), mask, np.ones(n, np.int32), np.array([[0, ny, 0, nx]], np.int32),
             np.array([11.0]), np.array([10.0]), np.zeros(n, np.int32), np.zeros(n, np.int32)),
        ),
        (
            footprint_mask_bits,
            (np.ones((ny, nx), np.int32), mask, np.ones(n, np.int32), np.array([[0, ny, 0, nx]], np.int32),
             np.array([11.0]), np.array([10.0]), np.zeros(n, np.int32), np.zeros(n, np.int32)),
        ),
    ]  # fmt: skip
