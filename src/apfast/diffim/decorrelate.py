"""Decorrelation afterburner for image differences (DMTN-021, Reiss & Lupton 2016).

After PSF matching, ``D = S - K * T`` (mode ``convolveTemplate``) carries the
template noise convolved by the matching kernel ``K``, so neighbouring pixels
of ``D`` are correlated and a per-pixel threshold finds too many false
positives. With white science and template noise of variances ``s`` and ``t``,
the noise power spectrum of ``D`` is ``s + t |K^(k)|^2``. Convolving ``D`` with
the real, centro-symmetric kernel whose Fourier transform is

    phi(k) = sqrt((s + t Ksum^2) / (s + t |K^(k)|^2)),   Ksum = sum(K) = K^(0)

makes the spectrum flat (``s + t Ksum^2``): the noise is white again. The
numerator follows Rubin's current ip_diffim (``computeDiffimCorrection``): the
matching kernel is *not* normalised (its sum is the photometric scale between
the images), and the numerator uses ``Ksum^2`` so that ``phi(0) = 1`` and
fluxes are preserved; for ``Ksum = 1`` it is DMTN-021's
``sqrt((s + t) / (s + t |K^|^2))``. In mode ``convolveScience``
(``D = K * S - T``) the roles of ``s`` and ``t`` swap.

What :func:`decorrelate` does to each plane:

- **image**: pixels flagged ``NO_DATA``/``EDGE`` (``config.no_data_mask_planes``)
  or non-finite are set to 0 (the expected value of a difference) before the
  FFT convolution and get their input values back afterwards; the convolution
  is circular on an FFT-friendly grid at least as large as the image.
- **mask**: every pixel within ``r = kernel_size // 2`` (box distance) of such a
  pixel, or of the image boundary (where the circular convolution wraps), gets
  ``EDGE`` added; other bits are kept.
- **variance**: the input plane of ``D`` is multiplied by the predicted ratio
  ``(e sum(phi^2) + m sum((K*phi)^2)) / (e + m sum(K^2))`` (``e``, ``m`` the
  unconvolved and the convolved image's variances), the exact change of the
  noise variance for white inputs, with ``phi`` the truncated real-space kernel
  actually applied. This keeps the spatial structure of the variance plane
  (bright stars, amp boundaries) and any global scale the differencing applied
  (Rubin divides ``D`` by ``Ksum`` in ``convolveScience`` mode), since both
  cancel in the ratio. Rubin instead rebuilds the plane from the science and
  template variance planes (``estimateVariancePlane``), which this function
  does not receive. With ``variance_scaling = "measured"`` (the default) the
  plane is then scaled once more by the robust variance of
  ``image / sqrt(variance)`` over good pixels (``(IQR / 1.349)^2``, insensitive
  to sources), so that in source-free areas the pulls have unit standard
  deviation even when the input variance planes were mis-scaled (warped
  templates underestimate their variance; Rubin's later ``ScaleVarianceTask``
  exists for the same reason). Both factors go to the metadata.
- **psf**: a :class:`ConvolvedPsf` evaluating the input PSF convolved with
  ``phi`` (serialisable as ``PSFTYPE = 'CONVOLVED'``).

Examples
--------
>>> import numpy as np
>>> k = np.zeros((5, 5)); k[2, 2] = 1.0
>>> phi = decorrelation_kernel(k, 1.0, 4.0)
>>> float(phi[2, 2]), float(abs(phi).sum())   # K = delta gives a delta
(1.0, 1.0)
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from astropy.io import fits

from apfast._configbase import ConfigSection, opt
from apfast.diffim.fftw import convolve_full, rfft2_pair
from apfast.errors import AlgorithmError, InputError
from apfast.exposure import Exposure
from apfast.kernels import fftutil
from apfast.masks import MASK_BITS, MASK_PLANES, bitmask
from apfast.psf import PsfModel, psf_from_hdus

__all__ = [
    "ConvolvedPsf",
    "DecorrelationConfig",
    "convolve_fft",
    "decorrelate",
    "decorrelation_kernel",
    "next_fast_even",
    "noise_weights",
    "prepare_fft",
    "variance_mean",
    "whiteness_error",
]

log = logging.getLogger(__name__)

#: Rubin warns when the correction diverges: phi -> sqrt(m / e) at high frequency.
_DIVERGENCE_RATIO = 1e8
#: Minimum number of good pixels for the measured variance scaling.
_MIN_GOOD_PIXELS = 1000
#: Approximate number of (regularly sub-sampled) pixels used for the measured scaling.
_STAT_PIXELS = 500_000
_IQR_PER_SIGMA = 1.3489795003921634  # 2 * Phi^-1(0.75)

Mode = Literal["convolveTemplate", "convolveScience"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DecorrelationConfig(ConfigSection):
    """Decorrelation afterburner (DMTN-021) applied to the image difference."""

    _key_prefix: ClassVar[str] = "difference.decorrelation."

    kernel_size: int | None = opt(
        None,
        "Odd side (pixels) of the real-space decorrelation kernel; none: the smallest odd side from the "
        "matching kernel's k up to 4k+1 that whitens the noise spectrum to within whiteness_tolerance.",
    )
    whiteness_tolerance: float = opt(
        0.01,
        "Allowed max relative deviation from flat of the whitened noise spectrum (automatic kernel_size).",
    )
    ignore_mask_planes: tuple[str, ...] = opt(
        ("INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA", "DETECTED_NEGATIVE"),
        "Mask planes left out of the variance statistics (variance_mean and the measured scaling).",
    )
    no_data_mask_planes: tuple[str, ...] = opt(
        ("NO_DATA", "EDGE"),
        "Pixels with these planes are zeroed before convolving; pixels within kernel_size // 2 get EDGE.",
    )
    variance_scaling: Literal["predicted", "measured"] = opt(
        "measured",
        "How the variance plane is rescaled after whitening.",
        choices={
            "predicted": "by the exact noise-variance change for white inputs of the given variances",
            "measured": "predicted, then by the robust variance of image/sqrt(variance) over good pixels",
        },
    )
    fft_backend: Literal["pyfftw", "numpy"] = opt(
        "pyfftw",
        "FFT library for the image convolution.",
        choices={
            "pyfftw": "FFTW through pyfftw, plans cached per shape, FFT_THREADS (2) threads",
            "numpy": "numpy.fft (pocketfft, one thread): the reference",
        },
    )
    fft_planner: Literal["FFTW_ESTIMATE", "FFTW_MEASURE"] = opt(
        "FFTW_MEASURE",
        "FFTW planner effort for new plan shapes (pyfftw backend); plans are cached per process and measured "
        "plans are kept in the FFTW wisdom cache (apfast.diffim.fftw: $APFAST_CACHE_DIR; APFAST_FFTW_WISDOM=0: off).",
        choices={
            "FFTW_ESTIMATE": "plan instantly by heuristics (2048x4096: ~2x slower transforms measured here)",
            "FFTW_MEASURE": "time candidate plans once per shape and machine (seconds for 2048x4096, saved as "
            "wisdom; later processes plan in milliseconds; `apfast warmup` does it ahead of a run)",
        },
    )

    def _validate(self) -> None:
        ks = self.kernel_size
        if ks is not None and (ks < 1 or ks % 2 == 0):
            self._fail("kernel_size", ks, "use a positive odd integer (e.g. 31) or none")
        if not (0.0 < self.whiteness_tolerance < 1.0):
            self._fail("whiteness_tolerance", self.whiteness_tolerance, "use a fraction in (0, 1), e.g. 0.01")
        for name in ("ignore_mask_planes", "no_data_mask_planes"):
            unknown = [p for p in getattr(self, name) if p not in MASK_BITS]
            if unknown:
                self._fail(
                    name,
                    getattr(self, name),
                    f"unknown plane(s) {unknown}; known planes are {', '.join(MASK_PLANES)}",
                )


# ----------------------------------------------------------------------------------------------- helpers
def _as_kernel(matching_kernel: Any) -> np.ndarray:
    k = np.array(matching_kernel, dtype=np.float64, order="C", copy=True)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
        msg = f"matching_kernel must be a square 2-D array of odd size, got shape {k.shape}; crop or pad it"
        raise InputError(msg)
    if not np.all(np.isfinite(k)):
        msg = f"matching_kernel has {int(np.count_nonzero(~np.isfinite(k)))} non-finite values; refit the kernel"
        raise InputError(msg)
    ksum = float(k.sum())
    if not ksum > 0:
        msg = f"matching_kernel sums to {ksum:.4g}; a PSF-matching kernel must have a positive sum (photometric scale)"
        raise InputError(msg)
    return k


def _check_var(name: str, value: Any, *, positive: bool) -> float:
    v = float(value)
    ok = math.isfinite(v) and (v > 0 if positive else v >= 0)
    if not ok:
        need = "> 0" if positive else ">= 0"
        msg = (f"{name} must be a finite variance {need}, got {value!r}; "
               "measure it with apfast.diffim.decorrelate.variance_mean")
        raise InputError(msg)
    return v


def _odd_size(shape: Any, default: int) -> int:
    if shape is None:
        return default
    if isinstance(shape, tuple | list):
        if len(shape) != 2 or shape[0] != shape[1]:
            msg = f"decorrelation kernel shape must be square, got {shape}; pass one odd integer"
            raise InputError(msg)
        shape = shape[0]
    n = int(shape)
    if n != shape or n < 1 or n % 2 == 0:
        msg = f"decorrelation kernel size must be a positive odd integer, got {shape}"
        raise InputError(msg)
    return n


def next_fast_even(n: int) -> int:
    """Smallest even ``m >= n`` whose prime factors are 2, 3, 5 and 7 (fast for FFTW and pocketfft).

    Examples
    --------
    >>> next_fast_even(2048), next_fast_even(2063), next_fast_even(255)
    (2048, 2100, 256)
    """
    m = max(2, int(n) + (int(n) % 2))
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


def _place_centred(a: np.ndarray, shape: tuple[int, int], dtype: Any) -> np.ndarray:
    """Zero-pad an odd, centred stamp onto ``shape`` with its centre moved to pixel (0, 0) (wrapped)."""
    out = np.zeros(shape, dtype=dtype)
    r0, r1 = a.shape[0] // 2, a.shape[1] // 2
    iy = np.arange(-r0, r0 + 1) % shape[0]
    ix = np.arange(-r1, r1 + 1) % shape[1]
    out[np.ix_(iy, ix)] = a
    return out


# ----------------------------------------------------------------------------------------------- kernel
def decorrelation_kernel(
    matching_kernel: np.ndarray,
    sigma_science2: float,
    sigma_template2: float,
    *,
    shape: int | tuple[int, int] | None = None,
    mode: Mode = "convolveTemplate",
    tolerance: float = 0.01,
) -> np.ndarray:
    """Real-space DMTN-021 decorrelation kernel ``phi`` for a PSF-matching kernel.

    ``phi^(k) = sqrt((e + m Ksum^2) / (e + m |K^(k)|^2))`` with ``(e, m) =
    (sigma_science2, sigma_template2)`` for ``convolveTemplate`` and swapped for
    ``convolveScience``; ``K^`` is the DFT of the (unnormalised) matching kernel
    and ``Ksum`` its sum. ``phi^`` is sampled on an even grid of at least
    ``4 max(k, size)`` pixels (so aliasing of the real-space kernel is
    negligible), transformed back, centred and cropped to ``size``. With
    ``shape=None`` the size is chosen: the smallest odd side from ``k`` up to
    ``4k + 1`` whose cropped kernel whitens the noise spectrum to within
    ``tolerance`` (:func:`whiteness_error`); wide kernels with a convolved image
    much noisier than the other need more than ``k``. The crop is
    renormalised to sum exactly 1 (``phi^(0) = 1``: fluxes are preserved). The
    result is real and centro-symmetric (``phi[::-1, ::-1] == phi``).

    Parameters
    ----------
    matching_kernel : ndarray, shape (k, k), k odd
        The PSF-matching kernel at the image centre, not normalised, sum > 0.
    sigma_science2, sigma_template2 : float
        Mean variances (counts^2) of the unconvolved science and template images.
        The unconvolved image's variance must be > 0, the other >= 0.
    shape : int or (int, int), optional
        Odd side of the output; default: chosen automatically (see above).
    mode : {"convolveTemplate", "convolveScience"}
        Which image the matching kernel convolved.
    tolerance : float
        Allowed spectral non-whiteness for the automatic size.

    Returns
    -------
    ndarray of float64, shape (size, size)
        The kernel, centred on ``(size // 2, size // 2)``, summing to 1.

    Raises
    ------
    InputError
        On a non-square or even kernel, a non-positive kernel sum, or invalid variances.

    Examples
    --------
    >>> y, x = np.mgrid[-7:8, -7:8]
    >>> k = np.exp(-(x**2 + y**2) / 2.0); k /= k.sum()
    >>> phi = decorrelation_kernel(k, 1.0, 1.0)
    >>> phi.shape, round(float(phi.sum()), 12), bool(phi[7, 7] > 1)
    ((15, 15), 1.0, True)
    """
    k = _as_kernel(matching_kernel)
    e, m = _roles(sigma_science2, sigma_template2, mode)
    kk = k.shape[0]
    auto = shape is None
    size = 4 * kk + 1 if auto else _odd_size(shape, kk)
    n = next_fast_even(4 * max(kk, size))
    khat = np.fft.rfft2(_place_centred(k, (n, n), np.float64))
    ksum = float(k.sum())
    noise = e + m * (khat.real**2 + khat.imag**2)  # noise power spectrum of the difference
    flat = e + m * ksum * ksum
    full = np.fft.fftshift(np.fft.irfft2(np.sqrt(flat / noise), s=(n, n)))
    c = n // 2

    def crop(side: int) -> np.ndarray:
        r = side // 2
        phi = full[c - r : c + r + 1, c - r : c + r + 1]
        # symmetrise away rounding so the kernel is exactly centro-symmetric, then restore phi^(0) = 1
        phi = 0.5 * (phi + phi[::-1, ::-1])
        return np.ascontiguousarray(phi / phi.sum())

    if not auto:
        return crop(size)
    for side in range(kk, 4 * kk + 2, 2):
        phi = crop(side)
        if whiteness_error(phi, noise, flat, n) <= tolerance:
            return phi
    log.warning(
        "decorrelation kernel of %d px still leaves %.3g spectral non-whiteness (tolerance %.3g); using it",
        4 * kk + 1,
        whiteness_error(phi, noise, flat, n),
        tolerance,
    )
    return phi


def whiteness_error(phi: np.ndarray, noise: np.ndarray, flat: float, n: int) -> float:
    """Largest relative deviation from flat of the decorrelated noise spectrum ``|phi^|^2 noise / flat``.

    Parameters
    ----------
    phi : ndarray, shape (d, d)
        Real-space, centred decorrelation kernel.
    noise : ndarray, shape (n, n // 2 + 1)
        Noise power spectrum of the difference on the ``rfft2`` grid of side ``n``.
    flat : float
        The target flat level (``e + m Ksum^2``).
    n : int
        Grid side.

    Returns
    -------
    float
        ``max |(|phi^|^2 noise / flat) - 1|``; 0 for a perfect whitening.
    """
    phat = np.fft.rfft2(_place_centred(phi, (n, n), np.float64))
    return float(np.abs((phat.real**2 + phat.imag**2) * noise / flat - 1.0).max())


def _roles(sigma_science2: float, sigma_template2: float, mode: str) -> tuple[float, float]:
    """Return (variance of the unconvolved image, variance of the convolved image)."""
    if mode == "convolveTemplate":
        e = _check_var("science variance", sigma_science2, positive=True)
        m = _check_var("template variance", sigma_template2, positive=False)
    elif mode == "convolveScience":
        e = _check_var("template variance", sigma_template2, positive=True)
        m = _check_var("science variance", sigma_science2, positive=False)
    else:
        msg = f"decorrelation mode must be 'convolveTemplate' or 'convolveScience', got {mode!r}"
        raise InputError(msg)
    if m / e > _DIVERGENCE_RATIO:
        log.warning(
            "diverging decorrelation: the convolved image's variance is %.3g times the other's", m / e
        )
    return e, m


def noise_weights(matching_kernel: np.ndarray, phi: np.ndarray) -> tuple[float, float, float]:
    """Noise-variance weights of the unconvolved and convolved images, before and after ``phi``.

    For white noise of variance ``e`` (unconvolved image) and ``m`` (convolved
    image), the difference has per-pixel variance ``e + m * sum(K^2)`` before
    decorrelation and ``e * sum(phi^2) + m * sum((K * phi)^2)`` after.

    Parameters
    ----------
    matching_kernel : ndarray, shape (k, k)
    phi : ndarray, shape (d, d)
        The real-space decorrelation kernel.

    Returns
    -------
    (w_k, w_e, w_m) : tuple of float
        ``sum(K^2)``, ``sum(phi^2)`` and ``sum((K * phi)^2)``.

    Examples
    --------
    >>> d = np.zeros((3, 3)); d[1, 1] = 1.0
    >>> noise_weights(d, d)
    (1.0, 1.0, 1.0)
    """
    k = np.asarray(matching_kernel, dtype=np.float64)
    p = np.asarray(phi, dtype=np.float64)
    kp = convolve_full(k, p)
    return float((k * k).sum()), float((p * p).sum()), float((kp * kp).sum())


# ----------------------------------------------------------------------------------------------- FFT
# FFTW threads are fixed (not numba's count): plans made for another thread count round differently,
# and a CCD must give the same difference whatever the worker layout (-j N, Dask, serial)
FFT_THREADS = 2


def _fftw_plans(shape: tuple[int, int], threads: int, planner: str) -> tuple[Any, Any, threading.Lock]:
    """Shared forward/inverse float32 FFTW plans for ``shape`` (wisdom-backed :func:`apfast.diffim.fftw.rfft2_pair`)."""
    return rfft2_pair(shape, np.float32, threads, planner)


def _symmetric_spectrum(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Real ``rfft2`` spectrum on ``shape`` of a small centro-symmetric kernel centred on pixel (0, 0).

    For ``k[-y, -x] = k[y, x]`` the DFT is real:
    ``sum k[y, x] cos(a_u y + b_v x) = (C0 k C1)[u, v] - (S0 k S1)[u, v]`` with
    ``C0[u, y] = cos(2 pi u y / P0)`` etc. Two thin float32 matrix products
    (``P0 x d`` by ``d x (P1/2 + 1)``) cost far less than a full-size FFT.
    """
    r0, r1 = kernel.shape[0] // 2, kernel.shape[1] // 2
    a = (2.0 * np.pi / shape[0]) * np.outer(np.arange(shape[0]), np.arange(-r0, r0 + 1))
    b = (2.0 * np.pi / shape[1]) * np.outer(np.arange(-r1, r1 + 1), np.arange(shape[1] // 2 + 1))
    k = np.asarray(kernel, dtype=np.float32)
    c0, s0 = np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)
    c1, s1 = np.cos(b).astype(np.float32), np.sin(b).astype(np.float32)
    return c0 @ (k @ c1) - s0 @ (k @ s1)


def prepare_fft(shape: tuple[int, int], *, config: DecorrelationConfig) -> tuple[int, int]:
    """Plan (and cache) the FFTs :func:`decorrelate` will use for images of ``shape``.

    Call it once per process (e.g. from ``apfast warmup``) so the first CCD does
    not pay the FFTW_MEASURE planning time. Does nothing for the numpy backend.

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)`` of the difference images.
    config : DecorrelationConfig
        Supplies ``fft_backend`` and ``fft_planner``.

    Returns
    -------
    (int, int)
        The padded FFT grid shape.
    """
    grid = (next_fast_even(int(shape[0])), next_fast_even(int(shape[1])))
    if config.fft_backend == "pyfftw":
        _fftw_plans(grid, FFT_THREADS, config.fft_planner)
    return grid


def convolve_fft(
    image: np.ndarray,
    kernel: np.ndarray,
    *,
    zero_where: np.ndarray | None = None,
    backend: Literal["pyfftw", "numpy"] = "pyfftw",
    planner: str = "FFTW_MEASURE",
) -> np.ndarray:
    """Same-size convolution of a float32 image with a small odd, centred kernel, by FFT.

    The image is zero-padded to ``next_fast_even`` of each side and convolved
    circularly, so output pixels within ``kernel_size // 2`` of the boundary
    mix in zeros or wrapped pixels from the opposite side: callers flag them.
    Computed in single precision (complex64 spectra). A centro-symmetric kernel
    (``kernel[::-1, ::-1] == kernel``, as decorrelation kernels are) has a real
    spectrum, computed by two small matrix products instead of a third FFT.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Pixels (any float dtype or byte order; converted to float32). Must be
        finite where ``zero_where`` is False.
    kernel : ndarray, shape (d, d), d odd
        The kernel, centred on its middle pixel.
    zero_where : ndarray of bool, shape (ny, nx), optional
        Pixels replaced by 0 before convolving (the input is not modified).
    backend : {"pyfftw", "numpy"}
        pyfftw uses cached plans and ``FFT_THREADS`` threads.
    planner : {"FFTW_ESTIMATE", "FFTW_MEASURE"}
        FFTW planner effort for a shape not seen before in this process.

    Returns
    -------
    ndarray of float32, shape (ny, nx)

    Examples
    --------
    >>> img = np.zeros((8, 8), np.float32); img[3, 4] = 1.0
    >>> ker = np.arange(9.0).reshape(3, 3)
    >>> out = convolve_fft(img, ker, backend="numpy")
    >>> np.allclose(out[2:5, 3:6], ker, atol=1e-6)
    True
    """
    img = np.asarray(image)
    if img.dtype != np.float32 or not img.dtype.isnative:
        img = img.astype(np.float32)
    ny, nx = img.shape
    ker = np.asarray(kernel, dtype=np.float64)
    if ker.ndim != 2 or ker.shape[0] % 2 == 0 or ker.shape[1] % 2 == 0:
        msg = f"convolve_fft kernel must be 2-D with odd sides, got shape {ker.shape}"
        raise InputError(msg)
    shape = (next_fast_even(ny), next_fast_even(nx))
    if backend not in ("pyfftw", "numpy"):
        msg = f"FFT backend must be 'pyfftw' or 'numpy', got {backend!r}"
        raise InputError(msg)
    symmetric = np.array_equal(ker, ker[::-1, ::-1])
    kft: np.ndarray | None = _symmetric_spectrum(ker, shape) if symmetric else None
    if backend == "numpy":
        src = img if zero_where is None else np.where(zero_where, np.float32(0.0), img)
        if kft is None:
            kft = np.fft.rfft2(_place_centred(ker, shape, np.float32))
        ift = np.fft.rfft2(src, s=shape)
        ift *= kft
        return np.ascontiguousarray(np.fft.irfft2(ift, s=shape)[:ny, :nx], dtype=np.float32)
    import pyfftw

    fwd, inv, lock = _fftw_plans(shape, FFT_THREADS, planner)
    # a fresh output array per call: the caller keeps it, the plan never writes into it again
    result = pyfftw.empty_aligned(shape, dtype=np.float32)
    with lock:
        buf = fwd.input_array
        if kft is None:
            buf[...] = _place_centred(ker, shape, np.float32)
            kft = fwd().copy()
        view = buf[:ny, :nx]
        view[...] = img
        if zero_where is not None:
            np.copyto(view, np.float32(0.0), where=zero_where)
        if ny < shape[0]:
            buf[ny:, :] = 0.0
        if nx < shape[1]:
            buf[:ny, nx:] = 0.0
        spec = fwd()
        spec *= kft
        # the plans are shared (apfast.diffim.fftw): write into our own array, then give the plan its own back
        own_out = inv.output_array
        try:
            out = inv(spec, output_array=result)
        finally:
            inv.update_arrays(inv.input_array, own_out)
    if shape == (ny, nx):
        return out
    return np.array(out[:ny, :nx], dtype=np.float32, order="C", copy=True)


# ----------------------------------------------------------------------------------------------- stats
def variance_mean(
    variance: np.ndarray, mask: np.ndarray | None = None, *, ignore_mask_planes: Sequence[str] = ()
) -> float:
    """Clipped mean of a variance plane over pixels without the ignored mask planes.

    Three iterations of 3-sigma clipping about the mean (as Rubin's MEANCLIP in
    ``computeVarianceMean``), starting from the median and the IQR so that a few
    huge values (bright stars) cannot drag the first pass. Large planes are
    regularly sub-sampled to about 500,000 pixels (every ``step``-th row and column). Use it for the
    ``science_variance`` / ``template_variance`` arguments of :func:`decorrelate`.

    Parameters
    ----------
    variance : ndarray, shape (ny, nx)
    mask : ndarray of int32, shape (ny, nx), optional
    ignore_mask_planes : sequence of str
        Planes whose pixels are skipped (e.g. ``DecorrelationConfig().ignore_mask_planes``).

    Returns
    -------
    float
        The clipped mean.

    Raises
    ------
    AlgorithmError
        If no pixel is finite, positive and unmasked.

    Examples
    --------
    >>> v = np.full((10, 10), 4.0, np.float32); v[0, 0] = 1e6
    >>> variance_mean(v)
    4.0
    """
    v = np.asarray(variance)
    # a regular subsample of ~_STAT_PIXELS pixels: variance planes are smooth, and the full
    # 2048x4096 plane would cost ~0.3 s of sorting per call
    step = max(1, int(math.sqrt(v.size / _STAT_PIXELS))) if v.ndim == 2 else 1
    sub = (slice(None, None, step), slice(None, None, step)) if v.ndim == 2 else ...
    vs = v[sub]
    good = np.isfinite(vs) & (vs > 0)
    if mask is not None and ignore_mask_planes:
        good &= (np.asarray(mask)[sub] & bitmask(list(ignore_mask_planes))) == 0
    vals = vs[good].astype(np.float64)
    if vals.size == 0:
        msg = (
            f"no usable variance pixels (finite, > 0, without planes {list(ignore_mask_planes)}) in a "
            f"{v.shape} plane; check the mask or pass the variance explicitly"
        )
        raise AlgorithmError(msg, shape=v.shape)
    q25, centre, q75 = np.percentile(vals, [25, 50, 75])
    width = (q75 - q25) / _IQR_PER_SIGMA
    for _ in range(3):
        if width > 0:
            sel = vals[np.abs(vals - centre) <= 3.0 * width]
        else:
            sel = vals[vals == centre]
        if sel.size == 0:
            break
        centre, width = float(sel.mean()), float(sel.std())
    return float(centre)


def _measured_scale(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, grown: np.ndarray, ignore: int
) -> tuple[float, int]:
    """Robust variance ``(IQR / 1.349)^2`` of ``image / sqrt(variance)`` over a subsample of good pixels.

    Good: none of the ``ignore`` bits, outside the grown no-data region, finite,
    positive variance. A regular subsample of about ``_STAT_PIXELS`` pixels keeps
    the cost low; the IQR's relative error is then ~0.2% in sigma.
    """
    step = max(1, int(math.sqrt(image.size / _STAT_PIXELS)))
    s = (slice(None, None, step), slice(None, None, step))
    img, var = image[s], variance[s]
    good = ((mask[s] & ignore) == 0) & (grown[s] == 0) & np.isfinite(img) & (var > 0) & np.isfinite(var)
    pulls = img[good].astype(np.float64) / np.sqrt(var[good].astype(np.float64))
    if pulls.size < _MIN_GOOD_PIXELS:
        return float("nan"), int(pulls.size)
    q25, q75 = np.percentile(pulls, [25, 75])
    return float(((q75 - q25) / _IQR_PER_SIGMA) ** 2), int(pulls.size)


def _checked_decorrelation_kernel(
    k: np.ndarray, science_variance: float, template_variance: float, mode: Mode, config: DecorrelationConfig,
    shape: tuple[int, int],
) -> np.ndarray:
    """The decorrelation kernel phi; InputError when it is larger than the image."""
    ny, nx = shape
    phi = decorrelation_kernel(
        k,
        science_variance,
        template_variance,
        shape=config.kernel_size,
        mode=mode,
        tolerance=config.whiteness_tolerance,
    )
    size = phi.shape[0]
    if size > min(ny, nx):
        msg = (
            f"decorrelation kernel size {size} exceeds the {ny}x{nx} image; set "
            f"difference.decorrelation.kernel_size to an odd value below {min(ny, nx)}"
        )
        raise InputError(msg)
    return phi


def _convolve_image(
    image: np.ndarray, mask_in: np.ndarray, phi: np.ndarray, config: DecorrelationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` convolved with ``phi``, no-data pixels zeroed before and restored after: (out, bad)."""
    nodata_bits = bitmask(list(config.no_data_mask_planes)) if config.no_data_mask_planes else 0
    bad = ~np.isfinite(image)
    if nodata_bits:
        bad |= (mask_in & nodata_bits) != 0
    any_bad = bool(bad.any())
    out = convolve_fft(
        image,
        phi,
        zero_where=bad if any_bad else None,
        backend=config.fft_backend,
        planner=config.fft_planner,
    )
    if any_bad:
        np.copyto(out, image, where=bad)
    return out, bad


def _edge_mask(mask_in: np.ndarray, bad: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A new mask with EDGE set within ``size // 2`` of a no-data pixel: (mask_out, grown)."""
    ny, nx = mask_in.shape
    grown = np.empty((ny, nx), dtype=np.uint8)
    fftutil.grow_mask_box(bad.view(np.uint8), size // 2, True, grown)
    mask_out = np.array(mask_in, dtype=np.int32, order="C", copy=True)
    np.bitwise_or(mask_out, np.int32(1 << MASK_BITS["EDGE"]), out=mask_out, where=grown.view(bool))
    return mask_out, grown


def _decorrelated_variance(
    difference: Exposure,
    out: np.ndarray,
    mask_out: np.ndarray,
    grown: np.ndarray,
    *,
    vpred: float,
    after: float,
    config: DecorrelationConfig,
) -> tuple[np.ndarray, float]:
    """The variance plane scaled by the predicted factor, then by the measured one if asked: (var_out, vmeas)."""
    ny, nx = difference.shape
    if difference.variance is not None:
        var_out = difference.variance * np.float32(vpred)
    else:
        var_out = np.full((ny, nx), after, dtype=np.float32)
    vmeas = 1.0
    if config.variance_scaling == "measured":
        ignore = bitmask(list(config.ignore_mask_planes)) if config.ignore_mask_planes else 0
        scale, n_used = _measured_scale(out, var_out, mask_out, grown, ignore)
        if math.isfinite(scale) and scale > 0:
            vmeas = scale
            var_out *= np.float32(scale)
            if not 0.5 < scale < 2.0:
                log.warning(
                    "decorrelated noise is %.3g times the predicted variance; check the science/template "
                    "variance planes",
                    scale,
                )
        else:
            log.warning(
                "only %d good pixels for the measured variance scaling; kept the predicted variance", n_used
            )
    return var_out, vmeas


def _decorrelated_metadata(
    difference: Exposure, *, mode: Mode, size: int, science_variance: float, template_variance: float,
    vpred: float, vmeas: float,
) -> fits.Header:
    """A copy of the difference's metadata with the DCR* keys added."""
    metadata = difference.metadata.copy()
    metadata["DCRMODE"] = (mode, "decorrelation: which image was convolved")
    metadata["DCRKSIZ"] = (size, "decorrelation kernel side (pixels)")
    metadata["DCRSVAR"] = (float(science_variance), "decorrelation: science variance")
    metadata["DCRTVAR"] = (float(template_variance), "decorrelation: template variance")
    metadata["DCRVPRED"] = (float(vpred), "variance plane factor, predicted")
    metadata["DCRVMEAS"] = (float(vmeas), "variance plane factor, measured after")
    return metadata


# ----------------------------------------------------------------------------------------------- driver
def decorrelate(
    difference: Exposure,
    matching_kernel: np.ndarray,
    *,
    science_variance: float,
    template_variance: float,
    mode: Mode,
    config: DecorrelationConfig,
) -> Exposure:
    """Whiten the noise of an image difference (DMTN-021) and update its variance, mask and PSF.

    See the module docstring for exactly what happens to each plane.

    Parameters
    ----------
    difference : Exposure
        The PSF-matched difference; not modified. ``mask``, ``variance`` and
        ``psf`` may be ``None`` (then: no mask bits are read but ``EDGE`` is
        still set in a new mask; a constant variance plane equal to the
        predicted decorrelated variance is made; no PSF).
    matching_kernel : ndarray, shape (k, k), k odd
        The PSF-matching kernel at the image centre, not normalised.
    science_variance, template_variance : float
        Mean variances of the unconvolved science and template images
        (e.g. :func:`variance_mean`), in the difference's units before any
        rescaling by the kernel sum.
    mode : {"convolveTemplate", "convolveScience"}
        Which image was convolved by ``matching_kernel``.
    config : DecorrelationConfig

    Returns
    -------
    Exposure
        New planes; same WCS, photometric calibration, visit info and ``xy0``;
        metadata gains ``DCRMODE``, ``DCRKSIZ``, ``DCRSVAR``, ``DCRTVAR``,
        ``DCRVPRED`` (predicted variance factor) and ``DCRVMEAS`` (measured
        factor, 1.0 when not measured).

    Raises
    ------
    InputError
        On an invalid kernel or variances, or a kernel larger than the image.
    """
    if not isinstance(difference, Exposure):
        msg = f"difference must be an apfast.exposure.Exposure, got {type(difference).__name__}"
        raise InputError(msg)
    k = _as_kernel(matching_kernel)
    e, m = _roles(science_variance, template_variance, mode)
    ny, nx = difference.shape
    phi = _checked_decorrelation_kernel(k, science_variance, template_variance, mode, config, (ny, nx))
    size = phi.shape[0]
    w_k, w_e, w_m = noise_weights(k, phi)
    before, after = e + m * w_k, e * w_e + m * w_m
    vpred = after / before

    image = difference.image
    mask_in = difference.mask if difference.mask is not None else np.zeros((ny, nx), dtype=np.int32)
    out, bad = _convolve_image(image, mask_in, phi, config)
    mask_out, grown = _edge_mask(mask_in, bad, size)
    var_out, vmeas = _decorrelated_variance(
        difference, out, mask_out, grown, vpred=vpred, after=after, config=config
    )
    log.info(
        "decorrelated %dx%d difference (%s, kernel %d px): variance x %.4f predicted, x %.4f measured",
        nx,
        ny,
        mode,
        size,
        vpred,
        vmeas,
    )

    metadata = _decorrelated_metadata(
        difference, mode=mode, size=size, science_variance=science_variance,
        template_variance=template_variance, vpred=vpred, vmeas=vmeas,
    )
    psf = ConvolvedPsf(difference.psf, phi) if difference.psf is not None else None
    return Exposure(
        out,
        mask_out,
        var_out,
        wcs=difference.wcs,
        psf=psf,
        photo_calib=difference.photo_calib,
        visit_info=difference.visit_info,
        metadata=metadata,
        xy0=difference.xy0,
    )


# ----------------------------------------------------------------------------------------------- PSF
class ConvolvedPsf(PsfModel, psftype="CONVOLVED"):
    """A PSF model convolved with a fixed kernel: the PSF of a decorrelated difference.

    ``compute_image(x, y)`` convolves ``base.compute_image(x, y)`` with
    ``kernel`` (full convolution), crops it centred to ``size`` and normalises
    it to sum 1, as Rubin's ``computeCorrectedDiffimPsf`` keeps the input stamp
    size. Written as one ``PSF_CONVKERN`` extension (the kernel, ``PSFTYPE =
    'CONVOLVED'``, ``PSFSIZE``) followed by the base model's extensions.

    Parameters
    ----------
    base : PsfModel
        The PSF before convolution (any registered model).
    kernel : array_like, shape (d, d), d odd
        The centred convolution kernel (e.g. from :func:`decorrelation_kernel`).
    size : int, optional
        Odd stamp side; default ``base.size``.

    Examples
    --------
    >>> from apfast.psf import GaussianPsf
    >>> d = np.zeros((3, 3)); d[1, 1] = 1.0
    >>> psf = ConvolvedPsf(GaussianPsf(2.0, 21), d)
    >>> bool(np.allclose(psf.compute_image(0, 0), GaussianPsf(2.0, 21).compute_image(0, 0)))
    True
    """

    def __init__(self, base: PsfModel, kernel: Any, *, size: int | None = None) -> None:
        if not isinstance(base, PsfModel):
            msg = f"ConvolvedPsf base must be an apfast.psf.PsfModel, got {type(base).__name__}"
            raise InputError(msg)
        ker = np.array(kernel, dtype=np.float64, order="C", copy=True)
        if (
            ker.ndim != 2
            or ker.shape[0] != ker.shape[1]
            or ker.shape[0] % 2 == 0
            or not np.all(np.isfinite(ker))
        ):
            msg = f"ConvolvedPsf kernel must be a finite square stamp of odd size, got shape {ker.shape}"
            raise InputError(msg)
        size = base.size if size is None else size
        if int(size) != size or size < 1 or size % 2 == 0:
            msg = f"ConvolvedPsf size must be a positive odd integer, got {size}"
            raise InputError(msg)
        ker.flags.writeable = False
        self.base, self.kernel, self._size = base, ker, int(size)

    @property
    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"ConvolvedPsf({self.base!r}, <{self.kernel.shape[0]}x{self.kernel.shape[0]} kernel>, size={self._size})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ConvolvedPsf)
            and other.base == self.base
            and np.array_equal(other.kernel, self.kernel)
            and other.size == self.size
        )

    __hash__ = None  # type: ignore[assignment]

    def compute_image(self, x: float, y: float) -> np.ndarray:
        """Return the convolved stamp at ``(x, y)``, centred, summing to 1.

        Raises
        ------
        AlgorithmError
            If the cropped convolution has no positive total flux.
        """
        full = convolve_full(self.base.compute_image(x, y), self.kernel)
        c, r = full.shape[0] // 2, self._size // 2
        if r > c:
            full = np.pad(full, r - c)
            c = r
        img = full[c - r : c + r + 1, c - r : c + r + 1]
        total = img.sum()
        if not total > 0:
            msg = f"ConvolvedPsf stamp at (x={x}, y={y}) has total {total:.3g}; the kernel is not a smoothing kernel"
            raise AlgorithmError(msg, x=x, y=y, total=float(total))
        return img / total

    def to_hdus(self) -> list[fits.ImageHDU]:
        """``PSF_CONVKERN`` (kernel, ``PSFTYPE``, ``PSFSIZE``) then the base model's extensions."""
        hdr = self._header()
        hdr["PSFSIZE"] = (self._size, "stamp side (pixels)")
        return [fits.ImageHDU(self.kernel, header=hdr, name="PSF_CONVKERN"), *self.base.to_hdus()]

    @classmethod
    def from_hdus(cls, hdus: Sequence[Any]) -> ConvolvedPsf:
        hdr = hdus[0].header
        base = psf_from_hdus(list(hdus[1:]), source="CONVOLVED PSF")
        return cls(base, np.asarray(hdus[0].data, dtype=np.float64), size=int(hdr["PSFSIZE"]))
