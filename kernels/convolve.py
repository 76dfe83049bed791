"""Numba kernels for applying a spatially varying PSF-matching kernel.

The matching kernel of :mod:`apfast.diffim.psfmatch` is ``K(x, y) = sum_t P_t(x, y) K_t``
with ``P_t`` the monomials of the normalised position (``1, x, y, x^2, x y, y^2``)
and ``K_t`` fixed images. Convolution is linear, so the image convolved with the
varying kernel is exactly ``sum_t P_t(x, y) (I (x) K_t)(x, y)`` (the kernel is
evaluated at the *output* pixel, as Rubin's ``afw`` convolution does). The
driver computes ``I (x) K_t`` by FFT; :func:`combine_spatial_terms` forms the
weighted sum, adds the differential background polynomial and the difference
in one pass. :func:`grow_mask_bits` ORs mask bits over the kernel footprint;
:func:`difference_masks`, :func:`or_masks_any` and :func:`planes_finite` are the
whole-image mask and validity passes of the subtraction fused into one pass each.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from apfast._jit import pjit

__all__ = ["combine_spatial_terms", "difference_masks", "grow_mask_bits", "or_masks_any", "planes_finite"]


@pjit
def combine_spatial_terms(convs, order, bg_coef, bg_order, xc, yc, xs, ys, target, scale, matched, diff):
    """Weighted sum of convolved term images plus background, and the difference.

    ``matched[y, x] = sum_t P_t(xn, yn) convs[t, y, x]`` and
    ``diff[y, x] = scale * (target[y, x] - matched[y, x] - sum_u bg_coef[u] P_u(xn, yn))``
    with ``xn = (x - xc) / xs``, ``yn = (y - yc) / ys`` and ``P`` ordered as
    :func:`apfast.psf.poly_terms` (total degree, then decreasing power of x).

    Parameters
    ----------
    convs : ndarray (nt, ny, nx) float64 or float32
        ``I (x) K_t``, ``nt = (order + 1)(order + 2) / 2``.
    order : int
        Spatial order of the kernel (0..2).
    bg_coef : ndarray (nbg,) float64
        Background polynomial coefficients (may be all zero).
    bg_order : int
        Its order.
    xc, yc, xs, ys : float
        Centre and half-size used to normalise pixel positions.
    target : ndarray (ny, nx) float32
        Image the matched image is subtracted from.
    scale : float
        Factor applied to the difference (1, or ``-1 / kernel_sum`` in ``convolveScience``).
    matched : ndarray (ny, nx) float32
        Written in place.
    diff : ndarray (ny, nx) float32
        Written in place.
    """
    nt = convs.shape[0]
    ny = convs.shape[1]
    nx = convs.shape[2]
    nbg = bg_coef.shape[0]
    nmax = max(nt, nbg)
    for y in prange(ny):
        yn = (y - yc) / ys
        p = np.empty(nmax)
        for x in range(nx):
            xn = (x - xc) / xs
            i = 0
            top = max(order, bg_order)
            for deg in range(top + 1):
                for j in range(deg + 1):
                    if i < nmax:
                        p[i] = xn ** (deg - j) * yn**j
                    i += 1
            acc = 0.0
            for t in range(nt):
                acc += p[t] * convs[t, y, x]
            bg = 0.0
            for u in range(nbg):
                bg += bg_coef[u] * p[u]
            matched[y, x] = acc
            diff[y, x] = scale * (target[y, x] - acc - bg)


@pjit
def grow_mask_bits(mask, r, grow_bits, out):
    """OR the bits ``grow_bits`` of every pixel over the ``(2r+1)^2`` box around it.

    Other bits are copied unchanged. The row pass costs ``2r + 1`` per pixel carrying
    a grown bit; the column pass ORs, for each row, only the rows within ``r`` that
    hold any grown bit (both passes parallel over rows, row-major memory order).

    Parameters
    ----------
    mask : ndarray (ny, nx) int32
        Input mask (not modified).
    r : int
        Half-width of the box (the kernel half-size).
    grow_bits : int
        Bits to spread.
    out : ndarray (ny, nx) int32
        Written in place.
    """
    ny, nx = mask.shape
    tmp = np.zeros((ny, nx), dtype=np.int32)
    row_any = np.zeros(ny, dtype=np.bool_)
    for y in prange(ny):
        for x in range(nx):
            m = mask[y, x] & grow_bits
            if m != 0:
                row_any[y] = True
                lo = max(0, x - r)
                hi = min(nx, x + r + 1)
                for xx in range(lo, hi):
                    tmp[y, xx] |= m
    # column pass in row order (cache friendly): OR the few non-empty rows within r of each row
    for y in prange(ny):
        for x in range(nx):
            out[y, x] = mask[y, x]
        for yy in range(max(0, y - r), min(ny, y + r + 1)):
            if row_any[yy]:
                for x in range(nx):
                    out[y, x] |= tmp[yy, x]


@pjit
def planes_finite(image, variance):
    """Whether every pixel of ``image`` and ``variance`` is finite (one parallel pass).

    Parameters
    ----------
    image, variance : ndarray (ny, nx) float32

    Returns
    -------
    bool
    """
    ny, nx = image.shape
    n_bad = 0
    for y in prange(ny):
        nb = 0
        for x in range(nx):
            if not (np.isfinite(image[y, x]) and np.isfinite(variance[y, x])):
                nb += 1
        n_bad += nb
    return n_bad == 0


@pjit
def or_masks_any(mask_a, mask_b, bits, out):
    """``out = ((mask_a | mask_b) & bits) != 0`` in one pass.

    Parameters
    ----------
    mask_a, mask_b : ndarray (ny, nx) int32
    bits : int
    out : ndarray (ny, nx) bool
        Written in place.
    """
    ny, nx = mask_a.shape
    for y in prange(ny):
        for x in range(nx):
            out[y, x] = ((mask_a[y, x] | mask_b[y, x]) & bits) != 0


@pjit
def difference_masks(mask_tgt, grown, r, edge_bit, not_grown, m_matched, m_diff):
    """Masks of the matched image and the difference, with the ``r``-pixel EDGE border, in one pass.

    ``m_matched = grown | E`` and ``m_diff = mask_tgt | (grown & ~not_grown) | E``, where
    ``E = edge_bit`` within ``r`` pixels of the image border (where the convolution
    kernel runs off the image) and 0 elsewhere.

    Parameters
    ----------
    mask_tgt : ndarray (ny, nx) int32
        Mask of the image the convolved one is subtracted from.
    grown : ndarray (ny, nx) int32
        Mask of the convolved image, grown over the kernel footprint.
    r : int
        Kernel half-size (EDGE border width).
    edge_bit, not_grown : int
        The EDGE bit; bits of ``grown`` not carried into the difference.
    m_matched, m_diff : ndarray (ny, nx) int32
        Written in place.
    """
    ny, nx = grown.shape
    keep = ~not_grown
    for y in prange(ny):
        edge_row = y < r or y >= ny - r
        for x in range(nx):
            e = edge_bit if (edge_row or x < r or x >= nx - r) else 0
            g = grown[y, x]
            m_matched[y, x] = g | e
            m_diff[y, x] = mask_tgt[y, x] | (g & keep) | e


def _warmup_cases():
    """Tiny argument tuples with the subtraction's dtypes (used by ``apfast warmup``)."""
    n = 8
    img = np.ones((n, n), dtype=np.float32)
    msk = np.zeros((n, n), dtype=np.int32)
    return [
        (combine_spatial_terms, (np.ones((1, n, n), np.float32), 0, np.zeros(1), 0, 4.0, 4.0, 4.0, 4.0, img, 1.0,
                                 np.empty((n, n), np.float32), np.empty((n, n), np.float32))),
        (grow_mask_bits, (msk, 1, 0xFF, np.empty((n, n), np.int32))),
        (planes_finite, (img, img)),
        (or_masks_any, (msk, msk, 0xFF, np.empty((n, n), np.bool_))),
        (difference_masks, (msk, msk, 1, 16, 0, np.empty((n, n), np.int32), np.empty((n, n), np.int32))),
    ]
