"""Array-level API of apfast's compiled core, for use from other codes (in the style of sep and stumpy).

Every function takes plain numpy arrays, validates them, converts them to the
kernels' dtype contract (C-contiguous, native-endian ``float32`` pixels, so FITS
data in ``'>f4'``/``'>f8'`` works as read), allocates its own scratch and
returns new arrays. Caller arrays are never modified. Data come first, every
option is keyword-only.

================================  ===========================================================
function                          what it does
================================  ===========================================================
:func:`background`                smooth sky model and its rms (mesh of clipped means, Akima)
:func:`detect`                    detection (PSF-smoothed S/N threshold) + measurement
:func:`convolve`                  2-D convolution with a small kernel, same-shape output
:func:`warp`                      Lanczos-3 resampling at given input pixel coordinates
:func:`subtract`                  PSF matching (Alard-Lupton), subtraction, decorrelation
:func:`forced_photometry`         PSF-fit flux at given positions
================================  ===========================================================

Conventions
-----------
* Pixel centres are at integer coordinates, ``image[y, x]``, 0-based.
* ``mask`` arguments are boolean or integer arrays of the image's shape: a
  non-zero pixel is bad and is left out (it becomes the ``BAD`` plane of
  :mod:`apfast.masks` inside). Masks returned are ``int32`` bit planes of
  :data:`apfast.masks.MASK_BITS` (``BAD=1, SAT=2, INTRP=4, CR=8, EDGE=16,
  DETECTED=32, DETECTED_NEGATIVE=64, SUSPECT=128, NO_DATA=256``).
* Variances are per pixel, in image units squared.
* Wrong kinds of input (complex, object, strings) raise ``TypeError``; wrong
  shapes or values raise ``ValueError``. Both name the parameter and the fix.

Importing this module imports numpy only: the stage drivers it calls (and
astropy, for :func:`subtract` and :func:`convolve`) load on first call.

Examples
--------
>>> import numpy as np
>>> from apfast.kernels import api
>>> rng = np.random.default_rng(0)
>>> yy, xx = np.mgrid[:64, :64]
>>> img = 800.0 * np.exp(-((xx - 30.2) ** 2 + (yy - 20.7) ** 2) / 8.0) / (8.0 * np.pi)
>>> img = img + rng.normal(0.0, 1.0, img.shape)
>>> cat = api.detect(img, variance=np.ones_like(img), psf_fwhm=4.71)
>>> len(cat), round(float(cat["x"][0]), 1), round(float(cat["y"][0]), 1)
(1, 30.2, 20.7)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DETECT_FLAG_CENTROID",
    "DETECT_FLAG_EDGE",
    "DETECT_FLAG_MASKED",
    "DETECT_FLAG_PSF_FLUX",
    "DETECT_FLAG_SHAPE",
    "FORCED_FLAG_EDGE",
    "FORCED_FLAG_NO_GOOD_PIXELS",
    "BackgroundResult",
    "SubtractionResult",
    "WarpResult",
    "background",
    "convolve",
    "detect",
    "forced_photometry",
    "subtract",
    "warp",
]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: :func:`detect` flag bit: the centroid did not converge (position is the detection peak).
DETECT_FLAG_CENTROID = 1
#: :func:`detect` flag bit: the PSF flux fit failed (flux is NaN).
DETECT_FLAG_PSF_FLUX = 2
#: :func:`detect` flag bit: the PSF stamp or footprint touches the image border.
DETECT_FLAG_EDGE = 4
#: :func:`detect` flag bit: masked pixels were skipped in the PSF fit.
DETECT_FLAG_MASKED = 8
#: :func:`detect` flag bit: the adaptive second moments failed.
DETECT_FLAG_SHAPE = 16

#: :func:`forced_photometry` flag bit: part of the PSF stamp fell off the image (fitted on the rest).
FORCED_FLAG_EDGE = 1
#: :func:`forced_photometry` flag bit: no usable pixel under the stamp (flux and error are NaN).
FORCED_FLAG_NO_GOOD_PIXELS = 2

_BAD = 1  # apfast.masks.MASK_BITS["BAD"] == 0 (checked in the tests)


# ------------------------------------------------------------------------------------------- validation


def _as_array(a: Any, name: str, *, ndim: int, dtype: Any = np.float32) -> np.ndarray:
    """``a`` as a C-contiguous native-endian array of ``dtype`` (a copy only when needed).

    Integers and unsigned integers are converted; booleans, complex numbers,
    objects and strings raise ``TypeError``; the wrong number of dimensions or
    an empty array raises ``ValueError``.
    """
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu":
        msg = (
            f"{name} must hold real numbers, got dtype {arr.dtype}; convert it with "
            f"{name}.astype(np.float32) (complex: take .real or abs() first)"
        )
        raise TypeError(msg)
    if arr.ndim != ndim:
        what = "a 2-D array (ny, nx)" if ndim == 2 else f"a {ndim}-D array"
        msg = f"{name} must be {what}, got shape {arr.shape}"
        raise ValueError(msg)
    if arr.size == 0:
        msg = f"{name} is empty (shape {arr.shape}); pass at least one element"
        raise ValueError(msg)
    return np.ascontiguousarray(arr, dtype=dtype)


def _as_image(a: Any, name: str, *, shape: tuple[int, ...] | None = None, finite: bool = False) -> np.ndarray:
    """A 2-D float32 plane, optionally of ``shape`` and all finite."""
    arr = _as_array(a, name, ndim=2)
    if shape is not None and arr.shape != shape:
        msg = f"{name} has shape {arr.shape} but the image has shape {shape}; pass planes of the same image"
        raise ValueError(msg)
    if finite and not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        msg = (
            f"{name} has {n} non-finite pixel(s); replace them (e.g. np.nan_to_num({name})) "
            f"and pass them as mask=... where the function takes a mask"
        )
        raise ValueError(msg)
    return arr


def _as_variance(a: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A 2-D float32 variance plane of ``shape``, non-negative where finite."""
    var = _as_image(a, name, shape=shape)
    if (var < 0).any():
        msg = f"{name} has negative values (min {float(np.nanmin(var))}); a variance must be >= 0"
        raise ValueError(msg)
    return var


