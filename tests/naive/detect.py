"""Slow, obviously correct NumPy/SciPy versions of the detection and measurement kernels (tests only)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def label(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels of equal non-zero codes: scipy per code, renumbered in raster order."""
    out = np.zeros(codes.shape, dtype=np.int64)
    offset = 0
    for c in np.unique(codes[codes != 0]):
        lab, n = ndimage.label(codes == c, structure=np.ones((3, 3)))
        out[lab > 0] = lab[lab > 0] + offset
        offset += n
    # renumber by first pixel in raster order
    flat = out.ravel()
    _, first = np.unique(flat, return_index=True)
    order = [flat[i] for i in sorted(first) if flat[i] != 0]
    remap = np.zeros(offset + 1, dtype=np.int64)
    for new, old in enumerate(order, start=1):
        remap[old] = new
    return remap[out].astype(np.int32), offset


def dilate_disk(binary: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by the disk ``dx^2 + dy^2 <= radius^2``."""
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = dx**2 + dy**2 <= radius**2 + 1e-9
    return ndimage.binary_dilation(binary.astype(bool), structure=disk)


def smooth(image: np.ndarray, variance: np.ndarray, good: np.ndarray, k1: np.ndarray):
    """``(g I) * K`` and ``(g V) * K^2`` with the 2-D kernel ``K = k1 k1^T`` by explicit shifted sums."""
    h = k1.size // 2
    ny, nx = image.shape
    gi = np.where(good, image, 0.0).astype(np.float64)
    gv = np.where(good, variance, 0.0).astype(np.float64)
    pi = np.pad(gi, h)
    pv = np.pad(gv, h)
    num = np.zeros((ny, nx))
    den = np.zeros((ny, nx))
    for a in range(2 * h + 1):
        for b in range(2 * h + 1):
            k = k1[a] * k1[b]
            num += k * pi[a : a + ny, b : b + nx]
            den += k * k * pv[a : a + ny, b : b + nx]
    return num, den


def centroid(image: np.ndarray, x0: float, y0: float, sigma: float, *, n_iter: int = 500):
    """Plain (not over-relaxed) fixed point of the Gaussian-weighted first moment, full-image sums."""
    yy, xx = np.indices(image.shape, dtype=np.float64)
    xc, yc = x0, y0
    for _ in range(n_iter):
        w = np.exp(-((xx - xc) ** 2 + (yy - yc) ** 2) / (2 * sigma**2)) * image
        xc, yc = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    return xc, yc


def adaptive_moments(image: np.ndarray, xc: float, yc: float, sigma0: float, *, n_iter: int = 400):
    """Adaptive moments by the slow iteration ``W <- 2 M`` (same fixed point ``W = C``), full-image sums."""
    yy, xx = np.indices(image.shape, dtype=np.float64)
    dx, dy = xx - xc, yy - yc
    wm = np.array([[sigma0**2, 0.0], [0.0, sigma0**2]])
    for _ in range(n_iter):
        a = np.linalg.inv(wm)
        w = np.exp(-0.5 * (a[0, 0] * dx**2 + 2 * a[0, 1] * dx * dy + a[1, 1] * dy**2)) * image
        s = w.sum()
        m = (
            np.array([[(w * dx * dx).sum(), (w * dx * dy).sum()], [(w * dx * dy).sum(), (w * dy * dy).sum()]])
            / s
        )
        wm = 2 * m
    return wm[0, 0], wm[1, 1], wm[0, 1]


def floored_moments(image: np.ndarray, xc: float, yc: float, min_sigma: float, *, n_iter: int = 200):
    """Moments ``C = (M^-1 - W^-1)^-1`` under the weight ``W`` = ``C`` with eigenvalues clipped at
    ``min_sigma^2`` (``numpy.linalg.eigh``), iterated to its fixed point, full-image sums."""
    yy, xx = np.indices(image.shape, dtype=np.float64)
    dx, dy = xx - xc, yy - yc
    c = np.eye(2) * min_sigma**2
    for _ in range(n_iter):
        lam, vec = np.linalg.eigh(c)
        wm = vec @ np.diag(np.maximum(lam, min_sigma**2)) @ vec.T
        a = np.linalg.inv(wm)
        w = np.exp(-0.5 * (a[0, 0] * dx**2 + 2 * a[0, 1] * dx * dy + a[1, 1] * dy**2)) * image
        m = np.array([[(w * dx * dx).sum(), (w * dx * dy).sum()], [(w * dx * dy).sum(), (w * dy * dy).sum()]])
        c = np.linalg.inv(np.linalg.inv(m / w.sum()) - a)
    return c[0, 0], c[1, 1], c[0, 1]


def aperture(image: np.ndarray, variance: np.ndarray, xc: float, yc: float, radius: float, nsub: int):
    """Aperture sum with EVERY pixel split into ``nsub x nsub`` sub-pixels (no shortcut for inner pixels)."""
    ny, nx = image.shape
    off = (np.arange(nsub) + 0.5) / nsub - 0.5
    sy, sx = np.meshgrid(off, off, indexing="ij")
    f = v = 0.0
    for y in range(ny):
        for x in range(nx):
            inside = ((x + sx - xc) ** 2 + (y + sy - yc) ** 2 <= radius**2).mean()
            if inside > 0:
                f += inside * image[y, x]
                v += inside**2 * variance[y, x]
    return f, math.sqrt(v)


def lanczos3(t: np.ndarray) -> np.ndarray:
    """``sinc(t) sinc(t/3)`` on ``|t| < 3``, else 0."""
    return np.where(np.abs(t) < 3, np.sinc(t) * np.sinc(t / 3), 0.0)


def lanczos_shift(stamp: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """Full-matrix separable Lanczos-3 shift with per-output normalised taps, rescaled to the input sum."""
    k = stamp.shape[0]
    i = np.arange(k)

    def matrix(f: float) -> np.ndarray:
        base = math.floor(f)
        frac = f - base
        m = np.arange(6)
        taps = lanczos3((m - 2) - frac)
        taps /= taps.sum()
        mat = np.zeros((k, k))
        for j in i:
            for mm in m:
                n = j - base + 2 - mm
                if 0 <= n < k:
                    mat[j, n] += taps[mm]
        return mat

    out = matrix(fy) @ stamp @ matrix(fx).T
    return out * stamp.sum() / out.sum()


def psf_flux(image: np.ndarray, variance: np.ndarray, psf: np.ndarray, ix: int, iy: int):
    """Weighted least-squares amplitude with numpy on the stamp footprint (fully inside the image)."""
    h = psf.shape[0] // 2
    d = image[iy - h : iy + h + 1, ix - h : ix + h + 1].astype(np.float64)
    v = variance[iy - h : iy + h + 1, ix - h : ix + h + 1].astype(np.float64)
    a = (psf * d / v).sum()
    b = (psf**2 / v).sum()
    f = a / b
    return f, 1 / math.sqrt(b), (((d - f * psf) ** 2) / v).sum()
