"""Coadds: warp calexps onto a sky-map patch and combine them (Rubin's ``assembleCoadd``, simplified).

:func:`make_coadd` does, for one ``(tract, patch)``:

1. **Warp** every input calexp onto the patch grid with
   :func:`apfast.diffim.warp.warp_exposure` (Lanczos-3), only over the part of the
   patch the calexp's outline reaches.
2. **Scale** each input to one photometric zero point,
   ``CoaddConfig.zero_point`` (default 31.4, so coadd pixels are in nJy as
   Rubin's ``deepCoadd`` is): ``s_i = 10**(0.4 (zp - zp_i))`` multiplies the
   image and ``s_i**2`` the variance. The coadd's ``photo_calib`` is
   ``PhotoCalib(zero_point)``. Every input needs a ``photo_calib``.
3. **Combine** pixel by pixel in :func:`apfast.kernels.coadd.combine_clipped`
   (numba, parallel over rows): inputs with a ``bad_mask_planes`` bit (or
   outside their footprint: NO_DATA) are skipped; with >= 3 valid inputs, values
   further than ``clip_sigma`` sigma from the median (then from the clipped
   weighted mean) are rejected, sigma being the larger of the input's own noise
   and the robust (MAD) scatter of the inputs; the rest are averaged with
   weights ``1/median variance`` per input (``weighting="exposure"``, Rubin's
   choice) or ``1/variance`` per pixel (``"ivar"``). Variance:
   ``sum w^2 v / (sum w)^2``. Pixels with fewer than ``min_inputs`` inputs:
   image 0, variance inf, NO_DATA. Mask: OR of the masks of the inputs used
   (DETECTED and DETECTED_NEGATIVE are dropped: detections belong to the
   single visit); where nothing is used, OR of the covering inputs' masks plus
   NO_DATA (so a star saturated in every input stays SAT).
4. **PSF**: the coadd PSF at a position is the weighted sum of the inputs'
   warped PSFs (:class:`apfast.diffim.warp.WarpedPsf`) over the inputs that cover it,
   with the per-input weights of step 3 (``1/median scaled variance`` for both
   weightings), which is exactly the PSF of the weighted mean of a point source
   for ``"exposure"`` weighting. It is evaluated on a 3x3 grid spanning the
   covered part of the patch and materialised as a serialisable
   :class:`apfast.psf.PolynomialPixelPsf`: per pixel, the tensor-product
   quadratic (Lagrange) interpolant through the 9 stamps, written as 9 basis
   stamps with total-degree-4 polynomial coefficients. It reproduces the 9
   grid stamps exactly and interpolates quadratically between them.

Metadata of the coadd: ``NINPUTS`` (inputs that reached the patch), ``COADDZP``,
``INPnnn = 'visit,ccdnum'`` for each input, ``TRACT`` and ``PATCH``.

Examples
--------
>>> CoaddConfig().weighting
'exposure'
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from apfast import masks
from apfast._configbase import ConfigSection, opt
from apfast.diffim.skymap import SkyMap, overlap_bbox
from apfast.errors import InputError, NoWorkFound
from apfast.exposure import Exposure, PhotoCalib, VisitInfo
from apfast.kernels.coadd import combine_clipped
from apfast.psf import PolynomialPixelPsf, PsfModel

if TYPE_CHECKING:
    from astropy.wcs import WCS

    from apfast.diffim.warp import WarpConfig

__all__ = ["CoaddConfig", "coadd_psf", "make_coadd", "psf_from_grid"]

log = logging.getLogger(__name__)

_DROP_PLANES = ("DETECTED", "DETECTED_NEGATIVE")


@dataclass(frozen=True, slots=True, kw_only=True)
class CoaddConfig(ConfigSection):
    """Coadd assembly: weighting, per-pixel sigma clipping, masks and photometric scaling."""

    _key_prefix: ClassVar[str] = "coadd."

    weighting: Literal["exposure", "ivar"] = opt(
        "exposure",
        "How inputs are weighted in the mean.",
        choices={
            "exposure": "1 / median variance of each (scaled) input: unbiased for bright sources (Rubin's choice)",
            "ivar": "per-pixel inverse variance: least noise, but biases bright sources low (Poisson variance)",
        },
    )
    clip_sigma: float = opt(
        3.0, "Reject per-pixel values this many sigma from the others (needs >= 3 inputs); 0 turns clipping off."
    )
    clip_iter: int = opt(2, "Rounds of sigma clipping per pixel (>= 1).")
    bad_mask_planes: tuple[str, ...] = opt(
        ("BAD", "SAT", "NO_DATA", "CR", "EDGE"), "Input pixels with these mask planes are left out of the mean."
    )
    min_inputs: int = opt(1, "Fewest inputs a coadd pixel needs; fewer gives NO_DATA (>= 1).")
    zero_point: float = opt(31.4, "AB zero point of the coadd pixels (31.4: nJy, as Rubin's deepCoadd).")

    def _validate(self) -> None:
        if not (math.isfinite(self.clip_sigma) and self.clip_sigma >= 0):
            self._fail("clip_sigma", self.clip_sigma, "use a finite number >= 0, e.g. 3.0 (0 turns clipping off)")
        if self.clip_iter < 1:
            self._fail("clip_iter", self.clip_iter, "use an integer >= 1, e.g. 2")
        if self.min_inputs < 1:
            self._fail("min_inputs", self.min_inputs, "use an integer >= 1")
        if not math.isfinite(self.zero_point):
            self._fail("zero_point", self.zero_point, "use a finite AB magnitude, e.g. 31.4 for nJy")
        unknown = [p for p in self.bad_mask_planes if p not in masks.MASK_BITS]
        if unknown:
            self._fail("bad_mask_planes", self.bad_mask_planes, f"unknown planes {unknown}; known: {masks.MASK_PLANES}")


# --------------------------------------------------------------------------- PSF
def _pad_stamp(stamp: np.ndarray, k: int) -> np.ndarray:
    s = stamp.shape[0]
    if s == k:
        return stamp
    out = np.zeros((k, k))
    o = (k - s) // 2
    if o >= 0:
        out[o : o + s, o : o + s] = stamp
    else:
        out[:] = stamp[-o : -o + k, -o : -o + k]
    return out


#: Coefficients of the quadratic Lagrange polynomials through t = -1, 0, 1: L_a(t) = sum_p M[a, p] t^p.
_LAGRANGE = np.array([[0.0, -0.5, 0.5], [1.0, 0.0, -1.0], [0.0, 0.5, 0.5]])


def psf_from_grid(
    stamps: np.ndarray, xs: Sequence[float], ys: Sequence[float]
) -> PolynomialPixelPsf:
    """Interpolating :class:`PolynomialPixelPsf` through PSF stamps on a 3x3 grid.

    Parameters
    ----------
    stamps : ndarray, shape (3, 3, k, k)
        ``stamps[a, b]`` is the PSF at ``(xs[b], ys[a])``; each should sum to 1.
    xs, ys : sequence of 3 floats
        Equally spaced grid coordinates (pixels), increasing.

    Returns
    -------
    PolynomialPixelPsf
        Order 4 in total degree, 9 basis stamps: ``image(x, y) = sum_{p,q<=2}
        C_pq xn^p yn^q`` with ``xn = (x - xs[1]) / (xs[2] - xs[1])`` (same for y),
        equal to ``stamps[a, b]`` at the grid points.

    Examples
    --------
    >>> st = np.zeros((3, 3, 3, 3)); st[..., 1, 1] = 1.0
    >>> psf = psf_from_grid(st, [0, 50, 100], [0, 20, 40])
    >>> float(psf.compute_image(100.0, 0.0)[1, 1])
    1.0
    """
    st = np.asarray(stamps, dtype=np.float64)
    k = st.shape[-1]
    # C[q, p] = sum_a sum_b M[a, q] M[b, p] P[a, b]
    coef = np.einsum("aq,bp,abij->qpij", _LAGRANGE, _LAGRANGE, st)
    basis = np.empty((9, k, k))
    sel = np.zeros((9, 15))
    for q in range(3):
        for p in range(3):
            b = 3 * q + p
            basis[b] = coef[q, p]
            d = p + q
            sel[b, d * (d + 1) // 2 + q] = 1.0  # poly_terms order: degree d, then x^(d-j) y^j
    x_scale = max(float(xs[2]) - float(xs[1]), 1e-6)
    y_scale = max(float(ys[2]) - float(ys[1]), 1e-6)
    return PolynomialPixelPsf(basis, sel, 4, float(xs[1]), float(ys[1]), x_scale, y_scale)


def coadd_psf(
    psfs: Sequence[PsfModel], weights: Sequence[float] | np.ndarray, coverage: np.ndarray, *, step: int = 8
) -> tuple[PolynomialPixelPsf, np.ndarray]:
    """Coadd PSF from the inputs' PSFs on the coadd grid (see the module docstring).

    Parameters
    ----------
    psfs : sequence of PsfModel
        Each input's PSF on the coadd pixel grid (e.g. :class:`apfast.diffim.warp.WarpedPsf`).
    weights : sequence of float
        Per-input weights (> 0).
    coverage : ndarray of bool, shape (n, ny, nx)
        Where each input contributes.
    step : int
        Subsampling used to find the covered area and the nearest covered pixel.

    Returns
    -------
    PolynomialPixelPsf
        The interpolating model.
    ndarray, shape (3, 3, k, k)
        The grid stamps (weighted sums) it interpolates; grid points are ``(xs[b], ys[a])``
        given by the model's ``x_center +- x_scale``, ``y_center +- y_scale``.

    Raises
    ------
    NoWorkFound
        If no input covers any pixel.
    """
    any_cov = np.asarray(coverage.any(axis=0))
    sub = any_cov[::step, ::step]
    iy, ix = np.nonzero(sub)
    if iy.size == 0:
        iy, ix = np.nonzero(any_cov)
        if iy.size == 0:
            msg = "no input covers any pixel of the coadd, so it has no PSF; check the inputs' WCSs"
            raise NoWorkFound(msg)
        cy, cx = iy, ix
    else:
        cy, cx = iy * step, ix * step
    x0, x1 = float(cx.min()), float(cx.max())
    y0, y1 = float(cy.min()), float(cy.max())
    xs = [x0, 0.5 * (x0 + x1), x1] if x1 > x0 else [x0 - 1.0, x0, x0 + 1.0]
    ys = [y0, 0.5 * (y0 + y1), y1] if y1 > y0 else [y0 - 1.0, y0, y0 + 1.0]
    k = max(p.size for p in psfs)
    grid = np.zeros((3, 3, k, k))
    w = np.asarray(weights, dtype=np.float64)
    for a, gy in enumerate(ys):
        for b, gx in enumerate(xs):
            jy, jx = round(gy), round(gx)
            if not (0 <= jy < any_cov.shape[0] and 0 <= jx < any_cov.shape[1] and any_cov[jy, jx]):
                d2 = (cx - gx) ** 2 + (cy - gy) ** 2
                j = int(np.argmin(d2))
                jy, jx = int(cy[j]), int(cx[j])
            used = [i for i in range(len(psfs)) if coverage[i, jy, jx]]
            if not used:
                used = list(range(len(psfs)))
            total = np.zeros((k, k))
            for i in used:
                total += w[i] * _pad_stamp(psfs[i].compute_image(float(jx), float(jy)), k)
            grid[a, b] = total / total.sum()
    return psf_from_grid(grid, xs, ys), grid


# --------------------------------------------------------------------------- coadd
def _input_name(exp: Exposure, i: int) -> str:
    vi = exp.visit_info
    if vi is not None and vi.visit is not None:
        return f"{vi.visit},{vi.ccdnum}"
    return f"input{i}"


def _check_coadd_inputs(calexps: Sequence[Exposure], tract: int, patch: str) -> set[str]:
    """Check that every calexp is calibrated and all share one filter; return the set of filters named."""
    if len(calexps) == 0:
        msg = f"make_coadd needs at least one calexp for tract {tract} patch {patch}, got none"
        raise InputError(msg)
    for i, exp in enumerate(calexps):
        missing = [n for n in ("wcs", "variance", "psf", "photo_calib") if getattr(exp, n) is None]
        if missing:
            msg = (
                f"calexp {_input_name(exp, i)} has no {', '.join(missing)}; coadd inputs must be calibrated "
                f"exposures (run calibrate first)"
            )
            raise InputError(msg)
    filters = {exp.visit_info.filter for exp in calexps if exp.visit_info is not None and exp.visit_info.filter}
    if len(filters) > 1:
        msg = f"make_coadd got inputs in several filters {sorted(filters)}; coadd one filter at a time"
        raise InputError(msg)
    return filters


def _overlaps(
    calexps: Sequence[Exposure], tract: int, patch: str, pwcs: WCS, shape: tuple[int, int]
) -> tuple[list[tuple[int, int, int, int] | None], list[int]]:
    """Each calexp's box on the patch grid (None = no overlap) and the indices of those that overlap."""
    ny, nx = shape
    boxes = []
    for exp in calexps:
        boxes.append(overlap_bbox(exp.wcs, exp.shape, pwcs, (ny, nx)))
    used = [i for i, b in enumerate(boxes) if b is not None]
    if not used:
        msg = (
            f"none of the {len(calexps)} calexps overlaps tract {tract} patch {patch}; choose the patches with "
            f"SkyMap.find_tracts_patches"
        )
        raise NoWorkFound(msg)
    return boxes, used


