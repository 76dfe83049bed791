"""Delta-function (pixel) kernel basis for PSF matching, regularised, and the automatic basis choice.

A sum of Gaussians times polynomials (:func:`apfast.diffim.psfmatch.make_basis`)
represents the matching kernel of two near-Gaussian PSFs with ~30 numbers, but not
the kernel between two real PSFs with spikes, rings or a sharp core (JWST, HST, a
ground PSF with a coma-like wing): its residuals at compact sources stay well above
the noise. The delta-function basis (Bramich 2008; Becker et al. 2012; the pixel
form SFFT fits, Hu et al. 2022) gives every kernel pixel its own coefficient, so it
can represent any kernel of its size, at the price of ``(2r + 1)^2`` unknowns per
spatial term whose noise must be held down by regularisation.

Method
------
1. **Stamps**: of the ones the Gaussian fit kept (kernel-sum and residual clipped),
   those whose reference peak pixel has S/N >= ``delta_min_peak_snr`` (at least the
   brightest 20, at most ``delta_max_stamps``), of half-size
   ``delta_stamp_fwhm_scaling`` FWHM; each gets one weight, the inverse median target
   variance in it. One weight per stamp (not per pixel) makes the stamp's
   normal matrix a function of the lag between two kernel pixels, which
   :func:`apfast.kernels.psfmatch.delta_stamp_normal_equations` builds from
   summed-area tables of lag products in ``O((4r)^2 S^2 / 2)`` instead of the
   ``O(S^2 r^4)`` of outer products (a 21-px kernel: 14x fewer operations).
2. **Spatial fit**: every kernel pixel varies as the Gaussian solution's spatial
   polynomial (order ``spatial_kernel_order``, lowered to keep ten stamps per term: a
   term is a whole kernel image here), the background as its polynomial; the global
   normal equations are sums over stamps of ``P_s (x) M_s``.
3. **Regularisation** (Becker et al. 2012 eq. 10; Tikhonov): ``lambda |L k_t|^2``
   added for each spatial term's kernel image ``k_t``, ``L`` the 5-point Laplacian
   of the kernel pixels with the kernel's central row left out (so a kernel close to
   a delta function, two images with the same PSF, is not smoothed away: SFFT's
   ``IGNORE_LAPLACIAN_KERCENT``). ``lambda`` is relative: ``delta_lambda`` times the
   mean diagonal of the data term (signal plus reference noise) over the mean diagonal
   of ``L^T L``. With several values the one with the least chi^2 on held-out stamps
   (two folds) is used, judged on the spatially constant part of the problem
   (``nk + 1`` unknowns), which costs ~1000x less than the full solves.
   **Errors in variables**: the reference's noise adds ``rho(d) sqrt(V_j V_k)`` to the
   expected normal matrix and biases a least-squares kernel towards smoothing it away;
   it is subtracted (``delta_noise_correction``), with ``rho`` the noise's correlation
   measured on the reference's sky (:func:`_noise_correlation`). Should the corrected
   matrix not be positive definite (a few faint stamps), the fit is redone without it.
4. **Automatic choice** (``basis = auto``): the Gaussian fit's median reduced chi^2
   within two FWHM of the brightest quarter of the kernel stars (the "core chi^2",
   computed from the pixels, with the convolved reference variance) above
   ``auto_core_chi2`` marks structured residuals; the delta basis is then fitted and kept when its core chi^2 on
   held-out stamps (each fold's stars predicted by the other fold's solution) is at
   least ``auto_min_gain`` lower than the Gaussian's.

The result is an ordinary :class:`apfast.diffim.psfmatch.KernelSolution` whose
basis is the zero-sum form of the pixel basis (first function the central delta,
then ``delta_j - delta_centre``), so convolution, decorrelation, diagnostics and
storage are unchanged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy import ndimage
from scipy.signal import fftconvolve
from threadpoolctl import threadpool_limits

from apfast.diffim.psfmatch import (
    BackgroundPolynomial,
    KernelBasis,
    KernelSolution,
    PsfMatchConfig,
    SpatialKernel,
    _poly,
    n_poly_terms,
)
from apfast.errors import AlgorithmError
from apfast.kernels.psfmatch import delta_stamp_normal_equations

__all__ = [
    "BasisChoice", "choose_basis", "core_chi2", "laplacian_penalty", "make_delta_basis", "peak_snr",
    "solve_delta_kernel",
]

logger = logging.getLogger(__name__)

_DECIDE_STAMPS = 50  # most stamps whose core chi^2 decides basis=auto (the brightest quarter): <= ~15 ms
_MIN_STAMPS = 20  # fewest stamps a delta fit takes (the brightest), when enough were kept
_ACF_MAX_LAG = 4  # the reference noise's correlation is kept out to this lag (drizzle, warps: 1-3 px)
_ACF_HALF = 256  # the reference noise's correlation is measured on the central <= 512 x 512 pixels
_CHUNK = 32  # stamps whose normal matrices are held at once (32 x 1.6 MB for a 21-px kernel)


def make_delta_basis(size: int) -> KernelBasis:
    """Return the zero-sum pixel basis of a ``size`` x ``size`` kernel.

    Raw function ``i = (v + r) size + (u + r)`` is the delta at offset ``(u, v)``; the
    zero-sum basis puts the central delta first (its coefficient is the kernel sum)
    and then ``delta_j - delta_centre`` for every other pixel in raw order.

    Examples
    --------
    >>> b = make_delta_basis(5)
    >>> b.n_basis, b.images.shape, float(b.images[0].sum()), float(abs(b.images[1:].sum(axis=(1, 2))).max())
    (25, (25, 5, 5), 1.0, 0.0)
    """
    if size % 2 == 0 or size < 3:
        msg = f"kernel size must be odd and >= 3, got {size}"
        raise ValueError(msg)
    k = int(size)
    nk = k * k
    c = nk // 2
    filt = np.eye(k)
    vv, uu = np.divmod(np.arange(nk), k)
    pairs = np.stack([uu, vv], axis=1).astype(np.int64)  # (row factor = x offset, column factor = y offset)
    others = np.array([i for i in range(nk) if i != c], dtype=np.int64)
    transform = np.zeros((nk, nk))
    transform[c, 0] = 1.0
    transform[others, np.arange(1, nk)] = 1.0
    transform[c, 1:] = -1.0
    images = np.zeros((nk, k, k))
    images[np.arange(1, nk), vv[others], uu[others]] = 1.0
    images[:, c // k, c % k] = -1.0
    images[0, c // k, c % k] = 1.0
    return KernelBasis(sigmas=(), degrees=(), size=k, row_filt=filt, col_filt=filt, pairs=pairs,
                       transform=transform, images=images)


def laplacian_penalty(size: int) -> np.ndarray:
    """Return ``L^T L`` (nk, nk) float64: the 5-point Laplacian of a kernel image without its central row.

    Pixels outside the kernel count as zero, so a kernel with flux at its edge is
    penalised too.

    Examples
    --------
    >>> h = laplacian_penalty(5)
    >>> h.shape, bool(np.allclose(h, h.T)), float(np.ones(25) @ h @ np.ones(25)) > 0
    ((25, 25), True, True)
    """
    k = int(size)
    nk = k * k
    c = nk // 2
    rows = []
    for v in range(k):
        for u in range(k):
            i = v * k + u
            if i == c:
                continue
            row = np.zeros(nk)
            row[i] = -4.0
            for dv, du in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= v + dv < k and 0 <= u + du < k:
                    row[(v + dv) * k + u + du] = 1.0
            rows.append(row)
    lmat = np.array(rows)
    return lmat.T @ lmat


def core_chi2(ref: np.ndarray, var_ref: np.ndarray, tgt: np.ndarray, var_tgt: np.ndarray, cx: np.ndarray,
              cy: np.ndarray, kernel: SpatialKernel, background: BackgroundPolynomial, *, half: int,
              radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-stamp reduced chi^2 of ``tgt - K (x) ref - b``: within ``radius`` of the centre, and over the stamp.

    Parameters
    ----------
    ref, var_ref, tgt, var_tgt : ndarray (ny, nx)
        Reference and target images and variances (the fit's inputs).
    cx, cy : ndarray (ns,) int
        Stamp centres; each stamp plus the kernel half-width lies inside the image.
    kernel, background : SpatialKernel, BackgroundPolynomial
        The solution, evaluated at each stamp centre.
    half : int
        Stamp half-size.
    radius : float
        Core radius in pixels.

    Returns
    -------
    core, full : ndarray (ns,) float64
        Mean of ``r^2 / (var_tgt + K^2 (x) var_ref)`` over the core and over the stamp.
    """
    r = kernel.size // 2
    s = 2 * half + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    core = (xx**2 + yy**2) <= radius**2
    out_core = np.empty(cx.size)
    out_full = np.empty(cx.size)
    for i, (x, y) in enumerate(zip(cx.tolist(), cy.tolist(), strict=True)):
        k = kernel.evaluate(x, y)
        win = np.asarray(ref[y - half - r : y + half + r + 1, x - half - r : x + half + r + 1], dtype=np.float64)
        vwin = np.asarray(var_ref[y - half - r : y + half + r + 1, x - half - r : x + half + r + 1],
                          dtype=np.float64)
        model = fftconvolve(win, k, mode="valid") + float(background.evaluate(x, y))
        var = np.asarray(var_tgt[y - half : y + half + 1, x - half : x + half + 1], dtype=np.float64)
        var = var + fftconvolve(vwin, k * k, mode="valid")
        t = np.asarray(tgt[y - half : y + half + 1, x - half : x + half + 1], dtype=np.float64)
        chi = (t - model) ** 2 / np.where(var > 0, var, np.inf)
        assert chi.shape == (s, s)
        out_core[i] = float(chi[core].mean())
        out_full[i] = float(chi.mean())
    return out_core, out_full


