"""Fake point sources injected into an exposure (Rubin's ``source_injection``), no I/O.

Two steps, both pure functions of an :class:`~apfast.exposure.Exposure` and a catalogue:

1. :func:`make_random_catalog` draws ``inject.n_per_ccd`` fakes for one CCD-visit, deterministic
   from ``inject.seed``, the visit and the ccdnum: positions uniform over the CCD (``EDGE_MARGIN``
   pixels from its edges), magnitudes uniform in ``inject.mag_range``; a fraction
   ``inject.host_fraction`` sits on galaxies of the CCD's source catalogue (``src``), offset from
   the galaxy's centroid by up to ``inject.host_offset_max`` arcsec in a random direction; a
   fraction ``inject.template_fraction`` is marked ``on_template`` (injected into the template
   too, so it must vanish in the difference).
2. :func:`inject_sources` adds them to an exposure: the flux ``10**(-0.4 (mag - 31.4))`` nJy
   converted to image units through the exposure's :class:`~apfast.exposure.PhotoCalib`, spread
   by the exposure's own PSF model at each position (the stamp of ``psf.compute_image`` shifted
   to the sub-pixel position by normalised Lanczos-3, as forced photometry does). The variance
   gets the Poisson term of the added counts, ``model / gain`` (``inject.gain``: electrons per
   image unit; calexps are in electrons, so 1), and with ``inject.add_noise`` the image gets that
   noise too (Gaussian, from a generator seeded like the catalogue, so injecting the same catalogue
   into the same exposure twice gives identical pixels). Pixels where the model exceeds
   ``inject.mask_nsigma`` times the original per-pixel noise, and the pixel under each fake's
   centre, get the ``INJECTED`` mask plane (``INJECTED_TEMPLATE`` for a template).

The catalogue is an astropy :class:`~astropy.table.Table` with the columns of
:data:`CATALOG_COLUMNS` (what ``apfast process`` writes as the ``injected_catalog`` dataset).

Examples
--------
>>> import numpy as np
>>> from astropy.wcs import WCS
>>> from apfast.psf import GaussianPsf
>>> from apfast.exposure import Exposure, PhotoCalib
>>> w = WCS(naxis=2); w.wcs.ctype = ["RA---TAN", "DEC--TAN"]; w.wcs.crval = [10.0, -5.0]
>>> w.wcs.crpix = [50.0, 50.0]; w.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
>>> img = np.zeros((100, 100), np.float32)
>>> exp = Exposure(img, np.zeros(img.shape, np.int32), np.ones_like(img), wcs=w, psf=GaussianPsf(1.7, 25),
...                photo_calib=PhotoCalib(30.0))
>>> cfg = InjectConfig(n_per_ccd=3, mag_range=(20.0, 21.0), add_noise=False)
>>> cat = make_random_catalog(exp, visit=1, ccdnum=2, config=cfg)
>>> res = inject_sources(exp, cat, config=cfg, visit=1, ccdnum=2)
>>> bool(res.catalog["injected"].all()), round(float(res.exposure.image.sum() / res.catalog["flux"].sum()), 3)
(True, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from astropy.table import Table

from apfast._configbase import ConfigSection, opt
from apfast.errors import InputError
from apfast.exposure import NJY_AB_ZERO_POINT, Exposure
from apfast.masks import bitmask

__all__ = [
    "CATALOG_COLUMNS",
    "EDGE_MARGIN",
    "InjectConfig",
    "InjectionResult",
    "inject_sources",
    "make_random_catalog",
    "mag_to_njy",
    "select_hosts",
]

#: Random fakes keep this many pixels away from the CCD edges (most PSF stamp half-widths).
EDGE_MARGIN: int = 20
#: A source of ``src`` is a galaxy (a possible host) when its second-moment size exceeds the PSF's by this factor.
HOST_SIZE_RATIO: float = 1.2

#: Columns of an injection catalogue (the ``injected_catalog`` dataset) and what they hold.
CATALOG_COLUMNS: dict[str, str] = {
    "injection_id": "int64: unique id of the fake (random fakes: (visit * 100 + ccdnum) * 100000 + n)",
    "visit": "int64: the visit it was injected into",
    "ccdnum": "int64: the CCD it was injected into",
    "ra": "float64: right ascension (deg)",
    "dec": "float64: declination (deg)",
    "x": "float64: column on the calexp (0-based pixel centres)",
    "y": "float64: row on the calexp",
    "mag": "float64: AB magnitude",
    "flux_nJy": "float64: flux in nJy, 10**(-0.4 (mag - 31.4))",
    "flux": "float64: flux in calexp image units (electrons) through the calexp's zero point",
    "on_template": "bool: injected into the template too (must vanish in the difference)",
    "host_id": "int64: id in src of the host galaxy, -1 for none",
    "host_offset_arcsec": "float64: distance from the host's centroid (arcsec), 0 without host",
    "injected": "bool: landed on the calexp, not on NO_DATA pixels (False: nothing was added)",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class InjectConfig(ConfigSection):
    """Fake point sources injected before differencing, to measure completeness (``inject``)."""

    _key_prefix: ClassVar[str] = "inject."

    catalog: str = opt(
        "",
        "CSV or FITS table of fakes (columns ra, dec in deg, mag in AB; optional visit, ccdnum, injection_id, "
        "on_template); '' for none. Rows with another visit/ccdnum, or off the CCD, are ignored.",
    )
    n_per_ccd: int = opt(0, "Random fakes per CCD-visit (0: none); positions uniform over the CCD.")
    mag_range: tuple[float, float] = opt(
        (20.0, 24.5), "(bright, faint) AB magnitudes of the random fakes, drawn uniformly in between."
    )
    seed: int = opt(0, "Seed of the random fakes and their noise; with the visit and ccdnum it fixes everything.")
    host_fraction: float = opt(
        0.0, "Fraction (0-1) of the random fakes put on galaxies of the CCD's source catalogue (src)."
    )
    host_offset_max: float = opt(1.0, "Largest offset (arcsec) of a hosted fake from its galaxy's centroid.")
    template_fraction: float = opt(
        0.0, "Fraction (0-1) of the random fakes also injected into the template: they must vanish in the difference."
    )
    mask_nsigma: float = opt(
        1.0,
        "Pixels where the injected flux exceeds this many sigma of the exposure's noise (and the pixel under "
        "each fake's centre) get the INJECTED (template: INJECTED_TEMPLATE) mask plane.",
    )
    add_noise: bool = opt(
        True, "Add the Poisson noise of the injected counts to the image (the variance gets it always)."
    )
    gain: float = opt(
        1.0, "Electrons per calexp image unit for the Poisson term (calexps are in electrons with isr.do_apply_gains)."
    )

    @property
    def enabled(self) -> bool:
        """Whether injection is on (a catalogue file or ``n_per_ccd > 0``)."""
        return bool(self.catalog) or self.n_per_ccd > 0

    def _validate(self) -> None:
        if self.n_per_ccd < 0 or self.n_per_ccd > 100000:
            self._fail("n_per_ccd", self.n_per_ccd, "give 0 (off) to 100000 fakes per CCD-visit")
        if self.catalog and self.n_per_ccd:
            self._fail("n_per_ccd", self.n_per_ccd,
                       "use inject.catalog or inject.n_per_ccd, not both (set one to 0/'')")
        bright, faint = self.mag_range
        if not (math.isfinite(bright) and math.isfinite(faint) and bright <= faint):
            self._fail("mag_range", self.mag_range,
                       "give [bright, faint] AB magnitudes with bright <= faint, e.g. [20, 24.5]")
        for name in ("host_fraction", "template_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                self._fail(name, v, "give a fraction between 0 and 1")
        if not (self.host_offset_max >= 0 and math.isfinite(self.host_offset_max)):
            self._fail("host_offset_max", self.host_offset_max, "give an offset >= 0 arcsec")
        if not (self.mask_nsigma > 0 and math.isfinite(self.mask_nsigma)):
            self._fail("mask_nsigma", self.mask_nsigma, "give a positive number of sigma, e.g. 1")
        if not (self.gain > 0 and math.isfinite(self.gain)):
            self._fail("gain", self.gain, "give a positive number of electrons per image unit, e.g. 1")


@dataclass(frozen=True, slots=True, eq=False)
class InjectionResult:
    """Output of :func:`inject_sources`.

    Attributes
    ----------
    exposure : Exposure
        A new exposure: image + fakes (+ noise), variance + Poisson term, mask + plane.
    catalog : astropy.table.Table
        The input rows with every column of :data:`CATALOG_COLUMNS` filled in.
    """

    exposure: Exposure
    catalog: Table


def mag_to_njy(mag: Any) -> np.ndarray:
    """AB magnitude to nJy: ``10**(-0.4 (mag - 31.4))``.

    Examples
    --------
    >>> float(mag_to_njy(31.4)), round(float(mag_to_njy(23.9)), 3)
    (1.0, 1000.0)
    """
    return np.power(10.0, -0.4 * (np.asarray(mag, dtype=np.float64) - NJY_AB_ZERO_POINT))


def _rng(seed: int, visit: int, ccdnum: int, stream: int) -> np.random.Generator:
    """One independent generator per (seed, visit, ccdnum, purpose): catalogue draws (0) and noise (1)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(visit) & 0xFFFFFFFF, int(ccdnum) & 0xFFFFFFFF, stream])