def _warp_inputs(
    calexps: Sequence[Exposure],
    boxes: Sequence[tuple[int, int, int, int] | None],
    used: Sequence[int],
    pwcs: WCS,
    shape: tuple[int, int],
    *,
    tract: int,
    patch: str,
    config: CoaddConfig,
    warp_config: WarpConfig,
    nodata: int,
    bad_bits: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[PsfModel]]:
    """Warp the overlapping calexps into stacks on the patch grid: (images, variances, masks, scales, weights,
    psfs)."""
    from apfast.diffim import warp as _warp

    ny, nx = shape
    n = len(used)
    images = np.zeros((n, ny, nx), dtype=np.float32)
    variances = np.full((n, ny, nx), np.inf, dtype=np.float32)
    stack_masks = np.full((n, ny, nx), nodata, dtype=np.int32)
    scales = np.empty(n)
    weights = np.empty(n)
    psfs: list[PsfModel] = []
    for j, i in enumerate(used):
        exp = calexps[i]
        box = boxes[i]
        assert box is not None and exp.photo_calib is not None and exp.psf is not None  # i in used; checked above
        y0, y1, x0, x1 = box
        sub_wcs = pwcs.slice((slice(y0, y1), slice(x0, x1)))
        warped = _warp.warp_exposure(exp, sub_wcs, (y1 - y0, x1 - x0), config=warp_config)
        images[j, y0:y1, x0:x1] = warped.image
        if warped.variance is not None:
            variances[j, y0:y1, x0:x1] = warped.variance
        if warped.mask is not None:
            stack_masks[j, y0:y1, x0:x1] = warped.mask
        scales[j] = 10.0 ** (0.4 * (config.zero_point - exp.photo_calib.zero_point))
        # median variance from every 7th pixel of the warped box: plenty for a weight, 7x cheaper
        vbox = variances[j, y0:y1, x0:x1].ravel()[::7]
        ok = ((stack_masks[j, y0:y1, x0:x1].ravel()[::7] & bad_bits) == 0) & np.isfinite(vbox) & (vbox > 0)
        med_var = float(np.median(vbox[ok])) * scales[j] ** 2 if ok.any() else math.inf
        weights[j] = 1.0 / med_var if med_var > 0 and math.isfinite(med_var) else 0.0
        psfs.append(_warp.WarpedPsf(exp.psf, exp.wcs, pwcs, src_xy0=exp.xy0))
        log.debug("coadd %d/%s: input %s warped into y[%d:%d] x[%d:%d]", tract, patch, _input_name(exp, i),
                  y0, y1, x0, x1)
    return images, variances, stack_masks, scales, weights, psfs


