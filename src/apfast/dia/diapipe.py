"""DIA sources to the APDB and alerts for one CCD-visit (Rubin's ``DiaPipelineTask``).

:func:`process_dia` runs after image differencing, per CCD-visit:

1. detect and measure DIA sources on ``deepDiff_differenceExp`` (both polarities, dipoles,
   forced fluxes on the calexp and the matched template) and write ``deepDiff_diaSrc``;
2. in ONE APDB transaction: undo a previous run of this CCD-visit (so re-processing
   replaces rows), load the DiaObjects whose positions fall in the CCD footprint grown by
   ``association.pixel_margin`` pixels, match the sources one-to-one within
   ``association.max_dist_arcsec`` (new objects for the rest), recompute the summary
   statistics of every touched object from its full history, run forced PSF photometry
   on the difference and the calexp at every DiaObject inside the CCD, and store the new
   object versions, sources and forced sources;
3. write one Avro alert per DIA source to ``alerts/<visit>_<ccdnum>.avro``.

Because association reads and writes inside the same transaction, two processes storing
overlapping CCD-visits are serialised by the database (SQLite: the write lock taken at
``BEGIN IMMEDIATE``); the second sees the first's objects and cannot create a duplicate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.table import Table

from apfast._configbase import ConfigSection, opt
from apfast.dia.apdb_schema import concat_column_sets
from apfast.exposure import Exposure
from apfast.repo.butler import Butler

if TYPE_CHECKING:
    from apfast.repo.writer import OutputWriter

__all__ = ["DiaOutcome", "DiaPipeConfig", "ccd_region", "midpoint_mjd", "process_dia", "take_rows"]

log = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]


class AlertBatch(list):
    """The alert records of one CCD-visit, with the Avro codec to write them with."""

    codec: str = "null"


@dataclass(frozen=True, slots=True, kw_only=True)
class DiaPipeConfig(ConfigSection):
    """What ``apfast process`` does after image differencing."""

    do_dia: bool = opt(True, "Detect DIA sources, associate them and store them in the APDB.")
    do_alerts: bool = opt(True, "Write one Avro alert per DIA source to alerts/<visit>_<ccdnum>.avro.")


@dataclass(slots=True)
class DiaOutcome:
    """Numbers of one CCD-visit's DIA step (for the summary table)."""

    n_sources: int = 0
    n_positive: int = 0
    n_negative: int = 0
    n_dipole: int = 0
    n_new_objects: int = 0
    n_updated_objects: int = 0
    n_forced: int = 0
    n_alerts: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


TAI_MINUS_UTC_S = 37.0  # leap seconds since 2017-01-01 (DECam headers give MJD-OBS in UTC)


def midpoint_mjd(exp: Exposure, row: dict[str, Any]) -> float:
    """Exposure midpoint as MJD TAI: MJD-OBS (UTC) + EXPTIME / 2 + TAI-UTC."""
    vi = exp.visit_info
    mjd = vi.mjd if vi is not None and vi.mjd is not None else row.get("mjd")
    exptime = vi.exptime if vi is not None and vi.exptime is not None else row.get("expTime")
    if mjd is None:
        from apfast.errors import InputError

        msg = f"visit={row['visit']} ccdnum={row['ccdnum']}: no MJD-OBS in the calexp or the registry"
        raise InputError(msg)
    return float(mjd) + (0.5 * float(exptime or 0.0) + TAI_MINUS_UTC_S) / 86400.0


