"""Slow, obviously-correct NumPy/SciPy versions of the background and cosmic-ray kernels (test references)."""

from __future__ import annotations

import numpy as np
from scipy.interpolate import Akima1DInterpolator, CubicHermiteSpline, CubicSpline
from scipy.special import erf

IQR_TO_SIGMA = 0.7413011092528009


def clipped_stats(values: np.ndarray, statistic: str, n_sigma: float, n_iter: int) -> tuple[float, float]:
    """Median/IQR start, then ``n_iter`` rounds of mean/std of the values within ``n_sigma`` of the centre."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0:
        return np.nan, np.nan
    # MEANCLIP starts from every (n // 2048)-th value (in the given order) when n > 4096
    start = np.asarray(values, dtype=np.float64)
    if statistic == "MEANCLIP" and start.size > 4096:
        start = start[:: start.size // 2048]
    start = np.sort(start)
    n = start.size
    med = float(np.median(start))
    q25 = start[(n - 1) // 4]
    q75 = start[(3 * (n - 1)) // 4]
    sig = IQR_TO_SIGMA * (q75 - q25)
    if not sig > 0:
        sig = float(start.std())
    if statistic == "MEDIAN":
        return med, sig
    c = med
    for _ in range(n_iter):
        if not sig > 0:
            break
        kept = x[np.abs(x - c) <= n_sigma * sig]
        if kept.size == 0:
            break
        c = float(kept.mean())
        sig = float(kept.std())
    return c, sig


def mesh(image, mask, ignore_bits, bin_size, statistic="MEANCLIP", n_sigma=3.0, n_iter=3):
    """Cell values, stds and good-pixel counts, cell by cell with boolean indexing."""
    ny, nx = image.shape
    ye = _edges(ny, bin_size)
    xe = _edges(nx, bin_size)
    shape = (len(ye) - 1, len(xe) - 1)
    vals = np.full(shape, np.nan)
    stds = np.full(shape, np.nan)
    counts = np.zeros(shape, dtype=int)
    for p in range(shape[0]):
        for q in range(shape[1]):
            im = image[ye[p] : ye[p + 1], xe[q] : xe[q + 1]].astype(np.float32)
            mk = mask[ye[p] : ye[p + 1], xe[q] : xe[q + 1]]
            good = np.isfinite(im) & ((mk & ignore_bits) == 0)
            counts[p, q] = good.sum()
            vals[p, q], stds[p, q] = clipped_stats(im[good], statistic, n_sigma, n_iter)
    return vals, stds, counts


def _edges(n: int, b: int) -> np.ndarray:
    k = max(1, n // b)
    e = np.arange(k + 1) * b
    e[-1] = n
    return e


def centres(n: int, b: int) -> np.ndarray:
    """Pixel coordinates of the cell centres along one axis."""
    e = _edges(n, b)
    return 0.5 * (e[:-1] + e[1:] - 1.0)


def interp1d(xk, yk, x, method):
    """SciPy 1-D interpolant with extrapolation by the end pieces."""
    xk = np.asarray(xk, float)
    yk = np.asarray(yk, float)
    if xk.size == 1:
        return np.full(np.shape(x), yk[0])
    if method == "LINEAR" or xk.size == 2:
        # straight lines, continued past the ends
        k = np.clip(np.searchsorted(xk, x, side="right") - 1, 0, xk.size - 2)
        slope = (yk[k + 1] - yk[k]) / (xk[k + 1] - xk[k])
        return yk[k] + slope * (x - xk[k])
    if method == "AKIMA":
        return Akima1DInterpolator(xk, yk, extrapolate=True)(x)
    return CubicSpline(xk, yk, bc_type="natural", extrapolate=True)(x)


def akima_secants(xk, yk):
    """Secant slopes with Akima's two ghost slopes on each side."""
    m = np.diff(yk) / np.diff(xk)
    left = [3 * m[0] - 2 * m[1], 2 * m[0] - m[1]]
    right = [2 * m[-1] - m[-2], 3 * m[-1] - 2 * m[-2]]
    return np.concatenate([left, m, right])


def akima_alpha(xk, yk):
    """Akima's weight of the left secant at every knot (1/2 where both weights vanish)."""
    m = akima_secants(xk, yk)
    w1 = np.abs(m[3:] - m[2:-1])
    w2 = np.abs(m[1:-2] - m[:-3])
    tot = w1 + w2
    return np.where(tot > 0, w1 / np.where(tot > 0, tot, 1.0), 0.5)


def interpolate(values, shape, bin_size, method):
    """Separable interpolation: along x for each mesh row, then along y for each column.

    For AKIMA the y pass uses Hermite slopes ``alpha m_{i-1} + (1 - alpha) m_i``
    with ``alpha`` from the mesh columns, splined (natural cubic) along x.
    """
    values = np.asarray(values, float)
    ny, nx = shape
    xc = centres(nx, bin_size)
    yc = centres(ny, bin_size)
    xs = np.arange(nx, dtype=float)
    ys = np.arange(ny, dtype=float)
    tmp = np.array([interp1d(xc, row, xs, method) for row in values])
    if method != "AKIMA" or yc.size < 3:
        return np.array([interp1d(yc, tmp[:, j], ys, method) for j in range(nx)]).T
    acol = np.array([akima_alpha(yc, values[:, q]) for q in range(xc.size)])  # (nxc, nyc)
    alpha = np.array([interp1d(xc, acol[:, p], xs, "CUBIC") for p in range(yc.size)])  # (nyc, nx)
    out = np.empty(shape)
    for j in range(nx):
        m = akima_secants(yc, tmp[:, j])
        slopes = alpha[:, j] * m[1:-2] + (1 - alpha[:, j]) * m[2:-1]
        out[:, j] = CubicHermiteSpline(yc, tmp[:, j], slopes, extrapolate=True)(ys)
    return out


