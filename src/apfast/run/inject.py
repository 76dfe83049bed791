"""Fake injection in ``apfast process``: catalogue files, the ``injected_catalog`` dataset, re-injection.

The stage (:mod:`apfast.ccd.inject`) adds fakes to an exposure; this module is its I/O wrapper:

- :func:`read_catalog_file` reads ``inject.catalog`` (CSV or FITS: ``ra``, ``dec`` in degrees, ``mag``
  in AB; optional ``visit``, ``ccdnum``, ``injection_id``, ``on_template``) once per run and says in
  one line which file and column is wrong (:class:`InjectCatalogError`, exit status 2);
- :func:`inject_for_difference` is called by :func:`apfast.run.pipeline.process_diffim`: it builds
  the CCD-visit's catalogue (file rows of this visit and CCD, or on the CCD; or random fakes),
  injects it into the calexp in memory (and the ``on_template`` fakes into the warped template),
  and writes the ``injected_catalog`` dataset (FITS table, columns
  :data:`apfast.ccd.inject.CATALOG_COLUMNS`);
- :func:`reinjected_calexp` gives the DIA stage the same injected calexp when it reads the calexp
  from disk (a resumed run, ``-j N`` or Dask): the stored ``injected_catalog`` injected again with the
  same seed gives identical pixels, noise included.

With injection off (``inject.catalog = ''`` and ``inject.n_per_ccd = 0``, the default) nothing here
runs and the products are those of a run without this module.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from apfast.ccd.inject import InjectConfig, inject_sources, make_random_catalog
from apfast.errors import InputError
from apfast.exposure import Exposure

__all__ = [
    "DATASET",
    "InjectCatalogError",
    "catalog_for_ccd",
    "check_catalog",
    "dia_products",
    "inject_for_difference",
    "read_catalog_file",
    "reinjected_calexp",
]

log = logging.getLogger(__name__)

#: The Butler dataset holding what was injected into one CCD-visit.
DATASET = "injected_catalog"
_REQUIRED = ("ra", "dec", "mag")
_INT_COLUMNS = ("visit", "ccdnum", "injection_id")


class InjectCatalogError(InputError):
    """``inject.catalog`` cannot be used (missing file, unreadable table, missing or bad column): exit 2."""

    exit_code = 2


def check_catalog(config: InjectConfig) -> None:
    """Read ``inject.catalog`` once before any work, so a bad file stops the run with one line (exit 2)."""
    if config.catalog:
        read_catalog_file(config.catalog)


def read_catalog_file(path: str | Path) -> Table:
    """Read an injection catalogue (CSV or FITS), checking its columns.

    Parameters
    ----------
    path : str or Path
        A ``.csv`` file with a header line, or a FITS file with the table in HDU 1.

    Returns
    -------
    astropy.table.Table
        ``ra``, ``dec``, ``mag`` as float64, ``visit``/``ccdnum``/``injection_id`` as int64 and
        ``on_template`` as bool when present; ``injection_id`` defaults to the row number.

    Raises
    ------
    InjectCatalogError
        Naming the file and the fix: it does not exist, is not a readable table, lacks ``ra``,
        ``dec`` or ``mag``, or a column holds non-numbers.
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        msg = f"inject.catalog = {str(path)!r}: no such file; give a CSV or FITS table with columns ra, dec, mag"
        raise InjectCatalogError(msg) from None
    return _read_cached(str(p.resolve()), st.st_mtime_ns, st.st_size).copy()


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, _mtime: int, _size: int) -> Table:
    fmt = "fits" if path.lower().endswith((".fits", ".fit", ".fits.gz")) else "ascii.csv"
    try:
        t = Table.read(path, format=fmt)
    except Exception as exc:  # astropy raises many kinds for a malformed table
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        msg = (f"inject.catalog {path}: cannot read it as a {'FITS' if fmt == 'fits' else 'CSV'} table ({first}); "
               "give a CSV with a header line or a FITS binary table")
        raise InjectCatalogError(msg) from None
    lower = {c.lower(): c for c in t.colnames}
    missing = [c for c in _REQUIRED if c not in lower]
    if missing:
        msg = (f"inject.catalog {path}: no column {', '.join(repr(c) for c in missing)} "
               f"(columns: {', '.join(t.colnames) or 'none'}); it needs ra, dec (deg) and mag (AB)")
        raise InjectCatalogError(msg)
    out = Table()
    for name in (*_REQUIRED, *_INT_COLUMNS, "on_template"):
        if name not in lower:
            continue
        masked = np.ma.getmaskarray(t[lower[name]]) if hasattr(t[lower[name]], "mask") else None
        if masked is not None and masked.any():
            bad = int(np.flatnonzero(masked)[0])
            msg = f"inject.catalog {path}: column {name!r} has a missing value in data row {bad + 1}; fill it in"
            raise InjectCatalogError(msg)
        col = np.asarray(t[lower[name]])
        try:
            if name == "on_template":
                text = np.char.lower(col.astype(str)) if col.dtype.kind in "US" else None
                value = np.isin(text, ["true", "1", "t", "yes"]) if text is not None else col.astype(bool)
            elif name in _INT_COLUMNS:
                value = col.astype(np.int64)
            else:
                value = col.astype(np.float64)
        except (TypeError, ValueError):
            msg = f"inject.catalog {path}: column {name!r} holds values that are not numbers; fix the file"
            raise InjectCatalogError(msg) from None
        if name in _REQUIRED and not np.all(np.isfinite(value)):
            bad = int(np.flatnonzero(~np.isfinite(value))[0])
            msg = f"inject.catalog {path}: column {name!r} has a missing or non-finite value in data row {bad + 1}"
            raise InjectCatalogError(msg)
        out[name] = value
    if "injection_id" not in out.colnames:
        out["injection_id"] = np.arange(len(out), dtype=np.int64)
    return out


