"""Cosmic-ray detection and repair: pixels sharper than the PSF allows (Rubin ``findCosmicRays`` logic).

:func:`find_cosmic_rays` flags pixels that stand ``min_sigma`` standard
deviations above the mean of two opposite neighbours *and* whose neighbours
fall off faster than the PSF can (``cond3_fac2`` times the PSF's value one
pixel from its peak, with a ``cond3_fac`` sigma noise allowance). The
candidates are grouped into 8-connected footprints, footprints with less than
``min_dn`` summed flux are dropped, the 3x3 neighbours of the survivors are
re-tested ``n_iter`` times at half the threshold, the result is grown by
``grow`` pixels, masked ``CR`` and (unless ``keep_crs``) replaced by linear
interpolation from the nearest unflagged pixels along the direction with the
shortest gap (and masked ``INTRP``). The full description of the test is in
:mod:`apfast.kernels.cosmicray`.

The PSF enters as one number, the Gaussian ``psf_sigma`` in pixels. Star cores
pass condition 2 but fail condition 3 for any PSF with FWHM above about 1.5 px;
a ``psf_sigma`` smaller than the real PSF makes the test stricter for stars
(safe), a larger one lets through fewer cosmic rays.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(1)
>>> img = rng.normal(0.0, 10.0, (64, 64)).astype(np.float32)
>>> img[30, 20:25] += 2000.0
>>> var = np.full(img.shape, 100.0, dtype=np.float32)
>>> res = find_cosmic_rays(img, var, None, psf_sigma=1.5, config=CosmicRayConfig())
>>> res.n_cr, bool(res.mask[30, 22] & 8), bool(abs(res.image[30, 22]) < 50)
(1, True, True)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast.errors import AlgorithmError, InputError
from apfast.kernels import cosmicray as kc
from apfast.masks import MASK_BITS, MASK_PLANES, bitmask

__all__ = ["CosmicRayConfig", "CosmicRayResult", "TooManyCosmicRaysError", "find_cosmic_rays"]

log = logging.getLogger(__name__)

#: Furthest step (pixels) searched on each side of a flagged pixel for interpolation.
MAX_INTERP_DIST = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class CosmicRayConfig(ConfigSection):
    """Cosmic-ray detection and repair (Rubin ``findCosmicRays`` parameters, DECam values)."""

    _key_prefix: ClassVar[str] = "cosmicray."

    min_sigma: float = opt(6.0, "A candidate exceeds the mean of two opposite neighbours by this many sigma (> 0).")
    min_dn: float = opt(150.0, "Minimum summed flux (image units, above background) of a cosmic ray (>= 0).")
    cond3_fac: float = opt(2.5, "Noise allowance, in sigma, of the PSF-sharpness test (>= 0).")
    cond3_fac2: float = opt(
        0.6, "Fraction of the PSF's 1-pixel fall-off that a candidate's neighbours must stay below (> 0)."
    )
    n_iter: int = opt(3, "Rounds of re-testing the neighbours of found pixels at half the threshold (>= 0).")
    max_cr_pixels: int = opt(
        100000, "Fail with TooManyCosmicRaysError above this many flagged pixels (Rubin nCrPixelMax, DECam)."
    )
    grow: int = opt(1, "Grow every cosmic ray by this many pixels (square) before masking/interpolating (>= 0).")
    keep_crs: bool = opt(False, "Only set the CR mask bit; leave the pixel values unchanged.")
    bad_mask_planes: tuple[str, ...] = opt(
        ("BAD", "SAT", "INTRP", "NO_DATA"),
        "Pixels with these planes are never cosmic rays and are not used to interpolate.",
    )

    def _validate(self) -> None:
        for name, low, strict in (("min_sigma", 0.0, True), ("cond3_fac2", 0.0, True),
                                  ("min_dn", 0.0, False), ("cond3_fac", 0.0, False)):
            v = getattr(self, name)
            if not math.isfinite(v) or v < low or (strict and v == low):
                self._fail(name, v, f"use a finite number {'>' if strict else '>='} {low:g}")
        if self.n_iter < 0:
            self._fail("n_iter", self.n_iter, "use an integer >= 0, e.g. 3")
        if self.max_cr_pixels < 1:
            self._fail("max_cr_pixels", self.max_cr_pixels, "use a positive integer, e.g. 100000")
        if not 0 <= self.grow <= 5:
            self._fail("grow", self.grow, "use an integer between 0 and 5, e.g. 1")
        unknown = [p for p in self.bad_mask_planes if p not in MASK_BITS]
        if unknown:
            self._fail(
                "bad_mask_planes", self.bad_mask_planes,
                f"unknown plane(s) {unknown}; known planes are {', '.join(MASK_PLANES)}",
            )


class TooManyCosmicRaysError(AlgorithmError):
    """More cosmic-ray pixels than ``cosmicray.max_cr_pixels``; ``metadata`` has ``n_pixels`` and ``limit``."""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class CosmicRayResult:
    """Output of :func:`find_cosmic_rays`.

    Attributes
    ----------
    image : ndarray, float32, shape (ny, nx)
        Copy of the input with cosmic rays interpolated over (unchanged values if ``keep_crs``).
    mask : ndarray, int32, shape (ny, nx)
        Copy of the input mask with ``CR`` set (and ``INTRP`` where pixels were replaced).
    n_cr : int
        Number of cosmic rays: 8-connected groups of the final (grown) flagged pixels.
    n_pixels : int
        Number of pixels masked ``CR`` by this call (after growing).
    """

    image: np.ndarray
    mask: np.ndarray
    n_cr: int
    n_pixels: int


def _too_many(n: int, limit: int, stage: str) -> TooManyCosmicRaysError:
    msg = (
        f"found {n} cosmic-ray pixels ({stage}), more than cosmicray.max_cr_pixels = {limit}: check that the "
        f"image is background-subtracted (or pass background=), that the variance plane is in the image's "
        f"units, and that psf_sigma is not too large; raise cosmicray.max_cr_pixels if the image really is "
        f"this contaminated"
    )
    return TooManyCosmicRaysError(msg, n_pixels=int(n), limit=int(limit), stage=stage)


def find_cosmic_rays(
    image: Any,
    variance: Any,
    mask: Any,
    *,
    psf_sigma: float,
    background: float | np.ndarray = 0.0,
    config: CosmicRayConfig,
) -> CosmicRayResult:
    """Find, mask and repair cosmic rays; the inputs are not modified.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
        Pixels (any real dtype or byte order).
    variance : array_like, shape (ny, nx)
        Per-pixel variance in the image's units squared (including the sources' Poisson noise).
    mask : array_like of int, shape (ny, nx), or None
        Mask bit planes; pixels with ``config.bad_mask_planes`` are never flagged nor used for repairs.
    psf_sigma : float
        Gaussian sigma of the PSF in pixels (> 0); FWHM = 2.355 sigma.
    background : float or array_like of shape (ny, nx)
        Sky level still in ``image`` (0 for a background-subtracted image).
    config : CosmicRayConfig

    Returns
    -------
    CosmicRayResult

    Raises
    ------
    InputError
        Shapes differ, arrays are not 2-D real numbers, or ``psf_sigma`` is not a positive number.
    TooManyCosmicRaysError
        More than ``config.max_cr_pixels`` pixels were flagged.
    """
    t0 = time.perf_counter()
    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0 or not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        msg = f"image must be a non-empty 2-D real array, got shape {img.shape} dtype {img.dtype}"
        raise InputError(msg)
    img = np.ascontiguousarray(img, dtype=np.float32)
    shape = img.shape
    var = np.asarray(variance)
    if var.shape != shape or not np.issubdtype(var.dtype, np.number):
        msg = f"variance must be a real array of the image's shape {shape}, got shape {var.shape} dtype {var.dtype}"
        raise InputError(msg)
    var = np.ascontiguousarray(var, dtype=np.float32)
    if mask is None:
        msk = np.zeros(shape, dtype=np.int32)
    else:
        msk = np.asarray(mask)
        if msk.shape != shape or not np.issubdtype(msk.dtype, np.integer):
            msg = f"mask must be an integer array of the image's shape {shape}, got shape {msk.shape} dtype {msk.dtype}"
            raise InputError(msg)
        msk = np.ascontiguousarray(msk, dtype=np.int32)
    if not (isinstance(psf_sigma, (int, float, np.number)) and math.isfinite(psf_sigma) and psf_sigma > 0):
        msg = f"psf_sigma must be a positive number of pixels (Gaussian sigma), got {psf_sigma!r}"
        raise InputError(msg)
    bkg = np.asarray(background)
    if bkg.ndim == 0:
        bkg2 = np.full((1, 1), float(bkg), dtype=np.float32)
        work = img - np.float32(bkg) if float(bkg) != 0.0 else img.copy()
    elif bkg.shape == shape:
        bkg2 = np.ascontiguousarray(bkg, dtype=np.float32)
        work = img - bkg2
    else:
        msg = f"background must be a number or an array of the image's shape {shape}, got shape {bkg.shape}"
        raise InputError(msg)

    s2 = float(psf_sigma) ** 2
    thres_ax = config.cond3_fac2 * math.exp(-0.5 / s2)
    thres_d = config.cond3_fac2 * math.exp(-1.0 / s2)
    bad = bitmask(config.bad_mask_planes)
    limit = config.max_cr_pixels

    cand = np.empty(shape, dtype=np.uint8)
    n_cand = int(kc.find_cr_candidates(
        work, var, msk, bad, float(config.min_sigma), thres_ax, thres_ax, thres_d, float(config.cond3_fac), cand
    ))
    if n_cand > limit:
        raise _too_many(n_cand, limit, "first pass")
    crmask = np.zeros(shape, dtype=np.uint8)
    n_cr, ys, xs = kc.group_candidates(cand, work, n_cand, float(config.min_dn), crmask)
    del cand
    for _ in range(config.n_iter):
        if ys.size == 0:
            break
        kc.interpolate_pixels(work, var, crmask, msk, bad, ys, xs, True, MAX_INTERP_DIST)
        ny_, nx_, overflow = kc.grow_candidates(
            work, var, msk, bad, crmask, ys, xs, 0.5 * float(config.min_sigma), thres_ax, thres_ax, thres_d,
            MAX_INTERP_DIST, limit - ys.size + 1,
        )
        if ny_.size == 0:
            break
        ys = np.concatenate([ys, ny_])
        xs = np.concatenate([xs, nx_])
        if overflow or ys.size > limit:
            raise _too_many(int(ys.size), limit, "after growing into neighbours")
    if config.grow > 0 and ys.size:
        ys, xs = kc.dilate_pixels(crmask, msk, bad, ys, xs, int(config.grow))

    if ys.size:
        # report the final, grown cosmic rays: first-pass pieces of one track have merged by now
        n_cr = kc.count_groups(crmask, ys, xs)
    out_mask = msk.copy()
    bits = 1 << MASK_BITS["CR"]
    # with no background to add back, the working copy already is the repaired image: save a full copy
    reuse_work = bkg.ndim == 0 and float(bkg) == 0.0 and not config.keep_crs
    out = work if reuse_work else img.copy()
    if ys.size and not config.keep_crs:
        kc.interpolate_pixels(work, var, crmask, msk, bad, ys, xs, False, MAX_INTERP_DIST)
        if not reuse_work:
            kc.restore_background(out, work, bkg2, ys, xs)
        bits |= 1 << MASK_BITS["INTRP"]
    if ys.size:
        out_mask[ys, xs] |= bits
    log.info(
        "cosmic rays: %d found, %d pixels masked (%d first-pass candidates) in %.3f s",
        n_cr, ys.size, n_cand, time.perf_counter() - t0,
    )
    return CosmicRayResult(image=out, mask=out_mask, n_cr=int(n_cr), n_pixels=int(ys.size))