def cr_candidates(work, variance, mask, bad_bits, min_sigma, thres_h, thres_v, thres_d, c3):
    """Conditions 2-4 of the cosmic-ray test on every interior pixel, vectorised."""
    w = work.astype(np.float64)
    var = variance.astype(np.float64)
    c = w[1:-1, 1:-1]
    v0 = var[1:-1, 1:-1]
    pairs = {
        "ns": ((w[:-2, 1:-1], var[:-2, 1:-1]), (w[2:, 1:-1], var[2:, 1:-1]), thres_v),
        "we": ((w[1:-1, :-2], var[1:-1, :-2]), (w[1:-1, 2:], var[1:-1, 2:]), thres_h),
        "swne": ((w[:-2, :-2], var[:-2, :-2]), (w[2:, 2:], var[2:, 2:]), thres_d),
        "nwse": ((w[2:, :-2], var[2:, :-2]), (w[:-2, 2:], var[:-2, 2:]), thres_d),
    }
    with np.errstate(invalid="ignore"):
        sig0 = np.sqrt(np.where(v0 > 0, v0, np.nan))
        hit = np.zeros(c.shape, bool)
        for (a, va), (b, vb), thr in pairs.values():
            mean = 0.5 * (a + b)
            dm = 0.5 * np.sqrt(va + vb)
            cond2 = c >= mean + min_sigma * sig0
            cond3 = thr * (c - c3 * sig0) > mean + c3 * dm
            hit |= cond2 & cond3
        hit &= (c > 0) & (v0 > 0) & ((mask[1:-1, 1:-1] & bad_bits) == 0)
    out = np.zeros(work.shape, bool)
    out[1:-1, 1:-1] = hit
    return out


def add_gaussian_star(img, xc, yc, flux, sigma):
    """Add a pixel-integrated circular Gaussian (in place)."""
    r = int(np.ceil(6 * sigma)) + 1
    ny, nx = img.shape
    x0, x1 = max(0, int(xc) - r), min(nx, int(xc) + r + 1)
    y0, y1 = max(0, int(yc) - r), min(ny, int(yc) + r + 1)
    fx = np.diff(0.5 * erf((np.arange(x0, x1 + 1) - 0.5 - xc) / (np.sqrt(2) * sigma)))
    fy = np.diff(0.5 * erf((np.arange(y0, y1 + 1) - 0.5 - yc) / (np.sqrt(2) * sigma)))
    img[y0:y1, x0:x1] += flux * np.outer(fy, fx)


def cr_scene(rng, shape=(1024, 1024), sky=1000.0, read_noise=5.0, n_stars=50, n_cr=100):
    """Sky + Gaussian stars (FWHM 2.5-5 px, some bright) + sharp cosmic rays + noise.

    Cosmic rays are blobs (1-3 px squares) and straight tracks 1-2 px thick
    (2-3 px across on diagonals), placed at least 12 px from every star centre.

    Returns
    -------
    image, variance : float32 arrays
    truth : float64, sky + stars without noise or cosmic rays
    cr : float64, the cosmic-ray charge alone
    stars : (n, 4) array of x, y, fwhm, flux
    """
    ny, nx = shape
    truth = np.full(shape, sky)
    stars = []
    for k in range(n_stars):
        xc, yc = rng.uniform(20, nx - 20), rng.uniform(20, ny - 20)
        fwhm = rng.uniform(2.5, 5.0)
        flux = 10 ** rng.uniform(3.5, 6.5) if k >= 5 else 10 ** rng.uniform(6.0, 6.5)
        add_gaussian_star(truth, xc, yc, flux, fwhm / 2.3548)
        stars.append((xc, yc, fwhm, flux))
    stars = np.array(stars)
    cr = np.zeros(shape)
    k = 0
    while k < n_cr:
        x, y = rng.uniform(10, nx - 10), rng.uniform(10, ny - 10)
        if np.min(np.hypot(stars[:, 0] - x, stars[:, 1] - y)) < 15:
            continue
        amp = 10 ** rng.uniform(2.7, 3.8)
        if rng.integers(3) == 0:
            w = int(rng.integers(1, 4))
            cr[int(y) : int(y) + w, int(x) : int(x) + w] += amp
        else:
            length = rng.uniform(3, 20)
            ang = rng.uniform(0, np.pi)
            w = int(rng.integers(1, 3))
            for t in np.arange(0, length, 0.5):
                j = int(round(x + t * np.cos(ang)))
                i = int(round(y + t * np.sin(ang)))
                if 1 <= i < ny - 3 and 1 <= j < nx - 3 and np.min(np.hypot(stars[:, 0] - j, stars[:, 1] - i)) >= 12:
                    cr[i : i + w, j : j + w] = np.maximum(cr[i : i + w, j : j + w], amp)
        k += 1
    img = truth + cr + rng.normal(0.0, 1.0, shape) * np.sqrt(truth + read_noise**2)
    var = np.maximum(img, 0.0) + read_noise**2
    return img.astype(np.float32), var.astype(np.float32), truth, cr, stars
