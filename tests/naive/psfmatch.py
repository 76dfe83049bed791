"""Slow, obviously correct NumPy references for the PSF-matching kernels (stumpy's ``naive.py`` pattern)."""

from __future__ import annotations

import numpy as np


def convolve_direct(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """True 2-D convolution ``out[y, x] = sum_{v,u} K[v+r, u+r] I[y-v, x-u]``, zero outside the image."""
    ny, nx = image.shape
    k = kernel.shape[0]
    r = k // 2
    pad = np.zeros((ny + 2 * r, nx + 2 * r))
    pad[r : r + ny, r : r + nx] = image
    out = np.zeros((ny, nx))
    for v in range(-r, r + 1):
        for u in range(-r, r + 1):
            out += kernel[v + r, u + r] * pad[r - v : r - v + ny, r - u : r - u + nx]
    return out


def convolve_spatial(image: np.ndarray, kernel_at) -> np.ndarray:
    """Convolve with a kernel evaluated afresh at every output pixel: ``kernel_at(x, y) -> (k, k)``."""
    ny, nx = image.shape
    k = kernel_at(0.0, 0.0).shape[0]
    r = k // 2
    pad = np.zeros((ny + 2 * r, nx + 2 * r))
    pad[r : r + ny, r : r + nx] = image
    out = np.zeros((ny, nx))
    for y in range(ny):
        for x in range(nx):
            kern = kernel_at(float(x), float(y))
            # window rows y - r .. y + r of the image; flipping the kernel turns the sum into a convolution
            win = pad[y : y + k, x : x + k]
            out[y, x] = np.sum(win * kern[::-1, ::-1])
    return out


def stamp_normal_equations(ref, tgt, wgt, basis_images, cx, cy, half, with_bg):
    """Per-stamp ``M = C^T W C``, ``b = C^T W I`` with ``C`` the reference convolved with each basis image."""
    nb = basis_images.shape[0]
    nu = nb + int(with_bg)
    ns = len(cx)
    m = np.zeros((ns, nu, nu))
    b = np.zeros((ns, nu))
    for s in range(ns):
        ys = slice(cy[s] - half, cy[s] + half + 1)
        xs = slice(cx[s] - half, cx[s] + half + 1)
        cols = []
        for i in range(nb):
            cols.append(convolve_direct(ref.astype(np.float64), basis_images[i])[ys, xs].ravel())
        if with_bg:
            cols.append(np.ones((2 * half + 1) ** 2))
        c = np.stack(cols, axis=1)
        w = wgt[ys, xs].astype(np.float64).ravel()
        t = tgt[ys, xs].astype(np.float64).ravel()
        m[s] = c.T @ (w[:, None] * c)
        b[s] = c.T @ (w * t)
    return m, b


def grow_mask_bits(mask: np.ndarray, r: int, grow_bits: int) -> np.ndarray:
    """OR ``mask & grow_bits`` of each pixel over its ``(2r+1)^2`` box, keeping every original bit."""
    out = mask.copy()
    for y, x in zip(*np.nonzero(mask & grow_bits), strict=True):
        out[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1] |= mask[y, x] & grow_bits
    return out