def _combine_stack(
    images: np.ndarray,
    variances: np.ndarray,
    stack_masks: np.ndarray,
    scales: np.ndarray,
    weights: np.ndarray,
    *,
    config: CoaddConfig,
    bad_bits: int,
    drop_bits: int,
    nodata: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clipped weighted mean of the stacks: (image, variance, mask, count) on the patch grid."""
    ny, nx = images.shape[1:]
    out_image = np.empty((ny, nx), dtype=np.float32)
    out_var = np.empty((ny, nx), dtype=np.float32)
    out_mask = np.empty((ny, nx), dtype=np.int32)
    out_count = np.empty((ny, nx), dtype=np.int16)
    combine_clipped(
        images, variances, stack_masks, scales, weights, config.weighting == "ivar", bad_bits, drop_bits, nodata,
        float(config.clip_sigma), int(config.clip_iter), int(config.min_inputs),
        out_image, out_var, out_mask, out_count,
    )
    return out_image, out_var, out_mask, out_count


def _coadd_exposure(
    out_image: np.ndarray,
    out_mask: np.ndarray,
    out_var: np.ndarray,
    out_count: np.ndarray,
    psf: PsfModel,
    *,
    calexps: Sequence[Exposure],
    used: Sequence[int],
    filters: set[str],
    pwcs: WCS,
    tract: int,
    patch: str,
    config: CoaddConfig,
) -> Exposure:
    """The coadd Exposure with its calibration and TRACT/PATCH/NINPUTS/... metadata."""
    n = len(used)
    meta_src = calexps[used[0]]
    band = next(iter(filters)) if filters else None
    camera = meta_src.visit_info.camera if meta_src.visit_info is not None else None
    coadd = Exposure(
        out_image,
        out_mask,
        out_var,
        wcs=pwcs,
        psf=psf,
        photo_calib=PhotoCalib(float(config.zero_point)),
        visit_info=VisitInfo(filter=band, camera=camera),
    )
    md = coadd.metadata
    md["TRACT"] = (int(tract), "sky map tract")
    md["PATCH"] = (str(patch), "sky map patch x,y")
    md["NINPUTS"] = (n, "calexps that reach this patch")
    md["COADDZP"] = (float(config.zero_point), "zero point all inputs were scaled to")
    md["COADDWT"] = (config.weighting, "coadd weighting")
    md["NPIXDATA"] = (int(np.count_nonzero(out_count)), "pixels with at least one input")
    for j, i in enumerate(used[:999]):
        md[f"INP{j:03d}"] = (_input_name(calexps[i], i), "input visit,ccdnum")
    return coadd


def make_coadd(
    calexps: Sequence[Exposure],
    tract: int,
    patch: str,
    skymap: SkyMap,
    *,
    config: CoaddConfig | None = None,
    warp_config: WarpConfig | None = None,
) -> Exposure:
    """Warp calexps onto one sky-map patch and combine them into a coadd (see the module docstring).

    Parameters
    ----------
    calexps : sequence of Exposure
        Calibrated exposures with ``wcs``, ``variance``, ``psf`` and
        ``photo_calib``; masks are optional. They are not modified.
    tract : int
        Tract id in ``skymap``.
    patch : str
        Patch name ``'x,y'``.
    skymap : SkyMap
        The sky map defining the patch grid.
    config : CoaddConfig, optional
        Weighting, clipping and masks; default ``CoaddConfig()``.
    warp_config : apfast.diffim.warp.WarpConfig, optional
        Warping options; default ``WarpConfig()``.

    Returns
    -------
    Exposure
        On the patch grid (its WCS from :meth:`SkyMap.patch_wcs`), in units of
        ``config.zero_point`` (nJy by default), with a :class:`PolynomialPixelPsf`.

    Raises
    ------
    InputError
        If there are no inputs, an input lacks a WCS, variance, PSF or photo_calib,
        or the inputs have different filters.
    NoWorkFound
        If no input overlaps the patch.
    """
    from apfast.diffim import warp as _warp

    config = CoaddConfig() if config is None else config
    warp_config = _warp.WarpConfig() if warp_config is None else warp_config
    filters = _check_coadd_inputs(calexps, tract, patch)

    pwcs, (ny, nx) = skymap.patch_wcs(tract, patch)
    nodata = masks.bitmask("NO_DATA")
    bad_bits = masks.bitmask(config.bad_mask_planes) | nodata
    drop_bits = masks.bitmask(_DROP_PLANES)

    boxes, used = _overlaps(calexps, tract, patch, pwcs, (ny, nx))
    n = len(used)
    images, variances, stack_masks, scales, weights, psfs = _warp_inputs(
        calexps, boxes, used, pwcs, (ny, nx), tract=tract, patch=patch, config=config, warp_config=warp_config,
        nodata=nodata, bad_bits=bad_bits,
    )
    out_image, out_var, out_mask, out_count = _combine_stack(
        images, variances, stack_masks, scales, weights, config=config, bad_bits=bad_bits, drop_bits=drop_bits,
        nodata=nodata,
    )
    coverage = (stack_masks & bad_bits) == 0
    del images, variances
    good_w = weights > 0
    if not good_w.any():
        msg = f"no usable pixels in any calexp overlapping tract {tract} patch {patch}; check their masks"
        raise NoWorkFound(msg)
    psf, _ = coadd_psf([psfs[j] for j in range(n) if good_w[j]], weights[good_w], coverage[good_w])

    coadd = _coadd_exposure(
        out_image, out_mask, out_var, out_count, psf, calexps=calexps, used=used, filters=filters, pwcs=pwcs,
        tract=tract, patch=patch, config=config,
    )
    md = coadd.metadata
    log.info(
        "coadd tract %d patch %s: %d inputs, %.1f%% of %dx%d pixels covered",
        tract, patch, n, 100.0 * md["NPIXDATA"] / (ny * nx), nx, ny,
    )
    return coadd