def catalog_for_ccd(config: InjectConfig, calexp: Exposure, *, visit: int, ccdnum: int,
                    sources: Any = None) -> Table:
    """The fakes of one CCD-visit: file rows of this visit/CCD (or, without those columns, on the CCD), or random.

    Rows of the file that name this visit and CCD are kept wherever they fall (``injected`` then says
    whether they landed); rows without ``visit``/``ccdnum`` are kept when they fall on the calexp.
    """
    if not config.catalog:
        return make_random_catalog(calexp, visit=visit, ccdnum=ccdnum, config=config, sources=sources)
    t = read_catalog_file(config.catalog)
    keep = np.ones(len(t), bool)
    for key, value in (("visit", visit), ("ccdnum", ccdnum)):
        if key in t.colnames:
            keep &= np.asarray(t[key]) == value
    if "visit" not in t.colnames or "ccdnum" not in t.colnames:
        assert calexp.wcs is not None
        x, y = calexp.wcs.all_world2pix(np.asarray(t["ra"]), np.asarray(t["dec"]), 0)
        ny, nx = calexp.shape
        keep &= np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    return t[keep]


def inject_for_difference(out: Any, calexp: Exposure, template: Exposure, *, visit: int, ccdnum: int,
                          config: InjectConfig, sources: Any = None) -> tuple[Exposure, Exposure, Table]:
    """Inject one CCD-visit's fakes into the calexp (and the template fraction into the template).

    Parameters
    ----------
    out : Butler or OutputWriter
        Receives the ``injected_catalog`` dataset.
    calexp, template : Exposure
        The science exposure and the template warped onto it (not modified).
    visit, ccdnum : int
    config : InjectConfig
    sources : astropy.table.Table, optional
        The CCD's ``src`` (hosts of hosted random fakes).

    Returns
    -------
    (Exposure, Exposure, astropy.table.Table)
        The injected calexp, the template (injected when any fake is ``on_template``) and the catalogue.
    """
    cat = catalog_for_ccd(config, calexp, visit=visit, ccdnum=ccdnum, sources=sources)
    res = inject_sources(calexp, cat, config=config, visit=visit, ccdnum=ccdnum)
    cat = res.catalog
    both = np.asarray(cat["on_template"], bool) & np.asarray(cat["injected"], bool)
    if both.any():
        template = inject_sources(template, cat[both], config=config, visit=visit, ccdnum=ccdnum,
                                  plane="INJECTED_TEMPLATE", add_noise=False).exposure
    cat.meta.update({"INJSEED": int(config.seed), "INJNOISE": bool(config.add_noise), "INJGAIN": float(config.gain)})
    out.put(cat, DATASET, {"visit": int(visit), "ccdnum": int(ccdnum)})
    log.info("visit=%d ccdnum=%d: injected %d fake(s) (%d also into the template)", visit, ccdnum,
             int(np.sum(cat["injected"])), int(both.sum()))
    return res.exposure, template, cat


def reinjected_calexp(butler: Any, did: dict[str, int], calexp: Exposure, config: InjectConfig) -> Exposure:
    """The calexp read from disk with the stored ``injected_catalog`` injected again (identical pixels).

    Raises
    ------
    NoLocationsError
        If the CCD-visit has no ``injected_catalog`` (its difference was made without injection).
    """
    cat = butler.get(DATASET, did)
    return inject_sources(calexp, cat, config=config, visit=int(did["visit"]), ccdnum=int(did["ccdnum"])).exposure


def dia_products(butler: Any, did: dict[str, int], config: InjectConfig, products: dict[str, Any]) -> dict[str, Any]:
    """The in-memory products for the DIA stage: with injection on and no calexp in memory, the re-injected one.

    Without injection, or with the calexp handed over by differencing, ``products`` itself is returned.
    """
    if not config.enabled or "calexp" in products:
        return products
    return {**products, "calexp": reinjected_calexp(butler, did, butler.get("calexp", did), config)}
