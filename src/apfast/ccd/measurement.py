"""Source measurement on detected footprints (Rubin ``SingleFrameMeasurementTask`` plugins).

:func:`measure_sources` measures one row per footprint of a
:class:`~apfast.ccd.detection.DetectionResult`, all in one parallel numba kernel
(:mod:`apfast.kernels.measure` documents the equations):

================================  ===============================================================
column(s)                         meaning (Rubin plugin it stands in for)
================================  ===============================================================
``id``                            footprint id (label value)
``x, y, xErr, yErr``              Gaussian-weighted matched-filter centroid (SdssCentroid), pixels
``centroid_flag``                 centroid failed or not converged; ``centroid_flag_resetToPeak``:
                                  position is the detection peak
``Ixx, Iyy, Ixy, shape_flag``     adaptive second moments (SdssShape), pixels^2, with the weight
                                  no narrower than ``shape_min_sigma`` (undersampled stars);
                                  ``shape_flag_maxRadius`` when the weight box hit the cap
``Ixx_psf, Iyy_psf, Ixy_psf``     adaptive moments of the PSF model at the source
``psfFlux, psfFluxErr``           weighted least-squares PSF amplitude (PsfFlux), image units
``psfChi2, psfNdata``             chi^2 of that fit and pixels used
``psfFlux_flag``                  fit failed; ``_flag_edge`` stamp off the image;
                                  ``_flag_badPixels`` masked pixels skipped
``apFlux_<r>, apFlux_<r>Err``     circular aperture flux of radius ``r`` (CircularApertureFlux),
                                  e.g. ``apFlux_4_5`` for 4.5 px; ``_flag`` failed or truncated
                                  by the edge, ``_flag_badPixels`` masked pixels skipped
``gaussianFlux(Err)``             flux under the adaptive Gaussian weight (GaussianFlux); the
                                  error holds the weight fixed (as Rubin's), so it underestimates
                                  the scatter (about 1.45x for stars at S/N 50)
``peakValue, snr``                detection peak pixel value; ``psfFlux / psfFluxErr``
``bboxSize``                      larger side of the footprint bounding box, pixels
``is_negative``                   brightest peak is negative (centroid and shape measure ``-image``)
``has_positive, has_negative``    the footprint has positive / negative peaks (both: dipole)
``pixelFlags_<p>``                any footprint pixel carries plane ``p`` (PixelFlags); ``<p>``:
                                  edge (EDGE or NO_DATA, or footprint touches the image border),
                                  interpolated, saturated, cr, bad, suspect
``pixelFlags_<p>_center``         the same over the 3x3 pixels at the centroid
================================  ===============================================================

Aperture fluxes sum point-sampled pixels with a sharp circular edge (sub-pixel
area weights), which underestimates a steep profile by about 1% at 3 px radius
for a sigma = 2 px star and by < 0.2% from 6 px out (Rubin uses sinc apertures
for small radii).

Fluxes are signed: a negative difference-image source has a negative ``psfFlux``.
Dipole footprints are measured at their brightest lobe; dipole fitting is a
separate step.

Examples
--------
>>> import numpy as np
>>> from apfast.ccd.detection import detect_sources
>>> from apfast.ccd.measurement import measure_sources
>>> rng = np.random.default_rng(2)
>>> yy, xx = np.mgrid[:64, :64]
>>> img = (1000.0 / (2 * np.pi * 4.0) * np.exp(-((xx - 30.3) ** 2 + (yy - 20.6) ** 2) / 8.0)).astype(np.float32)
>>> img += rng.normal(0.0, 1.0, img.shape).astype(np.float32)
>>> var, mask = np.ones_like(img), np.zeros(img.shape, np.int32)
>>> det = detect_sources(img, var, mask, psf_sigma=2.0)
>>> cat = measure_sources(img, var, mask, det, psf=None, psf_sigma=2.0)
>>> len(cat), round(float(cat["x"][0]), 1), round(float(cat["y"][0]), 1)
(1, 30.3, 20.6)
>>> bool(abs(cat["psfFlux"][0] - 1000.0) < 5 * cat["psfFluxErr"][0])
True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast.ccd.detection import DetectionResult, check_planes, validate_planes
from apfast.errors import InputError
from apfast.kernels import measure as _k
from apfast.masks import bitmask
from apfast.psf import GaussianPsf, ImagePsf, PolynomialPixelPsf, PsfModel, poly_terms

__all__ = ["MeasurementConfig", "MeasurementResult", "aperture_name", "measure_sources", "psf_stamps"]

log = logging.getLogger(__name__)

_PIXEL_FLAGS = {
    "edge": ("EDGE", "NO_DATA"),
    "interpolated": ("INTRP",),
    "saturated": ("SAT",),
    "cr": ("CR",),
    "bad": ("BAD",),
    "suspect": ("SUSPECT",),
}


def aperture_name(radius: float) -> str:
    """Column stem of an aperture: ``apFlux_4_5`` for 4.5 px (Rubin's ``CircularApertureFlux_4_5``).

    Examples
    --------
    >>> aperture_name(3.0), aperture_name(4.5), aperture_name(12)
    ('apFlux_3_0', 'apFlux_4_5', 'apFlux_12_0')
    """
    return "apFlux_" + f"{float(radius):.1f}".replace(".", "_")


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasurementConfig(ConfigSection):
    """Options of :func:`measure_sources`."""

    #: Used in characterize and calibrate: loaded configs name the full key, direct construction this.
    _key_prefix: ClassVar[str] = "measurement."

    aperture_radii: tuple[float, ...] = opt((3.0, 4.5, 6.0, 9.0, 12.0), "Circular aperture radii in pixels.")
    bad_mask_planes: tuple[str, ...] = opt(
        ("BAD", "SAT", "NO_DATA"), "Mask planes whose pixels are left out of every measurement (and flagged)."
    )
    max_iter: int = opt(50, "Iteration limit of the centroid and adaptive moments.")
    shape_max_radius: int = opt(30, "Largest half-width (pixels) of the adaptive-moment and Gaussian-flux box.")
    shape_min_sigma: float = opt(
        1.2,
        "Smallest sigma (pixels) of the adaptive-moment weight along either axis. A weight "
        "narrower than about a pixel is too coarsely sampled: on undersampled stars (ZTF) the "
        "iteration collapsed and Ixx, Ixx_psf were NaN. 0 turns the floor off.",
    )
    aperture_subpixels: int = opt(8, "Sub-pixels per side for pixels crossed by an aperture edge.")

    def _validate(self) -> None:
        radii = self.aperture_radii
        if not all(math.isfinite(r) and r > 0 for r in radii) or len(set(radii)) != len(radii):
            self._raise("aperture_radii", f" = {radii!r} must be distinct positive radii in pixels")
        validate_planes(self.bad_mask_planes, f"{self._prefix}bad_mask_planes")
        for key, lo in (("max_iter", 1), ("shape_max_radius", 2), ("aperture_subpixels", 1)):
            v = getattr(self, key)
            if v < lo:
                self._raise(key, f" = {v!r} must be an integer >= {lo}")
        ok = math.isfinite(self.shape_min_sigma) and 0 <= self.shape_min_sigma <= self.shape_max_radius / 4
        self._check_ranges([("shape_min_sigma", ok, f"a sigma in pixels from 0 (no floor) to shape_max_radius / 4 "
                                                    f"= {self.shape_max_radius / 4:g}")])


@dataclass(frozen=True, slots=True)
class MeasurementResult:
    """Source catalogue: columns of length ``n_sources`` keyed by name, like an astropy Table.

    ``result["psfFlux"]`` gives a column, ``len(result)`` the number of rows,
    ``result.names`` the column names in order and :meth:`to_table` an astropy Table.
    """

    columns: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.columns[key]
        except KeyError:
            msg = f"no column {key!r} in the source catalogue; columns are {', '.join(self.columns)}"
            raise KeyError(msg) from None

    def __contains__(self, key: object) -> bool:
        return key in self.columns

    def __len__(self) -> int:
        """Number of rows (sources)."""
        return self.n_sources

    @property
    def names(self) -> tuple[str, ...]:
        """Column names in order."""
        return tuple(self.columns)

    @property
    def n_sources(self) -> int:
        """Number of rows."""
        return int(self.columns["id"].shape[0])

    def to_table(self) -> Any:
        """Return an ``astropy.table.Table`` with the same columns (copies the arrays)."""
        from astropy.table import Table

        return Table(dict(self.columns))


PsfLike = PsfModel | Callable[[float, float], Any] | None


def psf_stamps(
    psf: PsfLike, x: np.ndarray, y: np.ndarray, psf_sigma: float
) -> tuple[np.ndarray, np.ndarray, bool]:
    """PSF stamps for sources at ``(x, y)`` as ``(basis, weights, per_source)`` for the kernel.

    ``None`` gives a Gaussian of ``psf_sigma``; :class:`GaussianPsf` and
    :class:`ImagePsf` one constant stamp; :class:`PolynomialPixelPsf` its basis with
    per-source polynomial weights (evaluated in bulk, no per-source Python call);
    any other model or callable ``f(x, y) -> (k, k) stamp`` one stamp per source.
    """
    n = x.shape[0]
    if psf is None:
        r = int(math.ceil(5.0 * psf_sigma))
        return GaussianPsf(psf_sigma, 2 * r + 1).compute_image(0.0, 0.0)[None], np.ones((n, 1)), False
    if isinstance(psf, (GaussianPsf, ImagePsf)):
        return (
            np.ascontiguousarray(psf.compute_image(0.0, 0.0), dtype=np.float64)[None],
            np.ones((n, 1)),
            False,
        )
    if isinstance(psf, PolynomialPixelPsf):
        xn = (x - psf.x_center) / psf.x_scale
        yn = (y - psf.y_center) / psf.y_scale
        if n:
            terms = np.stack([poly_terms(a, b, psf.order) for a, b in zip(xn, yn, strict=True)])
            weights = terms @ psf.coeffs.T
        else:
            weights = np.zeros((0, psf.basis.shape[0]))
        # a writeable copy: numba compiles read-only arrays as a separate signature (~10 s per process)
        return np.array(psf.basis, dtype=np.float64), np.ascontiguousarray(weights), False
    func = psf.compute_image if isinstance(psf, PsfModel) else psf
    if not callable(func):
        msg = f"psf must be a PsfModel, a callable (x, y) -> stamp, or None; got {type(psf).__name__}"
        raise InputError(msg)
    stamps = [np.asarray(func(float(a), float(b)), dtype=np.float64) for a, b in zip(x, y, strict=True)]
    if not stamps:
        return np.zeros((0, 1, 1)), np.zeros((0, 0)), True
    shape = stamps[0].shape
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] % 2 == 0 or any(s.shape != shape for s in stamps):
        msg = f"the psf callable must return square stamps of one odd size; got {shape} (and others)"
        raise InputError(msg)
    return np.ascontiguousarray(np.stack(stamps)), np.zeros((n, 0)), True


def measure_sources(
    image: Any,
    variance: Any,
    mask: Any,
    detections: DetectionResult,
    *,
    psf: PsfLike,
    psf_sigma: float,
    config: MeasurementConfig | None = None,
) -> MeasurementResult:
    """Measure centroids, shapes, fluxes and pixel flags of every detected footprint.

    Parameters
    ----------
    image, variance : array_like, shape (ny, nx)
        Background-subtracted pixels and their variance.
    mask : array_like of int, shape (ny, nx)
        Mask planes (the detection's ``mask`` or the original; DETECTED bits are ignored).
    detections : DetectionResult
        Footprints from :func:`apfast.ccd.detection.detect_sources` on these planes.
    psf : PsfModel, callable or None
        PSF model (``None``: a Gaussian of ``psf_sigma``). See :func:`psf_stamps`.
    psf_sigma : float
        Gaussian sigma (pixels) of the PSF: centroid weight and moment starting point.
    config : MeasurementConfig, optional

    Returns
    -------
    MeasurementResult
        One row per footprint, columns listed in the module docstring.

    Raises
    ------
    InputError
        On mismatched shapes, a label image of another size, or a bad ``psf_sigma``.
    """
    cfg = config if config is not None else MeasurementConfig()
    img, var, msk = check_planes(image, variance, mask)
    if detections.labels.shape != img.shape:
        msg = (
            f"detections were made on a {detections.labels.shape} image but image has shape {img.shape}; "
            "measure on the planes you detected on"
        )
        raise InputError(msg)
    psf_sigma = float(psf_sigma)
    if not (math.isfinite(psf_sigma) and psf_sigma > 0):
        msg = f"psf_sigma = {psf_sigma} must be a positive number of pixels; pass the PSF Gaussian sigma (FWHM/2.355)"
        raise InputError(msg)
    n = detections.n_footprints
    x0 = detections.peak_x.astype(np.float64)
    y0 = detections.peak_y.astype(np.float64)
    sign = np.where(detections.peak_snr < 0, -1.0, 1.0)
    basis, weights, per_source = psf_stamps(psf, x0, y0, psf_sigma)
    radii = np.asarray(cfg.aperture_radii, dtype=np.float64)
    na = radii.size
    nf, ni = len(_k.FCOLS), len(_k.ICOLS)
    fout = np.full((n, nf + 2 * na), np.nan)
    iout = np.zeros((n, ni + na), dtype=np.int64)
    if n:
        _k.measure_all(
            img, var, msk, np.ascontiguousarray(detections.labels, dtype=np.int32),
            np.ascontiguousarray(detections.id, dtype=np.int32), np.ascontiguousarray(detections.bbox, dtype=np.int32),
            x0, y0, sign, basis, weights, per_source, psf_sigma, radii, bitmask(cfg.bad_mask_planes),
            int(cfg.max_iter), int(cfg.shape_max_radius), float(cfg.shape_min_sigma), int(cfg.aperture_subpixels),
            fout, iout,
        )  # fmt: skip
    f = {name: fout[:, i] for i, name in enumerate(_k.FCOLS)}
    g = {name: iout[:, i] for i, name in enumerate(_k.ICOLS)}
    cols: dict[str, np.ndarray] = {"id": detections.id.astype(np.int32)}
    for name in ("x", "y", "xErr", "yErr"):
        cols[name] = f[name]
    cols["centroid_flag"] = g["centroid_flags"] != 0
    cols["centroid_flag_resetToPeak"] = (g["centroid_flags"] & 5) != 0
    for name in ("Ixx", "Iyy", "Ixy"):
        cols[name] = f[name]
    cols["shape_flag"] = (g["shape_flags"] & 3) != 0
    cols["shape_flag_maxRadius"] = (g["shape_flags"] & 4) != 0
    for name in ("Ixx_psf", "Iyy_psf", "Ixy_psf"):
        cols[name] = f[name]
    cols["psf_shape_flag"] = (g["psf_shape_flags"] & 7) != 0  # 8: sub-pixel weight (information only)
    for name in ("psfFlux", "psfFluxErr", "psfChi2"):
        cols[name] = f[name]
    cols["psfNdata"] = g["psfNdata"].astype(np.int32)
    cols["psfFlux_flag"] = (g["psfFlux_flags"] & 1) != 0
    cols["psfFlux_flag_edge"] = (g["psfFlux_flags"] & 2) != 0
    cols["psfFlux_flag_badPixels"] = (g["psfFlux_flags"] & 4) != 0
    for a, r in enumerate(cfg.aperture_radii):
        stem = aperture_name(r)
        cols[stem] = fout[:, nf + 2 * a]
        cols[stem + "Err"] = fout[:, nf + 2 * a + 1]
        cols[stem + "_flag"] = (iout[:, ni + a] & 3) != 0
        cols[stem + "_flag_badPixels"] = (iout[:, ni + a] & 4) != 0
    cols["gaussianFlux"] = f["gaussianFlux"]
    cols["gaussianFluxErr"] = f["gaussianFluxErr"]
    cols["gaussianFlux_flag"] = (g["gaussianFlux_flags"] & 5) != 0
    cols["peakValue"] = detections.peak_value.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cols["snr"] = f["psfFlux"] / f["psfFluxErr"]
    bb = detections.bbox
    cols["bboxSize"] = np.maximum(bb[:, 1] - bb[:, 0], bb[:, 3] - bb[:, 2]).astype(np.int32)
    cols["is_negative"] = sign < 0
    cols["has_positive"] = detections.has_positive.copy()
    cols["has_negative"] = detections.has_negative.copy()
    fm, cm = g["footprint_mask"], g["center_mask"]
    for flag, planes in _PIXEL_FLAGS.items():
        bits = bitmask(planes)
        cols[f"pixelFlags_{flag}"] = (fm & bits) != 0
        cols[f"pixelFlags_{flag}_center"] = (cm & bits) != 0
    cols["pixelFlags_edge"] |= g["touches_border"] != 0
    log.debug("measured %d sources", n)
    return MeasurementResult(cols)