def select_hosts(sources: Any) -> np.ndarray:
    """Indices of the galaxies in a source catalogue (``src``): extended, unflagged, detected at S/N > 10.

    A source is extended when ``sqrt((Ixx + Iyy) / (Ixx_psf + Iyy_psf)) > HOST_SIZE_RATIO``.

    Parameters
    ----------
    sources : astropy.table.Table or mapping of str to ndarray
        Needs ``x, y, Ixx, Iyy, Ixx_psf, Iyy_psf``; ``snr`` and ``shape_flag`` are used when present.

    Returns
    -------
    ndarray of int
    """
    names = set(sources.colnames if hasattr(sources, "colnames") else sources)
    need = {"x", "y", "Ixx", "Iyy", "Ixx_psf", "Iyy_psf"}
    if not need <= names or len(sources["x"]) == 0:
        return np.zeros(0, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        size = np.asarray(sources["Ixx"], float) + np.asarray(sources["Iyy"], float)
        psf = np.asarray(sources["Ixx_psf"], float) + np.asarray(sources["Iyy_psf"], float)
        ok = np.sqrt(size / psf) > HOST_SIZE_RATIO
    if "snr" in names:
        ok &= np.asarray(sources["snr"], float) > 10.0
    if "shape_flag" in names:
        ok &= ~np.asarray(sources["shape_flag"], bool)
    return np.flatnonzero(ok & np.isfinite(np.asarray(sources["x"], float)))


def _pixel_scale_arcsec(exposure: Exposure) -> float:
    assert exposure.wcs is not None
    return float(np.sqrt(abs(np.linalg.det(exposure.wcs.celestial.pixel_scale_matrix))) * 3600.0)


def make_random_catalog(exposure: Exposure, *, visit: int, ccdnum: int, config: InjectConfig,
                        sources: Any = None) -> Table:
    """Random fakes for one CCD-visit (see the module docstring), deterministic from the seed, visit and ccdnum.

    Parameters
    ----------
    exposure : Exposure
        The calexp: its shape and WCS place the fakes.
    visit, ccdnum : int
        The CCD-visit (ids and the random stream).
    config : InjectConfig
        ``n_per_ccd``, ``mag_range``, ``seed``, ``host_fraction``, ``host_offset_max``, ``template_fraction``.
    sources : astropy.table.Table, optional
        The CCD's source catalogue (``src``) for hosted fakes; without it (or without galaxies in it)
        every fake is hostless.

    Returns
    -------
    astropy.table.Table
        ``injection_id, visit, ccdnum, ra, dec, mag, on_template, host_id, host_offset_arcsec``.
    """
    if exposure.wcs is None:
        msg = f"visit={visit} ccdnum={ccdnum}: the calexp has no WCS; fakes cannot be placed"
        raise InputError(msg)
    n = int(config.n_per_ccd)
    rng = _rng(config.seed, visit, ccdnum, 0)
    ny, nx = exposure.shape
    m = min(EDGE_MARGIN, (min(nx, ny) - 1) // 4)
    x = rng.uniform(m, nx - 1 - m, n)
    y = rng.uniform(m, ny - 1 - m, n)
    bright, faint = config.mag_range
    mag = rng.uniform(bright, faint, n)
    on_template = rng.uniform(0.0, 1.0, n) < config.template_fraction
    hosted = rng.uniform(0.0, 1.0, n) < config.host_fraction
    pick, radius, angle = rng.integers(0, 2**31, n), rng.uniform(0.0, 1.0, n), rng.uniform(0.0, 2 * np.pi, n)
    host_id = np.full(n, -1, np.int64)
    offset = np.zeros(n)
    hosts = select_hosts(sources) if sources is not None and hosted.any() else np.zeros(0, np.int64)
    if len(hosts):
        scale = _pixel_scale_arcsec(exposure)
        sid = np.asarray(sources["id"], np.int64) if "id" in sources.colnames else np.arange(len(sources["x"]))
        hx, hy = np.asarray(sources["x"], float), np.asarray(sources["y"], float)
        for i in np.flatnonzero(hosted):
            h = hosts[pick[i] % len(hosts)]
            r_arcsec = config.host_offset_max * np.sqrt(radius[i])  # uniform over the disc
            x[i] = hx[h] + r_arcsec / scale * np.cos(angle[i])
            y[i] = hy[h] + r_arcsec / scale * np.sin(angle[i])
            host_id[i], offset[i] = sid[h], r_arcsec
    ra, dec = exposure.wcs.all_pix2world(x, y, 0)
    base = (int(visit) * 100 + int(ccdnum)) * 100000
    return Table({
        "injection_id": base + np.arange(n, dtype=np.int64),
        "visit": np.full(n, int(visit), np.int64),
        "ccdnum": np.full(n, int(ccdnum), np.int64),
        "ra": np.asarray(ra, float) % 360.0,
        "dec": np.asarray(dec, float),
        "mag": mag,
        "on_template": on_template,
        "host_id": host_id,
        "host_offset_arcsec": offset,
    })


def _lanczos3_matrix(k: int, shift: float) -> np.ndarray:
    """``(k, k)`` matrix ``M`` with ``(M @ v)[i] = sum_n L(i - shift - n) v[n]``, taps normalised to sum 1."""
    base = math.floor(shift)
    frac = shift - base
    t = np.arange(6) - 2.0 - frac  # the six taps at t = (m - 2) - frac, as apfast.kernels.measure.lanczos_shift
    w = np.sinc(t) * np.sinc(t / 3.0)
    w /= w.sum()
    out = np.zeros((k, k))
    for i in range(k):
        for m in range(6):
            n = i - base + 2 - m
            if 0 <= n < k:
                out[i, n] += w[m]
    return out


def _shifted_stamp(stamp: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """``stamp`` moved by ``(fx, fy)`` pixels (separable Lanczos-3), rescaled to the input's sum."""
    k = stamp.shape[0]
    out = _lanczos3_matrix(k, fy) @ stamp @ _lanczos3_matrix(k, fx).T
    s = out.sum()
    return out * (stamp.sum() / s) if s != 0 else out


def inject_sources(exposure: Exposure, catalog: Table, *, config: InjectConfig, visit: int, ccdnum: int,
                   plane: str = "INJECTED", add_noise: bool | None = None) -> InjectionResult:
    """Add the fakes of ``catalog`` to ``exposure`` (a new exposure; the input is not modified).

    Parameters
    ----------
    exposure : Exposure
        Needs ``wcs``, ``psf`` and ``photo_calib``; ``variance`` and ``mask`` are updated when present.
    catalog : astropy.table.Table
        Columns ``ra``, ``dec`` (deg) and ``mag`` (AB); the other columns of :data:`CATALOG_COLUMNS`
        are kept when present and filled in otherwise.
    config : InjectConfig
        ``mask_nsigma``, ``gain``, ``seed`` and ``add_noise``.
    visit, ccdnum : int
        The CCD-visit (the noise generator's stream).
    plane : {'INJECTED', 'INJECTED_TEMPLATE'}
        The mask plane to set.
    add_noise : bool, optional
        Override ``config.add_noise`` (templates get the noiseless model).

    Returns
    -------
    InjectionResult

    Raises
    ------
    InputError
        If the exposure lacks a WCS, PSF or photometric calibration, or the catalogue lacks a column.
    """
    missing = [c for c in ("ra", "dec", "mag") if c not in catalog.colnames]
    if missing:
        msg = f"visit={visit} ccdnum={ccdnum}: the injection catalogue has no column(s) {', '.join(missing)}"
        raise InputError(msg)
    lacks = [name for name in ("wcs", "psf", "photo_calib") if getattr(exposure, name) is None]
    if lacks:
        msg = f"visit={visit} ccdnum={ccdnum}: cannot inject fakes into an exposure without {', '.join(lacks)}"
        raise InputError(msg)
    assert exposure.wcs is not None and exposure.psf is not None and exposure.photo_calib is not None
    if plane not in ("INJECTED", "INJECTED_TEMPLATE"):
        msg = f"plane must be 'INJECTED' or 'INJECTED_TEMPLATE', got {plane!r}"
        raise InputError(msg)
    noise = config.add_noise if add_noise is None else add_noise
    cat = _complete(catalog, visit, ccdnum)
    ny, nx = exposure.shape
    x, y = exposure.wcs.all_world2pix(np.asarray(cat["ra"], float), np.asarray(cat["dec"], float), 0)
    x, y = np.asarray(x, float), np.asarray(y, float)
    cat["x"], cat["y"] = x, y
    cat["flux_nJy"] = mag_to_njy(cat["mag"])
    cat["flux"] = np.asarray(exposure.photo_calib.njy_to_instflux(np.asarray(cat["flux_nJy"])), float)
    on = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    ix = np.where(on, np.floor(x + 0.5), 0).astype(np.int64)
    iy = np.where(on, np.floor(y + 0.5), 0).astype(np.int64)
    if exposure.mask is not None:
        on &= (exposure.mask[iy, ix] & bitmask("NO_DATA")) == 0
    on &= np.isfinite(np.asarray(cat["flux"])) & (np.asarray(cat["flux"]) > 0)
    cat["injected"] = on
    image = exposure.image.copy()
    variance = exposure.variance.copy() if exposure.variance is not None else None
    mask = exposure.mask.copy() if exposure.mask is not None else None
    bit = np.int32(bitmask(plane))
    rng = _rng(config.seed, visit, ccdnum, 1)
    x0, y0 = exposure.xy0
    # one stamp box at a time: a CCD of 8M pixels costs no full-size temporaries
    for i in np.flatnonzero(on):
        stamp = _shifted_stamp(exposure.psf.compute_image(x[i] + x0, y[i] + y0), x[i] - ix[i], y[i] - iy[i])
        h = stamp.shape[0] // 2
        ya, yb, xa, xb = max(iy[i] - h, 0), min(iy[i] + h + 1, ny), max(ix[i] - h, 0), min(ix[i] + h + 1, nx)
        sy, sx = ya - (iy[i] - h), xa - (ix[i] - h)
        box = (slice(ya, yb), slice(xa, xb))
        model = float(cat["flux"][i]) * stamp[sy : sy + yb - ya, sx : sx + xb - xa]
        # Poisson variance in image units^2: model * gain electrons, divided by gain^2
        poisson = np.clip(model, 0.0, None) / config.gain
        add = model + rng.standard_normal(model.shape) * np.sqrt(poisson) if noise else model
        if mask is not None:
            sigma = np.sqrt(np.clip(exposure.variance[box], 0.0, None)) if exposure.variance is not None else np.inf
            flagged = model > config.mask_nsigma * sigma
            flagged[iy[i] - ya, ix[i] - xa] = True
            mask[box][flagged] |= bit
        image[box] += add.astype(np.float32)
        if variance is not None:
            variance[box] += poisson.astype(np.float32)
    out = replace(exposure, image=image, mask=mask, variance=variance, metadata=exposure.metadata.copy())
    return InjectionResult(exposure=out, catalog=cat)


def _complete(catalog: Table, visit: int, ccdnum: int) -> Table:
    """A copy of ``catalog`` with the id, CCD-visit, template and host columns every fake needs."""
    cat = Table(catalog, copy=True)
    n = len(cat)
    defaults: dict[str, Any] = {
        "injection_id": np.arange(n, dtype=np.int64),
        "visit": np.full(n, int(visit), np.int64),
        "ccdnum": np.full(n, int(ccdnum), np.int64),
        "on_template": np.zeros(n, bool),
        "host_id": np.full(n, -1, np.int64),
        "host_offset_arcsec": np.zeros(n),
    }
    for name, value in defaults.items():
        if name not in cat.colnames:
            cat[name] = value
    for name in ("ra", "dec", "mag"):
        cat[name] = np.asarray(cat[name], dtype=np.float64)
    cat["on_template"] = np.asarray(cat["on_template"]).astype(bool)
    return cat
