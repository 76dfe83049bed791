"""The PSF-matching record of a subtraction (``deepDiff_psfMatch``), taken from its result (no I/O).

:func:`psfmatch_diagnostics` reads a :class:`~apfast.diffim.subtract.SubtractionResult`:
the spatial kernel and background are evaluated at the corners and centre, the candidate
table comes from :class:`~apfast.diffim.psfmatch.KernelSolution`, and the residual stamps
are cut from the difference the subtraction already made (before the residual-background
offset and the decorrelation), divided by the square root of its variance. Nothing is
refitted or convolved again: on a 2048x4096 CCD it takes well under a millisecond per stamp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from apfast.psfmatch_diag import KERNEL_LABELS, PsfMatchDiagnostics

if TYPE_CHECKING:
    from apfast.diffim.subtract import SubtractionResult

__all__ = ["kernel_positions", "psfmatch_diagnostics", "residual_stamps"]


def kernel_positions(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """The corners and the centre of an ``(ny, nx)`` image in the order of :data:`KERNEL_LABELS`.

    Examples
    --------
    >>> x, y = kernel_positions(4096, 2048)
    >>> x.tolist(), y.tolist()
    ([0.0, 2047.0, 0.0, 2047.0, 1023.5], [0.0, 0.0, 4095.0, 4095.0, 2047.5])
    """
    x = np.array([0.0, nx - 1, 0.0, nx - 1, (nx - 1) / 2.0])
    y = np.array([0.0, 0.0, ny - 1, ny - 1, (ny - 1) / 2.0])
    assert x.size == len(KERNEL_LABELS)
    return x, y


def _spread(idx: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` entries of ``idx``, evenly spaced (all of them if it has no more)."""
    if idx.size <= n:
        return idx
    return idx[np.round(np.linspace(0, idx.size - 1, n)).astype(np.int64)] if n > 0 else idx[:0]


def residual_stamps(image: np.ndarray, variance: np.ndarray, x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray:
    """``image / sqrt(variance)`` in ``(2 half + 1)``-pixel squares centred on ``(x, y)``; float32 ``(n, s, s)``.

    Pixels outside the image or with a variance that is not positive are NaN.

    Examples
    --------
    >>> img = np.arange(25, dtype=np.float32).reshape(5, 5)
    >>> r = residual_stamps(img, np.full((5, 5), 4.0), np.array([0]), np.array([2]), 1)
    >>> r[0].tolist()
    [[nan, 2.5, 3.0], [nan, 5.0, 5.5], [nan, 7.5, 8.0]]
    """
    ny, nx = image.shape
    s = 2 * half + 1
    out = np.full((len(x), s, s), np.nan, dtype=np.float32)
    for i, (cx, cy) in enumerate(zip(np.asarray(x, np.int64), np.asarray(y, np.int64), strict=True)):
        x0, x1 = max(cx - half, 0), min(cx + half + 1, nx)
        y0, y1 = max(cy - half, 0), min(cy + half + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        img = image[y0:y1, x0:x1].astype(np.float32)
        var = variance[y0:y1, x0:x1].astype(np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            pull = np.where(var > 0, img / np.sqrt(np.where(var > 0, var, 1.0)), np.nan)
        out[i, y0 - (cy - half) : y1 - (cy - half), x0 - (cx - half) : x1 - (cx - half)] = pull
    return out


def psfmatch_diagnostics(sub: SubtractionResult, *, max_stamps: int = 50, max_half: int = 16) -> PsfMatchDiagnostics:
    """The PSF-matching record of a subtraction (what ``deepDiff_psfMatch`` stores).

    Parameters
    ----------
    sub : SubtractionResult
        From :func:`apfast.diffim.subtract.subtract_images` (``DiffimResult.subtraction``).
    max_stamps : int
        Residual stamps stored at most: the rejected candidates first (up to half of them, more if
        fewer were kept), the rest kept ones, each group spread evenly over the candidate list
        (which runs cell by cell over the CCD). The candidate table always has every candidate.
    max_half : int
        Largest half-size of a stored residual stamp: the fitted stamps' half-size, cropped to
        this (16 keeps 50 stamps within 220 kB).

    Returns
    -------
    PsfMatchDiagnostics
    """
    sol = sub.solution
    diff = sub.difference
    ny, nx = diff.shape
    kx, ky = kernel_positions(ny, nx)
    kern, bg = sub.kernel, sub.background
    kernels = np.stack([kern.evaluate(float(a), float(b)) for a, b in zip(kx, ky, strict=True)])
    sums = np.array([kern.sum(float(a), float(b)) for a, b in zip(kx, ky, strict=True)])
    status = np.asarray(sol.candidate_status, dtype=np.int8)
    idx = np.arange(status.size)
    rejected, kept = idx[status != 0], idx[status == 0]
    take_rej = _spread(rejected, min(rejected.size, max(max_stamps - kept.size, max_stamps // 2)))
    chosen = np.sort(np.concatenate([take_rej, _spread(kept, max_stamps - take_rej.size)]))
    where = np.full(status.size, -1, dtype=np.int32)
    where[chosen] = np.arange(chosen.size, dtype=np.int32)
    half_fit = int(sub.metadata.get("stamp_half_size", max_half))
    half = max(1, min(half_fit, max_half))
    assert diff.variance is not None  # subtract_images always makes the difference's variance
    res = residual_stamps(diff.image, diff.variance, sol.candidate_x[chosen], sol.candidate_y[chosen], half)
    meta = sub.metadata
    return PsfMatchDiagnostics(
        mode=sub.mode, shape=(ny, nx), kernel_x=kx, kernel_y=ky, kernels=kernels, kernel_sums=sums,
        background=bg.evaluate(kx, ky), background_coeffs=bg.coeffs, background_order=bg.order,
        background_norm=(bg.x_center, bg.y_center, bg.x_scale, bg.y_scale),
        stamp_x=sol.candidate_x, stamp_y=sol.candidate_y, stamp_status=status,
        stamp_kernel_sum=sol.candidate_kernel_sums, stamp_residual_std=sol.candidate_residual_std,
        stamp_residual_index=where, residuals=res,
        fwhm_science=float(meta.get("fwhm_science", np.nan)), fwhm_template=float(meta.get("fwhm_template", np.nan)),
        basis_sigmas=tuple(meta.get("basis_sigmas", ())), kernel_order=int(kern.order), stamp_half_size=half_fit,
    )