def _as_mask(m: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """int32 bit plane: ``BAD`` where ``m`` is non-zero (zeros when ``m`` is None)."""
    if m is None:
        return np.zeros(shape, dtype=np.int32)
    arr = np.asarray(m)
    if arr.dtype.kind not in "biu":
        msg = f"{name} must be a boolean or integer array (non-zero = bad pixel), got dtype {arr.dtype}"
        raise TypeError(msg)
    if arr.shape != shape:
        msg = f"{name} has shape {arr.shape} but the image has shape {shape}; pass the mask of the same image"
        raise ValueError(msg)
    return np.where(arr != 0, np.int32(_BAD), np.int32(0))


def _positive(value: Any, name: str, *, integer: bool = False, minimum: float = 0.0) -> Any:
    """A finite number > ``minimum`` (an int when ``integer``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        msg = f"{name} must be a number, got {type(value).__name__}"
        raise TypeError(msg)
    v = float(value)
    if not (math.isfinite(v) and v > minimum) or (integer and v != int(v)):
        kind = "an integer" if integer else "a finite number"
        msg = f"{name} = {value!r} is invalid; use {kind} > {minimum:g}"
        raise ValueError(msg)
    return int(v) if integer else v


def _as_psf_stamp(psf: Any, name: str) -> np.ndarray:
    """A (k, k) float64 stamp, k odd, positive sum, normalised to 1 (a number is a Gaussian FWHM)."""
    if isinstance(psf, (int, float, np.integer, np.floating)) and not isinstance(psf, bool):
        sigma = _positive(psf, name) / FWHM_PER_SIGMA
        r = max(2, int(math.ceil(5.0 * sigma)))
        d = np.arange(-r, r + 1, dtype=np.float64)
        g = np.exp(-0.5 * (d / sigma) ** 2)
        stamp = np.outer(g, g)
        return stamp / stamp.sum()
    stamp = _as_array(psf, name, ndim=2, dtype=np.float64)
    ky, kx = stamp.shape
    if ky != kx or ky % 2 == 0:
        msg = (
            f"{name} must be a square stamp of odd side centred on its middle pixel, got shape {stamp.shape}"
        )
        raise ValueError(msg)
    total = float(stamp.sum())
    if not (np.isfinite(stamp).all() and total > 0):
        msg = f"{name} must be finite with a positive sum (got sum {total}); pass the PSF image, not its log"
        raise ValueError(msg)
    return stamp / total


def _as_positions(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``x, y`` as 1-D float64 arrays of one length (a scalar is one position)."""
    xa = np.atleast_1d(np.asarray(x))
    ya = np.atleast_1d(np.asarray(y))
    for arr, name in ((xa, "x"), (ya, "y")):
        if arr.dtype.kind not in "fiu":
            msg = f"{name} must hold real pixel coordinates, got dtype {arr.dtype}; pass floats"
            raise TypeError(msg)
        if arr.ndim != 1:
            msg = f"{name} must be a 1-D array of pixel coordinates, got shape {arr.shape}; use .ravel()"
            raise ValueError(msg)
    if xa.shape != ya.shape:
        msg = f"x and y have different lengths ({xa.size} and {ya.size}); pass one (x, y) per position"
        raise ValueError(msg)
    return np.ascontiguousarray(xa, dtype=np.float64), np.ascontiguousarray(ya, dtype=np.float64)


def _robust_std(values: np.ndarray, good: np.ndarray) -> float:
    v = values[good].astype(np.float64)
    if v.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


# ------------------------------------------------------------------------------------------- background


@dataclass(frozen=True, slots=True)
class BackgroundResult:
    """Smooth sky model of :func:`background`.

    Attributes
    ----------
    background : ndarray, float32, shape (ny, nx)
        Sky level at every pixel (image units).
    rms : ndarray, float32, shape (ny, nx)
        Clipped standard deviation of the sky pixels, interpolated like the level.
    mesh : ndarray, float32, shape (ny_cells, nx_cells)
        The cell values the model interpolates.
    """

    background: np.ndarray
    rms: np.ndarray
    mesh: np.ndarray


def background(
    image: Any,
    *,
    mask: Any = None,
    cell: int = 128,
    statistic: str = "MEANCLIP",
    n_sigma: float = 3.0,
    interpolation: str = "AKIMA",
) -> BackgroundResult:
    """Estimate a smooth sky background and its rms.

    The image is cut into ``cell`` x ``cell`` pixel cells (the last cell per axis
    takes the remainder); each cell's good pixels give a 3-iteration
    ``n_sigma``-clipped mean (or median), empty cells are filled from their
    neighbours, and the mesh is expanded by a separable spline through the cell
    centres (Rubin's ``binSize=128``, MEANCLIP, Akima spline).

    Parameters
    ----------
    image : array_like, shape (ny, nx)
        Pixels, any real dtype or byte order. Non-finite pixels are ignored.
    mask : array_like of bool or int, shape (ny, nx), optional
        Non-zero pixels are left out (e.g. detected sources).
    cell : int
        Cell side in pixels (>= 4).
    statistic : {"MEANCLIP", "MEDIAN"}
        Cell statistic.
    n_sigma : float
        Clipping half-width for MEANCLIP.
    interpolation : {"AKIMA", "CUBIC", "LINEAR"}
        Spline through the cell centres.

    Returns
    -------
    BackgroundResult
        ``background`` and ``rms`` images (float32, image shape) and the cell ``mesh``.

    Raises
    ------
    ValueError
        On a non-2-D image, a mismatched mask, bad options, or no usable pixel.
    TypeError
        On a non-real image or mask.

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:256, :256]
    >>> sky = 100.0 + 0.05 * xx
    >>> res = background(sky, cell=64)
    >>> bool(np.abs(res.background - sky).max() < 1e-3)
    True
    """
    from apfast.ccd.background import BackgroundConfig, BackgroundModel, measure_background
    from apfast.errors import ApfastError

    img = _as_image(image, "image")
    msk = _as_mask(mask, "mask", img.shape)
    cell = _positive(cell, "cell", integer=True, minimum=3)
    try:
        cfg = BackgroundConfig(
            bin_size=cell,
            statistic=statistic,
            n_sigma=float(n_sigma),  # type: ignore[arg-type]
            interpolation=interpolation,
        )  # type: ignore[arg-type]
        model = measure_background(img, msk, config=cfg)
    except ApfastError as exc:  # ConfigError / InputError / NoGoodBackgroundPixelsError
        raise ValueError(str(exc)) from exc
    rms_model = BackgroundModel(
        bin_size=model.bin_size,
        image_shape=model.image_shape,
        values=model.stds,
        stds=model.stds,
        counts=model.counts,
        filled=model.filled,
        interpolation=model.interpolation,
    )
    return BackgroundResult(background=model.image(), rms=rms_model.image(), mesh=model.values.copy())


# ------------------------------------------------------------------------------------------- detection


_DETECT_DTYPE = np.dtype([
    ("x", "f8"), ("y", "f8"), ("x_err", "f8"), ("y_err", "f8"),
    ("flux", "f8"), ("flux_err", "f8"), ("snr", "f8"), ("peak", "f8"), ("peak_snr", "f8"),
    ("ixx", "f8"), ("iyy", "f8"), ("ixy", "f8"), ("npix", "i8"), ("flags", "i4"),
])  # fmt: skip


def detect(
    image: Any,
    *,
    variance: Any = None,
    mask: Any = None,
    threshold: float = 5.0,
    psf_fwhm: float = 3.0,
    psf: Any = None,
    min_pixels: int = 1,
    polarity: str = "positive",
) -> np.ndarray:
    """Detect sources above a matched-filter S/N threshold and measure them.

    Detection correlates the image with a Gaussian of ``psf_fwhm`` and the
    variance with its square, so ``S/N = (I * K) / sqrt(V * K^2)`` is the
    matched-filter significance of a point source (Rubin ``SourceDetectionTask``
    with ``thresholdType="variance"``). Connected pixels with ``S/N >= threshold``
    are footprints (grown by 2.4 PSF sigma, no deblending). Each footprint is
    measured at its brightest peak: Gaussian-weighted centroid, adaptive second
    moments, and a weighted least-squares PSF flux.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
        Background-subtracted pixels (see :func:`background`), any real dtype or byte order.
    variance : array_like, shape (ny, nx), optional
        Per-pixel variance (image units squared). ``None``: a constant variance,
        the square of the robust (MAD) standard deviation of the image.
    mask : array_like of bool or int, shape (ny, nx), optional
        Non-zero pixels take no part.
    threshold : float
        Detection threshold in S/N.
    psf_fwhm : float
        FWHM of the PSF in pixels: smoothing kernel, centroid weight.
    psf : array_like, shape (k, k), k odd, optional
        PSF stamp for the PSF flux (normalised here); ``None``: a Gaussian of ``psf_fwhm``.
    min_pixels : int
        Fewest above-threshold pixels of a footprint.
    polarity : {"positive", "negative", "both"}
        Sign of sources to find; fluxes of negative sources are negative.

    Returns
    -------
    ndarray, structured, shape (n,)
        One row per source with fields ``x, y, x_err, y_err`` (pixels), ``flux,
        flux_err`` (PSF flux, image units x pixels), ``snr`` (flux / flux_err),
        ``peak`` (image value at the peak pixel), ``peak_snr`` (detection S/N
        there), ``ixx, iyy, ixy`` (adaptive moments, pixels^2), ``npix`` (pixels
        in the grown footprint) and ``flags`` (``DETECT_FLAG_*`` bits). Empty
        when nothing is above threshold.

    Raises
    ------
    ValueError
        On mismatched shapes, non-positive options or no usable pixel.
    TypeError
        On non-real inputs.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(1).normal(0.0, 1.0, (48, 48))
    >>> img[20, 30] += 200.0
    >>> cat = detect(img, psf_fwhm=1.0, threshold=10.0)
    >>> len(cat), round(float(cat["x"][0])), round(float(cat["y"][0]))
    (1, 30, 20)
    """
    from apfast.ccd.detection import DetectionConfig, detect_sources
    from apfast.errors import ApfastError
    from apfast.kernels import measure as km

    img = _as_image(image, "image")
    msk = _as_mask(mask, "mask", img.shape)
    if variance is None:
        good = np.isfinite(img) & (msk == 0)
        sd = _robust_std(img, good)
        if not (math.isfinite(sd) and sd > 0):
            msg = "cannot estimate the noise of image (robust std is 0 or undefined); pass variance=..."
            raise ValueError(msg)
        var = np.full(img.shape, sd * sd, dtype=np.float32)
    else:
        var = _as_variance(variance, "variance", img.shape)
    threshold = _positive(threshold, "threshold")
    sigma = _positive(psf_fwhm, "psf_fwhm") / FWHM_PER_SIGMA
    min_pixels = _positive(min_pixels, "min_pixels", integer=True)
    stamp = _as_psf_stamp(psf_fwhm if psf is None else psf, "psf")
    if polarity not in ("positive", "negative", "both"):
        msg = f"polarity = {polarity!r} is invalid; use 'positive', 'negative' or 'both'"
        raise ValueError(msg)
    try:
        cfg = DetectionConfig(threshold=threshold, min_pixels=min_pixels, polarity=polarity)  # type: ignore[arg-type]
        det = detect_sources(img, var, msk, psf_sigma=sigma, config=cfg)
    except ApfastError as exc:
        raise ValueError(str(exc)) from exc

    n = det.n_footprints
    out = np.zeros(n, dtype=_DETECT_DTYPE)
    if n == 0:
        return out
    radii = np.zeros(0)
    fout = np.full((n, len(km.FCOLS)), np.nan)
    iout = np.zeros((n, len(km.ICOLS)), dtype=np.int64)
    sign = np.where(det.peak_snr < 0, -1.0, 1.0)
    km.measure_all(
        img, var, msk, det.labels, np.ascontiguousarray(det.id, dtype=np.int32),
        np.ascontiguousarray(det.bbox, dtype=np.int32), det.peak_x.astype(np.float64),
        det.peak_y.astype(np.float64), sign, stamp[None], np.ones((n, 1)), False, sigma, radii,
        _BAD, 50, 30, 1.2, 8, fout, iout,
    )  # fmt: skip
    f = {name: fout[:, i] for i, name in enumerate(km.FCOLS)}
    g = {name: iout[:, i] for i, name in enumerate(km.ICOLS)}
    for dst, src in (
        ("x", "x"),
        ("y", "y"),
        ("x_err", "xErr"),
        ("y_err", "yErr"),
        ("flux", "psfFlux"),
        ("flux_err", "psfFluxErr"),
        ("ixx", "Ixx"),
        ("iyy", "Iyy"),
        ("ixy", "Ixy"),
    ):
        out[dst] = f[src]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["snr"] = f["psfFlux"] / f["psfFluxErr"]
    out["peak"] = det.peak_value
    out["peak_snr"] = det.peak_snr
    out["npix"] = det.npix
    flags = np.where(g["centroid_flags"] != 0, DETECT_FLAG_CENTROID, 0)
    flags |= np.where((g["psfFlux_flags"] & 1) != 0, DETECT_FLAG_PSF_FLUX, 0)
    flags |= np.where(((g["psfFlux_flags"] & 2) != 0) | (g["touches_border"] != 0), DETECT_FLAG_EDGE, 0)
    flags |= np.where((g["psfFlux_flags"] & 4) != 0, DETECT_FLAG_MASKED, 0)
    flags |= np.where((g["shape_flags"] & 3) != 0, DETECT_FLAG_SHAPE, 0)
    out["flags"] = flags
    return out


# ------------------------------------------------------------------------------------------- convolution


def convolve(image: Any, kernel: Any, *, normalize: bool = False) -> np.ndarray:
    """Convolve an image with a small kernel; the output has the image's shape.

    A true convolution (the kernel is flipped), computed by FFT (FFTW through
    :func:`apfast.subtract.fft_convolve_terms`) on the image zero-padded by half
    the kernel: pixels beyond the border count as 0, so the result equals
    ``scipy.signal.fftconvolve(image, kernel, mode="same")`` everywhere (to
    float32 rounding), and is unaffected by the border in the interior (more than
    ``k // 2`` pixels from the edge).

    Parameters
    ----------
    image : array_like, shape (ny, nx)
        Finite pixels (replace NaNs first, e.g. with 0 or a background value).
    kernel : array_like, shape (ky, kx)
        Odd sides, centre at ``[ky // 2, kx // 2]``; non-square kernels are zero-padded to square.
    normalize : bool
        Divide the kernel by its sum first (which must then be non-zero).

    Returns
    -------
    ndarray, float32, shape (ny, nx)

    Raises
    ------
    ValueError
        On non-finite pixels, even kernel sides, or a zero-sum kernel with ``normalize``.
    TypeError
        On non-real inputs.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((16, 16)); img[5, 7] = 1.0
    >>> k = np.zeros((3, 3)); k[1, 2] = 2.0   # moves flux by +1 in x
    >>> out = convolve(img, k)
    >>> float(out[5, 8]), float(out.sum())
    (2.0, 2.0)
    """
    from apfast.diffim.subtract import fft_convolve_terms

    img = _as_image(image, "image", finite=True)
    kern = _as_array(kernel, "kernel", ndim=2, dtype=np.float64)
    if not np.isfinite(kern).all():
        msg = "kernel has non-finite values; pass a finite kernel"
        raise ValueError(msg)
    ky, kx = kern.shape
    if ky % 2 == 0 or kx % 2 == 0:
        msg = (
            f"kernel must have odd sides so it has a centre pixel, got shape {kern.shape}; pad it with zeros"
        )
        raise ValueError(msg)
    if normalize:
        total = float(kern.sum())
        if total == 0:
            msg = "kernel sums to 0 and cannot be normalised; pass normalize=False"
            raise ValueError(msg)
        kern = kern / total
    k = max(ky, kx)
    if k != ky or k != kx:
        sq = np.zeros((k, k))
        sq[(k - ky) // 2 : (k - ky) // 2 + ky, (k - kx) // 2 : (k - kx) // 2 + kx] = kern
        kern = sq
    r = k // 2
    ny, nx = img.shape
    padded = np.zeros((ny + 2 * r, nx + 2 * r), dtype=np.float32)
    padded[r : r + ny, r : r + nx] = img
    out = fft_convolve_terms(padded, np.ascontiguousarray(kern[None]))[0]
    return np.ascontiguousarray(out[r : r + ny, r : r + nx])


# ------------------------------------------------------------------------------------------- warping


@dataclass(frozen=True, slots=True)
class WarpResult:
    """Resampled planes of :func:`warp` (output-grid shape).

    Attributes
    ----------
    image : ndarray, float32
        Resampled pixels; 0 where NO_DATA.
    variance : ndarray, float32 or None
        Resampled variance (``inf`` where NO_DATA); None when no variance was given.
    mask : ndarray, int32
        Bit planes: ``BAD`` (1) from the input mask's footprint, ``INTRP`` (4) where
        bad input pixels were skipped and the weights renormalised, ``NO_DATA`` (256)
        where the position is off the image, not finite, or has too few good taps.
    """

    image: np.ndarray
    variance: np.ndarray | None
    mask: np.ndarray


def warp(
    image: Any,
    x_map: Any,
    y_map: Any,
    *,
    variance: Any = None,
    mask: Any = None,
    min_good_weight: float = 0.5,
) -> WarpResult:
    """Resample an image at given input pixel coordinates with a Lanczos-3 kernel.

    Output pixel ``[i, j]`` is the image interpolated at input position
    ``(x_map[i, j], y_map[i, j])``: ``sum_kl w_k(x) w_l(y) I[iy+l, ix+k] / W`` over
    the 6x6 taps, skipping bad input pixels (mask or non-finite) and
    renormalising by the good weight ``W``; the variance is propagated with the
    squared weights (ignoring the covariance interpolation creates). An integer
    position copies the pixel exactly. The Lanczos weights sum to 1, so a shift
    conserves flux. The mapping is yours: a WCS-to-WCS map, a shift, a distortion.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
        Input pixels.
    x_map, y_map : array_like, shape (nyo, nxo)
        Input pixel coordinates (0-based, float) of every output pixel; the output has this shape.
    variance : array_like, shape (ny, nx), optional
        Input variance.
    mask : array_like of bool or int, shape (ny, nx), optional
        Non-zero input pixels are never interpolated from.
    min_good_weight : float
        Smallest good-tap weight ``W`` in (0, 1] for an output pixel to be kept.

    Returns
    -------
    WarpResult
        ``image``, ``variance`` and ``mask`` on the output grid.

    Raises
    ------
    ValueError
        If ``x_map`` and ``y_map`` differ in shape, or planes mismatch.
    TypeError
        On non-real inputs.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.arange(100.0).reshape(10, 10)
    >>> yy, xx = np.mgrid[:10, :10].astype(float)
    >>> out = warp(img, xx + 1.0, yy)          # output[i, j] = image[i, j + 1]
    >>> float(out.image[4, 4]), int(out.mask[4, 9])
    (45.0, 256)
    """
    from apfast.kernels import warp as kw

    img = _as_image(image, "image")
    var = (
        _as_variance(variance, "variance", img.shape)
        if variance is not None
        else np.zeros(img.shape, np.float32)
    )
    msk = _as_mask(mask, "mask", img.shape)
    xm = _as_array(x_map, "x_map", ndim=2, dtype=np.float64)
    ym = _as_array(y_map, "y_map", ndim=2, dtype=np.float64)
    if xm.shape != ym.shape:
        msg = f"x_map {xm.shape} and y_map {ym.shape} must have the same (output) shape"
        raise ValueError(msg)
    w = _positive(min_good_weight, "min_good_weight")
    if w > 1:
        msg = f"min_good_weight = {min_good_weight} is invalid; use a number in (0, 1], e.g. 0.5"
        raise ValueError(msg)
    bad = np.empty(img.shape, np.uint8)
    anybad = np.empty(img.shape, np.uint8)
    kw.mark_bad_footprints(img, var, msk, _BAD, -2, 3, bad, anybad)
    out_img = np.empty(xm.shape, np.float32)
    out_var = np.empty(xm.shape, np.float32)
    out_msk = np.empty(xm.shape, np.int32)
    counts = np.zeros((xm.shape[0], 2), np.int64)
    kw.warp_lanczos3(img, var, msk, bad, anybad, xm, ym, out_img, out_var, out_msk, 256, 4, w, counts)
    return WarpResult(image=out_img, variance=out_var if variance is not None else None, mask=out_msk)


# ------------------------------------------------------------------------------------------- subtraction


@dataclass(frozen=True, slots=True)
class SubtractionResult:
    """Difference of :func:`subtract`.

    Attributes
    ----------
    difference : ndarray, float32, shape (ny, nx)
        ``science - kernel (x) template`` (convolveTemplate); with convolveScience the
        science image is the one convolved and the difference is rescaled by
        ``1 / sum(kernel)``, so either way it is in science units and a new source in
        the science image is positive. Decorrelated when asked.
    variance : ndarray, float32, shape (ny, nx)
        Its per-pixel variance.
    mask : ndarray, int32, shape (ny, nx)
        Bit planes (:data:`apfast.masks.MASK_BITS`): input ``BAD`` pixels grown by the
        kernel, ``EDGE`` where the kernel or decorrelation runs off the image or over NO_DATA.
    psf : ndarray, float64, shape (k, k)
        PSF stamp of the difference at the image centre (sums to 1).
    kernel : ndarray, float64, shape (m, m)
        The PSF-matching kernel at the image centre (not normalised: its sum is the
        photometric scale between the images).
    mode : str
        ``"convolveTemplate"`` or ``"convolveScience"``: which image was convolved.
    science_fwhm, template_fwhm : float
        PSF FWHMs (pixels) used to size the kernel basis.
    n_stamps : int
        Kernel stars used in the fit.
    """

    difference: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    psf: np.ndarray
    kernel: np.ndarray
    mode: str
    science_fwhm: float
    template_fwhm: float
    n_stamps: int


def _measure_fwhm(img: np.ndarray, var: np.ndarray, msk: np.ndarray, name: str) -> float:
    """FWHM (pixels) of the bright unflagged stars of an image: median adaptive size, as a Gaussian."""
    guess = 3.0
    for _ in range(2):
        cat = detect(img, variance=var, mask=msk, threshold=10.0, psf_fwhm=guess)
        ok = (cat["flags"] == 0) & (cat["snr"] > 30) & (cat["ixx"] > 0) & (cat["iyy"] > 0)
        if ok.sum() < 3:
            msg = (
                f"only {int(ok.sum())} bright isolated star(s) on the {name} image to measure its PSF; "
                f"pass {name}_psf= as a FWHM in pixels or a PSF stamp"
            )
            raise ValueError(msg)
        size = np.sqrt(0.5 * (cat["ixx"][ok] + cat["iyy"][ok]))
        # the locus of point sources: the median of the smaller half rejects galaxies and blends
        s = np.sort(size)
        guess = float(np.median(s[: max(3, s.size // 2)])) * FWHM_PER_SIGMA
    return guess


def _psf_model(psf: Any, img: np.ndarray, var: np.ndarray, msk: np.ndarray, name: str) -> Any:
    from apfast.psf import GaussianPsf, ImagePsf

    if psf is None:
        psf = _measure_fwhm(img, var, msk, name)
    if isinstance(psf, (int, float, np.integer, np.floating)) and not isinstance(psf, bool):
        sigma = _positive(psf, f"{name}_psf") / FWHM_PER_SIGMA
        return GaussianPsf(sigma, 2 * max(2, int(math.ceil(5 * sigma))) + 1)
    return ImagePsf(_as_psf_stamp(psf, f"{name}_psf"))


def subtract(
    science: Any,
    template: Any,
    *,
    science_variance: Any,
    template_variance: Any,
    science_mask: Any = None,
    template_mask: Any = None,
    science_psf: Any = None,
    template_psf: Any = None,
    mode: str = "auto",
    decorrelate: bool = True,
    variance_scaling: str = "measured",
    residual_background: bool = True,
    size_cell: int = 128,
    spatial_order: int = 1,
    min_stamps: int = 5,
) -> SubtractionResult:
    """PSF-match, subtract and decorrelate two aligned images (Alard-Lupton + DMTN-021).

    The image with the narrower PSF (``mode="auto"``) is convolved by a spatially
    varying kernel, a sum of Gaussian basis functions times polynomials fitted
    on isolated stars (Alard & Lupton 1998, Rubin ``ip_diffim``), with a
    differential background; it is subtracted from the other; a constant residual
    offset is removed; and the difference is convolved by the decorrelation
    kernel that whitens its noise (Reiss & Lupton, DMTN-021), its variance
    rescaled to match.

    Parameters
    ----------
    science, template : array_like, shape (ny, nx)
        Background-subtracted images on the SAME pixel grid (warp first, e.g.
        with :func:`warp`), in the same flux units up to a scale the kernel fits.
    science_variance, template_variance : array_like, shape (ny, nx)
        Per-pixel variances (image units squared).
    science_mask, template_mask : array_like of bool or int, shape (ny, nx), optional
        Non-zero pixels are bad (not used for the fit, flagged in the output).
    science_psf, template_psf : float or array_like (k, k), optional
        PSF as a FWHM in pixels (a Gaussian) or an odd-sized stamp. ``None``:
        measured on the image from the adaptive moments of bright stars.
    mode : {"auto", "convolveTemplate", "convolveScience"}
        Which image is convolved.
    decorrelate : bool
        Apply the decorrelation afterburner.
    variance_scaling : {"measured", "predicted"}
        After decorrelation, rescale the variance by the predicted factor only, or
        also by the measured noise of ``difference / sqrt(variance)``.
    residual_background : bool
        Remove the 3-sigma clipped mean of unflagged pixels of the difference.
    size_cell : int
        Side (pixels) of the cells kernel stars are spread over (3 per cell).
    spatial_order : int
        Polynomial order (0-2) of the kernel's variation over the image (0: one
        constant kernel, the safest choice for small cutouts with few stars).
    min_stamps : int
        Fewest kernel stars the fit accepts (raise it for safety, lower it for
        sparse fields).

    Returns
    -------
    SubtractionResult
        ``difference``, ``variance``, ``mask``, ``psf``, ``kernel``, ``mode`` and diagnostics.

    Raises
    ------
    ValueError
        On mismatched shapes, non-finite variances, or too few kernel stars
        (the message says what to change).
    TypeError
        On non-real inputs.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> yy, xx = np.mgrid[:128, :128]
    >>> def scene(s):
    ...     img = sum(2e4 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)
    ...               for x in range(16, 128, 24) for y in range(16, 128, 24))
    ...     return img + rng.normal(0.0, 5.0, img.shape)
    >>> var = np.full((128, 128), 25.0)
    >>> res = subtract(scene(2.0), scene(1.5), science_variance=var, template_variance=var,
    ...                science_psf=4.71, template_psf=3.53, size_cell=32)
    >>> pull = (res.difference / np.sqrt(res.variance))[20:-20, 20:-20]
    >>> res.mode, bool(0.8 < np.std(pull) < 1.2)
    ('convolveTemplate', True)
    """
    from apfast.diffim.decorrelate import DecorrelationConfig
    from apfast.diffim.psfmatch import PsfMatchConfig
    from apfast.diffim.stage import DifferenceConfig, run_image_difference
    from apfast.errors import ApfastError
    from apfast.exposure import Exposure

    sci = _as_image(science, "science")
    tmp = _as_image(template, "template", shape=sci.shape)
    s_var = _as_variance(science_variance, "science_variance", sci.shape)
    t_var = _as_variance(template_variance, "template_variance", sci.shape)
    s_msk = _as_mask(science_mask, "science_mask", sci.shape)
    t_msk = _as_mask(template_mask, "template_mask", sci.shape)
    # non-finite pixels become masked zeros: the FFT convolutions would spread NaNs over the image
    for img, var, msk in ((sci, s_var, s_msk), (tmp, t_var, t_msk)):
        bad = ~(np.isfinite(img) & np.isfinite(var))
        if bad.any():
            msk[bad] |= _BAD
    if not (np.isfinite(sci).all() and np.isfinite(s_var).all()):
        sci = np.where(s_msk & _BAD, np.float32(0), np.nan_to_num(sci)).astype(np.float32)
        s_var = np.where(np.isfinite(s_var), s_var, np.float32(0)).astype(np.float32)
    if not (np.isfinite(tmp).all() and np.isfinite(t_var).all()):
        tmp = np.where(t_msk & _BAD, np.float32(0), np.nan_to_num(tmp)).astype(np.float32)
        t_var = np.where(np.isfinite(t_var), t_var, np.float32(0)).astype(np.float32)
    if mode not in ("auto", "convolveTemplate", "convolveScience"):
        msg = f"mode = {mode!r} is invalid; use 'auto', 'convolveTemplate' or 'convolveScience'"
        raise ValueError(msg)
    if variance_scaling not in ("measured", "predicted"):
        msg = f"variance_scaling = {variance_scaling!r} is invalid; use 'measured' or 'predicted'"
        raise ValueError(msg)
    s_psf = _psf_model(science_psf, sci, s_var, s_msk, "science")
    t_psf = _psf_model(template_psf, tmp, t_var, t_msk, "template")
    try:
        res = run_image_difference(
            Exposure(sci, s_msk, s_var, psf=s_psf),
            Exposure(tmp, t_msk, t_var, psf=t_psf),
            psfmatch=PsfMatchConfig(
                mode=mode,  # type: ignore[arg-type]
                size_cell=_positive(size_cell, "size_cell", integer=True),
                spatial_kernel_order=int(spatial_order),
                min_stamps=_positive(min_stamps, "min_stamps", integer=True),
            ),
            decorrelation=DecorrelationConfig(variance_scaling=variance_scaling),  # type: ignore[arg-type]
            config=DifferenceConfig(
                do_decorrelate=bool(decorrelate), do_residual_background=bool(residual_background)
            ),
        )
    except ApfastError as exc:  # ConfigError, InsufficientKernelSourcesError, InputError, ...
        raise ValueError(str(exc)) from exc
    diff = res.difference
    ny, nx = sci.shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    assert diff.variance is not None and diff.mask is not None and diff.psf is not None
    sub = res.subtraction
    return SubtractionResult(
        difference=diff.image,
        variance=diff.variance,
        mask=diff.mask,
        psf=np.asarray(diff.psf.compute_image(xc, yc), dtype=np.float64),
        kernel=np.asarray(sub.kernel.evaluate(xc, yc), dtype=np.float64),
        mode=sub.mode,
        science_fwhm=float(sub.metadata["fwhm_science"]),
        template_fwhm=float(sub.metadata["fwhm_template"]),
        n_stamps=int(sub.n_stamps_used),
    )


# ----------------------------------------------------------------------------------------- forced photometry


def forced_photometry(
    image: Any, variance: Any, x: Any, y: Any, psf: Any, *, mask: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF-fit fluxes at fixed positions (forced photometry).

    At each ``(x, y)`` the PSF stamp is shifted to the sub-pixel position
    (Lanczos-3) and its amplitude fitted by weighted least squares over the
    stamp's good pixels: ``flux = sum(P I / V) / sum(P^2 / V)``,
    ``flux_err = 1 / sqrt(sum(P^2 / V))`` with ``P`` normalised to sum 1, so
    ``flux`` is the total flux of a point source in image units x pixels.

    Parameters
    ----------
    image : array_like, shape (ny, nx)
        Background-subtracted pixels (e.g. a difference image).
    variance : array_like, shape (ny, nx)
        Per-pixel variance; pixels with variance <= 0 or non-finite are skipped.
    x, y : array_like, shape (n,)
        Positions in pixels (pixel centres at integers).
    psf : float or array_like, shape (k, k), k odd
        PSF as a FWHM in pixels (a Gaussian) or a stamp (normalised here).
    mask : array_like of bool or int, shape (ny, nx), optional
        Non-zero pixels are skipped.

    Returns
    -------
    flux, flux_err : ndarray, float64, shape (n,)
        NaN where no pixel was usable.
    flags : ndarray, int32, shape (n,)
        ``FORCED_FLAG_EDGE`` (1): stamp partly off the image;
        ``FORCED_FLAG_NO_GOOD_PIXELS`` (2): no usable pixel.

    Raises
    ------
    ValueError
        On mismatched shapes or lengths, or an invalid PSF.
    TypeError
        On non-real inputs.

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:32, :32]
    >>> img = 500.0 * np.exp(-((xx - 15.3) ** 2 + (yy - 16.0) ** 2) / 8.0) / (8.0 * np.pi)
    >>> flux, err, flags = forced_photometry(img, np.ones_like(img), [15.3], [16.0], 4.71)
    >>> round(float(flux[0])), int(flags[0])
    (500, 0)
    """
    from apfast.kernels import forced as kf

    img = _as_image(image, "image")
    var = _as_image(variance, "variance", shape=img.shape)
    msk = _as_mask(mask, "mask", img.shape)
    xs, ys = _as_positions(x, y)
    stamp = _as_psf_stamp(psf, "psf")
    n = xs.size
    flux = np.empty(n)
    err = np.empty(n)
    chi2 = np.empty(n)
    ndata = np.empty(n, np.int32)
    flags = np.empty(n, np.int32)
    kf.forced_psf_flux(
        img, var, msk, stamp[None], np.ones((n, 1)), False, xs, ys, _BAD, flux, err, chi2, ndata, flags
    )
    return flux, err, flags