@dataclass(frozen=True, slots=True, kw_only=True)
class BasisChoice:
    """What the automatic basis choice saw (``SubtractionResult.metadata['basis_choice']``).

    Attributes
    ----------
    basis : str
        ``gaussian`` or ``delta``: the basis of the solution used.
    reason : str
        One line: why.
    gaussian_core_chi2 : float
        Median core chi^2 of the Gaussian fit at the brightest quarter of its kept stamps (NaN
        unless ``basis = auto``: the check is not spent when a basis is configured).
    delta_core_chi2 : float
        Median held-out core chi^2 of the delta fit (NaN when it was not tried).
    delta_lambda : float
        The regularisation strength used (relative; NaN when not tried).
    seconds : float
        Time spent on the delta fit.
    """

    basis: str
    reason: str
    gaussian_core_chi2: float
    delta_core_chi2: float = math.nan
    delta_lambda: float = math.nan
    seconds: float = 0.0


@dataclass(slots=True)
class _Equations:
    """Spatial normal equations ``n theta = b`` with data term ``sws`` (one fold or all stamps)."""

    n: np.ndarray
    b: np.ndarray
    sws: float

    def __add__(self, other: _Equations) -> _Equations:
        return _Equations(self.n + other.n, self.b + other.b, self.sws + other.sws)

    def sub(self, idx: np.ndarray) -> _Equations:
        """The equations of the unknowns ``idx`` with the others held at zero."""
        return _Equations(self.n[np.ix_(idx, idx)], self.b[idx], self.sws)

    def chi2(self, theta: np.ndarray) -> float:
        return float(theta @ self.n @ theta - 2.0 * theta @ self.b + self.sws)


