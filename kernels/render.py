"""Rendering kernels for the DECam data simulator (:mod:`apfast.sim.simulate`).

Every source (star, galaxy, transient, trailed asteroid) is a mixture of
elliptical Gaussians already convolved with the PSF (a double Gaussian), so a
galaxy convolved with the PSF is again a Gaussian mixture whose covariances are
the sums ``Sigma_gal_k + Sigma_psf_j`` (Hogg & Lang 2013, PASP 125, 719, eq. 3).
The kernels only sample those mixtures, lay down cosmic rays, bleed saturated
charge along columns and assemble the raw two-amplifier frame. All random
numbers are drawn by the driver and passed in.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from apfast._jit import jit, pjit

__all__ = [
    "add_cosmic_rays",
    "apply_defects",
    "assemble_raw",
    "bleed_columns",
    "fill_sky",
    "render_mixtures",
]


@pjit
def render_mixtures(
    image, xc, yc, flux, radius, comp_start, comp_count, comp_w, comp_ixx, comp_ixy, comp_iyy, comp_norm, band
):
    """Add Gaussian-mixture sources to ``image`` (in place), parallel over row bands.

    Pixel ``image[i, j]`` has its centre at ``(x, y) = (j, i)``; source ``s`` adds
    ``flux[s] * sum_k w_k * norm_k * exp(-0.5 * (ixx dx^2 + 2 ixy dx dy + iyy dy^2))``
    with ``dx = j - xc[s]``, ``dy = i - yc[s]`` inside the square stamp
    ``|dx|, |dy| <= radius[s]``, where ``k`` runs over the source's components
    ``comp_start[s] .. comp_start[s] + comp_count[s] - 1`` and ``norm_k = 1 / (2 pi sqrt(det Sigma_k))``.
    Each thread owns a band of ``band`` rows, so no two threads write the same pixel
    and the sum order per pixel (source order) is deterministic.

    Parameters
    ----------
    image : ndarray, float32, shape (ny, nx)
        Written in place.
    xc, yc, flux : ndarray, float64, shape (n,)
        Centres (pixels, 0-based) and total fluxes (any unit).
    radius : ndarray, int64, shape (n,)
        Stamp half-width in pixels.
    comp_start, comp_count : ndarray, int64, shape (n,)
        Slice of the component arrays belonging to each source.
    comp_w, comp_ixx, comp_ixy, comp_iyy, comp_norm : ndarray, float64, shape (m,)
        Component weight, inverse covariance terms and Gaussian normalisation.
    band : int
        Rows per parallel band.
    """
    ny, nx = image.shape
    nband = (ny + band - 1) // band
    n = xc.shape[0]
    for b in prange(nband):
        r0 = b * band
        r1 = min(ny, r0 + band)
        for s in range(n):
            rad = radius[s]
            iy0 = max(r0, int(math.floor(yc[s])) - rad)
            iy1 = min(r1 - 1, int(math.floor(yc[s])) + rad + 1)
            if iy0 > iy1:
                continue
            ix0 = max(0, int(math.floor(xc[s])) - rad)
            ix1 = min(nx - 1, int(math.floor(xc[s])) + rad + 1)
            if ix0 > ix1:
                continue
            k0 = comp_start[s]
            k1 = k0 + comp_count[s]
            f = flux[s]
            for i in range(iy0, iy1 + 1):
                dy = i - yc[s]
                for j in range(ix0, ix1 + 1):
                    dx = j - xc[s]
                    acc = 0.0
                    for k in range(k0, k1):
                        q = comp_ixx[k] * dx * dx + 2.0 * comp_ixy[k] * dx * dy + comp_iyy[k] * dy * dy
                        if q < 60.0:
                            acc += comp_w[k] * comp_norm[k] * math.exp(-0.5 * q)
                    image[i, j] += f * acc


@jit
def fill_sky(image, level, gu, gv, u0, v0, scale):
    """Fill ``image`` (in place, serial: it is memory bound) with a planar sky
    ``level * (1 + gu*u/scale + gv*v/scale)``.

    ``u = j + u0`` and ``v = i + v0`` are focal-plane coordinates of pixel ``(i, j)``,
    so neighbouring CCDs see one continuous gradient.

    Parameters
    ----------
    image : ndarray, float32, shape (ny, nx)
        Overwritten.
    level, gu, gv, u0, v0, scale : float
        Sky level, fractional gradients per ``scale`` pixels, focal-plane offset of pixel (0, 0).
    """
    ny, nx = image.shape
    for i in range(ny):
        v = i + v0
        for j in range(nx):
            image[i, j] = level * (1.0 + gu * (j + u0) / scale + gv * v / scale)


@jit
def apply_defects(electrons, x0, y0, width, height, kind, value):
    """Apply defect boxes to an electron image in place.

    ``kind[d] == 0`` is a dead box (pixels multiplied by ``value[d]``, e.g. 0.03);
    ``kind[d] == 1`` a hot box (``value[d]`` electrons added).

    Parameters
    ----------
    electrons : ndarray, float32, shape (ny, nx)
        Written in place.
    x0, y0, width, height, kind : ndarray, int64, shape (n,)
        Boxes in 0-based trimmed pixels.
    value : ndarray, float64, shape (n,)
    """
    ny, nx = electrons.shape
    for d in range(x0.shape[0]):
        for i in range(max(0, y0[d]), min(ny, y0[d] + height[d])):
            for j in range(max(0, x0[d]), min(nx, x0[d] + width[d])):
                if kind[d] == 0:
                    electrons[i, j] *= value[d]
                else:
                    electrons[i, j] += value[d]


@jit
def add_cosmic_rays(electrons, crmask, x0, y0, length, angle, dep, width):
    """Deposit cosmic-ray tracks (in place) and flag the pixels they touch.

    Each ray is a straight segment from ``(x0, y0)`` of ``length`` pixels at
    ``angle`` (radians); it is walked in steps of 0.25 px and each step adds
    ``0.25 * dep`` electrons to the nearest pixel, plus ``width`` (0..1) times that
    to the 4-neighbours (a "worm"). Zero length gives a compact blob. Tracks are
    sharp (not PSF-like), which is how ISR tells them apart from stars.

    Parameters
    ----------
    electrons : ndarray, float32, shape (ny, nx)
        Written in place.
    crmask : ndarray, uint8, shape (ny, nx)
        Set to 1 where a ray deposited charge (in place).
    x0, y0, length, angle, dep, width : ndarray, float64, shape (n,)
    """
    ny, nx = electrons.shape
    for r in range(x0.shape[0]):
        nstep = int(length[r] / 0.25) + 1
        c = math.cos(angle[r])
        s = math.sin(angle[r])
        amt = 0.25 * dep[r] if nstep > 1 else dep[r]
        for t in range(nstep):
            x = x0[r] + 0.25 * t * c
            y = y0[r] + 0.25 * t * s
            j = int(math.floor(x + 0.5))
            i = int(math.floor(y + 0.5))
            if 0 <= i < ny and 0 <= j < nx:
                electrons[i, j] += amt
                crmask[i, j] = 1
            if width[r] > 0.0:
                for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    ii = i + di
                    jj = j + dj
                    if 0 <= ii < ny and 0 <= jj < nx:
                        electrons[ii, jj] += amt * width[r]
                        crmask[ii, jj] = 1


@jit
def bleed_columns(electrons, full_well_a, full_well_b, nsplit):
    """Cap pixels at the full well and bleed the excess charge along the column (in place).

    Charge above ``full_well`` is removed from each pixel; half of it travels up
    the column and half down, filling the next unsaturated pixels to the full
    well until it is used up (charge reaching the edge is lost). Columns
    ``j < nsplit`` use ``full_well_b`` (amp B), the others ``full_well_a``.
    Saturated pixels end exactly at the full well.

    Parameters
    ----------
    electrons : ndarray, float32, shape (ny, nx)
        Written in place.
    full_well_a, full_well_b : float
        Full well in electrons for each amplifier.
    nsplit : int
        First column of amp A.

    Returns
    -------
    int
        Number of saturated pixels.
    """
    ny, nx = electrons.shape
    nsat = np.zeros(nx, dtype=np.int64)
    for j in range(nx):
        fw = full_well_b if j < nsplit else full_well_a
        fw32 = np.float32(fw)
        excess = np.zeros(ny, dtype=np.float64)
        anysat = False
        for i in range(ny):
            e = electrons[i, j]
            if e > fw32:
                excess[i] = e - fw
                electrons[i, j] = fw32
                anysat = True
        if not anysat:
            continue
        carry = 0.0
        for i in range(ny):  # upward half
            carry += 0.5 * excess[i]
            if carry > 0.0 and electrons[i, j] < fw32:
                room = fw - electrons[i, j]
                if carry >= room:
                    electrons[i, j] = fw32
                    carry -= room
                else:
                    electrons[i, j] += carry
                    carry = 0.0
        carry = 0.0
        for i in range(ny - 1, -1, -1):  # downward half
            carry += 0.5 * excess[i]
            if carry > 0.0 and electrons[i, j] < fw32:
                room = fw - electrons[i, j]
                if carry >= room:
                    electrons[i, j] = fw32
                    carry -= room
                else:
                    electrons[i, j] += carry
                    carry = 0.0
        c = 0
        for i in range(ny):
            if electrons[i, j] >= fw32:
                c += 1
        nsat[j] = c
    return nsat.sum()


@jit
def assemble_raw(
    signal_b, signal_a, bias_rows_b, bias_rows_a, bias2d, noise, rn_b, rn_a, xt_b_from_a, xt_a_from_b,
    sat_b, sat_a, data_x0, data_y0, out,
):
    """Build one raw DECam CCD frame (uint16) from amplifier signals, bias and read noise.

    For raw row ``r`` and column ``c`` (0-based) the value before rounding is
    ``bias_rows[amp, r] + rn_amp * noise[r, c]`` plus, in the data section,
    ``signal + bias2d + crosstalk``. Amp B occupies raw columns
    ``data_x0 .. data_x0+nb-1`` (trimmed columns ``0..nb-1``) and its overscan/prescan
    are the columns left of it; amp A follows (trimmed ``nb..2nb-1``) with its
    overscan to the right. Columns ``< data_x0 + nb`` belong to amp B. Rows
    ``< data_y0`` are the parallel overscan. Crosstalk: the victim pixel of amp B
    at trimmed column ``j`` gets ``xt_b_from_a * signal_a`` at the pixel read out at
    the same time, ``signal_a[:, nb-1-j]`` (amp A reads from the right edge), and
    vice versa. Values are rounded (``floor(v + 0.5)``) and clipped to
    ``[0, saturation]``; ``out`` is written in place.

    Parameters
    ----------
    signal_b, signal_a : ndarray, float32, shape (ny, nb)
        Bias-free amplifier signals in ADU, in trimmed orientation.
    bias_rows_b, bias_rows_a : ndarray, float64, shape (nrow,)
        Bias level per raw row (level + drift + jitter) in ADU.
    bias2d : ndarray, float32, shape (ny, 2 nb)
        Two-dimensional bias structure of the data section (ADU).
    noise : ndarray, float32, shape (nrow, ncol)
        Standard normal deviates.
    rn_b, rn_a : float
        Read noise in ADU.
    xt_b_from_a, xt_a_from_b : float
        Crosstalk coefficients (victim from source).
    sat_b, sat_a : float
        Saturation levels in ADU.
    data_x0, data_y0 : int
        Raw column and row of trimmed pixel (0, 0).
    out : ndarray, uint16, shape (nrow, ncol)
        Written in place.
    """
    nrow, ncol = out.shape
    ny, nb = signal_b.shape
    xsplit = data_x0 + nb
    for r in range(nrow):
        i = r - data_y0
        for c in range(ncol):
            if c < xsplit:
                v = bias_rows_b[r] + rn_b * noise[r, c]
                sat = sat_b
            else:
                v = bias_rows_a[r] + rn_a * noise[r, c]
                sat = sat_a
            if 0 <= i < ny:
                t = c - data_x0
                if 0 <= t < nb:
                    v += signal_b[i, t] + bias2d[i, t] + xt_b_from_a * signal_a[i, nb - 1 - t]
                elif nb <= t < 2 * nb:
                    k = t - nb
                    v += signal_a[i, k] + bias2d[i, t] + xt_a_from_b * signal_b[i, nb - 1 - k]
            v = math.floor(v + 0.5)
            v = max(v, 0.0)
            v = min(v, sat)
            out[r, c] = np.uint16(v)
