"""Alard-Lupton PSF-matching kernel: basis, stamp selection and the spatial solution.

This is the fitting half of Rubin's ``ImagePsfMatchTask`` (ip_diffim 20): find a
convolution kernel ``K(x, y)`` and a differential background ``b(x, y)`` such that
``target ~ K (x) reference + b`` (Alard & Lupton 1998; Alard 2000). The other
half, applying the kernel and forming the difference, is :mod:`apfast.diffim.subtract`.

Algorithm
---------
1. **Basis** (:func:`make_basis`): ``alard_n_gauss`` Gaussians times 2-D
   monomials ``u^p v^q`` with ``p + q <= degree`` (15 + 6 + 6 = 27 functions for
   degrees (4, 2, 2)). With ``scale_by_fwhm`` the sigmas follow ip_diffim's
   ``generateAlardLuptonBasisList``: ``sigma_K = sqrt(sigma_tgt^2 - sigma_ref^2)``
   (at least ``alard_min_sig``), sigmas ``[sigma_K / beta, sigma_K, sigma_K beta]``
   or ``[sigma_K, sigma_K beta, sigma_K beta^2]`` when ``sigma_K / beta`` would
   fall below the minimum; the kernel side is ``int(kernel_size_fwhm_scaling *
   largest sigma)`` made odd and clamped to ``[kernel_size_min, kernel_size_max]``.
   When the reference PSF is the wider one (deconvolution) the sigmas start at
   ``alard_min_sig_deconv`` (a simplification of ip_diffim's Ulmer rule).
   The first function is normalised to sum 1 and every other one has the first
   times its own sum subtracted, so only the first carries flux: the kernel sum
   (photometric scaling) is its coefficient.
2. **Stamps** (:func:`select_stamps`): candidate stars from a source catalogue
   (or from detection on the template), S/N in ``[stamp_snr_min,
   stamp_snr_max]``, no flags, no masked pixel in the stamp window of either
   image, no other source within ``isolation_fwhm_scaling`` FWHM; the
   ``n_star_per_cell`` brightest in each ``size_cell`` square cell (Rubin
   ``SpatialCellSet``; smaller cells on small images, :func:`effective_cell_size`),
   at most ``max_stamps`` in all (first-ranked stars of every
   cell first). A stamp has half-size ``max(stamp_fwhm_scaling * FWHM, kernel
   half-size)``: it must be wider than the kernel, or the constant background is
   nearly degenerate with the kernel wings (Rubin grows footprints by 30 px).
3. **Per-stamp fit**: weighted least squares (weights ``1 / variance`` of the
   target) for the basis coefficients and a constant; the normal equations are
   accumulated by :func:`apfast.kernels.psfmatch.stamp_normal_equations` and
   solved by an eigen-decomposition with eigenvalues below
   ``max / max_condition_number`` dropped (Rubin's EIGENVALUE regularisation).
   Stamps are rejected by kernel-sum outliers (``max_ksum_sigma`` robust sigmas)
   and by residual ``std = sqrt(chi^2 / E[chi^2])`` above
   ``candidate_residual_std_max``, where ``E[chi^2] = n + sum(K^2) sum(w var_ref)``
   accounts for the convolved reference noise.
4. **Spatial fit**: each coefficient is a polynomial of order
   ``spatial_kernel_order`` of the stamp position and the background one of
   order ``spatial_bg_order`` (each lowered until there are at least two stamps
   per polynomial term: 6 for order 1, 12 for order 2); the global weighted least squares is assembled
   from the per-stamp normal equations (exactly Rubin's approach), with up to
   ``max_spatial_iterations`` rounds of rejecting stamps the spatial model fits
   badly.

Positions are 0-based pixel coordinates of the input arrays (not parent ``xy0``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast._constants import FWHM_PER_SIGMA
from apfast.errors import AlgorithmError, InputError
from apfast.kernels.psfmatch import solve_symmetric_batch, stamp_normal_equations
from apfast.masks import MASK_BITS, MASK_PLANES

__all__ = [
    "BackgroundPolynomial",
    "InsufficientKernelSourcesError",
    "KernelBasis",
    "KernelSolution",
    "STAMP_STATUS",
    "PsfMatchConfig",
    "SpatialKernel",
    "effective_cell_size",
    "make_basis",
    "n_poly_terms",
    "select_stamps",
    "solve_kernel",
]

logger = logging.getLogger(__name__)

SIGMA_PER_FWHM = 1.0 / FWHM_PER_SIGMA
#: ``KernelSolution.candidate_status`` codes: what became of each stamp offered to the fit.
STAMP_STATUS = ("kept", "residual", "kernel_sum", "spatial")


@dataclass(frozen=True, slots=True, kw_only=True)
class PsfMatchConfig(ConfigSection):
    """Image differencing: Alard-Lupton PSF matching (Rubin ImagePsfMatchTask / AlardLuptonSubtractTask)."""

    _key_prefix: ClassVar[str] = "difference.psfmatch."

    mode: Literal["convolveTemplate", "convolveScience", "auto"] = opt(
        "convolveTemplate",
        "Which image is convolved (Rubin AlardLuptonSubtractTask.mode); the difference is always science - template.",
        choices={
            "convolveTemplate": "convolve the template to the science PSF (Rubin default); diffim PSF = science PSF",
            "convolveScience": "convolve the science to the template PSF; diffim in science units, PSF = science (x) K",
            "auto": "convolve whichever image has the narrower PSF (FWHM at the image centre)",
        },
    )
    scale_by_fwhm: bool = opt(True, "Scale basis sigmas and kernel size from the two PSF FWHMs (scaleByFwhm).")
    kernel_size: int = opt(21, "Kernel side in pixels (odd) when scale_by_fwhm is false (kernelSize).")
    kernel_size_fwhm_scaling: float = opt(
        6.0, "Kernel side = int(this * largest basis sigma), made odd (kernelSizeFwhmScaling)."
    )
    kernel_size_min: int = opt(21, "Smallest kernel side in pixels, odd (kernelSizeMin).")
    kernel_size_max: int = opt(35, "Largest kernel side in pixels, odd (kernelSizeMax).")
    alard_sig_gauss: tuple[float, ...] = opt(
        (0.7, 1.5, 3.0), "Basis Gaussian sigmas in pixels when scale_by_fwhm is false (alardSigGauss)."
    )
    alard_deg_gauss: tuple[int, ...] = opt(
        (4, 2, 2), "Polynomial degree modulating each Gaussian (alardDegGauss); one per Gaussian."
    )
    alard_gauss_beta: float = opt(2.0, "Ratio between successive basis sigmas (alardGaussBeta).")
    alard_min_sig: float = opt(0.7, "Smallest basis sigma in pixels (alardMinSig).")
    alard_min_sig_deconv: float = opt(
        0.4, "Smallest basis sigma when the convolved image has the wider PSF (alardMinSigDeconv)."
    )
    spatial_kernel_order: int = opt(1, "Polynomial order of the kernel coefficients in x, y (spatialKernelOrder, 0-2).")
    spatial_bg_order: int = opt(1, "Polynomial order of the differential background (spatialBgOrder, 0-2).")
    fit_for_background: bool = opt(True, "Fit a differential background (fitForBackground).")
    size_cell: int = opt(128, "Side in pixels of the cells stamps are spread over (sizeCellX/Y).")
    n_star_per_cell: int = opt(3, "Brightest usable stars kept per cell (nStarPerCell).")
    stamp_snr_min: float = opt(10.0, "Least S/N of a kernel star (Rubin detThreshold 10).")
    stamp_snr_max: float = opt(1e7, "Largest S/N of a kernel star (rejects near-saturated stars).")
    stamp_fwhm_scaling: float = opt(
        5.0,
        "Stamp half-size = max(ceil(this * larger FWHM), kernel half-size) pixels (the area fitted per star).",
    )
    isolation_fwhm_scaling: float = opt(
        2.0, "Reject a star with another catalogue source closer than this many FWHM (blends)."
    )
    detect_threshold: float = opt(
        10.0, "S/N threshold for detecting kernel stars on the template when no catalogue is given."
    )
    bad_mask_planes: tuple[str, ...] = opt(
        ("NO_DATA", "EDGE", "SAT", "BAD", "CR", "INTRP"),
        "Stamps with any of these planes set in either image's window are not used (badMaskPlanes).",
    )
    max_ksum_sigma: float = opt(3.0, "Reject stamps whose kernel sum is this many robust sigmas off (maxKsumSigma).")
    candidate_residual_std_max: float = opt(
        1.5, "Reject stamps whose normalised residual std exceeds this (candidateResidualStdMax)."
    )
    max_spatial_iterations: int = opt(3, "Rounds of spatial fit and stamp rejection (maxSpatialIterations).")
    max_condition_number: float = opt(5e7, "Eigenvalues below max / this are dropped (maxConditionNumber).")
    fft_planner: Literal["FFTW_ESTIMATE", "FFTW_MEASURE"] = opt(
        "FFTW_MEASURE",
        "FFTW planning effort for the image convolutions; measured plans are kept in the FFTW wisdom cache "
        "(apfast.diffim.fftw: $APFAST_CACHE_DIR or ~/.cache/apfast, APFAST_FFTW_WISDOM=0 disables it).",
        choices={
            "FFTW_ESTIMATE": "plan instantly by heuristics (no cache needed), ~2x slower FFTs on a 2k x 4k CCD",
            "FFTW_MEASURE": "time candidate plans once per image shape and machine (~10 s for 2k x 4k, saved as "
            "wisdom; later processes plan in milliseconds; `apfast warmup` does it ahead of a run)",
        },
    )
    basis: Literal["gaussian", "delta", "auto"] = opt(
        "auto",
        "Kernel basis (apfast.diffim.deltabasis).",
        choices={
            "gaussian": "Alard-Lupton: Gaussians times polynomials (Rubin's default)",
            "delta": "one free value per kernel pixel, regularised (Bramich 2008; Becker et al. 2012)",
            "auto": "gaussian, or delta when the Gaussian fit leaves structured residuals at the bright stars "
                    "and the delta fit predicts held-out stars better",
        },
    )
    delta_lambda: tuple[float, ...] = opt(
        (0.001, 0.01, 0.1),
        "Regularisation strength of the delta basis (relative to the data term); with several values, the one "
        "with the least chi^2 on held-out stamps (two-fold, judged on the spatially constant kernel) is taken.",
    )
    delta_noise_correction: bool = opt(
        True,
        "Remove the reference image's noise from the delta basis's normal equations (errors in variables: "
        "noisy stamps otherwise pull the kernel towards smoothing).",
    )
    delta_kernel_size: int = opt(
        21,
        "Delta basis: kernel side in pixels (odd), at most the Gaussian kernel's; its unknowns, (side^2) per "
        "spatial term, and its cost grow as side^2 to side^4.",
    )
    delta_stamp_fwhm_scaling: float = opt(
        3.0,
        "Delta basis: stamp half-size = max(ceil(this * larger FWHM), kernel half-size); its cost grows as the "
        "stamp's area.",
    )
    delta_min_peak_snr: float = opt(
        20.0,
        "Delta basis: use the kernel stamps whose reference peak pixel has at least this S/N (at least the "
        "brightest 20 of them): a faint stamp adds more reference noise than kernel signal.",
    )
    delta_max_stamps: int = opt(60, "Cap on stamps in a delta-basis fit (its cost grows with each stamp).")
    auto_core_chi2: float = opt(
        2.0,
        "basis=auto: try the delta basis when the median reduced chi^2 of the Gaussian fit within 2 FWHM of "
        "the kernel stars exceeds this.",
    )
    auto_min_gain: float = opt(
        0.1,
        "basis=auto: keep the delta solution only when it lowers that core chi^2 on held-out stamps by at "
        "least this fraction.",
    )
    max_stamps: int = opt(
        200,
        "Cap on stamps fitted (spread over the cells, first-ranked stars first); more costs time, not accuracy.",
    )
    min_stamps: int = opt(5, "Fewest stamps the spatial solution needs; fewer raises InsufficientKernelSourcesError.")

    def _validate(self) -> None:
        for name in ("kernel_size", "kernel_size_min", "kernel_size_max", "delta_kernel_size"):
            v = getattr(self, name)
            if v < 3 or v % 2 == 0:
                self._fail(name, v, "use an odd integer >= 3, e.g. 21")
        if self.kernel_size_min > self.kernel_size_max:
            self._fail("kernel_size_min", self.kernel_size_min, f"must be <= kernel_size_max ({self.kernel_size_max})")
        if not self.kernel_size_fwhm_scaling > 0:
            self._fail("kernel_size_fwhm_scaling", self.kernel_size_fwhm_scaling, "use a number > 0, e.g. 6.0")
        if len(self.alard_deg_gauss) == 0 or any(d < 0 or d > 6 for d in self.alard_deg_gauss):
            self._fail("alard_deg_gauss", self.alard_deg_gauss, "use 1+ degrees in 0..6, e.g. [4, 2, 2]")
        if len(self.alard_sig_gauss) != len(self.alard_deg_gauss) or any(s <= 0 for s in self.alard_sig_gauss):
            self._fail(
                "alard_sig_gauss", self.alard_sig_gauss,
                f"give one positive sigma per degree in alard_deg_gauss ({len(self.alard_deg_gauss)})",
            )
        for name in ("alard_gauss_beta",):
            if not getattr(self, name) > 1.0:
                self._fail(name, getattr(self, name), "use a number > 1, e.g. 2.0")
        for name in ("alard_min_sig", "alard_min_sig_deconv", "stamp_fwhm_scaling", "delta_stamp_fwhm_scaling",
                     "max_ksum_sigma",
                     "candidate_residual_std_max", "detect_threshold", "isolation_fwhm_scaling"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                self._fail(name, v, "use a finite number > 0")
        for name in ("spatial_kernel_order", "spatial_bg_order"):
            if not 0 <= getattr(self, name) <= 2:
                self._fail(name, getattr(self, name), "use 0, 1 or 2")
        if self.size_cell < 16:
            self._fail("size_cell", self.size_cell, "use an integer >= 16, e.g. 128")
        if self.n_star_per_cell < 1:
            self._fail("n_star_per_cell", self.n_star_per_cell, "use an integer >= 1, e.g. 3")
        if not (0 <= self.stamp_snr_min < self.stamp_snr_max):
            self._fail("stamp_snr_min", self.stamp_snr_min, f"must be >= 0 and < stamp_snr_max ({self.stamp_snr_max})")
        unknown = [p for p in self.bad_mask_planes if p not in MASK_BITS]
        if unknown:
            self._fail("bad_mask_planes", self.bad_mask_planes,
                       f"unknown plane(s) {unknown}; known planes are {', '.join(MASK_PLANES)}")
        if self.max_spatial_iterations < 1:
            self._fail("max_spatial_iterations", self.max_spatial_iterations, "use an integer >= 1, e.g. 3")
        if not self.max_condition_number > 1:
            self._fail("max_condition_number", self.max_condition_number, "use a number > 1, e.g. 5e7")
        if self.max_stamps < self.min_stamps:
            self._fail("max_stamps", self.max_stamps, f"must be >= min_stamps ({self.min_stamps})")
        if self.min_stamps < 1:
            self._fail("min_stamps", self.min_stamps, "use an integer >= 1, e.g. 5")
        if not self.delta_lambda or any(not (math.isfinite(v) and v >= 0) for v in self.delta_lambda):
            self._fail("delta_lambda", self.delta_lambda, "give one or more finite numbers >= 0, e.g. [0.01, 0.1]")
        if self.delta_max_stamps < self.min_stamps:
            self._fail("delta_max_stamps", self.delta_max_stamps, f"must be >= min_stamps ({self.min_stamps})")
        if not (math.isfinite(self.auto_core_chi2) and self.auto_core_chi2 > 0):
            self._fail("auto_core_chi2", self.auto_core_chi2, "use a finite number > 0, e.g. 2.0")
        if not 0 <= self.auto_min_gain < 1:
            self._fail("auto_min_gain", self.auto_min_gain, "use a number in [0, 1), e.g. 0.1")


class InsufficientKernelSourcesError(AlgorithmError):
    """Too few usable stamps to solve for the PSF-matching kernel (ip_diffim's error of the same name).

    Attributes ``n_sources`` and ``n_required`` (also in ``metadata``).
    """

    def __init__(self, msg: str, *, n_sources: int, n_required: int, **metadata: object) -> None:
        super().__init__(msg, n_sources=n_sources, n_required=n_required, **metadata)
        self.n_sources = n_sources
        self.n_required = n_required


def n_poly_terms(order: int) -> int:
    """Number of monomials of total degree <= ``order`` in two variables.

    Examples
    --------
    >>> [n_poly_terms(o) for o in range(3)]
    [1, 3, 6]
    """
    return (order + 1) * (order + 2) // 2


def _poly(xn: np.ndarray | float, yn: np.ndarray | float, order: int) -> np.ndarray:
    """Monomials (ordered as :func:`apfast.psf.poly_terms`) at arrays of positions -> ``(n, nterms)``."""
    xn = np.atleast_1d(np.asarray(xn, dtype=np.float64))
    yn = np.atleast_1d(np.asarray(yn, dtype=np.float64))
    cols = [xn ** (deg - j) * yn**j for deg in range(order + 1) for j in range(deg + 1)]
    return np.stack(cols, axis=-1)


# ---------------------------------------------------------------------------- basis
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class KernelBasis:
    """The Alard-Lupton basis of one solve.

    Attributes
    ----------
    sigmas : tuple of float
        Gaussian sigmas in pixels.
    degrees : tuple of int
        Polynomial degree per Gaussian.
    size : int
        Kernel side ``k`` (odd).
    row_filt, col_filt : ndarray (nr, k), (nc, k) float64
        Distinct separable 1-D factors (unit L2 norm each).
    pairs : ndarray (nb, 2) int64
        Row/column factor of each raw basis function.
    transform : ndarray (nb, nb) float64
        Raw -> zero-sum basis: ``B'_j = sum_i transform[i, j] B_i``.
    images : ndarray (nb, k, k) float64
        The zero-sum basis ``B'`` (the first sums to 1, the others to 0).
    """

    sigmas: tuple[float, ...]
    degrees: tuple[int, ...]
    size: int
    row_filt: np.ndarray
    col_filt: np.ndarray
    pairs: np.ndarray
    transform: np.ndarray
    images: np.ndarray

    @property
    def n_basis(self) -> int:
        """Number of basis functions."""
        return int(self.pairs.shape[0])


def basis_sigmas(fwhm_ref: float, fwhm_tgt: float, config: PsfMatchConfig) -> tuple[tuple[float, ...], int]:
    """Return the basis sigmas and kernel side for reference / target PSF FWHMs (pixels).

    Follows ip_diffim's ``scaleByFwhm`` rule (see the module docstring).

    Examples
    --------
    >>> s, k = basis_sigmas(3.0, 5.0, PsfMatchConfig())
    >>> [round(v, 3) for v in s], k
    ([0.849, 1.699, 3.397], 21)
    """
    n = len(config.alard_deg_gauss)
    if not config.scale_by_fwhm:
        return tuple(float(s) for s in config.alard_sig_gauss), config.kernel_size
    s_ref = fwhm_ref * SIGMA_PER_FWHM
    s_tgt = fwhm_tgt * SIGMA_PER_FWHM
    beta = config.alard_gauss_beta
    if s_tgt >= s_ref:
        s_k = max(math.sqrt(s_tgt**2 - s_ref**2), config.alard_min_sig)
        sig = [s_k / beta, s_k] if (s_k / beta > config.alard_min_sig and n > 1) else [s_k]
    else:
        # deconvolution: the kernel must sharpen; start from the smallest allowed width
        sig = [config.alard_min_sig_deconv]
    while len(sig) < n:
        sig.append(sig[-1] * beta)
    sig = sig[:n]
    size = int(config.kernel_size_fwhm_scaling * sig[-1])
    size += 0 if size % 2 else 1
    size = min(config.kernel_size_max, max(size, config.kernel_size_min))
    return tuple(float(s) for s in sig), size


def make_basis(sigmas: tuple[float, ...], degrees: tuple[int, ...], size: int) -> KernelBasis:
    """Build the separable Alard-Lupton basis and its zero-sum transform.

    Parameters
    ----------
    sigmas : tuple of float
        Gaussian sigmas (pixels).
    degrees : tuple of int
        Degree of the polynomial modulating each Gaussian.
    size : int
        Odd kernel side.

    Returns
    -------
    KernelBasis

    Examples
    --------
    >>> b = make_basis((1.0, 2.0, 4.0), (4, 2, 2), 21)
    >>> b.n_basis, b.images.shape, round(float(b.images[0].sum()), 12)
    (27, (27, 21, 21), 1.0)
    >>> round(float(abs(b.images[1:].sum(axis=(1, 2))).max()), 12)
    0.0
    """
    if size % 2 == 0 or size < 3:
        msg = f"kernel size must be odd and >= 3, got {size}; set difference.psfmatch.kernel_size_min/max to odd values"
        raise InputError(msg)
    r = size // 2
    u = np.arange(-r, r + 1, dtype=np.float64)
    rows: list[np.ndarray] = []
    row_key: dict[tuple[int, int], int] = {}
    pairs = []
    for gi, (sigma, deg) in enumerate(zip(sigmas, degrees, strict=True)):
        g = np.exp(-0.5 * (u / sigma) ** 2)
        for p in range(deg + 1):
            f = g * u**p
            row_key[(gi, p)] = len(rows)
            rows.append(f / np.sqrt(np.sum(f * f)))
        for total in range(deg + 1):
            for q in range(total + 1):
                p = total - q
                pairs.append((row_key[(gi, p)], row_key[(gi, q)]))
    filt = np.ascontiguousarray(np.array(rows))
    pairs_a = np.array(pairs, dtype=np.int64)
    raw = np.einsum("bv,bu->bvu", filt[pairs_a[:, 1]], filt[pairs_a[:, 0]])
    sums = raw.sum(axis=(1, 2))
    nb = raw.shape[0]
    transform = np.eye(nb)
    transform[0, 0] = 1.0 / sums[0]
    transform[0, 1:] = -sums[1:] / sums[0]
    images = np.einsum("ij,ivu->jvu", transform, raw)
    return KernelBasis(
        sigmas=tuple(float(s) for s in sigmas), degrees=tuple(int(d) for d in degrees), size=int(size),
        row_filt=filt, col_filt=filt, pairs=pairs_a, transform=transform, images=images,
    )


# ---------------------------------------------------------------------------- models
@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SpatialKernel:
    """A spatially varying convolution kernel ``K(x, y) = sum_t P_t(xn, yn) terms[t]``.

    Attributes
    ----------
    basis : ndarray (nb, k, k) float64
        Zero-sum basis images.
    coeffs : ndarray (nb, nt) float64
        Spatial polynomial coefficients of each basis coefficient.
    order : int
        Spatial order (``nt = (order+1)(order+2)/2``).
    x_center, y_center, x_scale, y_scale : float
        Position normalisation ``xn = (x - x_center) / x_scale``.
    """

    basis: np.ndarray
    coeffs: np.ndarray
    order: int
    x_center: float
    y_center: float
    x_scale: float
    y_scale: float

    @property
    def size(self) -> int:
        """Kernel side ``k``."""
        return int(self.basis.shape[1])

    def term_images(self) -> np.ndarray:
        """Return the ``(nt, k, k)`` float64 images ``K_t`` multiplying each monomial."""
        return np.einsum("it,ivu->tvu", self.coeffs, self.basis)

    def _terms(self, x: float, y: float) -> np.ndarray:
        return _poly((x - self.x_center) / self.x_scale, (y - self.y_center) / self.y_scale, self.order)[0]

    def evaluate(self, x: float, y: float) -> np.ndarray:
        """Return the float64 ``(k, k)`` kernel image at pixel ``(x, y)`` (not normalised)."""
        return np.tensordot(self.coeffs @ self._terms(x, y), self.basis, axes=1)

    def sum(self, x: float, y: float) -> float:
        """Kernel sum (photometric scaling) at ``(x, y)``: the first basis coefficient there."""
        return float(self.coeffs[0] @ self._terms(x, y))


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class BackgroundPolynomial:
    """Differential background ``b(x, y) = sum_u coeffs[u] P_u(xn, yn)`` (same normalisation as the kernel)."""

    coeffs: np.ndarray
    order: int
    x_center: float
    y_center: float
    x_scale: float
    y_scale: float

    def evaluate(self, x: Any, y: Any) -> np.ndarray:
        """Background at pixel positions (arrays broadcast together), float64."""
        x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        p = _poly(((x - self.x_center) / self.x_scale).ravel(), ((y - self.y_center) / self.y_scale).ravel(),
                  self.order)
        return (p @ self.coeffs).reshape(x.shape)

    def image(self, shape: tuple[int, int]) -> np.ndarray:
        """Background over a ``(ny, nx)`` image, float64."""
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
        return self.evaluate(xx, yy)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class KernelSolution:
    """Result of :func:`solve_kernel`.

    Attributes
    ----------
    kernel : SpatialKernel
    background : BackgroundPolynomial
    basis : KernelBasis
    stamp_x, stamp_y : ndarray int64
        Centres of the stamps used in the final spatial fit.
    n_candidates : int
        Stamps offered to the fit.
    kernel_sums : ndarray float64
        Per-stamp kernel sums of the single-stamp fits (for the used stamps).
    residual_std : ndarray float64
        Normalised residual std of each used stamp under the spatial model.
    candidate_x, candidate_y : ndarray (n_candidates,) int64
        Centres of every stamp offered to the fit (``stamp_x``/``stamp_y`` are the kept ones).
    candidate_status : ndarray (n_candidates,) int8
        What became of each candidate: one of :data:`STAMP_STATUS` (0 kept, 1 rejected by its own
        fit's residual, 2 kernel-sum outlier, 3 rejected by the spatial fit).
    candidate_kernel_sums : ndarray (n_candidates,) float64
        Kernel sum of each candidate's single-stamp fit.
    candidate_residual_std : ndarray (n_candidates,) float64
        Normalised residual std of each candidate under the final spatial model (of the kept
        ones, ``residual_std``).
    """

    kernel: SpatialKernel
    background: BackgroundPolynomial
    basis: KernelBasis
    stamp_x: np.ndarray
    stamp_y: np.ndarray
    n_candidates: int
    kernel_sums: np.ndarray
    residual_std: np.ndarray
    candidate_x: np.ndarray
    candidate_y: np.ndarray
    candidate_status: np.ndarray
    candidate_kernel_sums: np.ndarray
    candidate_residual_std: np.ndarray


# ---------------------------------------------------------------------------- stamps
_REJECT_COLUMNS = (
    "centroid_flag", "psfFlux_flag", "is_negative", "pixelFlags_saturated", "pixelFlags_bad",
    "pixelFlags_edge", "pixelFlags_cr", "pixelFlags_interpolated", "pixelFlags_suspect",
)


def _catalogue_arrays(sources: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return x, y, snr, ok from a catalogue-like object (Table, MeasurementResult, dict of arrays)."""
    try:
        x = np.asarray(sources["x"], dtype=np.float64)
        y = np.asarray(sources["y"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"the kernel-source catalogue needs 'x' and 'y' columns ({exc}); pass the science src table or None"
        raise InputError(msg) from None
    if hasattr(sources, "names"):  # MeasurementResult
        names = set(sources.names)
    elif hasattr(sources, "colnames"):  # astropy Table
        names = set(sources.colnames)
    elif getattr(getattr(sources, "dtype", None), "names", None):  # numpy structured array
        names = set(sources.dtype.names)
    else:  # mapping of arrays
        names = set(sources.keys())
    if "snr" in names:
        snr = np.asarray(sources["snr"], dtype=np.float64)
    elif "psfFlux" in names and "psfFluxErr" in names:
        snr = np.asarray(sources["psfFlux"], dtype=np.float64) / np.asarray(sources["psfFluxErr"], dtype=np.float64)
    else:
        snr = np.full(x.shape, np.inf)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(snr)
    for col in _REJECT_COLUMNS:
        if col in names:
            ok &= ~np.asarray(sources[col], dtype=bool)
    if "flags" in names:
        ok &= np.asarray(sources["flags"]) == 0
    return x, y, snr, ok


def effective_cell_size(nx: int, ny: int, config: PsfMatchConfig) -> int:
    """Side (pixels) of the stamp cells on an ``nx`` x ``ny`` image: ``size_cell``, smaller on small images.

    The cells must be able to hold ``2 * min_stamps`` stars at ``n_star_per_cell``
    each, or an image under ~128 px (one cell of 3 stars) could never reach the
    ``min_stamps`` (5) the spatial fit needs. The side shrinks to
    ``sqrt(nx * ny * n_star_per_cell / (2 * min_stamps))`` when that is smaller, but not
    below 16 px. Full CCDs keep ``size_cell``.

    Examples
    --------
    >>> cfg = PsfMatchConfig()
    >>> effective_cell_size(2048, 4096, cfg), effective_cell_size(256, 256, cfg), effective_cell_size(100, 100, cfg)
    (128, 128, 54)
    """
    need = 2 * config.min_stamps
    fit = int(math.sqrt(nx * ny * config.n_star_per_cell / need))
    return max(min(config.size_cell, fit), 16)


def select_stamps(
    x: np.ndarray, y: np.ndarray, snr: np.ndarray, ok: np.ndarray, bad: np.ndarray, *, half: int, r: int,
    isolation: float, config: PsfMatchConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose stamp centres: usable, isolated stars, the brightest ``n_star_per_cell`` per cell.

    Parameters
    ----------
    x, y, snr, ok : ndarray (n,)
        Positions, S/N and a usable flag of every catalogue source (all are used for isolation).
    bad : ndarray (ny, nx) bool
        Pixels that disqualify a stamp (bad planes in either image).
    half, r : int
        Stamp half-size and kernel half-size.
    isolation : float
        A star with another source closer than this (pixels) is not used.
    config : PsfMatchConfig

    Returns
    -------
    cx, cy : ndarray int64
        Stamp centre pixels.
    """
    ny, nx = bad.shape
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    m = half + r
    use = ok & (snr >= config.stamp_snr_min) & (snr <= config.stamp_snr_max)
    use &= (ix >= m) & (ix < nx - m) & (iy >= m) & (iy < ny - m)
    # isolation: no other catalogue source within `isolation` pixels (other sources in the stamp are
    # fine: they are in both images and the kernel models them too)
    if x.size > 1:
        order = np.argsort(x)
        xs = x[order]
        for i in np.nonzero(use)[0]:
            lo = np.searchsorted(xs, x[i] - isolation)
            hi = np.searchsorted(xs, x[i] + isolation)
            near = order[lo:hi]
            if np.count_nonzero((x[near] - x[i]) ** 2 + (y[near] - y[i]) ** 2 < isolation**2) > 1:
                use[i] = False
    # no bad pixel in the window the fit touches (stamp plus kernel margin)
    # (a direct window test per candidate: a summed-area table of the whole CCD cost 0.17 s per call)
    for i in np.nonzero(use)[0]:
        if bad[iy[i] - m : iy[i] + m + 1, ix[i] - m : ix[i] + m + 1].any():
            use[i] = False
    idx = np.nonzero(use)[0]
    size_cell = effective_cell_size(nx, ny, config)
    cell = (iy[idx] // size_cell) * (nx // size_cell + 1) + ix[idx] // size_cell
    order = np.lexsort((-snr[idx], cell))
    idx, cell = idx[order], cell[order]
    first = np.r_[0, np.nonzero(np.diff(cell))[0] + 1]
    rank = np.arange(idx.size) - np.repeat(first, np.diff(np.r_[first, idx.size]))
    sel = rank < config.n_star_per_cell
    idx, rank, cell = idx[sel], rank[sel], cell[sel]
    if idx.size > config.max_stamps:
        # take whole ranks (brightest per cell first); thin the last rank evenly over the cells
        chosen: list[np.ndarray] = []
        for rk in range(config.n_star_per_cell):
            this = idx[rank == rk]  # ordered by cell
            room = config.max_stamps - sum(c.size for c in chosen)
            if this.size > room:
                this = this[np.linspace(0, this.size - 1, room).astype(np.int64)] if room > 0 else this[:0]
            chosen.append(this)
        idx = np.concatenate(chosen)
    return ix[idx], iy[idx]


# ---------------------------------------------------------------------------- solving
def _solve_eig(m: np.ndarray, b: np.ndarray, max_cond: float) -> np.ndarray:
    """Solve one ``(n, n)`` or a batch ``(ns, n, n)`` of symmetric systems, dropping eigenvalues < max / max_cond."""
    single = m.ndim == 2
    mm = np.ascontiguousarray(m[None] if single else m, dtype=np.float64)
    bb = np.ascontiguousarray(b[None] if single else b, dtype=np.float64)
    out = np.empty(bb.shape)
    solve_symmetric_batch(mm, bb, float(max_cond), out)
    return out[0] if single else out


def _robust_sigma(v: np.ndarray) -> tuple[float, float]:
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return float(med), float(0.7413 * (q75 - q25))


def solve_kernel(
    ref: np.ndarray, var_ref: np.ndarray, tgt: np.ndarray, var_tgt: np.ndarray, bad: np.ndarray,
    cx: np.ndarray, cy: np.ndarray, *, basis: KernelBasis, half: int, config: PsfMatchConfig,
) -> KernelSolution:
    """Fit the spatial Alard-Lupton kernel and background from stamps (module docstring, steps 3-4).

    Parameters
    ----------
    ref, var_ref : ndarray (ny, nx) float32
        Image to convolve and its variance.
    tgt, var_tgt : ndarray (ny, nx) float32
        Image to match and its variance.
    bad : ndarray (ny, nx) bool
        Pixels given zero weight.
    cx, cy : ndarray int64
        Stamp centres from :func:`select_stamps`.
    basis : KernelBasis
    half : int
        Stamp half-size.
    config : PsfMatchConfig

    Returns
    -------
    KernelSolution

    Raises
    ------
    InsufficientKernelSourcesError
        If fewer than ``config.min_stamps`` stamps survive.
    """
    ny, nx = ref.shape
    nb = basis.n_basis
    with_bg = config.fit_for_background
    nu = nb + int(with_bg)
    ns = cx.size
    n_candidates = ns
    _require(ns, config, "usable kernel stars")
    wgt = np.where(bad | ~(var_tgt > 0), 0.0, 1.0 / np.where(var_tgt > 0, var_tgt, 1.0)).astype(np.float32)
    m_raw = np.zeros((ns, nu, nu))
    b_raw = np.zeros((ns, nu))
    sws = np.zeros(ns)
    wvr = np.zeros(ns)
    npix = np.zeros(ns, dtype=np.int64)
    stamp_normal_equations(ref, tgt, wgt, var_ref, cx.astype(np.int64), cy.astype(np.int64), int(half),
                           basis.row_filt, basis.col_filt, basis.pairs, with_bg, m_raw, b_raw, sws, wvr, npix)
    tr = np.eye(nu)
    tr[:nb, :nb] = basis.transform
    m = tr.T @ m_raw @ tr
    b = b_raw @ tr
    gram = np.einsum("ivu,jvu->ij", basis.images, basis.images)

    def resid_std(c: np.ndarray, sel: np.ndarray) -> np.ndarray:
        chi2 = (sws[sel] - 2 * np.einsum("si,si->s", c, b[sel])
                + np.einsum("si,si->s", (m[sel] @ c[:, :, None])[:, :, 0], c))
        ksq = np.einsum("si,si->s", c[:, :nb] @ gram, c[:, :nb])
        return np.sqrt(np.maximum(chi2, 0.0) / (npix[sel] + ksq * wvr[sel]))

    # single-stamp solutions, kernel-sum and residual clipping
    c_single = _solve_eig(m, b, config.max_condition_number)
    ksum = c_single[:, 0]
    keep = np.ones(ns, dtype=bool)
    keep &= resid_std(c_single, np.arange(ns)) <= config.candidate_residual_std_max
    status = np.where(keep, 0, 1).astype(np.int8)  # STAMP_STATUS codes
    for _ in range(5):
        if keep.sum() < 3:
            break
        med, sig = _robust_sigma(ksum[keep])
        new = keep & (np.abs(ksum - med) <= config.max_ksum_sigma * max(sig, 1e-12 * abs(med)))
        if new.sum() == keep.sum():
            break
        status[keep & ~new] = 2
        keep = new
    _require(int(keep.sum()), config, "stamps after kernel-sum and residual clipping", n_candidates=ns)

    xc, yc, xsc, ysc = (nx - 1) / 2.0, (ny - 1) / 2.0, nx / 2.0, ny / 2.0
    kord = config.spatial_kernel_order
    bord = config.spatial_bg_order if with_bg else 0
    # a spatial polynomial needs about two stamps per term, or it fits the stamps' noise (a cutout with
    # 4 kernel stars cannot tell a tilt from a bad stamp): lower the orders the stamps cannot carry,
    # as the PSF determiner does
    n_keep = int(keep.sum())
    while kord > 0 and n_keep < 2 * n_poly_terms(kord):
        kord -= 1
    while bord > 0 and n_keep < 2 * n_poly_terms(bord):
        bord -= 1
    if (kord, bord) != (config.spatial_kernel_order, config.spatial_bg_order if with_bg else 0):
        logger.info("%d kernel stamps: spatial kernel order %d, background order %d (configured %d, %d)",
                    n_keep, kord, bord, config.spatial_kernel_order, config.spatial_bg_order)
    nk, nbg = n_poly_terms(kord), n_poly_terms(bord) if with_bg else 0
    pk = _poly((cx - xc) / xsc, (cy - yc) / ysc, kord)  # (ns, nk)
    pb = _poly((cx - xc) / xsc, (cy - yc) / ysc, bord)
    ntot = nb * nk + nbg
    lmat = np.zeros((ns, nu, ntot))
    for i in range(nb):
        lmat[:, i, i * nk : (i + 1) * nk] = pk
    if with_bg:
        lmat[:, nb, nb * nk :] = pb
    theta = np.zeros(ntot)
    rstd = np.zeros(ns)
    for _ in range(config.max_spatial_iterations):
        sel = np.nonzero(keep)[0]
        lt = np.swapaxes(lmat[sel], 1, 2)
        big_n = (lt @ m[sel] @ lmat[sel]).sum(axis=0)
        big_b = (lt @ b[sel][:, :, None]).sum(axis=0)[:, 0]
        theta = _solve_eig(big_n, big_b, config.max_condition_number)
        c_sp = lmat @ theta
        rstd = resid_std(c_sp, np.arange(ns))
        new = keep & (rstd <= config.candidate_residual_std_max)
        if new.sum() == keep.sum():
            break
        _require(int(new.sum()), config, "stamps after spatial-fit rejection", n_candidates=ns)
        status[keep & ~new] = 3
        keep = new
    sel = np.nonzero(keep)[0]
    coeffs = theta[: nb * nk].reshape(nb, nk)
    bg = theta[nb * nk :] if with_bg else np.zeros(1)
    kernel = SpatialKernel(basis=basis.images, coeffs=coeffs, order=kord, x_center=xc, y_center=yc,
                           x_scale=xsc, y_scale=ysc)
    background = BackgroundPolynomial(coeffs=bg, order=bord, x_center=xc, y_center=yc, x_scale=xsc, y_scale=ysc)
    logger.debug("kernel solved from %d of %d stamps; kernel sum at centre %.5f", sel.size, ns, kernel.sum(xc, yc))
    return KernelSolution(kernel=kernel, background=background, basis=basis, stamp_x=cx[sel], stamp_y=cy[sel],
                          n_candidates=n_candidates, kernel_sums=ksum[sel], residual_std=rstd[sel],
                          candidate_x=np.asarray(cx, dtype=np.int64), candidate_y=np.asarray(cy, dtype=np.int64),
                          candidate_status=status, candidate_kernel_sums=ksum, candidate_residual_std=rstd)


def _require(n: int, config: PsfMatchConfig, what: str, **meta: object) -> None:
    if n < config.min_stamps:
        p = config._key_prefix or "diffim."
        msg = (
            f"only {n} {what} for the PSF-matching kernel, {config.min_stamps} needed; check the images overlap "
            f"and have stars, take more stars per area with {p}n_star_per_cell (now {config.n_star_per_cell}) "
            f"or a smaller {p}size_cell ({config.size_cell}), or relax {p}stamp_snr_min ({config.stamp_snr_min}), "
            f"{p}candidate_residual_std_max ({config.candidate_residual_std_max}), "
            f"{p}max_ksum_sigma ({config.max_ksum_sigma}) or {p}min_stamps"
        )
        raise InsufficientKernelSourcesError(msg, n_sources=n, n_required=config.min_stamps, **meta)