def _spatial_equations(ref: np.ndarray, tgt: np.ndarray, cx: np.ndarray, cy: np.ndarray, w: np.ndarray,
                       pk: np.ndarray, pb: np.ndarray, half: int, r: int, var_ref: np.ndarray,
                       rho: np.ndarray) -> _Equations:
    """Accumulate the spatial normal equations of stamps (unknowns pixel-major: ``j * nt + t``, then bg)."""
    k = 2 * r + 1
    nk = k * k
    nt, nbg = pk.shape[1], pb.shape[1]
    ntot = nk * nt + nbg
    nu = nk + 1
    g = np.zeros((nt * nt, nu * nu))  # sum_s w p_t1 p_t2 M_s, flattened
    nkb = np.zeros((nt * nbg, nk))
    nbb = np.zeros((nbg, nbg))
    bk = np.zeros((nt, nk))
    bb = np.zeros(nbg)
    sws_tot = 0.0
    for lo in range(0, cx.size, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, cx.size))
        ns = sl.stop - sl.start
        m = np.empty((ns, nu, nu))
        b = np.empty((ns, nu))
        sws = np.empty(ns)
        delta_stamp_normal_equations(ref, tgt, var_ref, rho, np.ascontiguousarray(cx[sl], dtype=np.int64),
                                     np.ascontiguousarray(cy[sl], dtype=np.int64), int(half), int(r), m, b, sws)
        ws, pks, pbs = w[sl], pk[sl], pb[sl]
        a = (ws[:, None, None] * pks[:, :, None] * pks[:, None, :]).reshape(ns, nt * nt)
        g += a.T @ m.reshape(ns, nu * nu)
        ab = (ws[:, None, None] * pks[:, :, None] * pbs[:, None, :]).reshape(ns, nt * nbg)
        nkb += ab.T @ m[:, :nk, nk]
        nbb += np.einsum("s,su,sv->uv", ws * m[:, nk, nk], pbs, pbs)
        bk += (ws[:, None] * pks).T @ b[:, :nk]
        bb += np.einsum("s,su->u", ws * b[:, nk], pbs)
        sws_tot += float(ws @ sws)
    n4 = g.reshape(nt, nt, nu, nu)[:, :, :nk, :nk].transpose(2, 0, 3, 1)  # (j, t1, i, t2)
    n = np.zeros((ntot, ntot))
    n[: nk * nt, : nk * nt] = n4.reshape(nk * nt, nk * nt)
    n[: nk * nt, nk * nt :] = nkb.reshape(nt, nbg, nk).transpose(2, 0, 1).reshape(nk * nt, nbg)
    n[nk * nt :, : nk * nt] = n[: nk * nt, nk * nt :].T
    n[nk * nt :, nk * nt :] = nbb
    return _Equations(n, np.concatenate([bk.T.ravel(), bb]), sws_tot)