def ccd_region(exp: Exposure, margin_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Sky polygon (ra, dec in degrees, 4 corners) of the CCD grown by ``margin_px`` pixels."""
    ny, nx = exp.shape
    m = float(margin_px)
    xs = np.array([-m, nx - 1 + m, nx - 1 + m, -m])
    ys = np.array([-m, -m, ny - 1 + m, ny - 1 + m])
    assert exp.wcs is not None  # a calexp
    ra, dec = exp.wcs.all_pix2world(xs, ys, 0)
    return np.asarray(ra, float) % 360.0, np.asarray(dec, float)


def take_rows(cols: Columns, index: Any) -> Columns:
    """Row subset of a column set (boolean mask or integer index)."""
    return {k: np.asarray(v)[index] for k, v in cols.items()}


def _n_rows(cols: Columns) -> int:
    return len(next(iter(cols.values()))) if cols else 0


def _rows_or_none(cols: Columns) -> Columns | None:
    """``None`` for a column set without rows (compute_object_versions then keeps the prior fpFlux)."""
    return cols if cols and _n_rows(cols) > 0 else None


def _inside(exp: Exposure, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel positions of (ra, dec) and whether they fall on the CCD."""
    if len(ra) == 0:
        e = np.zeros(0)
        return e, e, np.zeros(0, bool)
    assert exp.wcs is not None  # the difference carries the calexp's WCS
    x, y = exp.wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
    ny, nx = exp.shape
    ok = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    return np.asarray(x, float), np.asarray(y, float), ok


def _forced_sources(objects: Columns, diff: Exposure, calexp: Exposure, *, visit: int, detector: int,
                    band: str, t_mid: float) -> Columns:
    """DiaForcedSource rows: forced PSF flux on the difference and the calexp at every object on the CCD."""
    from apfast.dia.association import dia_forced_source_ids
    from apfast.dia.diasource import forced_photometry

    if not objects or _n_rows(objects) == 0:
        return {}
    x, y, ok = _inside(diff, objects["ra"], objects["dec"])
    if not ok.any():
        return {}
    x, y = x[ok], y[ok]
    fd = forced_photometry(diff, x, y)
    fs = forced_photometry(calexp, x, y)
    n = int(ok.sum())
    return {
        "diaForcedSourceId": dia_forced_source_ids(visit, detector, n),
        "diaObjectId": np.asarray(objects["diaObjectId"])[ok].astype(np.int64),
        "ra": np.asarray(objects["ra"], float)[ok],
        "dec": np.asarray(objects["dec"], float)[ok],
        "visit": np.full(n, visit, np.int64),
        "detector": np.full(n, detector, np.int64),
        "psfFlux": np.asarray(fd["flux"], float),
        "psfFluxErr": np.asarray(fd["fluxErr"], float),
        "midpointMjdTai": np.full(n, t_mid),
        "scienceFlux": np.asarray(fs["flux"], float),
        "scienceFluxErr": np.asarray(fs["fluxErr"], float),
        "band": np.full(n, band, dtype=object),
    }


def _read_matched(butler: Butler, did: dict[str, int], cfg: Any) -> Any:
    """``deepDiff_matchedExp`` from disk, or an error saying it was not written and what to do."""
    from apfast.errors import NoLocationsError

    try:
        return butler.get("deepDiff_matchedExp", did)
    except NoLocationsError as exc:
        if cfg.output.write_matched:
            raise
        msg = (f"visit={did['visit']} ccdnum={did['ccdnum']}: deepDiff_matchedExp was not written "
               "(output.write_matched = false / --no-write-matched), and the DIA stage needs the matched "
               "template (templateFlux, template cutouts) when it runs apart from differencing. Re-run with "
               "--clobber-output (differencing then hands it over in memory), or keep output.write_matched = "
               f"true ({exc})")
        raise NoLocationsError(msg) from None


def process_dia(butler: Butler, row: dict[str, Any], cfg: Any, apdb: Any, *,
                products: dict[str, Any] | None = None, writer: OutputWriter | None = None) -> DiaOutcome:
    """Detect, measure, associate, store and alert one CCD-visit (see the module docstring).

    Parameters
    ----------
    butler : Butler
        On the output repository holding ``calexp`` and the ``deepDiff_*`` images.
    row : dict
        Registry row of the CCD (visit, ccdnum, filter, mjd, expTime).
    cfg : apfast.run.config.PipelineConfig
    apdb : apfast.dia.apdb.Apdb
        The open APDB.
    products : dict, optional
        ``calexp``, ``difference`` and ``matched`` already in memory (else read through the Butler).
    writer : apfast.repo.writer.OutputWriter, optional
        Background writer: everything handed to it earlier is waited for before the APDB
        transaction (stored rows imply the CCD's image outputs exist), and this stage's
        ``deepDiff_diaSrc`` and ``alerts`` are handed to it (the caller waits for them).
    """
    from apfast.dia.alerts import build_ccd_alerts
    from apfast.dia.association import associate, compute_object_versions, dia_source_ids
    from apfast.dia.diasource import run_dia_detection

    visit, detector = int(row["visit"]), int(row["ccdnum"])
    did = {"visit": visit, "ccdnum": detector}
    band = str(row["filter"])[:1]
    out = DiaOutcome()
    tm = out.timings
    t = time.perf_counter()
    have = products or {}
    diff = have["difference"] if "difference" in have else butler.get("deepDiff_differenceExp", did)
    matched = have["matched"] if "matched" in have else _read_matched(butler, did, cfg)
    calexp = have["calexp"] if "calexp" in have else butler.get("calexp", did)
    tm["dia_read"] = time.perf_counter() - t

    t = time.perf_counter()
    res = run_dia_detection(diff, calexp, matched, config=cfg.dia)
    src = dict(res.sources)
    n = _n_rows(src)
    t_mid = midpoint_mjd(calexp, row)
    src["diaSourceId"] = dia_source_ids(visit, detector, n)
    src["visit"] = np.full(n, visit, np.int64)
    src["detector"] = np.full(n, detector, np.int64)
    src["midpointMjdTai"] = np.full(n, t_mid)
    src["band"] = np.full(n, band, dtype=object)
    vi = calexp.visit_info
    if vi is not None and getattr(vi, "exposure_time", None):
        src["exposureTime"] = np.full(n, float(vi.exposure_time))
    tm["dia_detect"] = time.perf_counter() - t

    t = time.perf_counter()
    src, rejected = _filter(src, diff, calexp, cfg, butler, band=band, out=out)
    _score(src, rejected, diff, cfg)
    n = _n_rows(src)
    out.n_sources = n
    neg = np.asarray(src["isNegative"], bool) if "isNegative" in src else np.zeros(n, bool)
    dip = np.asarray(src["isDipole"], bool) if "isDipole" in src else np.zeros(n, bool)
    out.n_positive, out.n_negative, out.n_dipole = int((~dip & ~neg).sum()), int((~dip & neg).sum()), int(dip.sum())
    tm["dia_filter"] = time.perf_counter() - t

    if writer is not None:
        tm["write_wait"] = writer.wait(did)
    t = time.perf_counter()
    region_ra, region_dec = ccd_region(calexp, cfg.association.pixel_margin)
    with apdb.ccd_visit(visit, detector, t_mid) as tx:
        affected = np.asarray(tx.undo(), dtype=np.int64)
        objects = tx.load_dia_objects(region_ra, region_dec)
        assoc = associate(src, objects, visit=visit, detector=detector,
                          max_dist_arcsec=cfg.association.max_dist_arcsec)
        src = assoc.sources
        n_obj = _n_rows(objects)
        loaded_ids = np.asarray(objects["diaObjectId"], np.int64) if n_obj else np.zeros(0, np.int64)
        touched_old = np.union1d(np.asarray(assoc.matched_object_ids, np.int64),
                                 np.intersect1d(affected, loaded_ids))
        hist_old = tx.load_dia_sources(touched_old) if len(touched_old) else {}
        forced_old = tx.load_dia_forced_sources(touched_old) if len(touched_old) else {}
        # forced photometry at every object on the CCD: the loaded ones and the new ones
        new_mask = np.isin(np.asarray(src["diaObjectId"], np.int64), np.asarray(assoc.new_object_ids, np.int64))
        new_pos = {"diaObjectId": np.asarray(src["diaObjectId"], np.int64)[new_mask],
                   "ra": np.asarray(src["ra"], float)[new_mask], "dec": np.asarray(src["dec"], float)[new_mask]}
        obj_pos = concat_column_sets([{k: objects[k] for k in ("diaObjectId", "ra", "dec")} if n_obj else {},
                                      new_pos])
        forced = _forced_sources(obj_pos, diff, calexp, visit=visit, detector=detector, band=band, t_mid=t_mid)
        history = concat_column_sets([hist_old, src])
        version_ids = np.union1d(touched_old, np.asarray(assoc.new_object_ids, np.int64))
        if len(version_ids):
            has_hist = np.isin(version_ids, np.asarray(history["diaObjectId"], np.int64))
            version_ids = version_ids[has_hist]
        prior = take_rows(objects, np.isin(loaded_ids, version_ids)) if n_obj else None
        versions = compute_object_versions(version_ids, history, band=band, validity_start=t_mid, prior=prior,
                                           forced_history=_rows_or_none(concat_column_sets([forced_old, forced])))
        tx.store(objects=versions, sources=src, forced_sources=forced, n_new_objects=int(assoc.n_new))
        tm["association"] = time.perf_counter() - t

        # The catalogue and the alerts are written INSIDE the transaction and waited for before it
        # commits: a CCD-visit is in the APDB only if its outputs are on disk (a failed write, e.g. a
        # full disk, rolls its rows back and the re-run redoes it).
        t = time.perf_counter()
        out_put = writer.put if writer is not None else butler.put
        out_put(Table({k: _fits_column(v) for k, v in src.items()}), "deepDiff_diaSrc", did)
        if rejected is not None:
            out_put(Table({k: _fits_column(v) for k, v in rejected.items()}), "deepDiff_diaSrcRejected", did)
        if cfg.dia_pipe.do_alerts:
            acfg = cfg.alerts
            alert_src = src
            rel = np.asarray(src.get("reliability", np.full(_n_rows(src), np.nan)), float)
            low = rel < acfg.min_reliability  # NaN (no score) alerts
            if low.any():
                alert_src = take_rows(src, ~low)
                out.filtered["alert_reliability"] = int(low.sum())
            alerts = build_ccd_alerts(alert_src, versions, hist_old, forced_old, difference=diff, science=calexp,
                                      template=matched, cutout_size=acfg.cutout_size, cutout_mask=acfg.cutout_mask,
                                      schema_version=acfg.schema_version)
            batch = AlertBatch(alerts)
            batch.codec = acfg.codec
            out_put(batch, "alerts", did)
            out.n_alerts = len(alerts)
        if writer is not None:
            writer.wait(did)
    out.n_new_objects = int(assoc.n_new)
    out.n_updated_objects = int(len(version_ids)) - int(assoc.n_new)
    out.n_forced = _n_rows(forced)
    tm["alerts"] = time.perf_counter() - t
    return out


def _bright_stars(butler: Butler, calexp: Exposure, cfg: Any, band: str) -> Columns | None:
    """Reference stars bright enough for the spike rule on this CCD (pixel positions), or None."""
    from apfast.errors import RefcatError
    from apfast.repo.refcat import load_polygon

    fcfg = cfg.dia_filter
    if fcfg.spike_length_px <= 0 or calexp.wcs is None:
        return None
    ra, dec = ccd_region(calexp, 0.0)
    try:
        region = load_polygon(butler.repo.root, cfg.calibrate.photometry_refcat, corners_ra=list(ra),
                              corners_dec=list(dec), margin=0.01)
    except (RefcatError, OSError) as exc:
        log.debug("spike rule off for this CCD: %s", exc)
        return None
    refs = region.sources
    col = f"{band}_mag"
    if refs.dtype.names is None or col not in refs.dtype.names:
        return None
    mag = np.asarray(refs[col], float)
    bright = np.isfinite(mag) & (mag < fcfg.spike_mag_limit)
    if not bright.any():
        return {"x": np.zeros(0), "y": np.zeros(0), "mag": np.zeros(0)}
    x, y = calexp.wcs.all_world2pix(np.asarray(refs["ra"], float)[bright], np.asarray(refs["dec"], float)[bright], 0)
    return {"x": np.asarray(x, float), "y": np.asarray(y, float), "mag": mag[bright]}


def _filter(src: Columns, diff: Exposure, calexp: Exposure, cfg: Any, butler: Butler, *, band: str,
            out: DiaOutcome) -> tuple[Columns, Columns | None]:
    """Apply :mod:`apfast.dia.filtering`: the kept sources, and the rejected ones with ``filterReason``."""
    from apfast.dia.filtering import filter_dia_sources

    fcfg = cfg.dia_filter
    if not fcfg.do_filter:
        return src, None
    stars = _bright_stars(butler, calexp, cfg, band) if _n_rows(src) else None
    res = filter_dia_sources(src, diff, calexp, config=fcfg, stars=stars)
    out.filtered = dict(res.counts)
    rejected = take_rows(src, ~res.keep)
    rejected["filterReason"] = res.reason[~res.keep]
    return take_rows(src, res.keep), rejected


def _score(src: Columns, rejected: Columns | None, diff: Exposure, cfg: Any) -> None:
    """Fill ``reliability`` and ``reliabilityVersion`` of the kept (and rejected) sources in place."""
    from apfast.dia.reliability import load_model, score_sources

    if cfg.reliability.model == "none":
        return
    model = load_model(cfg.reliability.model)
    for cols in (src, rejected):
        if cols is None:
            continue
        n = _n_rows(cols)
        cols["reliability"] = score_sources(cols, diff, model) if n else np.zeros(0)
        cols["reliabilityVersion"] = np.full(n, model.version, dtype=object)


def _fits_column(v: np.ndarray) -> np.ndarray:
    """A FITS-writable version of a column (object columns of str/None become str)."""
    v = np.asarray(v)
    if v.dtype.kind == "O":
        if all(isinstance(e, str) or e is None for e in v):
            return np.array(["" if e is None else e for e in v], dtype=str)
        return np.array([np.nan if e is None else e for e in v], dtype=float)
    return v
