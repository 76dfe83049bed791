"""Measurement kernels: centroids, adaptive moments, PSF, aperture and Gaussian fluxes, pixel flags.

One ``prange`` kernel, :func:`measure_all`, loops over sources; each iteration
calls the serial per-source algorithms below with its own scratch stamps, so
threads never share writable memory. Pixel ``image[i, j]`` has its centre at
``(x, y) = (j, i)``. A pixel takes part in a measurement only when it is finite,
has positive finite variance and none of ``bad_bits`` in its mask.

Algorithms (all sums over usable pixels ``i`` in a box around the source):

- **Centroid** (SdssCentroid-like matched filter): the fixed point of the
  Gaussian-weighted first moment, ``sum_i w_i (x_i - x_c) I_i = 0`` with
  ``w_i = exp(-|r_i - r_c|^2 / 2 sigma^2)``, which maximises the correlation with a
  Gaussian PSF (the maximum-likelihood centroid for background-limited noise).
  The iteration ``x_c <- x_c + 2 sum w dx I / sum w I`` is over-relaxed by 2, the
  exact one-step factor when the source matches the weight, and contracts for any
  Gaussian source. Error (linearised): ``var(x_c) = sum w^2 dx^2 V / (sum w I (dx^2/sigma^2 - 1))^2``.
- **Adaptive moments** (SdssShape; Bernstein & Jarvis 2002, eq. 8): the
  weighted second moments ``M`` of ``I`` under an elliptical Gaussian weight of
  covariance ``W`` satisfy ``M^-1 = C^-1 + W^-1`` for a Gaussian source of
  covariance ``C``; iterating ``W <- (M^-1 - W^-1)^-1`` converges to ``W = C``,
  reported as ``Ixx, Iyy, Ixy``. The product rule holds for any Gaussian weight,
  but pixel sums only approximate the integrals when the weighted profile
  ``(C^-1 + W^-1)^-1`` spans a pixel or more: with ``W = C`` on an undersampled
  star (ZTF, sigma 0.6 px) the sums underestimate ``M``, more so as ``W`` shrinks,
  and the iteration collapsed to ``W = 0``. So the weight's eigenvalues are
  floored at ``min_sigma^2`` (the weight stays wider than such a source) while
  the estimate ``C = (M^-1 - W^-1)^-1`` is iterated as before; sources with
  ``C`` above the floor are unaffected.
- **Gaussian flux**: ``F = 2 sum w I`` with the adaptive weight ``w`` (peak 1),
  exact for a Gaussian whose covariance equals ``W``; error ``2 sqrt(sum w^2 V)``.
- **PSF flux**: the PSF stamp shifted to the sub-pixel centroid by a normalised
  separable Lanczos-3 interpolation, then the weighted linear least squares
  ``F = sum P I / V / sum P^2 / V``, ``err = (sum P^2 / V)^-1/2``,
  ``chi2 = sum (I - F P)^2 / V``.
- **Aperture flux**: pixel sum inside a circle; pixels crossed by the circle are
  split into ``nsub x nsub`` sub-pixels. ``err = sqrt(sum a_i^2 V_i)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import jit, pjit
from apfast.kernels.primitives import lanczos3_weights

__all__ = [
    "FCOLS",
    "ICOLS",
    "adaptive_moments",
    "aperture_flux",
    "floor_weight",
    "gaussian_centroid",
    "gaussian_flux",
    "lanczos_shift",
    "measure_all",
    "psf_flux_fit",
    "usable",
]

#: Column names of ``measure_all``'s float output before the aperture pairs (driver-side only).
FCOLS = (
    "x", "y", "xErr", "yErr", "Ixx", "Iyy", "Ixy", "Ixx_psf", "Iyy_psf", "Ixy_psf",
    "psfFlux", "psfFluxErr", "psfChi2", "gaussianFlux", "gaussianFluxErr",
)  # fmt: skip
#: Column names of ``measure_all``'s integer output before the aperture flags (driver-side only).
ICOLS = (
    "centroid_flags", "shape_flags", "psf_shape_flags", "psfFlux_flags", "psfNdata",
    "gaussianFlux_flags", "footprint_mask", "center_mask", "touches_border",
)  # fmt: skip


@jit
def usable(image, variance, mask, bad_bits, y, x):
    """True when pixel ``(y, x)`` is finite, has positive finite variance and no ``bad_bits``."""
    v = variance[y, x]
    return (mask[y, x] & bad_bits) == 0 and math.isfinite(image[y, x]) and v > 0 and math.isfinite(v)


@jit
def gaussian_centroid(image, variance, mask, bad_bits, sign, x0, y0, sigma, max_iter, tol):
    """Gaussian-weighted (matched-filter) centroid of ``sign * image`` started at ``(x0, y0)``.

    See the module docstring for the equations. The box has half-width
    ``ceil(4 sigma)`` around the rounded current centre; each step is clipped to
    ``sigma`` pixels.

    Parameters
    ----------
    image, variance : ndarray, float32, shape (ny, nx)
    mask : ndarray, int32, shape (ny, nx)
    bad_bits : int
    sign : float
        +1 for a positive source, -1 for a negative one.
    x0, y0 : float
        Start position (pixels).
    sigma : float
        Weight sigma (the PSF sigma), pixels.
    max_iter : int
    tol : float
        Convergence when the step is below ``tol`` pixels.

    Returns
    -------
    x, y, xerr, yerr : float
        Centroid and its 1-sigma errors; the start position and NaN errors on failure.
    flags : int
        1 failed (no usable pixel or non-positive weighted flux, position reset to
        the start), 2 not converged, 4 moved more than ``2 sigma + 1`` px from the
        start (reset to the start).
    """
    ny, nx = image.shape
    r = int(math.ceil(4.0 * sigma))
    inv2s2 = 0.5 / (sigma * sigma)
    xc, yc = x0, y0
    converged = False
    for _ in range(max_iter):
        ix = int(math.floor(xc + 0.5))
        iy = int(math.floor(yc + 0.5))
        s0 = 0.0
        sx = 0.0
        sy = 0.0
        for y in range(max(iy - r, 0), min(iy + r + 1, ny)):
            dy = y - yc
            for x in range(max(ix - r, 0), min(ix + r + 1, nx)):
                if not usable(image, variance, mask, bad_bits, y, x):
                    continue
                dx = x - xc
                wi = math.exp(-(dx * dx + dy * dy) * inv2s2) * sign * image[y, x]
                s0 += wi
                sx += wi * dx
                sy += wi * dy
        if not s0 > 0:
            return x0, y0, math.nan, math.nan, 1
        stepx = min(max(2.0 * sx / s0, -sigma), sigma)
        stepy = min(max(2.0 * sy / s0, -sigma), sigma)
        xc += stepx
        yc += stepy
        if abs(stepx) < tol and abs(stepy) < tol:
            converged = True
            break
    flags = 0 if converged else 2
    if abs(xc - x0) > 2.0 * sigma + 1.0 or abs(yc - y0) > 2.0 * sigma + 1.0:
        return x0, y0, math.nan, math.nan, flags | 4
    # linearised errors at the solution
    ix = int(math.floor(xc + 0.5))
    iy = int(math.floor(yc + 0.5))
    fx = 0.0
    fy = 0.0
    vx = 0.0
    vy = 0.0
    for y in range(max(iy - r, 0), min(iy + r + 1, ny)):
        dy = y - yc
        for x in range(max(ix - r, 0), min(ix + r + 1, nx)):
            if not usable(image, variance, mask, bad_bits, y, x):
                continue
            dx = x - xc
            w = math.exp(-(dx * dx + dy * dy) * inv2s2)
            wi = w * sign * image[y, x]
            fx += wi * (dx * dx / (sigma * sigma) - 1.0)
            fy += wi * (dy * dy / (sigma * sigma) - 1.0)
            vx += w * w * dx * dx * variance[y, x]
            vy += w * w * dy * dy * variance[y, x]
    xerr = math.sqrt(vx) / abs(fx) if fx != 0 else math.nan
    yerr = math.sqrt(vy) / abs(fy) if fy != 0 else math.nan
    return xc, yc, xerr, yerr, flags


@jit
def floor_weight(wxx, wyy, wxy, floor):
    """The 2x2 covariance ``[[wxx, wxy], [wxy, wyy]]`` with its eigenvalues raised to at least ``floor``.

    ``W' = W + (floor - l2) v2 v2^T`` when only the smaller eigenvalue ``l2`` (unit
    eigenvector ``v2``) is below ``floor``; ``floor * I`` when both are. The
    orientation and the larger axis are kept; ``floor <= 0`` returns the input.

    Returns
    -------
    uxx, uyy, uxy : float
    """
    if not floor > 0:
        return wxx, wyy, wxy
    half = math.sqrt(0.25 * (wxx - wyy) ** 2 + wxy * wxy)
    l1 = 0.5 * (wxx + wyy) + half
    l2 = 0.5 * (wxx + wyy) - half
    if not l1 > floor:
        return floor, floor, 0.0
    if l2 >= floor:
        return wxx, wyy, wxy
    if wxy != 0.0:
        vx = wxy
        vy = l2 - wxx
    elif wxx <= wyy:
        vx = 1.0
        vy = 0.0
    else:
        vx = 0.0
        vy = 1.0
    d = (floor - l2) / (vx * vx + vy * vy)
    return wxx + d * vx * vx, wyy + d * vy * vy, wxy + d * vx * vy


@jit
def adaptive_moments(image, variance, mask, bad_bits, sign, xc, yc, sigma0, min_sigma, max_radius, max_iter, tol):
    """Adaptive second moments of ``sign * image`` about the fixed centre ``(xc, yc)``.

    Iterates ``C <- (M^-1 - W^-1)^-1`` (module docstring) from the circular
    ``C = sigma0^2``, where the weight ``W`` is ``C`` with its eigenvalues raised
    to at least ``min_sigma^2`` (:func:`floor_weight`); when ``M^-1 - W^-1`` is not
    positive definite (noise) the step falls back to ``C <- 2 M``, which also has
    ``W = C`` as its fixed point. The box half-width is
    ``ceil(4 sqrt(max eigenvalue of W))`` capped at ``max_radius``.

    The floor keeps the weighted profile sampled: for a pixel-integrated Gaussian
    of ``C`` = 0.36 px^2 (ZTF's stars) at random sub-pixel centres, ``min_sigma`` =
    1.2 px gives ``Ixx`` within 1% on average and within -7%/+9% (2nd/98th
    percentile) at any phase; without it (``min_sigma`` = 0) the iteration collapses
    to ``W = 0`` (NaN returned) for a third of the phases, and always for a
    pixel-centred PSF stamp. Sources whose iterates stay above the floor (here
    ``C`` >= 1.44 px^2, e.g. any star with sigma >= 1.2 px) get bit-identical results.

    Parameters
    ----------
    image, variance : ndarray, shape (ny, nx)
        float32 image or a float64 PSF stamp (variance then all ones).
    mask : ndarray, int32, shape (ny, nx)
    bad_bits : int
    sign : float
    xc, yc : float
        Centre (pixels).
    sigma0 : float
        Initial circular weight sigma (pixels).
    min_sigma : float
        Smallest weight sigma (pixels) along either principal axis; 0 for none.
    max_radius : int
        Largest box half-width.
    max_iter : int
    tol : float
        Convergence when every element of ``C`` changes by less than ``tol`` times its trace.

    Returns
    -------
    ixx, iyy, ixy : float
        The converged covariance estimate ``C`` (pixels^2); the last iterate if not converged.
    flags : int
        1 failed (no usable pixel, non-positive flux, singular moments or an estimate
        that is not positive definite; NaN returned),
        2 not converged, 4 box truncated at ``max_radius``.
    """
    ny, nx = image.shape
    wxx = sigma0 * sigma0
    wyy = wxx
    wxy = 0.0
    flags = 2
    ix = int(math.floor(xc + 0.5))
    iy = int(math.floor(yc + 0.5))
    floor = min_sigma * min_sigma
    for _ in range(max_iter):
        # (wxx, wyy, wxy) is the estimate C; (uxx, uyy, uxy) the weight W used in the sums.
        # C must be positive definite (negative sums of noise can make 2 M negative definite,
        # whose determinant is positive too, and the floor would hide it)
        if not (wxx > 0 and wxx * wyy - wxy * wxy > 0):
            return math.nan, math.nan, math.nan, 1
        uxx, uyy, uxy = floor_weight(wxx, wyy, wxy, floor)
        det = uxx * uyy - uxy * uxy
        axx = uyy / det
        ayy = uxx / det
        axy = -uxy / det
        lam = 0.5 * (uxx + uyy) + math.sqrt(0.25 * (uxx - uyy) ** 2 + uxy * uxy)
        r = int(math.ceil(4.0 * math.sqrt(lam)))
        if r > max_radius:
            r = max_radius
            flags |= 4
        s0 = 0.0
        mxx = 0.0
        myy = 0.0
        mxy = 0.0
        for y in range(max(iy - r, 0), min(iy + r + 1, ny)):
            dy = y - yc
            for x in range(max(ix - r, 0), min(ix + r + 1, nx)):
                if not usable(image, variance, mask, bad_bits, y, x):
                    continue
                dx = x - xc
                wi = (
                    math.exp(-0.5 * (axx * dx * dx + 2.0 * axy * dx * dy + ayy * dy * dy))
                    * sign
                    * image[y, x]
                )
                s0 += wi
                mxx += wi * dx * dx
                myy += wi * dy * dy
                mxy += wi * dx * dy
        if not s0 > 0:
            return math.nan, math.nan, math.nan, 1
        mxx /= s0
        myy /= s0
        mxy /= s0
        mdet = mxx * myy - mxy * mxy
        if not mdet > 0:
            return math.nan, math.nan, math.nan, 1
        # C^-1 = M^-1 - W^-1
        cxx = myy / mdet - axx
        cyy = mxx / mdet - ayy
        cxy = -mxy / mdet - axy
        cdet = cxx * cyy - cxy * cxy
        if cxx > 0 and cdet > 0:
            nxx = cyy / cdet
            nyy = cxx / cdet
            nxy = -cxy / cdet
        else:
            nxx = 2.0 * mxx
            nyy = 2.0 * myy
            nxy = 2.0 * mxy
        tr = nxx + nyy
        done = abs(nxx - wxx) < tol * tr and abs(nyy - wyy) < tol * tr and abs(nxy - wxy) < tol * tr
        wxx, wyy, wxy = nxx, nyy, nxy
        if done:
            flags &= ~2
            break
    return wxx, wyy, wxy, flags


@jit
def gaussian_flux(image, variance, mask, bad_bits, xc, yc, wxx, wyy, wxy, max_radius):
    """Flux under an elliptical Gaussian weight: ``F = 2 sum w I``, ``err = 2 sqrt(sum w^2 V)``.

    ``w = exp(-0.5 d^T W^-1 d)`` (peak 1) with ``d`` the offset from ``(xc, yc)``;
    exact for a Gaussian source of covariance ``W`` (Rubin GaussianFlux). The box
    half-width is ``ceil(4 sqrt(max eigenvalue))`` capped at ``max_radius``.

    Returns
    -------
    flux, err : float
    flags : int
        1 failed (singular weight or no usable pixel), 2 a bad or off-image pixel
        inside the weight (where ``w > 0.01``).
    """
    ny, nx = image.shape
    det = wxx * wyy - wxy * wxy
    if not det > 0:
        return math.nan, math.nan, 1
    axx = wyy / det
    ayy = wxx / det
    axy = -wxy / det
    lam = 0.5 * (wxx + wyy) + math.sqrt(0.25 * (wxx - wyy) ** 2 + wxy * wxy)
    r = min(int(math.ceil(4.0 * math.sqrt(lam))), max_radius)
    ix = int(math.floor(xc + 0.5))
    iy = int(math.floor(yc + 0.5))
    f = 0.0
    v = 0.0
    n = 0
    flags = 0
    for y in range(iy - r, iy + r + 1):
        dy = y - yc
        for x in range(ix - r, ix + r + 1):
            dx = x - xc
            w = math.exp(-0.5 * (axx * dx * dx + 2.0 * axy * dx * dy + ayy * dy * dy))
            if y < 0 or y >= ny or x < 0 or x >= nx or not usable(image, variance, mask, bad_bits, y, x):
                if w > 0.01:
                    flags |= 2
                continue
            f += w * image[y, x]
            v += w * w * variance[y, x]
            n += 1
    if n == 0:
        return math.nan, math.nan, 1
    return 2.0 * f, 2.0 * math.sqrt(v), flags


@jit
def lanczos_shift(stamp, fx, fy, out):
    """Shift a centred stamp by ``(fx, fy)`` pixels with separable, normalised Lanczos-3.

    ``out[i, j] = sum_{m, n} stamp[m, n] L(i - fy - m) L(j - fx - n)`` with the six
    taps of ``L(t) = sinc(t) sinc(t / 3)`` normalised to sum 1 (so a flat stamp
    stays flat); samples outside the stamp count as 0. The output is rescaled to
    the input's sum.

    Parameters
    ----------
    stamp : ndarray, float64, shape (k, k)
    fx, fy : float
        Shift in pixels, usually in [-0.5, 0.5].
    out : ndarray, float64, shape (k, k)
        Written in place.
    """
    k = stamp.shape[0]
    tmp = np.zeros((k, k))
    wx = np.empty(6)
    wy = np.empty(6)
    # tap m sits at t = (m - 2) - frac with frac = f - floor(f) in [0, 1), covering (-3, 3];
    # t = j - f - n then gives the source pixel n = j - floor(f) + 2 - m
    base_x = int(math.floor(fx))
    base_y = int(math.floor(fy))
    lanczos3_weights(fx - base_x, wx)
    lanczos3_weights(fy - base_y, wy)
    for i in range(k):
        for j in range(k):
            acc = 0.0
            for m in range(6):
                n = j - base_x + 2 - m
                if 0 <= n < k:
                    acc += wx[m] * stamp[i, n]
            tmp[i, j] = acc
    s_in = 0.0
    s_out = 0.0
    for i in range(k):
        for j in range(k):
            acc = 0.0
            for m in range(6):
                n = i - base_y + 2 - m
                if 0 <= n < k:
                    acc += wy[m] * tmp[n, j]
            out[i, j] = acc
            s_out += acc
            s_in += stamp[i, j]
    if s_out != 0.0:
        for i in range(k):
            for j in range(k):
                out[i, j] *= s_in / s_out


@jit
def psf_flux_fit(image, variance, mask, bad_bits, psf, ix, iy):
    """Weighted linear least-squares amplitude of ``psf`` centred on pixel ``(ix, iy)``.

    Parameters
    ----------
    image, variance : ndarray, float32, shape (ny, nx)
    mask : ndarray, int32, shape (ny, nx)
    bad_bits : int
    psf : ndarray, float64, shape (k, k)
        Model already shifted to the sub-pixel position; summing to 1.
    ix, iy : int
        Image pixel under the stamp's central pixel.

    Returns
    -------
    flux, err, chi2 : float
    ndata : int
        Pixels used.
    flags : int
        1 no usable pixel, 2 stamp truncated by the image edge, 4 bad pixels skipped.
    """
    ny, nx = image.shape
    k = psf.shape[0]
    h = k // 2
    spi = 0.0
    spp = 0.0
    flags = 0
    n = 0
    for a in range(k):
        y = iy + a - h
        for b in range(k):
            x = ix + b - h
            if y < 0 or y >= ny or x < 0 or x >= nx:
                flags |= 2
                continue
            if not usable(image, variance, mask, bad_bits, y, x):
                flags |= 4
                continue
            p = psf[a, b]
            iv = 1.0 / variance[y, x]
            spi += p * image[y, x] * iv
            spp += p * p * iv
            n += 1
    if n == 0 or not spp > 0:
        return math.nan, math.nan, math.nan, 0, flags | 1
    f = spi / spp
    chi2 = 0.0
    for a in range(k):
        y = iy + a - h
        for b in range(k):
            x = ix + b - h
            if y < 0 or y >= ny or x < 0 or x >= nx or not usable(image, variance, mask, bad_bits, y, x):
                continue
            d = image[y, x] - f * psf[a, b]
            chi2 += d * d / variance[y, x]
    return f, 1.0 / math.sqrt(spp), chi2, n, flags


@jit
def aperture_flux(image, variance, mask, bad_bits, xc, yc, radius, nsub):
    """Sum of ``image`` inside the circle of ``radius`` about ``(xc, yc)``, with error.

    Pixels whose centre is farther than ``radius + sqrt(2)/2`` are out, nearer than
    ``radius - sqrt(2)/2`` fully in; the others are weighted by the fraction of their
    ``nsub x nsub`` sub-pixel centres inside the circle.

    Returns
    -------
    flux, err : float
    flags : int
        1 no usable pixel, 2 the aperture extends off the image, 4 bad pixels inside
        were skipped.
    """
    ny, nx = image.shape
    half = 0.7071067811865476
    rin2 = (radius - half) ** 2 if radius > half else -1.0
    rout2 = (radius + half) ** 2
    r2 = radius * radius
    flags = 0
    f = 0.0
    v = 0.0
    n = 0
    y_lo = int(math.floor(yc - radius - 1))
    y_hi = int(math.ceil(yc + radius + 1))
    x_lo = int(math.floor(xc - radius - 1))
    x_hi = int(math.ceil(xc + radius + 1))
    for y in range(y_lo, y_hi + 1):
        dy = y - yc
        for x in range(x_lo, x_hi + 1):
            dx = x - xc
            d2 = dx * dx + dy * dy
            if d2 > rout2:
                continue
            if d2 <= rin2:
                a = 1.0
            else:
                cnt = 0
                for p in range(nsub):
                    sy = dy + (p + 0.5) / nsub - 0.5
                    for q in range(nsub):
                        sx = dx + (q + 0.5) / nsub - 0.5
                        if sx * sx + sy * sy <= r2:
                            cnt += 1
                a = cnt / (nsub * nsub)
                if a == 0.0:
                    continue
            if y < 0 or y >= ny or x < 0 or x >= nx:
                flags |= 2
                continue
            if not usable(image, variance, mask, bad_bits, y, x):
                flags |= 4
                continue
            f += a * image[y, x]
            v += a * a * variance[y, x]
            n += 1
    if n == 0:
        return math.nan, math.nan, flags | 1
    return f, math.sqrt(v), flags


@jit
def _psf_stamp(basis, weights, per_source, s, out):
    """PSF stamp of source ``s``: ``basis[s]`` or ``sum_b weights[s, b] basis[b]``, normalised to sum 1."""
    k = out.shape[0]
    if per_source:
        for i in range(k):
            for j in range(k):
                out[i, j] = basis[s, i, j]
    else:
        out[:, :] = 0.0
        for b in range(basis.shape[0]):
            w = weights[s, b]
            for i in range(k):
                for j in range(k):
                    out[i, j] += w * basis[b, i, j]
    total = out.sum()
    if total != 0.0:
        for i in range(k):
            for j in range(k):
                out[i, j] /= total
    return total


@pjit
def measure_all(
    image, variance, mask, labels, ids, bbox, x0, y0, sign, basis, weights, per_source, sigma,
    radii, bad_bits, max_iter, shape_max_radius, shape_min_sigma, nsub, fout, iout,
):  # fmt: skip
    """Measure every source (prange over sources); outputs written in place.

    For source ``s``: centroid (:func:`gaussian_centroid` from ``(x0, y0)``),
    adaptive moments of the source and of its PSF stamp, Gaussian flux, PSF flux
    (stamp from ``basis``/``weights`` shifted by :func:`lanczos_shift` to the
    centroid), aperture fluxes for ``radii``, and the OR of mask bits over the
    footprint (``labels == ids[s]`` inside ``bbox[s]``) and over the 3x3 pixels at the
    centroid.

    Parameters
    ----------
    image, variance : ndarray, float32, shape (ny, nx)
    mask : ndarray, int32, shape (ny, nx)
    labels : ndarray, int32, shape (ny, nx)
        Footprint label image.
    ids : ndarray, int32, shape (n,)
    bbox : ndarray, int32, shape (n, 4)
        ``(y0, y1, x0, x1)`` half-open.
    x0, y0, sign : ndarray, float64, shape (n,)
        Start positions and +1/-1 source signs.
    basis : ndarray, float64, shape (nb, k, k)
    weights : ndarray, float64, shape (n, nb)
        Per-source basis weights (ignored when ``per_source``).
    per_source : bool
        ``basis`` holds one stamp per source (``nb == n``).
    sigma : float
        PSF Gaussian sigma (centroid weight, moment start, fallback Gaussian weight).
    radii : ndarray, float64, shape (na,)
    bad_bits, max_iter, shape_max_radius, nsub : int
    shape_min_sigma : float
        Weight floor of the adaptive moments (see :func:`adaptive_moments`), pixels.
    fout : ndarray, float64, shape (n, len(FCOLS) + 2 na)
        Columns ``FCOLS`` then ``(flux, err)`` per aperture; written in place.
    iout : ndarray, int64, shape (n, len(ICOLS) + na)
        Columns ``ICOLS`` then one flag word per aperture; written in place.
    """
    ny, nx = image.shape
    n = ids.shape[0]
    k = basis.shape[1]
    na = radii.shape[0]
    nf = 15
    ni = 9
    for s in prange(n):
        stamp = np.empty((k, k))
        shifted = np.empty((k, k))
        ones = np.ones((k, k))
        zmask = np.zeros((k, k), dtype=np.int32)
        sg = sign[s]
        xc, yc, xe, ye, cflag = gaussian_centroid(
            image, variance, mask, bad_bits, sg, x0[s], y0[s], sigma, max_iter, 1e-4
        )
        fout[s, 0] = xc
        fout[s, 1] = yc
        fout[s, 2] = xe
        fout[s, 3] = ye
        iout[s, 0] = cflag
        ixx, iyy, ixy, sflag = adaptive_moments(
            image, variance, mask, bad_bits, sg, xc, yc, sigma, shape_min_sigma, shape_max_radius, max_iter, 1e-6
        )
        fout[s, 4] = ixx
        fout[s, 5] = iyy
        fout[s, 6] = ixy
        iout[s, 1] = sflag
        # PSF at this position and its moments (about the stamp centre)
        total = _psf_stamp(basis, weights, per_source, s, stamp)
        h = k // 2
        if total > 0:
            pxx, pyy, pxy, pflag = adaptive_moments(
                stamp, ones, zmask, 0, 1.0, float(h), float(h), sigma, shape_min_sigma, h, max_iter, 1e-6
            )
        else:
            pxx, pyy, pxy, pflag = math.nan, math.nan, math.nan, 1
        fout[s, 7] = pxx
        fout[s, 8] = pyy
        fout[s, 9] = pxy
        iout[s, 2] = pflag
        # Gaussian flux with the adaptive weight, or the PSF-sized circular one if that failed
        gflag = 0
        if sflag & 1:
            gxx, gyy, gxy = sigma * sigma, sigma * sigma, 0.0
            gflag = 4
        else:
            gxx, gyy, gxy = ixx, iyy, ixy
        gf, ge, gfl = gaussian_flux(image, variance, mask, bad_bits, xc, yc, gxx, gyy, gxy, shape_max_radius)
        fout[s, 13] = gf
        fout[s, 14] = ge
        iout[s, 5] = gflag | gfl
        # PSF flux at the sub-pixel centroid
        ix = int(math.floor(xc + 0.5))
        iy = int(math.floor(yc + 0.5))
        if total > 0:
            lanczos_shift(stamp, xc - ix, yc - iy, shifted)
            pf, pe, chi2, nd, pfl = psf_flux_fit(image, variance, mask, bad_bits, shifted, ix, iy)
        else:
            pf, pe, chi2, nd, pfl = math.nan, math.nan, math.nan, 0, 1
        fout[s, 10] = pf
        fout[s, 11] = pe
        fout[s, 12] = chi2
        iout[s, 3] = pfl
        iout[s, 4] = nd
        for a in range(na):
            af, ae, afl = aperture_flux(image, variance, mask, bad_bits, xc, yc, radii[a], nsub)
            fout[s, nf + 2 * a] = af
            fout[s, nf + 2 * a + 1] = ae
            iout[s, ni + a] = afl
        # pixel flags over the footprint and the 3x3 centre
        fm = 0
        lab = ids[s]
        for y in range(bbox[s, 0], bbox[s, 1]):
            for x in range(bbox[s, 2], bbox[s, 3]):
                if labels[y, x] == lab:
                    fm |= mask[y, x]
        cm = 0
        for y in range(max(iy - 1, 0), min(iy + 2, ny)):
            for x in range(max(ix - 1, 0), min(ix + 2, nx)):
                cm |= mask[y, x]
        iout[s, 6] = fm
        iout[s, 7] = cm
        iout[s, 8] = 1 if (bbox[s, 0] == 0 or bbox[s, 2] == 0 or bbox[s, 1] == ny or bbox[s, 3] == nx) else 0


def _warmup_cases():
    """Tiny calls with the production dtypes, for ``apfast warmup``."""
    ny, nx = 21, 23
    yy, xx = np.mgrid[:ny, :nx]
    img = np.exp(-((xx - 11.0) ** 2 + (yy - 10.0) ** 2) / 8.0).astype(np.float32)
    var = np.ones((ny, nx), np.float32)
    mask = np.zeros((ny, nx), np.int32)
    labels = np.ones((ny, nx), np.int32)
    d = np.arange(-5, 6)
    g = np.exp(-0.5 * (d / 2.0) ** 2)
    basis = (np.outer(g, g) / np.outer(g, g).sum())[None]
    radii = np.array([3.0, 6.0])
    n = 1
    return [
        (
            measure_all,
            (
                img, var, mask, labels, np.ones(n, np.int32), np.array([[0, ny, 0, nx]], np.int32),
                np.array([11.0]), np.array([10.0]), np.array([1.0]), basis, np.ones((n, 1)), False, 2.0,
                radii, 1, 50, 20, 1.2, 8, np.zeros((n, 15 + 2 * radii.size)), np.zeros((n, 9 + radii.size), np.int64),
            ),
        ),
    ]  # fmt: skip