def _noise_correlation(ref: np.ndarray, var_ref: np.ndarray, r: int) -> np.ndarray:
    """Correlation coefficient of the reference's noise at lags ``|dv|, |du| <= 2r``, ``(4r + 1, 4r + 1)``.

    Measured on the pixels below 3 sigma (sky) of the variance-normalised reference in a
    central square of at most ``2 * _ACF_HALF`` pixels, sources set to zero; a warped or
    drizzled image has correlated noise, and the errors-in-variables term of the delta
    basis is ``rho(d)`` times the variance.
    """
    ny, nx = ref.shape
    ys = slice(max(0, ny // 2 - _ACF_HALF), ny // 2 + _ACF_HALF)
    xs = slice(max(0, nx // 2 - _ACF_HALF), nx // 2 + _ACF_HALF)
    vr = np.asarray(var_ref[ys, xs], dtype=np.float64)
    z = np.asarray(ref[ys, xs], dtype=np.float64) / np.sqrt(np.where(vr > 0, vr, np.inf))
    # sky left in the reference, a gradient or the wings of sources correlate at every lag: take the noise
    # as what a 15-px box mean does not hold, away from (grown) sources
    fin = np.isfinite(z)
    z = np.where(fin, z, 0.0)
    src = ndimage.binary_dilation(np.abs(z - float(np.median(z))) > 3.0, iterations=3) | ~fin
    z = np.where(src, 0.0, z - ndimage.uniform_filter(z, 15, mode="nearest"))
    n = 2 * r
    ny, nx = z.shape
    f = np.fft.rfft2(z, s=(ny + n, nx + n))
    one = np.fft.rfft2((z != 0).astype(np.float64), s=(ny + n, nx + n))
    acf = np.fft.irfft2(f * np.conj(f), s=(ny + n, nx + n))
    cnt = np.fft.irfft2(one * np.conj(one), s=(ny + n, nx + n))
    idx_y = np.arange(-n, n + 1) % (ny + n)
    idx_x = np.arange(-n, n + 1) % (nx + n)
    npair = cnt[np.ix_(idx_y, idx_x)]
    c = acf[np.ix_(idx_y, idx_x)] / np.maximum(npair, 1.0)
    rho = c / c[n, n]
    # keep the lags where the correlation is real: within _ACF_MAX_LAG and above 5 sigma of its estimate.
    # The noise of ~1700 estimated lags, summed into the kernel's sum direction, would otherwise bias the
    # photometric scale (measured +0.7% on white noise)
    dv, du = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    keep = (np.maximum(np.abs(dv), np.abs(du)) <= _ACF_MAX_LAG) & (np.abs(rho) > 5.0 / np.sqrt(np.maximum(npair, 1.0)))
    keep[n, n] = True
    return np.where(keep, rho, 0.0)


def _solve(eq: _Equations, penalty: np.ndarray, lam: float) -> np.ndarray | None:
    """Solve ``(n + lam P) theta = b`` by Cholesky; None when the matrix is not positive definite.

    The noise correction can leave it indefinite when a few faint stamps carry less signal
    than noise.
    """
    a = eq.n + lam * penalty
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, check_finite=False), eq.b, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return None


class _Indefinite(Exception):
    """The regularised normal matrix was not positive definite."""


def _checked(theta: np.ndarray | None) -> np.ndarray:
    if theta is None:
        raise _Indefinite
    return theta


def _models(theta: np.ndarray, k: int, nt: int, kord: int, bord: int, shape: tuple[int, int],
            basis: KernelBasis) -> tuple[SpatialKernel, BackgroundPolynomial]:
    ny, nx = shape
    xc, yc, xsc, ysc = (nx - 1) / 2.0, (ny - 1) / 2.0, nx / 2.0, ny / 2.0
    nk = k * k
    pix = theta[: nk * nt].reshape(nk, nt)  # raw pixel coefficients
    # zero-sum basis coefficients: the kernel sum first, then every non-central pixel (make_delta_basis)
    coeffs = np.concatenate([pix.sum(axis=0, keepdims=True), np.delete(pix, nk // 2, axis=0)])
    kernel = SpatialKernel(basis=basis.images, coeffs=coeffs, order=kord, x_center=xc, y_center=yc, x_scale=xsc,
                           y_scale=ysc)
    bg = BackgroundPolynomial(coeffs=theta[nk * nt :].copy(), order=bord, x_center=xc, y_center=yc, x_scale=xsc,
                              y_scale=ysc)
    return kernel, bg


def solve_delta_kernel(
    ref: np.ndarray, var_ref: np.ndarray, tgt: np.ndarray, var_tgt: np.ndarray, gaussian: KernelSolution, *,
    half: int, fwhm: float, config: PsfMatchConfig, held_out: bool = True,
) -> tuple[KernelSolution, np.ndarray, float]:
    """Fit the regularised, spatially varying delta-function kernel (module docstring, steps 1-3).

    Parameters
    ----------
    ref, var_ref, tgt, var_tgt : ndarray (ny, nx) float32
        Image to convolve, image to match, and their variances.
    gaussian : KernelSolution
        The Gaussian-basis solution: its kept stamps, kernel size and spatial orders are reused.
    half : int
        Stamp half-size of the Gaussian fit (the delta fit uses at most that, see
        ``delta_stamp_fwhm_scaling``).
    fwhm : float
        The larger PSF FWHM (pixels): the core radius of the held-out chi^2 is two of them.
    config : PsfMatchConfig
    held_out : bool
        Compute the held-out core chi^2 (two extra solves when ``delta_lambda`` has one value).

    Returns
    -------
    solution : KernelSolution
        With the delta basis; every offered stamp is kept (status 0).
    held_out_core_chi2 : ndarray (n_stamps,)
        Core chi^2 of each stamp of ``solution`` under the other fold's solution (NaN without ``held_out``).
    lam : float
        The relative regularisation strength used.

    Notes
    -----
    BLAS runs on one thread here: at n ~ 1300 unknowns OpenBLAS's own threads cost 5-40x
    more than they give when numba's threads or other processes share the cores.
    """
    with threadpool_limits(1, user_api="blas"):
        return _solve_delta_kernel(ref, var_ref, tgt, var_tgt, gaussian, half=half, fwhm=fwhm, config=config,
                                   held_out=held_out)


def _solve_delta_kernel(
    ref: np.ndarray, var_ref: np.ndarray, tgt: np.ndarray, var_tgt: np.ndarray, gaussian: KernelSolution, *,
    half: int, fwhm: float, config: PsfMatchConfig, held_out: bool,
) -> tuple[KernelSolution, np.ndarray, float]:
    ny, nx = ref.shape
    k = min(gaussian.kernel.size, config.delta_kernel_size)
    r = k // 2
    nk = k * k
    cx, cy = gaussian.stamp_x.astype(np.int64), gaussian.stamp_y.astype(np.int64)
    # the brightest by the reference's peak S/N: a faint stamp adds reference noise, little signal
    snr = peak_snr(ref, var_ref, cx, cy)
    n_use = int(np.count_nonzero(snr >= config.delta_min_peak_snr))
    n_use = min(max(n_use, _MIN_STAMPS), config.delta_max_stamps, cx.size)
    take = np.sort(np.argsort(-snr, kind="stable")[:n_use])
    cx, cy = cx[take], cy[take]
    half = min(half, max(r, math.ceil(config.delta_stamp_fwhm_scaling * fwhm)))
    kord, bord = gaussian.kernel.order, gaussian.background.order
    # each spatial term is a whole kernel image: ask for ten stamps per term (a Gaussian term is one number)
    while kord > 0 and n_use < 10 * n_poly_terms(kord):
        kord -= 1
    with_bg = config.fit_for_background
    xc, yc, xsc, ysc = (nx - 1) / 2.0, (ny - 1) / 2.0, nx / 2.0, ny / 2.0
    pk = _poly((cx - xc) / xsc, (cy - yc) / ysc, kord)
    pb = _poly((cx - xc) / xsc, (cy - yc) / ysc, bord) if with_bg else np.zeros((cx.size, 0))
    nt = pk.shape[1]
    w = np.empty(cx.size)
    for i, (x, y) in enumerate(zip(cx.tolist(), cy.tolist(), strict=True)):
        v = float(np.median(var_tgt[y - half : y + half + 1, x - half : x + half + 1]))
        w[i] = 1.0 / v if v > 0 else 0.0
    fold = np.arange(cx.size) % 2
    h = laplacian_penalty(k)
    basis = make_delta_basis(k)
    lams = config.delta_lambda
    radius = 2.0 * fwhm
    rho = _noise_correlation(ref, var_ref, r) if config.delta_noise_correction else np.zeros((4 * r + 1,) * 2)
    s2 = (2 * half + 1) ** 2
    noise_diag = float(np.mean([wi * s2 * float(np.mean(var_ref[y - half - r : y + half + r + 1,
                                                               x - half - r : x + half + r + 1]))
                                for wi, x, y in zip(w, cx.tolist(), cy.tolist(), strict=True)])) * cx.size
    for attempt in range(2):
        eqs = [_spatial_equations(ref, tgt, cx[fold == f], cy[fold == f], w[fold == f], pk[fold == f],
                                  pb[fold == f], half, r, var_ref, rho) for f in (0, 1)]
        total = eqs[0] + eqs[1]
        penalty = np.zeros_like(total.n)
        penalty[: nk * nt, : nk * nt] = np.kron(h, np.eye(nt))
        # lambda is relative to the data term's diagonal before the noise correction (signal plus noise),
        # so a noise-dominated fit is held by the regularisation rather than left indefinite
        scale = (float(np.mean(np.diag(total.n)[: nk * nt : nt])) + noise_diag * float(rho[2 * r, 2 * r])) / float(
            np.mean(np.diag(h)))
        cv: dict[float, float] = {}
        held_core = np.full(cx.size, np.nan)
        lam = lams[0]
        theta = None
        thetas: list[np.ndarray] = []
        try:
            if len(lams) > 1:
                # the strength is chosen on the spatially constant part of the problem (the t = 0 term of
                # every pixel and the constant background: nk + 1 unknowns, ~1000x cheaper to solve)
                sub = np.r_[np.arange(0, nk * nt, nt), nk * nt]
                for v in lams:
                    try:
                        cv[v] = sum(eqs[f].sub(sub).chi2(_checked(_solve(eqs[1 - f].sub(sub), penalty[np.ix_(
                            sub, sub)], v * scale))) for f in (0, 1))
                    except _Indefinite:
                        continue  # too weak for these stamps: not a candidate
                if not cv:
                    raise _Indefinite
                lam = min(cv, key=lambda v: cv[v])
            if held_out:
                thetas = [_checked(_solve(eqs[1 - f], penalty, lam * scale)) for f in (0, 1)]
            theta = _checked(_solve(total, penalty, lam * scale))
        except _Indefinite:
            if attempt == 1 or not rho.any():
                raise AlgorithmError(
                    "the delta-basis kernel equations are singular; use difference.psfmatch.basis = \"gaussian\" "
                    "or raise difference.psfmatch.delta_lambda") from None
            logger.warning("delta basis: %d stamps carry less signal than reference noise; fitting without the "
                           "noise correction (difference.psfmatch.delta_noise_correction)", cx.size)
            rho = np.zeros_like(rho)
            continue
        break
    assert theta is not None
    if held_out:
        # held-out core chi^2 at the chosen strength: each fold's stamps under the other fold's kernel
        for f in (0, 1):
            kern_f, bg_f = _models(thetas[f], k, nt, kord, bord, (ny, nx), basis)
            sel = fold == f
            held_core[sel] = core_chi2(ref, var_ref, tgt, var_tgt, cx[sel], cy[sel], kern_f, bg_f, half=half,
                                       radius=radius)[0]
    kernel, bg = _models(theta, k, nt, kord, bord, (ny, nx), basis)
    _, full = core_chi2(ref, var_ref, tgt, var_tgt, cx, cy, kernel, bg, half=half, radius=radius)
    ksum = np.array([kernel.sum(float(x), float(y)) for x, y in zip(cx, cy, strict=True)])
    if len(lams) > 1:
        logger.debug("delta basis: held-out chi^2 per lambda %s -> %g",
                     {v: round(c, 1) for v, c in cv.items()}, lam)
    sol = KernelSolution(kernel=kernel, background=bg, basis=basis, stamp_x=cx, stamp_y=cy, n_candidates=cx.size,
                         kernel_sums=ksum, residual_std=np.sqrt(full), candidate_x=cx, candidate_y=cy,
                         candidate_status=np.zeros(cx.size, dtype=np.int8), candidate_kernel_sums=ksum,
                         candidate_residual_std=np.sqrt(full))
    return sol, held_core, float(lam)


def peak_snr(image: np.ndarray, var: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """``image / sqrt(var)`` at the stamp centres (the reference's per-pixel S/N there), float64."""
    v = np.asarray(var[cy, cx], dtype=np.float64)
    return np.asarray(image[cy, cx], dtype=np.float64) / np.sqrt(np.where(v > 0, v, np.inf))


def _bright(snr: np.ndarray) -> np.ndarray:
    """The brightest quarter of the stamps (at least 3, at most ``_DECIDE_STAMPS``), as a boolean mask."""
    n = min(max(3, snr.size // 4), _DECIDE_STAMPS, snr.size)
    out = np.zeros(snr.size, dtype=bool)
    out[np.argsort(-snr, kind="stable")[:n]] = True
    return out


def choose_basis(
    ref: np.ndarray, var_ref: np.ndarray, tgt: np.ndarray, var_tgt: np.ndarray, gaussian: KernelSolution, *,
    half: int, fwhm: float, config: PsfMatchConfig,
) -> tuple[KernelSolution, BasisChoice]:
    """Return the solution of the configured basis, deciding ``auto`` as the module docstring says.

    Parameters are those of :func:`solve_delta_kernel`; ``gaussian`` is returned unchanged
    when the Gaussian basis is configured or chosen. The core chi^2 compared are medians over
    the brightest quarter of the stamps (by the reference's peak S/N): a kernel that misses
    the PSF's structure leaves residuals in proportion to a star's flux, so faint stamps, near
    the noise under either basis, would hide it.
    """
    if config.basis == "gaussian":
        return gaussian, BasisChoice(basis="gaussian", reason="configured", gaussian_core_chi2=math.nan)
    g_core = math.nan
    if config.basis == "auto":
        sx, sy = gaussian.stamp_x.astype(np.int64), gaussian.stamp_y.astype(np.int64)
        bright = _bright(peak_snr(ref, var_ref, sx, sy))
        core, _ = core_chi2(ref, var_ref, tgt, var_tgt, sx[bright], sy[bright], gaussian.kernel,
                            gaussian.background, half=half, radius=2.0 * fwhm)
        g_core = float(np.median(core))
    if config.basis == "auto" and g_core <= config.auto_core_chi2:
        return gaussian, BasisChoice(
            basis="gaussian", gaussian_core_chi2=g_core,
            reason=f"Gaussian core chi^2 {g_core:.2f} <= auto_core_chi2 {config.auto_core_chi2:g}",
        )
    t0 = time.perf_counter()
    delta, held, lam = solve_delta_kernel(ref, var_ref, tgt, var_tgt, gaussian, half=half, fwhm=fwhm,
                                          config=config, held_out=config.basis == "auto")
    dt = time.perf_counter() - t0
    d_bright = _bright(peak_snr(ref, var_ref, delta.stamp_x, delta.stamp_y))
    d_core = float(np.median(held[d_bright]))
    common = {"gaussian_core_chi2": g_core, "delta_core_chi2": d_core, "delta_lambda": lam, "seconds": dt}
    if config.basis == "delta":
        return delta, BasisChoice(basis="delta", reason="configured", **common)
    if d_core <= (1.0 - config.auto_min_gain) * g_core:
        return delta, BasisChoice(
            basis="delta", reason=f"held-out core chi^2 {d_core:.2f} vs Gaussian {g_core:.2f}", **common)
    return gaussian, BasisChoice(
        basis="gaussian", reason=f"delta basis not better: held-out core chi^2 {d_core:.2f} vs {g_core:.2f}",
        **common)
