"""Image subtraction: match the PSFs of science and template, then difference them.

:func:`subtract_images` is apfast's ``AlardLuptonSubtractTask.run``: both
exposures must already be on the same pixel grid (the template warped to the
science WCS). It fits the Alard-Lupton kernel (:mod:`apfast.diffim.psfmatch`), convolves
the image with the narrower PSF and returns the difference, always
``science - template``.

Convolution method
------------------
The spatially varying kernel is ``K(x, y) = sum_t P_t(x, y) K_t`` (``nt`` = 1, 3
or 6 monomials of the position). Because convolution is linear, the image
convolved with ``K`` evaluated at each output pixel is *exactly*
``sum_t P_t(x, y) (I (x) K_t)``. Each ``I (x) K_t`` is one FFT product (pyfftw,
the image transformed once), and :func:`apfast.kernels.convolve.combine_spatial_terms`
forms the weighted sum, background and difference in one parallel pass. No
padding is needed: circular wrap-around only reaches pixels within the kernel
half-width of the border, which are masked ``EDGE`` anyway.

Modes, sign, units, variance, mask and PSF
------------------------------------------
* ``convolveTemplate``: ``D = S - (K (x) T + b)``; units of the science image;
  variance ``var_S + var_T (x) K_c^2``; PSF = the science PSF.
* ``convolveScience``: the kernel matches the science to the template,
  ``T ~ K (x) S + b``; ``D = (K (x) S + b - T) / k_c`` where ``k_c`` is the
  kernel sum at the image centre, so ``D`` stays in science units (positive for
  a brightening); variance ``(var_S (x) K_c^2 + var_T) / k_c^2``; PSF =
  ``(science PSF (x) K_c) / k_c`` at the image centre (an :class:`ImagePsf`).
* ``auto``: ``convolveTemplate`` when the science FWHM >= template FWHM at the
  image centre, otherwise ``convolveScience``.

FWHM
----
Every width used here (basis sigmas, kernel size, stamp size, isolation radius,
candidate detection, ``auto``) is :func:`matching_fwhm`: the half-maximum FWHM of
the PSF model at the image centre, the number characterize reports
(``PsfResult.fwhm_center``). The second-moment width (``PsfModel.fwhm``) of a
measured pixel PSF is dominated by its wings: 9-10 px for a real PSF whose
half-maximum FWHM is 2.5 px, which oversized every derived length.

``K_c`` is the kernel at the image centre: the variance is convolved with the
centre kernel squared (the spatial variation of ``sum K^2`` across a CCD is a
fraction of a percent for order-1 kernels). The mask is the target mask OR the
convolved image's mask with its bad-data planes (everything but ``DETECTED`` and
``DETECTED_NEGATIVE``) grown over the kernel footprint; ``EDGE`` is set within the
kernel half-width of the border and ``NO_DATA`` where either input was not finite.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.fft

from apfast.ccd.background import BackgroundConfig, NoGoodBackgroundPixelsError, measure_background
from apfast.ccd.detection import DetectionConfig, detect_sources
from apfast.ccd.psf_determiner import halfmax_fwhm
from apfast.diffim.deltabasis import choose_basis
from apfast.diffim.fftw import convolve_full, rfft2_pair
from apfast.diffim.psfmatch import (
    SIGMA_PER_FWHM,
    BackgroundPolynomial,
    KernelSolution,
    PsfMatchConfig,
    SpatialKernel,
    _catalogue_arrays,
    basis_sigmas,
    make_basis,
    select_stamps,
    solve_kernel,
)
from apfast.errors import InputError
from apfast.exposure import Exposure
from apfast.kernels.convolve import (
    combine_spatial_terms,
    difference_masks,
    grow_mask_bits,
    or_masks_any,
    planes_finite,
)
from apfast.masks import MASK_BITS, bitmask
from apfast.psf import GaussianPsf, ImagePsf, PsfModel

__all__ = ["SubtractionResult", "fft_convolve_terms", "matching_fwhm", "subtract_images"]

logger = logging.getLogger(__name__)
_THREADS = 2
_NOT_GROWN = bitmask(["DETECTED", "DETECTED_NEGATIVE"])
_ALL_BITS = (1 << len(MASK_BITS)) - 1


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SubtractionResult:
    """Output of :func:`subtract_images`.

    Attributes
    ----------
    difference : Exposure
        ``science - template`` after PSF matching (Rubin ``deepDiff_differenceExp``).
    matched : Exposure
        The convolved image ``K (x) I`` without background (``deepDiff_matchedExp``).
    kernel : SpatialKernel
        The matching kernel; ``kernel.evaluate(x, y)``, ``kernel.sum(x, y)``.
    background : BackgroundPolynomial
        The differential background ``b(x, y)`` that was subtracted.
    mode : str
        ``"convolveTemplate"`` or ``"convolveScience"`` (``auto`` resolved).
    n_stamps_used : int
        Stamps in the final spatial fit.
    solution : KernelSolution
        Stamp positions, kernel sums and residuals of the fit.
    metadata : dict
        Numbers for the run record (FWHMs, kernel size, sigmas, timings ...).
    """

    difference: Exposure
    matched: Exposure
    kernel: SpatialKernel
    background: BackgroundPolynomial
    mode: Literal["convolveTemplate", "convolveScience"]
    n_stamps_used: int
    solution: KernelSolution
    metadata: dict[str, Any]


class _FftPlans:
    """The shared FFTW plan pair for one padded shape (:func:`apfast.diffim.fftw.rfft2_pair`); use under ``lock``.

    ``real`` is the forward plan's input (preserved by the transform, so zeroed
    regions stay zero between calls) and ``cplx`` the inverse plan's input (the
    same array as the forward output). They are looked up on the plans at each
    use because other modules share the plans.
    """

    __slots__ = ("fwd", "inv", "lock")

    def __init__(self, py: int, px: int, effort: str) -> None:
        self.fwd, self.inv, self.lock = rfft2_pair((py, px), np.float32, _THREADS, effort)

    @property
    def real(self) -> np.ndarray:
        return self.fwd.input_array

    @property
    def cplx(self) -> np.ndarray:
        return self.inv.input_array


def _plans(py: int, px: int, effort: str) -> _FftPlans:
    return _FftPlans(py, px, effort)


def fft_convolve_terms(image: np.ndarray, kernels: np.ndarray, *, planner: str = "FFTW_ESTIMATE") -> np.ndarray:
    """Convolve one image with several small kernels by FFT (circular beyond the border).

    The image is transformed once; each kernel costs one forward and one inverse
    real FFT of the padded size (float32/complex64, FFTW plans cached per shape).

    Parameters
    ----------
    image : ndarray (ny, nx) float32
        Finite pixels.
    kernels : ndarray (nt, k, k) float
        Odd-sized kernels, centre at ``[k // 2, k // 2]``.
    planner : {"FFTW_ESTIMATE", "FFTW_MEASURE"}
        FFTW planning effort for a shape without saved wisdom (MEASURE plans once per
        shape and machine, saved in the wisdom cache of :mod:`apfast.diffim.fftw`, then runs ~2x faster).

    Returns
    -------
    ndarray (nt, ny, nx) float32
        ``image (x) kernels[t]`` (true convolution); exact except within ``k // 2`` of the border.

    Examples
    --------
    >>> img = np.zeros((32, 32), np.float32); img[10, 12] = 1.0
    >>> k = np.zeros((1, 5, 5)); k[0, 2, 3] = 2.0  # shift by +1 in x
    >>> out = fft_convolve_terms(img, k)
    >>> round(float(out[0, 10, 13]), 5), round(float(abs(out[0]).sum()), 4)
    (2.0, 2.0)
    """
    ny, nx = image.shape
    nt, k, _ = kernels.shape
    r = k // 2
    py = scipy.fft.next_fast_len(max(ny, k), real=True)
    px = scipy.fft.next_fast_len(max(nx, k), real=True)
    out = np.empty((nt, ny, nx), dtype=np.float32)
    plans = _plans(py, px, planner)
    with plans.lock:
        buf = plans.real
        buf[:ny, :nx] = image
        buf[ny:, :] = 0.0
        buf[:ny, nx:] = 0.0
        f_img = plans.fwd().copy()
        buf[:] = 0.0
        for t in range(nt):
            kern = kernels[t]
            # centre of the kernel at pixel (0, 0), negative offsets wrapped to the far edges
            buf[: r + 1, : r + 1] = kern[r:, r:]
            buf[: r + 1, px - r :] = kern[r:, :r]
            buf[py - r :, : r + 1] = kern[:r, r:]
            buf[py - r :, px - r :] = kern[:r, :r]
            np.multiply(plans.fwd(), f_img, out=plans.cplx)
            out[t] = plans.inv()[:ny, :nx]
    return out


def matching_fwhm(psf: PsfModel, x: float, y: float) -> float:
    """The FWHM (pixels) differencing sizes everything from: the PSF's half-maximum width at ``(x, y)``.

    The same number :func:`apfast.ccd.characterize.run_characterize` reports for a
    measured PSF (``psf_result.fwhm_center``, :func:`apfast.ccd.psf_determiner.halfmax_fwhm`
    of the model stamp), and the analytic ``2 sqrt(2 ln 2) sigma`` of a
    :class:`~apfast.psf.GaussianPsf`. Not the second-moment width
    (:meth:`PsfModel.fwhm`): the wings of a real PSF make that several times larger.

    Parameters
    ----------
    psf : PsfModel
        Any PSF model.
    x, y : float
        Parent-image pixel position.

    Returns
    -------
    float
        FWHM in pixels.

    Examples
    --------
    >>> round(matching_fwhm(GaussianPsf(2.0, 25), 0.0, 0.0), 4)
    4.7096
    >>> round(matching_fwhm(ImagePsf(GaussianPsf(2.0, 25).compute_image(0, 0)), 0.0, 0.0), 1)
    4.7
    """
    if isinstance(psf, GaussianPsf):
        return float(psf.fwhm(x, y))
    return halfmax_fwhm(psf.compute_image(x, y))


def _planes(exp: Exposure, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(exp, Exposure):
        msg = f"{name} must be an apfast.exposure.Exposure, got {type(exp).__name__}"
        raise InputError(msg)
    if exp.variance is None:
        msg = f"the {name} exposure has no variance plane; PSF matching weights pixels by 1/variance"
        raise InputError(msg)
    if exp.psf is None:
        msg = f"the {name} exposure has no PSF model; run characterize (or attach exposure.psf) before subtracting"
        raise InputError(msg)
    img = np.ascontiguousarray(exp.image, dtype=np.float32)
    var = np.ascontiguousarray(exp.variance, dtype=np.float32)
    msk = np.zeros(img.shape, np.int32) if exp.mask is None else np.ascontiguousarray(exp.mask, dtype=np.int32)
    if not planes_finite(img, var):
        finite = np.isfinite(img) & np.isfinite(var)
        msk = msk | np.where(finite, 0, bitmask("NO_DATA")).astype(np.int32)
        img = np.where(finite, img, 0.0).astype(np.float32)
        var = np.where(finite, var, 0.0).astype(np.float32)
    return img, var, msk


def _detect_candidates(img: np.ndarray, var: np.ndarray, msk: np.ndarray, fwhm: float,
                       config: PsfMatchConfig) -> tuple[np.ndarray, ...]:
    """Kernel-star candidates detected on ``img`` minus its sky.

    An image that still has its sky (a calexp template with the background added back, a
    raw pair: ZTF has 200-600 DN) is one footprint at a variance threshold, and its
    peaks' S/N include the sky: the kernel was then fitted on whatever peaks came out
    (kernel sums 0.15-0.77 on ZTF). The sky is measured on a mesh of at most 128 px
    cells (half the image on small ones) and removed for the detection only.
    """
    ny, nx = img.shape
    bcfg = BackgroundConfig(bin_size=max(16, min(128, min(ny, nx) // 2)))
    try:
        sky = measure_background(img, msk, config=bcfg).image()
        img = (img - sky).astype(np.float32)
    except NoGoodBackgroundPixelsError:  # nothing good to measure: detection finds nothing either
        pass
    det = detect_sources(img, var, msk, psf_sigma=fwhm * SIGMA_PER_FWHM,
                         config=DetectionConfig(threshold=config.detect_threshold))
    x = det.peak_x.astype(np.float64)
    y = det.peak_y.astype(np.float64)
    snr = det.peak_snr.astype(np.float64)
    ok = det.has_positive & ~det.has_negative
    return x, y, snr, ok


def subtract_images(
    science: Exposure, template: Exposure, *, sources: Any = None, config: PsfMatchConfig | None = None
) -> SubtractionResult:
    """PSF-match and subtract a template from a science exposure on the same pixel grid.

    Parameters
    ----------
    science : Exposure
        Calibrated science exposure with variance and PSF.
    template : Exposure
        Template warped to the science grid (same shape), with variance and PSF.
    sources : catalogue, optional
        Kernel-star candidates with ``x``, ``y`` (pixels of these arrays) and
        optionally ``snr`` (or ``psfFlux``/``psfFluxErr``) and flag columns, e.g.
        the science ``src`` table; ``None`` detects stars on the template.
    config : PsfMatchConfig, optional

    Returns
    -------
    SubtractionResult

    Raises
    ------
    InputError
        If the exposures differ in shape or lack variance or PSF.
    InsufficientKernelSourcesError
        If too few stamps are usable (see ``difference.psfmatch.stamp_snr_min``, ``difference.psfmatch.min_stamps``).

    Examples
    --------
    >>> from apfast.psf import GaussianPsf
    >>> rng = np.random.default_rng(1)
    >>> yy, xx = np.mgrid[0:256, 0:256]
    >>> def scene(s):
    ...     img = np.zeros((256, 256))
    ...     for x0 in range(24, 240, 24):
    ...         for y0 in range(24, 240, 24):
    ...             img += 3e4 * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / s**2) / (2 * np.pi * s**2)
    ...     return img + rng.normal(0, 5, img.shape)
    >>> var = np.full((256, 256), 25.0)
    >>> sci = Exposure(scene(2.0), variance=var, psf=GaussianPsf(2.0, 25))
    >>> tmp = Exposure(scene(1.5), variance=var, psf=GaussianPsf(1.5, 25))
    >>> res = subtract_images(sci, tmp, config=PsfMatchConfig(size_cell=64))
    >>> res.mode, round(res.kernel.sum(128, 128), 2)
    ('convolveTemplate', 1.0)
    """
    cfg = config if config is not None else PsfMatchConfig()
    t0 = time.perf_counter()
    s_img, s_var, s_msk = _planes(science, "science")
    t_img, t_var, t_msk = _planes(template, "template")
    if s_img.shape != t_img.shape:
        msg = (
            f"science {s_img.shape} and template {t_img.shape} have different shapes; warp the template to the "
            f"science pixel grid first"
        )
        raise InputError(msg)
    ny, nx = s_img.shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    assert science.psf is not None and template.psf is not None  # _planes checked both
    fwhm_s = matching_fwhm(science.psf, science.xy0[0] + xc, science.xy0[1] + yc)
    fwhm_t = matching_fwhm(template.psf, template.xy0[0] + xc, template.xy0[1] + yc)
    mode = cfg.mode
    if mode == "auto":
        mode = "convolveTemplate" if fwhm_s >= fwhm_t else "convolveScience"
    if mode == "convolveTemplate":
        ref, var_ref, msk_ref, tgt, var_tgt, msk_tgt = t_img, t_var, t_msk, s_img, s_var, s_msk
        fwhm_ref, fwhm_tgt = fwhm_t, fwhm_s
    else:
        ref, var_ref, msk_ref, tgt, var_tgt, msk_tgt = s_img, s_var, s_msk, t_img, t_var, t_msk
        fwhm_ref, fwhm_tgt = fwhm_s, fwhm_t
    sigmas, ksize = basis_sigmas(fwhm_ref, fwhm_tgt, cfg)
    basis = make_basis(sigmas, cfg.alard_deg_gauss, ksize)
    r = ksize // 2
    # the stamp must be at least as wide as the kernel, or the background is degenerate with its wings
    half = max(math.ceil(cfg.stamp_fwhm_scaling * max(fwhm_s, fwhm_t)), r)
    badbits = bitmask(cfg.bad_mask_planes) | bitmask("NO_DATA")
    bad = np.empty((ny, nx), dtype=bool)
    or_masks_any(s_msk, t_msk, badbits, bad)
    if sources is None:
        x, y, snr, ok = _detect_candidates(t_img, t_var, t_msk, fwhm_t, cfg)
    else:
        x, y, snr, ok = _catalogue_arrays(sources)
    cx, cy = select_stamps(x, y, snr, ok, bad, half=half, r=r,
                           isolation=cfg.isolation_fwhm_scaling * max(fwhm_s, fwhm_t), config=cfg)
    t_sel = time.perf_counter()
    sol = solve_kernel(ref, var_ref, tgt, var_tgt, bad, cx, cy, basis=basis, half=half, config=cfg)
    sol, choice = choose_basis(ref, var_ref, tgt, var_tgt, sol, half=half, fwhm=max(fwhm_s, fwhm_t), config=cfg)
    if choice.basis == "delta" or cfg.basis != "gaussian":
        logger.info("diffim basis %s (%s)", choice.basis, choice.reason)
    t_fit = time.perf_counter()

    kern, bg = sol.kernel, sol.background
    k_c = kern.evaluate(xc, yc)
    ksum_c = float(k_c.sum())
    convs = fft_convolve_terms(ref, kern.term_images(), planner=cfg.fft_planner)
    matched = np.empty((ny, nx), dtype=np.float32)
    diff = np.empty((ny, nx), dtype=np.float32)
    scale = 1.0 if mode == "convolveTemplate" else -1.0 / ksum_c
    combine_spatial_terms(convs, kern.order, np.ascontiguousarray(bg.coeffs, dtype=np.float64), bg.order,
                          xc, yc, kern.x_scale, kern.y_scale, tgt, scale, matched, diff)
    del convs
    var_conv = fft_convolve_terms(var_ref, (k_c * k_c)[None], planner=cfg.fft_planner)[0]
    if mode == "convolveTemplate":
        var_diff = var_tgt + var_conv
    else:
        var_diff = (var_tgt + var_conv) / np.float32(ksum_c * ksum_c)
    grown = np.empty_like(msk_ref)
    grow_mask_bits(msk_ref, r, _ALL_BITS & ~_NOT_GROWN, grown)
    m_matched = np.empty((ny, nx), dtype=np.int32)
    m_diff = np.empty((ny, nx), dtype=np.int32)
    difference_masks(msk_tgt, grown, r, bitmask("EDGE"), _NOT_GROWN, m_matched, m_diff)
    t_conv = time.perf_counter()

    if mode == "convolveTemplate":
        psf: PsfModel = science.psf
    else:
        psf = _convolved_psf(science.psf, science.xy0[0] + xc, science.xy0[1] + yc, k_c)
    meta: dict[str, Any] = {
        "mode": mode, "fwhm_science": fwhm_s, "fwhm_template": fwhm_t, "kernel_size": ksize,
        "basis_sigmas": sigmas if choice.basis == "gaussian" else (), "basis": choice.basis,
        "basis_choice": choice, "stamp_half_size": half, "n_candidates": int(cx.size),
        "n_stamps_used": int(sol.stamp_x.size), "kernel_sum_center": ksum_c,
        "time_select": t_sel - t0, "time_fit": t_fit - t_sel, "time_convolve": t_conv - t_fit,
    }
    logger.info("diffim %s: %d/%d stamps, kernel %d px, sum %.4f, fit %.3fs, convolve %.3fs", mode,
                sol.stamp_x.size, cx.size, ksize, ksum_c, t_fit - t_sel, t_conv - t_fit)
    difference = Exposure(diff, m_diff, var_diff, wcs=science.wcs, psf=psf, photo_calib=science.photo_calib,
                          visit_info=science.visit_info, metadata=science.metadata.copy(), xy0=science.xy0)
    # the matched image is in the units, and has the PSF, of the image it was matched to
    tgt_exp = science if mode == "convolveTemplate" else template
    matched_exp = Exposure(matched, m_matched, var_conv, wcs=tgt_exp.wcs, psf=tgt_exp.psf,
                           photo_calib=tgt_exp.photo_calib, visit_info=tgt_exp.visit_info,
                           metadata=tgt_exp.metadata.copy(), xy0=tgt_exp.xy0)
    return SubtractionResult(difference=difference, matched=matched_exp, kernel=kern, background=bg, mode=mode,
                             n_stamps_used=int(sol.stamp_x.size), solution=sol, metadata=meta)


def _convolved_psf(psf: PsfModel, x: float, y: float, kernel: np.ndarray) -> ImagePsf:
    """Return the PSF stamp at ``(x, y)`` convolved with ``kernel``, normalised, as an ImagePsf."""
    stamp = psf.compute_image(x, y)
    out = convolve_full(stamp, kernel)
    out = np.clip(out, 0.0, None) if out.min() < -1e-3 * out.max() else out
    return ImagePsf(out / out.sum())
