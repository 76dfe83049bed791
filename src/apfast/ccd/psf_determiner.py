"""PSF determination: star selection and a spatially varying PCA pixel model.

Rubin's ``objectSizeStarSelector`` + ``pcaPsfDeterminer`` in spirit
(as in Rubin's ap_pipe), built for speed:

1. **Star selection.** Candidates are clean, bright (S/N above ``min_snr``),
   isolated sources. Stars share one size ``sqrt((Ixx + Iyy) / 2)`` while galaxies
   are larger: the stellar locus is found as the densest narrow size bin and refined
   by ``n_sigma_clip`` clipping, with an absolute floor ``width_std_allowed``.
   At most ``n_star_per_cell`` of the brightest stars per ``cell_size`` cell are kept,
   so the model sees the whole CCD rather than one crowded corner.
2. **Stamps.** Each star is cut out centred exactly on its centroid by quintic
   B-spline interpolation of a local cutout (more accurate than Lanczos-3 here) and
   normalised to unit flux in the stamp.
3. **PCA.** The mean stamp plus the first ``n_eigen`` principal components of the
   residual stamps form the basis; each star's component amplitudes are fitted with
   a polynomial of total degree ``spatial_order`` in position, with
   ``spatial_reject``-sigma clipping. Stars whose stamps disagree with the model
   (chi^2 outliers) are dropped and the fit repeated ``n_iter`` times.

The result is an :class:`apfast.psf.PolynomialPixelPsf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from apfast._configbase import ConfigSection, opt
from apfast._constants import MAD_TO_SIGMA
from apfast.errors import AlgorithmError
from apfast.kernels.stamps import extract_stamps_lanczos3
from apfast.psf import PolynomialPixelPsf, PsfModel, poly_terms

__all__ = [
    "NoPsfStarsError",
    "PsfDeterminerConfig",
    "PsfResult",
    "determine_psf",
    "halfmax_fwhm",
    "seeing_fwhm",
    "select_stars",
    "stellar_locus_size",
]


class NoPsfStarsError(AlgorithmError):
    """Too few usable PSF stars (counts in ``metadata``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PsfDeterminerConfig(ConfigSection):
    """Star selection and PCA PSF model (``characterize.psf``)."""

    _key_prefix: ClassVar[str] = "characterize.psf."

    min_snr: float = opt(50.0, "Lowest S/N of a PSF star candidate.")
    max_width: float = opt(10.0, "Largest star size sqrt((Ixx+Iyy)/2) in pixels.")
    width_std_allowed: float = opt(0.15, "Smallest half-width (pixels) of the stellar locus in size.")
    n_sigma_clip: float = opt(2.0, "Clipping of the stellar locus in robust sigma.")
    isolation_factor: float = opt(0.05, "A neighbour within the stamp brighter than this fraction rejects a star.")
    n_eigen: int = opt(4, "Principal components beyond the mean stamp.")
    spatial_order: int = opt(2, "Polynomial degree of the spatial variation.")
    kernel_size_factor: float = opt(10.0, "Stamp size in units of the star size.")
    kernel_size_min: int = opt(25, "Smallest stamp size (pixels, odd).")
    kernel_size_max: int = opt(45, "Largest stamp size (pixels, odd).")
    cell_size: int = opt(256, "Cell size (pixels) for spreading stars over the CCD.")
    n_star_per_cell: int = opt(3, "Brightest stars kept per cell.")
    n_iter: int = opt(3, "Fit / reject iterations.")
    spatial_reject: float = opt(3.0, "Rejection threshold (sigma) of star outliers.")
    min_stars: int = opt(6, "Fewest PSF stars accepted.")

    def _validate(self) -> None:
        checks = [
            ("min_snr", self.min_snr > 0, "> 0"),
            ("max_width", self.max_width > 0, "> 0"),
            ("n_eigen", 0 <= self.n_eigen <= 10, "0..10"),
            ("spatial_order", 0 <= self.spatial_order <= 4, "0..4"),
            ("kernel_size_min", self.kernel_size_min >= 5 and self.kernel_size_min % 2 == 1, "odd >= 5"),
            ("kernel_size_max", self.kernel_size_max >= self.kernel_size_min and self.kernel_size_max % 2 == 1,
             "odd >= kernel_size_min"),
            ("cell_size", self.cell_size >= 16, ">= 16"),
            ("n_star_per_cell", self.n_star_per_cell >= 1, ">= 1"),
            ("n_iter", self.n_iter >= 1, ">= 1"),
            ("min_stars", self.min_stars >= 2, ">= 2"),
        ]
        self._check_ranges(checks)


@dataclass(frozen=True, slots=True)
class PsfResult:
    """The PSF model and which sources built it."""

    psf: PsfModel
    star_index: np.ndarray  # indices into the input catalogue of the stars used
    candidate_index: np.ndarray  # indices of all star candidates (stellar locus)
    size: float  # stellar-locus size sqrt((Ixx+Iyy)/2), pixels
    fwhm_center: float  # half-maximum FWHM of the (pixelized) model at the image centre, pixels
    n_stars: int
    seeing: float = math.nan  # seeing FWHM of the PSF stars (pixel-integrated Moffat), pixels


def halfmax_fwhm(stamp: np.ndarray, *, upsample: int = 9) -> float:
    """FWHM (pixels) from the area above half maximum: ``2 sqrt(A / pi)``.

    The stamp is resampled on a grid ``upsample`` times finer (odd, so the original
    pixel centres are on it and the peak is sampled exactly) by cubic-spline
    interpolation before counting; accurate to about 1% for FWHM >= 2.5 px. For an
    elliptical PSF it is the geometric mean of the two FWHMs.
    """
    s = np.asarray(stamp, dtype=np.float64)
    if not np.isfinite(s).all() or s.max() <= 0:
        msg = "PSF stamp has no positive peak, so its FWHM is undefined"
        raise AlgorithmError(msg)
    f = upsample if upsample % 2 == 1 else upsample + 1
    ny, nx = s.shape
    fy = np.arange(ny * f) / f - (f - 1) / (2 * f)
    fx = np.arange(nx * f) / f - (f - 1) / (2 * f)
    gy, gx = np.meshgrid(fy, fx, indexing="ij")
    fine = ndimage.map_coordinates(s, [gy.ravel(), gx.ravel()], order=3, mode="nearest")
    area = np.count_nonzero(fine >= 0.5 * s.max()) / f**2
    return float(2.0 * math.sqrt(area / math.pi))


#: Moffat index of a PSF from Kolmogorov turbulence (Trujillo et al. 2001, MNRAS 328, 977).
KOLMOGOROV_BETA = 4.765


def seeing_fwhm(stamp: np.ndarray, *, beta: float = KOLMOGOROV_BETA, oversample: int = 7) -> float:
    """Seeing FWHM (pixels): the continuous FWHM of a pixel-integrated Moffat fitted to a star stamp.

    The model ``F (beta - 1) / (pi a^2) (1 + r^2 / a^2)^-beta + b`` is integrated over each
    pixel (``oversample`` x ``oversample`` sub-samples) and fitted by least squares
    (amplitude, centre, width and a constant free; ``beta`` fixed at the Kolmogorov value);
    FWHM ``= 2 a sqrt(2^(1/beta) - 1)``. Unlike the half-maximum width of a pixelized
    profile (:func:`halfmax_fwhm`) this removes the pixel response, so it stays meaningful
    for undersampled images (ZTF's 1 arcsec pixels) and compares with survey SEEING keywords.
    Fit the stars' own pixels: any resampling of an undersampled star broadens it.
    """
    from scipy.optimize import least_squares

    s = np.asarray(stamp, dtype=np.float64)
    ky, kx = s.shape
    yy, xx = np.mgrid[0:ky, 0:kx].astype(np.float64)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    dy, dx = (m.ravel() for m in np.meshgrid(sub, sub, indexing="ij"))
    iy, ix = np.unravel_index(np.argmax(s), s.shape)

    def model(p: np.ndarray) -> np.ndarray:
        f, x0, y0, a, b = p
        r2 = (xx[..., None] + dx - x0) ** 2 + (yy[..., None] + dy - y0) ** 2
        prof = (1.0 + r2 / (a * a)) ** (-beta)
        return f * (beta - 1.0) / (math.pi * a * a) * prof.mean(axis=-1) + b

    a0 = 1.5
    fit = least_squares(lambda p: (model(p) - s).ravel(), [max(s.sum(), 1e-9), ix, iy, a0, 0.0],
                        bounds=([0, ix - 1.5, iy - 1.5, 0.05, -np.inf], [np.inf, ix + 1.5, iy + 1.5, kx, np.inf]))
    return float(2.0 * abs(fit.x[3]) * math.sqrt(2 ** (1 / beta) - 1))


def _seeing(psf: PsfModel, image: np.ndarray, xs: np.ndarray, ys: np.ndarray, snr: np.ndarray, size: float,
            xc: float, yc: float) -> float:
    """Seeing FWHM: from the model at the centre when well sampled, from the stars' own pixels when not.

    Shifting undersampled stars to a common centre (as the model's stamps are) broadens
    them, so below ``size`` 1 px the stars are fitted directly; above, one fit of the
    model is as good and ~30 times cheaper.
    """
    if size < 1.0:
        return _seeing_from_stars(image, xs, ys, snr, size)
    stamp = psf.compute_image(xc, yc)
    h = min(stamp.shape[0] // 2, max(4, int(math.ceil(3 * size))))
    c = stamp.shape[0] // 2
    return seeing_fwhm(stamp[c - h : c + h + 1, c - h : c + h + 1], oversample=3 if size < 1.6 else 1)


def _seeing_from_stars(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, snr: np.ndarray, size: float,
                       n_max: int = 30) -> float:
    """Median :func:`seeing_fwhm` of the ``n_max`` highest-S/N PSF stars, on their own pixels."""
    h = max(4, int(math.ceil(3 * size)))
    # pixel integration matters only for narrow PSFs; sub-sampling costs oversample^2
    oversample = 7 if size < 1.0 else (3 if size < 1.6 else 1)
    out = []
    for i in np.argsort(-snr)[:n_max]:
        ix, iy = int(round(xs[i])), int(round(ys[i]))
        cut = image[iy - h : iy + h + 1, ix - h : ix + h + 1]
        if cut.shape == (2 * h + 1, 2 * h + 1) and np.all(np.isfinite(cut)):
            out.append(seeing_fwhm(cut, oversample=oversample))
    return float(np.median(out)) if out else math.nan


def _stamp_size(size: float, cfg: PsfDeterminerConfig) -> int:
    k = int(round(cfg.kernel_size_factor * size))
    k = min(max(k, cfg.kernel_size_min), cfg.kernel_size_max)
    return k if k % 2 == 1 else k + 1


def _locus(s: np.ndarray, config: PsfDeterminerConfig) -> tuple[float, float]:
    """Centre and half-width of the stellar locus in the sizes ``s`` (stars share one size).

    The densest narrow size bin seeds it (galaxies spread to larger sizes, the
    rare cosmic ray to smaller); ``n_sigma_clip`` clipping about the median refines
    it, with an absolute floor ``width_std_allowed``.
    """
    lo, hi = np.percentile(s, [1, 99])
    bw = max(0.05, config.width_std_allowed / 2)
    edges = np.arange(lo - bw, hi + 2 * bw, bw)
    hist, edges = np.histogram(s, bins=edges)
    smooth = np.convolve(hist, [1, 2, 1], mode="same")
    centre = 0.5 * (edges[np.argmax(smooth)] + edges[np.argmax(smooth) + 1])
    width = 3 * config.width_std_allowed
    for _ in range(5):
        near = np.abs(s - centre) < width
        if near.sum() < 3:
            break
        centre = float(np.median(s[near]))
        mad = MAD_TO_SIGMA * float(np.median(np.abs(s[near] - centre)))
        width = max(config.n_sigma_clip * mad, config.width_std_allowed / 2, 0.02 * centre)
    return float(centre), float(width)


def stellar_locus_size(snr: np.ndarray, size: np.ndarray, usable: np.ndarray, *,
                       config: PsfDeterminerConfig | None = None) -> float:
    """The stars' size ``sqrt((Ixx+Iyy)/2)`` (pixels) among clean bright sources; NaN if fewer than 3.

    Used to estimate the PSF width before a PSF model exists (e.g. for cosmic-ray
    rejection on an undersampled image).
    """
    cfg = config or PsfDeterminerConfig()
    ok = usable & np.isfinite(size) & (size > 0.3) & (size < cfg.max_width) & (snr > cfg.min_snr)
    if ok.sum() < 3:
        return math.nan
    return _locus(size[ok], cfg)[0]


def select_stars(
    x: np.ndarray, y: np.ndarray, flux: np.ndarray, snr: np.ndarray, size: np.ndarray, usable: np.ndarray,
    *, shape: tuple[int, int], config: PsfDeterminerConfig,
) -> tuple[np.ndarray, float]:
    """Indices of PSF star candidates on the stellar locus, and the locus size (pixels).

    Raises
    ------
    NoPsfStarsError
        If fewer than ``min_stars`` candidates remain; the message gives the counts after
        each cut and the config keys to change.
    """
    n0 = len(x)
    ok = usable & np.isfinite(x) & np.isfinite(y) & np.isfinite(size) & np.isfinite(flux) & (flux > 0)
    # a pixelated PSF has moments of at least 1/12 px^2: size >= 0.29 px
    ok &= (size > 0.3) & (size < config.max_width)
    n1 = int(ok.sum())
    bright = ok & (snr > config.min_snr)
    n2 = int(bright.sum())
    if n2 < config.min_stars:
        msg = (
            f"only {n2} bright clean source(s) for the PSF ({n0} detected, {n1} clean, {n2} with S/N > "
            f"{config.min_snr}); lower characterize.psf.min_snr or check the detection and masks"
        )
        raise NoPsfStarsError(msg, n_detected=n0, n_clean=n1, n_bright=n2)
    s = size[bright]
    centre, width = _locus(s, config)
    idx = np.flatnonzero(bright)[np.abs(s - centre) < width]
    # isolation: no neighbour within the stamp brighter than isolation_factor * the star
    k = _stamp_size(centre, config)
    allpts = np.column_stack([x[np.isfinite(x) & np.isfinite(y)], y[np.isfinite(x) & np.isfinite(y)]])
    allflux = np.nan_to_num(flux[np.isfinite(x) & np.isfinite(y)])
    tree = cKDTree(allpts)
    keep = []
    for i in idx:
        neigh = tree.query_ball_point([x[i], y[i]], k / 2 * math.sqrt(2))
        if all(
            allflux[j] < config.isolation_factor * flux[i] or (allpts[j, 0] == x[i] and allpts[j, 1] == y[i])
            for j in neigh
        ):
            keep.append(i)
    idx = np.array(keep, dtype=np.int64)
    # inside the image with the stamp and interpolation margin
    h = k // 2 + 4
    inside = (x[idx] >= h) & (x[idx] < shape[1] - h) & (y[idx] >= h) & (y[idx] < shape[0] - h)
    idx = idx[inside]
    if len(idx) < config.min_stars:
        msg = (
            f"only {len(idx)} isolated star(s) on the stellar locus (size {centre:.2f} px) from {n2} bright "
            "sources; lower characterize.psf.min_snr or min_stars, or raise isolation_factor"
        )
        raise NoPsfStarsError(msg, n_detected=n0, n_bright=n2, n_stars=len(idx))
    # spread over the CCD: the brightest n_star_per_cell per cell
    cells = (y[idx] // config.cell_size).astype(np.int64) * 100000 + (x[idx] // config.cell_size).astype(np.int64)
    order = np.lexsort((-flux[idx], cells))
    chosen, last, count = [], None, 0
    for j in order:
        if cells[j] != last:
            last, count = cells[j], 0
        if count < config.n_star_per_cell:
            chosen.append(idx[j])
            count += 1
    return np.sort(np.array(chosen, dtype=np.int64)), centre


def _extract_stamps_spline(image: np.ndarray, bad: np.ndarray, xs: np.ndarray, ys: np.ndarray, half: int,
                           out: np.ndarray, flags: np.ndarray) -> None:
    """Stamps centred on sub-pixel positions by quintic-spline interpolation of a local cutout.

    Lanczos-3 (:func:`~apfast.kernels.stamps.extract_stamps_lanczos3`) shifts a sampled
    Gaussian of sigma 2 px by ~0.013 px and smooths its core by ~0.3%; a PSF model is
    built from such stamps, so it uses the much more accurate quintic B-spline (4e-5).
    Flags as the kernel: bit 0 off the image, bit 1 a masked pixel within the cutout.
    """
    pad = 6
    ny, nx = image.shape
    grid = np.arange(-half, half + 1, dtype=np.float64)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        ix, iy = int(math.floor(x)), int(math.floor(y))
        y0, y1, x0, x1 = iy - half - pad, iy + half + pad + 2, ix - half - pad, ix + half + pad + 2
        if y0 < 0 or x0 < 0 or y1 > ny or x1 > nx:
            flags[i] = 1
            out[i] = np.nan
            continue
        flags[i] = 2 if bad[y0 + pad - 1 : y1 - pad + 1, x0 + pad - 1 : x1 - pad + 1].any() else 0
        cut = image[y0:y1, x0:x1].astype(np.float64)
        gy, gx = np.meshgrid(grid + (y - y0), grid + (x - x0), indexing="ij")
        out[i] = ndimage.map_coordinates(cut, [gy, gx], order=5, mode="nearest")


def _principal_axes(a: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` right singular vectors of ``a`` (rows of the result), as ``svd(a)[2][:n]`` up to sign.

    Taken from the eigenvectors of the smaller Gram matrix (``a a^T`` or ``a^T a``)
    instead of ``np.linalg.svd``: OpenBLAS's threaded SVD of a 300 x 1681 stamp
    matrix took 0.4-2.2 s with 2 threads on a shared 2-core machine (0.05 s with
    one), twelve times per ``apfast subtract`` of a 2k x 4k pair; the Gram matrix
    and its ``eigh`` take 0.01-0.04 s either way. Squaring the singular values costs
    precision only in the weakest components, whose amplitudes are noise anyway.

    Parameters
    ----------
    a : ndarray (m, p) float64
    n : int
        Number of axes, ``n <= min(m, p)``.

    Returns
    -------
    ndarray (n, p) float64
        Orthonormal rows in order of decreasing singular value; a row is zero where
        ``a`` has no variance left along any new direction (singular value 0).
    """
    m, p = a.shape
    if m < p:
        _, u = np.linalg.eigh(a @ a.T)
        u = u[:, ::-1][:, :n]
        v = (a.T @ u).T
        norm = np.linalg.norm(v, axis=1)
        tiny = norm <= 1e-12 * max(float(norm.max(initial=0.0)), 1e-300)
        return np.where(tiny[:, None], 0.0, v / np.where(tiny, 1.0, norm)[:, None])
    _, v = np.linalg.eigh(a.T @ a)
    return np.ascontiguousarray(v[:, ::-1][:, :n].T)


def _fit_model(stamps: np.ndarray, weights: np.ndarray, xn: np.ndarray, yn: np.ndarray, n_eigen: int,
               order: int, reject: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean + PCA basis and per-component spatial polynomials; returns (basis, coeffs)."""
    n, k, _ = stamps.shape
    flat = stamps.reshape(n, k * k)
    w = weights / weights.sum()
    mean = (w[:, None] * flat).sum(0)
    resid = flat - mean
    n_eig = min(n_eigen, max(n - 1, 0))
    terms = np.array([poly_terms(a, b, order) for a, b in zip(xn, yn, strict=True)])
    nterm = terms.shape[1]
    basis = [mean.reshape(k, k)]
    coeffs = [np.eye(1, nterm)[0]]
    if n_eig > 0:
        sw = np.sqrt(w)[:, None]
        vt = _principal_axes(resid * sw, n_eig)
        for b in range(n_eig):
            e = vt[b]
            amp = resid @ e
            use = np.ones(n, bool)
            c = np.zeros(nterm)
            for _ in range(3):
                if use.sum() < nterm + 1:
                    break
                c, *_ = np.linalg.lstsq(terms[use] * np.sqrt(w[use])[:, None], amp[use] * np.sqrt(w[use]), rcond=None)
                r = amp - terms @ c
                sig = MAD_TO_SIGMA * np.median(np.abs(r[use])) + 1e-12
                new = np.abs(r) < reject * sig
                if np.array_equal(new, use):
                    break
                use = new
            basis.append(e.reshape(k, k))
            coeffs.append(c)
    return np.array(basis), np.array(coeffs)


def determine_psf(
    image: np.ndarray, variance: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
    snr: np.ndarray, size: np.ndarray, usable: np.ndarray, *, config: PsfDeterminerConfig | None = None,
) -> PsfResult:
    """Select PSF stars and fit a :class:`~apfast.psf.PolynomialPixelPsf`.

    Parameters
    ----------
    image, variance : ndarray (ny, nx)
        Background-subtracted image and its variance.
    bad : ndarray (ny, nx) bool or uint8
        Pixels not to use (BAD, SAT, CR, EDGE, NO_DATA ...).
    x, y, flux, snr, size : ndarray (n,)
        Source centroids (0-based pixels), fluxes, S/N and sizes ``sqrt((Ixx+Iyy)/2)``.
    usable : ndarray (n,) bool
        Sources free of flags (not saturated, not at an edge, centroid and shape ok).
    config : PsfDeterminerConfig, optional

    Returns
    -------
    PsfResult

    Raises
    ------
    NoPsfStarsError
        Too few PSF stars, with the counts after each cut.
    """
    cfg = config or PsfDeterminerConfig()
    img = np.ascontiguousarray(image, dtype=np.float32)
    var = np.ascontiguousarray(variance, dtype=np.float32)
    badu8 = np.ascontiguousarray(bad, dtype=np.uint8)
    ny, nx = img.shape
    idx, size0 = select_stars(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float),
                              np.asarray(snr, float), np.asarray(size, float), np.asarray(usable, bool),
                              shape=(ny, nx), config=cfg)
    candidates = idx.copy()
    k = _stamp_size(size0, cfg)
    half = k // 2
    xs, ys = np.ascontiguousarray(np.asarray(x, float)[idx]), np.ascontiguousarray(np.asarray(y, float)[idx])
    stamps = np.empty((len(idx), k, k), np.float32)
    vstamps = np.empty((len(idx), k, k), np.float32)
    flags = np.empty(len(idx), np.int32)
    vflags = np.empty(len(idx), np.int32)
    _extract_stamps_spline(img, badu8, xs, ys, half, stamps, flags)
    # the variance only weights the chi^2 of each star: the fast Lanczos kernel is accurate enough
    extract_stamps_lanczos3(var, badu8, xs, ys, half, vstamps, vflags)
    good = flags == 0
    totals = stamps.sum(axis=(1, 2), dtype=np.float64)
    good &= totals > 0
    if good.sum() < cfg.min_stars:
        msg = (
            f"only {int(good.sum())} PSF star stamp(s) free of masked pixels out of {len(idx)}; lower "
            "characterize.psf.min_stars or check the mask planes"
        )
        raise NoPsfStarsError(msg, n_stars=int(good.sum()), n_candidates=len(idx))
    idx, xs, ys = idx[good], xs[good], ys[good]
    st = (stamps[good] / totals[good, None, None]).astype(np.float64)
    vs = np.clip(vstamps[good].astype(np.float64), 1e-12, None) / totals[good, None, None] ** 2
    xc, yc, xsc, ysc = (nx - 1) / 2.0, (ny - 1) / 2.0, nx / 2.0, ny / 2.0
    xn, yn = (xs - xc) / xsc, (ys - yc) / ysc
    snr_star = np.asarray(snr, float)[idx]
    keep = np.ones(len(idx), bool)
    basis = coeffs = None
    for _ in range(cfg.n_iter):
        order = cfg.spatial_order
        while order > 0 and keep.sum() < 2 * (order + 1) * (order + 2) // 2:
            order -= 1
        n_eigen = min(cfg.n_eigen, max(int(keep.sum()) // 4, 0))
        w = np.minimum(snr_star[keep], 1000.0) ** 2
        basis, coeffs = _fit_model(st[keep], w, xn[keep], yn[keep], n_eigen, order, cfg.spatial_reject)
        # chi^2 of every star against the model at its position
        model = np.einsum("nb,bij->nij",
                          np.array([coeffs @ poly_terms(a, b, order) for a, b in zip(xn, yn, strict=True)]), basis)
        model /= model.sum(axis=(1, 2), keepdims=True)
        chi2 = ((st - model) ** 2 / vs).sum(axis=(1, 2)) / (k * k)
        med = np.median(chi2[keep])
        mad = MAD_TO_SIGMA * np.median(np.abs(chi2[keep] - med)) + 1e-12
        new_keep = chi2 < med + cfg.spatial_reject * mad
        if new_keep.sum() < cfg.min_stars or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    assert basis is not None and coeffs is not None
    psf = PolynomialPixelPsf(basis, coeffs, order, xc, yc, xsc, ysc)
    return PsfResult(
        psf=psf,
        star_index=idx[keep],
        candidate_index=candidates,
        size=float(size0),
        fwhm_center=halfmax_fwhm(psf.compute_image(xc, yc)),
        n_stars=int(keep.sum()),
        seeing=_seeing(psf, img, xs[keep], ys[keep], snr_star[keep], size0, xc, yc),
    )
