"""Build ``OUT/report/``: ``index.html``, one page per CCD-visit and per shown DiaObject, and their PNGs.

Three passes: read each CCD-visit's products once (thumbnails and diagnostics are
written then, so a full image is in memory for one CCD-visit at a time), query the
APDB for the DiaObjects of those CCD-visits, then write the pages.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apfast.report.html import esc, fmt, light_curve_svg, marker_legend, page, table, thumbnail_svg
from apfast.report.psfmatch import psfmatch_html, read_psfmatch

__all__ = ["ReportResult", "build_report"]

log = logging.getLogger("apfast.report")

REPORT_DIR = "report"
_BIN = 8
_DIPOLE_FLAGS = (
    "pixelFlags_edge",
    "pixelFlags_saturatedCenter",
    "pixelFlags_crCenter",
    "pixelFlags_interpolatedCenter",
    "pixelFlags_suspectCenter",
    "pixelFlags_bad",
    "psfFlux_flag",
    "centroid_flag",
)


_COUNT_ATTR = {"positive": "n_pos", "negative": "n_neg", "dipole": "n_dipole", "flagged": "n_flagged",
               "filtered": "n_filtered"}


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What :func:`build_report` wrote: ``index`` (path of index.html), counts and seconds."""

    index: Path
    n_ccd_visits: int
    n_objects: int
    n_objects_shown: int
    n_png: int
    seconds: float


def _ccd_page(v: int, c: int) -> str:
    return f"ccd/v{v}_c{c:02d}.html"


def _obj_page(oid: int) -> str:
    return f"obj/{oid}.html"


def _kind(row: Any) -> str:
    def flag(name: str) -> bool:
        try:
            return bool(row[name])
        except (KeyError, IndexError, ValueError):
            return False

    if any(flag(f) for f in _DIPOLE_FLAGS) or flag("filtered") or flag("isFiltered"):
        return "flagged"
    if flag("isDipole"):
        return "dipole"
    if flag("isNegative"):
        return "negative"
    try:
        return "negative" if float(row["psfFlux"]) < 0 else "positive"
    except (KeyError, TypeError, ValueError):
        return "positive"


def _cutout_array(data: bytes | None) -> np.ndarray | None:
    if not data:
        return None
    from astropy.io import fits

    try:
        with fits.open(io.BytesIO(data)) as hdul:
            for h in hdul:
                if h.data is not None and np.ndim(h.data) == 2:
                    return np.asarray(h.data, dtype=np.float32)
    except (OSError, ValueError):
        return None
    return None


def _same_psf(a: Any, b: Any, exp: Any) -> bool:
    ny, nx = exp.shape
    ia, ib = a.compute_image(nx / 2, ny / 2), b.compute_image(nx / 2, ny / 2)
    return bool(np.shape(ia) == np.shape(ib) and np.allclose(ia, ib, rtol=0, atol=1e-7 * float(np.max(ia))))


def _pixel_scale_arcsec(wcs: Any) -> float | None:
    try:
        from astropy.wcs.utils import proj_plane_pixel_scales

        return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)
    except Exception:
        return None


def _get(butler: Any, name: str, did: dict[str, int]) -> Any:
    """The dataset ``name`` of ``did``, or None when it is missing or unreadable (logged)."""
    from apfast.errors import ApfastError

    try:
        return butler.get(name, did) if butler.datasetExists(name, did) else None
    except (ApfastError, OSError, ValueError) as exc:
        log.warning("report: %s %s unreadable: %s", name, did, exc)
        return None


def _read_calexp(butler: Any, cv: Any, did: dict[str, int], img_dir: Path, stem: str, info: dict[str, Any]) -> Any:
    """Fill ``cv`` from the calexp and write its thumbnail; return its PSF (None without a calexp)."""
    from apfast.report.plots import save_thumbnail

    calexp = _get(butler, "calexp", did)
    if calexp is None:
        return None
    rec = cv.record
    cv.has_calexp = True
    vi = calexp.visit_info
    if vi is not None:
        cv.mjd, cv.band = vi.mjd, vi.filter or ""
    md = calexp.metadata
    scale = _pixel_scale_arcsec(calexp.wcs) if calexp.wcs is not None else None
    cv.fwhm_arcsec = rec.get("fwhm_arcsec") or (
        round(float(md["PSF_FWHM"]) * scale, 3) if "PSF_FWHM" in md and scale else None
    )
    cv.zero_point = rec.get("zero_point") or (
        float(md["ZP"])
        if "ZP" in md
        else (calexp.photo_calib.zero_point if calexp.photo_calib is not None else None)
    )
    cv.astrom_rms_mas = rec.get("astrom_rms_mas") or (
        round(float(md["ASTR_RMS"]) * 1000.0, 1) if "ASTR_RMS" in md else None
    )
    cv.n_src = rec.get("n_src") or (int(md["N_SRC"]) if "N_SRC" in md else None)
    ny, nx = calexp.shape
    if calexp.wcs is not None:
        ra, dec = calexp.wcs.pixel_to_world_values([0, nx - 1, nx - 1, 0], [0, 0, ny - 1, ny - 1])
        cv.corners = [(float(a), float(b)) for a, b in zip(ra, dec, strict=True)]
    h, w = save_thumbnail(img_dir / f"{stem}_calexp.png", calexp.image, factor=_BIN, kind="asinh")
    info["calexp_png"] = (f"img/{stem}_calexp.png", w, h)
    info["shape"] = (ny, nx)
    info["pngs"].append(img_dir / f"{stem}_calexp.png")
    science_psf = calexp.psf
    del calexp
    return science_psf


def _matched_psf(butler: Any, did: dict[str, int], science_psf: Any, diff: Any) -> Any:
    """The PSF of the matched template, or None when it is missing or the same as the science PSF."""
    from apfast.errors import ApfastError

    matched_psf = None
    if butler.datasetExists("deepDiff_matchedExp", did):
        from apfast.exposure import read_exposure

        try:  # only the PSF is needed: read a 1-pixel box
            matched_psf = read_exposure(butler.getUri("deepDiff_matchedExp", did), bbox=(0, 1, 0, 1)).psf
            if (
                matched_psf is not None
                and science_psf is not None
                and _same_psf(matched_psf, science_psf, diff)
            ):
                matched_psf = (
                    None  # the matched template carries the science PSF: compare with the difference's
                )
        except (ApfastError, OSError, ValueError) as exc:
            log.warning("report: deepDiff_matchedExp %s unreadable: %s", did, exc)
    return matched_psf


def _read_diff(
    butler: Any, cv: Any, did: dict[str, int], img_dir: Path, stem: str, info: dict[str, Any], science_psf: Any
) -> None:
    """Fill ``cv`` from the difference image and write its thumbnail and diagnostics."""
    from apfast.report.plots import ccd_diagnostics, save_thumbnail

    diff = _get(butler, "deepDiff_differenceExp", did)
    if diff is None:
        return
    cv.has_diff = True
    cv.diff_meta = {
        k: diff.metadata[k]
        for k in ("DIFFMODE", "DIFFNSTP", "DIFFKSUM", "DIFFBKG", "DCRMODE", "DCRVPRED", "DCRVMEAS")
        if k in diff.metadata
    }
    if cv.mjd is None and diff.visit_info is not None:
        cv.mjd, cv.band = diff.visit_info.mjd, diff.visit_info.filter or ""
    ny, nx = diff.shape
    info["shape"] = (ny, nx)
    h, w = save_thumbnail(img_dir / f"{stem}_diff.png", diff.image, factor=_BIN, kind="diff")
    info["diff_png"] = (f"img/{stem}_diff.png", w, h)
    info["pngs"].append(img_dir / f"{stem}_diff.png")
    matched_psf = _matched_psf(butler, did, science_psf, diff)
    info["diag"] = ccd_diagnostics(
        img_dir / f"{stem}_diag.png",
        diff,
        science_psf=science_psf,
        matched_psf=matched_psf,
        title=f"visit {cv.visit} ccd {cv.ccdnum}: difference / sqrt(variance)",
    )
    info["diag_png"] = f"img/{stem}_diag.png"
    info["has_matched"] = butler.datasetExists("deepDiff_matchedExp", did)
    info["pngs"].append(img_dir / f"{stem}_diag.png")
    info["psfmatch"] = read_psfmatch(butler, did, img_dir, stem)
    info["pngs"] += info["psfmatch"].get("pngs", [])
    del diff


def _read_dia_sources(butler: Any, cv: Any, did: dict[str, int], info: dict[str, Any]) -> None:
    """Count the DIA sources of ``cv`` by kind and add them to ``info["dia"]``."""
    dia = _get(butler, "deepDiff_diaSrc", did)
    if dia is not None:
        cv.n_dia = len(dia)
        cols = set(dia.colnames)
        for r in dia:
            kind = _kind(r)
            attr = _COUNT_ATTR[kind]
            setattr(cv, attr, getattr(cv, attr) + 1)
            info["dia"].append(
                {
                    k: (r[k].item() if hasattr(r[k], "item") else r[k])
                    for k in (
                        "diaSourceId",
                        "diaObjectId",
                        "x",
                        "y",
                        "psfFlux",
                        "psfFluxErr",
                        "snr",
                        "ra",
                        "dec",
                    )
                    if k in cols
                }
                | {"kind": kind}
            )
    elif cv.record.get("n_dia") is not None:
        cv.n_dia = cv.record.get("n_dia")


def _read_rejected_sources(butler: Any, cv: Any, did: dict[str, int], info: dict[str, Any]) -> None:
    """Count the filtered-out DIA sources of ``cv`` and add them to ``info["dia"]`` with their reason."""
    rejected = _get(butler, "deepDiff_diaSrcRejected", did)
    if rejected is not None:
        cols = set(rejected.colnames)
        cv.n_filtered = len(rejected)
        for r in rejected:
            info["dia"].append(
                {k: (r[k].item() if hasattr(r[k], "item") else r[k])
                 for k in ("diaSourceId", "x", "y", "psfFlux", "psfFluxErr", "snr", "ra", "dec") if k in cols}
                | {"kind": "filtered", "reason": str(r["filterReason"]) if "filterReason" in cols else ""}
            )


def _read_alerts(
    butler: Any, did: dict[str, int], info: dict[str, Any], alerts_by_src: dict[int, dict[str, Any]]
) -> None:
    """Keep the cutouts of each alert by diaSourceId and count the alerts."""
    alerts = _get(butler, "alerts", did)
    for a in alerts or ():
        sid = int(a.get("diaSourceId") or a.get("diaSource", {}).get("diaSourceId") or 0)
        alerts_by_src[sid] = {k: a.get(k) for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference")}
    info["n_alerts"] = len(alerts or ())


def _read_ccd(
    butler: Any, cv: Any, img_dir: Path, alerts_by_src: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """Pass 1 of one CCD-visit: fill ``cv``, write its thumbnails and diagnostics; return page data."""
    did = {"visit": cv.visit, "ccdnum": cv.ccdnum}
    info: dict[str, Any] = {"pngs": [], "dia": []}
    stem = f"v{cv.visit}_c{cv.ccdnum:02d}"

    science_psf = _read_calexp(butler, cv, did, img_dir, stem, info)
    bkg = _get(butler, "calexpBackground", did)
    if bkg is not None:
        cv.sky = round(float(np.nanmedian(bkg.values)), 2)
    _read_diff(butler, cv, did, img_dir, stem, info, science_psf)
    _read_dia_sources(butler, cv, did, info)
    _read_rejected_sources(butler, cv, did, info)
    _read_alerts(butler, did, info, alerts_by_src)
    return info


def _summary_rows(ccds: Sequence[Any]) -> tuple[list[str], list[list[str]], list[str]]:
    stages = [
        "isr",
        "characterize",
        "calibrate",
        "template",
        "psfmatch",
        "decorrelate",
        "dia_detect",
        "association",
        "alerts",
        "total",
    ]
    present = [s for s in stages if any(s in (c.record.get("timings") or {}) for c in ccds)]
    head = [
        "visit",
        "ccd",
        "band",
        "MJD",
        "status",
        *[f"{s} s" for s in present],
        'FWHM"',
        "ZP",
        "astrom mas",
        "sky",
        "n_src",
        "n_dia",
        "+",
        "-",
        "dipole",
        "flagged",
        "filtered",
        "reason",
    ]
    rows, classes = [], []
    for c in ccds:
        t = c.record.get("timings") or {}
        link = f'<a href="{esc(c.page)}">{c.visit}</a>' if c.page else str(c.visit)
        rows.append(
            [
                link,
                str(c.ccdnum),
                esc(c.band),
                fmt(c.mjd, ".5f"),
                esc(c.status),
                *[fmt(t.get(s), ".2f") for s in present],
                fmt(c.fwhm_arcsec, ".3f"),
                fmt(c.zero_point, ".3f"),
                fmt(c.astrom_rms_mas, ".0f"),
                fmt(c.sky, ".1f"),
                fmt(c.n_src),
                fmt(c.n_dia),
                str(c.n_pos),
                str(c.n_neg),
                str(c.n_dipole),
                str(c.n_flagged),
                str(c.n_filtered),
                f'<span class="wrap">{esc(c.record.get("reason", ""))}</span>',
            ]
        )
        classes.append(c.status if c.status in ("failed", "skipped") else "")
    return head, rows, classes


def _obj_summary(o: dict[str, Any]) -> tuple[list[str], str]:
    """Per-band mean fluxes as 'g: 1234 ± 56' strings, and the band list."""
    parts = []
    for b in "ugrizy":
        n = o.get(f"{b}_psfFluxNdata") or 0
        if n:
            parts.append(
                f"{b}: {fmt(o.get(f'{b}_psfFluxMean'), '.0f')} ± {fmt(o.get(f'{b}_psfFluxMeanErr'), '.0f')}"
                f" ({n})"
            )
    return parts, "".join(b for b in "ugrizy" if o.get(f"{b}_psfFluxNdata"))


def _open_inputs(
    out: str | Path, db_url: str | None, config_overrides: Sequence[str], ids: Sequence[Sequence[str]]
) -> tuple[Any, Path, list[Any], list[Any], str | None, Any]:
    """The output repository, its selected CCD-visits and the APDB: (butler, out, exprs, ccds, url, apdb)."""
    from apfast.report.data import ApdbReader, ReportInputError, find_ccd_visits, open_output_repo, resolve_db_url
    from apfast.report.summary import read_summary_json

    butler = open_output_repo(out)
    out = Path(butler.repo.write_root)
    exprs = []
    if ids:
        from apfast.repo.dataid import parse_ids

        exprs = parse_ids([list(t) for t in ids])
    records = read_summary_json(out)
    ccds = find_ccd_visits(butler, records, exprs)
    url = db_url or resolve_db_url(out, config_overrides)
    if not ccds:
        what = f" matching --id {' '.join(' '.join(t) for t in ids)}" if ids else ""
        msg = f"{out} holds no processed CCD-visit{what}; run `apfast process` into it first"
        raise ReportInputError(msg)
    apdb = ApdbReader(url) if url else None
    if apdb is None:
        log.warning(
            "report: no APDB URL (no -c apdb.db_url and none in the stored config): no DiaObject pages"
        )
    return butler, out, exprs, ccds, url, apdb


def _fresh_report_dir(out: Path) -> Path:
    """``OUT/report`` with empty ccd/, obj/ and img/ folders."""
    rdir = out / REPORT_DIR
    for sub in ("ccd", "obj", "img"):  # our own products only: stale pages of an earlier report go
        shutil.rmtree(rdir / sub, ignore_errors=True)
        (rdir / sub).mkdir(parents=True, exist_ok=True)
    return rdir


def _read_ccds(
    butler: Any, ccds: list[Any], img_dir: Path, alerts_by_src: dict[int, dict[str, Any]]
) -> dict[tuple[int, int], dict[str, Any]]:
    """Pass 1 over every CCD-visit (:func:`_read_ccd`), logging each; the page data by CCD-visit key."""
    infos: dict[tuple[int, int], dict[str, Any]] = {}
    for i, cv in enumerate(ccds, 1):
        t = time.perf_counter()
        infos[cv.key] = _read_ccd(butler, cv, img_dir, alerts_by_src)
        if cv.has_calexp or cv.has_diff:
            cv.page = _ccd_page(cv.visit, cv.ccdnum)
        log.info(
            "report: [%d/%d] visit=%d ccdnum=%d %s in %.2f s",
            i,
            len(ccds),
            cv.visit,
            cv.ccdnum,
            cv.status,
            time.perf_counter() - t,
        )
    return infos


def _read_apdb(
    apdb: Any, ccds: list[Any], all_objects: bool, max_objects: int
) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]], dict[int, list[dict[str, Any]]], int, list[int]]:
    """The DiaObjects of the CCD-visits, most significant first: (objects, sources, forced, n_objects, shown)."""
    from apfast.report.data import significance

    objects: dict[int, dict[str, Any]] = {}
    obj_sources: dict[int, list[dict[str, Any]]] = {}
    obj_forced: dict[int, list[dict[str, Any]]] = {}
    n_objects = 0
    shown: list[int] = []
    if apdb is not None:
        try:
            here = apdb.sources_of([c.key for c in ccds])
            by_obj: dict[int, list[dict[str, Any]]] = {}
            for r in here:
                if r.get("diaObjectId") is not None:
                    by_obj.setdefault(int(r["diaObjectId"]), []).append(r)
            n_objects = len(by_obj)
            ranked = sorted(by_obj, key=lambda o: (-significance(by_obj[o]), o))
            shown = ranked if all_objects else ranked[:max_objects]
            objects = apdb.objects(shown)
            for r in apdb.sources_of_objects(shown):
                obj_sources.setdefault(int(r["diaObjectId"]), []).append(r)
            for r in apdb.forced_of_objects(shown):
                obj_forced.setdefault(int(r["diaObjectId"]), []).append(r)
        finally:
            apdb.close()
    log.info(
        "report: %d CCD-visits, %d DiaObjects (%d shown)%s",
        len(ccds),
        n_objects,
        len(shown),
        "" if all_objects or len(shown) == n_objects else "; --all shows every one",
    )
    return objects, obj_sources, obj_forced, n_objects, shown


def _write_overview(img_dir: Path, ccds: list[Any], objects: dict[int, dict[str, Any]], shown: list[int]) -> list[Path]:
    """Write the overview figure and the sky map; return their paths."""
    from apfast.report.plots import overview_figure, sky_map

    overview_figure(img_dir / "overview.png", [c for c in ccds if c.has_calexp or c.has_diff])
    sky_map(img_dir / "skymap.png", ccds, [objects[o] for o in shown if o in objects])
    return [img_dir / "overview.png", img_dir / "skymap.png"]


def _write_obj_pages(
    rdir: Path,
    img_dir: Path,
    ccds: list[Any],
    shown: list[int],
    objects: dict[int, dict[str, Any]],
    obj_sources: dict[int, list[dict[str, Any]]],
    obj_forced: dict[int, list[dict[str, Any]]],
    alerts_by_src: dict[int, dict[str, Any]],
) -> list[Path]:
    """Write a page (light curve, alert cutouts) per shown DiaObject; return the cutout PNGs written."""
    from apfast.report.plots import save_cutout_triplet

    pngs: list[Path] = []
    ccd_pages = {c.key: c.page for c in ccds if c.page}
    for k, oid in enumerate(shown, 1):
        srcs = sorted(obj_sources.get(oid, []), key=lambda r: float(r["midpointMjdTai"]))
        trip: dict[int, str] = {}
        for r in srcs:
            sid = int(r["diaSourceId"])
            cut = alerts_by_src.get(sid)
            if cut is None:
                continue
            p = img_dir / f"cut_{sid}.png"
            if save_cutout_triplet(
                p,
                *(_cutout_array(cut.get(n)) for n in ("cutoutScience", "cutoutTemplate", "cutoutDifference")),
            ):
                trip[sid] = f"../img/{p.name}"
                pngs.append(p)
        html = _obj_html(
            oid,
            objects.get(oid, {}),
            srcs,
            obj_forced.get(oid, []),
            trip,
            ccd_pages,
            rank=k,
            n_shown=len(shown),
        )
        (rdir / _obj_page(oid)).write_text(html, encoding="utf-8")
    return pngs


def build_report(
    out: str | Path,
    *,
    db_url: str | None = None,
    config_overrides: Sequence[str] = (),
    ids: Sequence[Sequence[str]] = (),
    all_objects: bool = False,
    max_objects: int = 200,
) -> ReportResult:
    """Write ``OUT/report/index.html`` and its pages and PNGs for an output repository of ``apfast process``.

    Parameters
    ----------
    out : str or Path
        The output repository (``REPO/rerun/NAME`` or an ``--output`` folder).
    db_url : str, optional
        APDB URL; default: ``-c apdb.db_url`` in ``config_overrides``, else the stored config's.
    config_overrides : sequence of str
        ``-c KEY=VALUE`` strings (only ``apdb.db_url`` matters).
    ids : sequence of token lists
        ``--id`` expressions restricting the CCD-visits (``visit=1^2 ccdnum=35``).
    all_objects : bool
        Show every DiaObject instead of the ``max_objects`` most significant.
    max_objects : int
        How many DiaObjects get a page (by max |psfFlux/psfFluxErr| of their DiaSources).

    Returns
    -------
    ReportResult

    Raises
    ------
    InputError
        ``out`` is not an output repository or holds no CCD-visit matching ``ids``.
    ConfigError
        No APDB at the URL, a bad ``-c`` key, ``max_objects < 1``.
    """
    from apfast.errors import ConfigError

    t_start = time.perf_counter()
    if max_objects < 1:
        msg = f"--max-objects {max_objects}: give a number >= 1 (or --all)"
        raise ConfigError(msg)
    butler, out, exprs, ccds, url, apdb = _open_inputs(out, db_url, config_overrides, ids)
    rdir = _fresh_report_dir(out)
    img_dir = rdir / "img"
    log.info("report: reading %d CCD-visit(s) of %s", len(ccds), out)

    alerts_by_src: dict[int, dict[str, Any]] = {}
    infos = _read_ccds(butler, ccds, img_dir, alerts_by_src)
    if exprs and any("filter" in e for e in exprs):
        ccds = [c for c in ccds if any(c.band in e.get("filter", (c.band,)) for e in exprs)]
    ccds.sort(key=lambda c: (c.mjd if c.mjd is not None else float("inf"), c.visit, c.ccdnum))

    objects, obj_sources, obj_forced, n_objects, shown = _read_apdb(apdb, ccds, all_objects, max_objects)
    shown_set = set(shown)

    pngs: list[Path] = [p for info in infos.values() for p in info["pngs"]]
    pngs += _write_overview(img_dir, ccds, objects, shown)
    for cv in ccds:
        if cv.page:
            (rdir / cv.page).write_text(_ccd_html(cv, infos[cv.key], shown_set, url), encoding="utf-8")
    pngs += _write_obj_pages(rdir, img_dir, ccds, shown, objects, obj_sources, obj_forced, alerts_by_src)

    index = rdir / "index.html"
    seconds = time.perf_counter() - t_start
    index.write_text(
        _index_html(out, url, ccds, objects, shown, obj_sources, n_objects, seconds), encoding="utf-8"
    )
    log.info(
        "report: wrote %s (%d CCD-visit pages, %d DiaObject pages, %d PNGs) in %.1f s",
        index,
        sum(1 for c in ccds if c.page),
        len(shown),
        len(pngs),
        time.perf_counter() - t_start,
    )
    return ReportResult(index, len(ccds), n_objects, len(shown), len(pngs), time.perf_counter() - t_start)


def _index_html(
    out: Path,
    url: str | None,
    ccds: Sequence[Any],
    objects: dict[int, dict[str, Any]],
    shown: Sequence[int],
    obj_sources: dict[int, list[dict[str, Any]]],
    n_objects: int,
    seconds: float,
) -> str:
    from datetime import UTC, datetime

    from apfast.report.data import significance

    head, rows, classes = _summary_rows(ccds)
    n_failed = sum(c.status == "failed" for c in ccds)
    body = [
        f"<h2>Run summary: {len(ccds)} CCD-visits ({n_failed} failed)</h2>",
        table(head, rows, left=[len(head) - 1], row_classes=classes, scroll=len(rows) > 25),
    ]
    fails = [c for c in ccds if c.status == "failed"]
    if fails:
        body.append(
            "<h2>Failures</h2><ul>"
            + "".join(
                f"<li>visit {c.visit} ccd {c.ccdnum}: {esc(c.record.get('reason', ''))}</li>" for c in fails
            )
            + "</ul>"
        )
    body.append(
        '<h2>Image quality and detections</h2><div class="flex">'
        '<div class="card"><img src="img/overview.png" width="880" alt="FWHM, zero point, sky and '
        'DIA-source counts against time and CCD"></div></div>'
    )
    body.append(
        '<h2>Sky map</h2><div class="card" style="display:inline-block"><img src="img/skymap.png" '
        'width="600" alt="CCD footprints and DiaObjects"></div>'
    )
    orows = []
    for oid in shown:
        o = objects.get(oid, {})
        parts, _ = _obj_summary(o)
        rel = [float(r["reliability"]) for r in obj_sources.get(oid, []) if r.get("reliability") is not None]
        orows.append(
            [
                f'<a href="{esc(_obj_page(oid))}">{oid}</a>',
                fmt(o.get("ra"), ".6f"),
                fmt(o.get("dec"), ".6f"),
                fmt(o.get("nDiaSources")),
                fmt(significance(obj_sources.get(oid, [])), ".1f"),
                esc("; ".join(parts)),
                fmt(max(rel) if rel else None, ".2f"),
            ]
        )
    lim = "" if len(shown) == n_objects else f" (the {len(shown)} most significant; --all shows every one)"
    body.append(f"<h2>DiaObjects: {n_objects}{esc(lim)}</h2>")
    body.append(
        table(
            [
                "diaObjectId",
                "ra",
                "dec",
                "nDiaSources",
                "max S/N",
                "mean psfFlux (nJy) per band (n)",
                "reliability",
            ],
            orows,
            left=[5],
            scroll=len(orows) > 25,
        )
        if orows
        else '<p class="muted">no DiaObjects (no APDB, or no DIA sources in these CCD-visits)</p>'
    )
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sub = f"{esc(out)} &middot; APDB {esc(url or 'none')} &middot; built {esc(now)} in {seconds:.1f} s"
    return page("apfast report", sub, "".join(body))


def _ccd_html(cv: Any, info: dict[str, Any], shown: set[int], url: str | None) -> str:
    ny, nx = info.get("shape", (0, 0))
    marks = []
    for r in info["dia"]:
        if "x" in r and "y" in r:
            tip = (
                f"diaSourceId {r.get('diaSourceId')} ({r['kind']}{': ' + r['reason'] if r.get('reason') else ''}) "
                f"x={float(r['x']):.1f} y={float(r['y']):.1f} "
                f"psfFlux={float(r.get('psfFlux') or 0):.0f} nJy S/N={float(r.get('snr') or 0):.1f}"
            )
            marks.append((float(r["x"]) / _BIN, (ny - float(r["y"])) / _BIN, r["kind"], tip))
    cards = []
    for key, label in (("calexp_png", "calexp (asinh stretch"), ("diff_png", "difference (linear ±5σ")):
        if key in info:
            src, w, h = info[key]
            svg = thumbnail_svg(f"../{src}", w, h, marks, scale=1.2)
            cards.append(
                f'<div class="card">{svg}<div class="cap">{esc(label)}, binned {_BIN}x{_BIN}; '
                f"y up)</div></div>"
            )
    body = [
        f"<h2>Images ({len(info['dia'])} DIA sources marked)</h2>",
        marker_legend(),
        f'<div class="flex">{"".join(cards)}</div>',
    ]
    kv = [
        ("status", esc(cv.status)),
        ("reason", esc(cv.record.get("reason", "")) or "-"),
        ("band", esc(cv.band)),
        ("MJD", fmt(cv.mjd, ".6f")),
        ('PSF FWHM (")', fmt(cv.fwhm_arcsec, ".3f")),
        ("zero point", fmt(cv.zero_point, ".4f")),
        ("astrometric scatter (mas)", fmt(cv.astrom_rms_mas, ".1f")),
        ("sky (median background)", fmt(cv.sky, ".2f")),
        ("sources (src)", fmt(cv.n_src)),
        (
            "DIA sources",
            f"{fmt(cv.n_dia)} ({cv.n_pos} positive, {cv.n_neg} negative, {cv.n_dipole} dipole, "
            f"{cv.n_flagged} flagged); {cv.n_filtered} filtered before association",
        ),
        ("alerts", fmt(info.get("n_alerts"))),
    ]
    kv += [(k, fmt(v)) for k, v in cv.diff_meta.items()]
    diag = info.get("diag") or {}
    kv += [(f"pull {k}", fmt(v, ".4g")) for k, v in diag.items()]
    for stage, sec in (cv.record.get("timings") or {}).items():
        kv.append((f"{stage} (s)", fmt(sec, ".2f")))
    body.append('<div class="flex"><div>')
    body.append("<h2>Numbers</h2>" + table(["quantity", "value"], [[esc(k), v] for k, v in kv], left=[0, 1]))
    body.append("</div><div>")
    if "diag_png" in info:
        note = (
            ""
            if info.get("has_matched")
            else " (no deepDiff_matchedExp: written with --no-write-matched, so only the science PSF)"
        )
        body.append(
            f'<h2>PSF matching diagnostics{esc(note)}</h2><div class="card">'
            f'<img src="../{esc(info["diag_png"])}" width="820" alt="pull histogram and PSFs"></div>'
            '<p class="muted">Left: difference/sqrt(variance) of unmasked pixels against a unit Gaussian '
            "(a width above 1 or heavy tails mean a poor subtraction or an underestimated variance). "
            "Right: the science PSF, the PSF-matched template's (or, where that is the science PSF itself, "
            "the difference image's PSF after decorrelation) and their residual at the corners and centre."
            "</p>"
        )
    body.append("</div></div>")
    body.append(psfmatch_html(info.get("psfmatch")))
    rows = []
    for r in sorted(info["dia"], key=lambda r: -abs(float(r.get("snr") or 0))):
        oid = r.get("diaObjectId")
        olink = (
            f'<a href="../{esc(_obj_page(int(oid)))}">{int(oid)}</a>'
            if oid is not None and int(oid) in shown
            else fmt(oid)
        )
        rows.append(
            [
                fmt(r.get("diaSourceId")),
                olink,
                esc(r["kind"] + (f" ({r['reason']})" if r.get("reason") else "")),
                fmt(r.get("x"), ".1f"),
                fmt(r.get("y"), ".1f"),
                fmt(r.get("ra"), ".6f"),
                fmt(r.get("dec"), ".6f"),
                fmt(r.get("psfFlux"), ".0f"),
                fmt(r.get("psfFluxErr"), ".0f"),
                fmt(r.get("snr"), ".1f"),
            ]
        )
    body.append(f"<h2>DIA sources ({len(rows)})</h2>")
    body.append(
        table(
            ["diaSourceId", "diaObjectId", "kind", "x", "y", "ra", "dec", "psfFlux nJy", "err", "S/N"],
            rows,
            left=[2],
            scroll=len(rows) > 20,
        )
    )
    return page(
        f"visit {cv.visit} ccd {cv.ccdnum}",
        f"CCD-visit &middot; APDB {esc(url or 'none')}",
        "".join(body),
        home="../index.html",
    )


def _obj_html(
    oid: int,
    o: dict[str, Any],
    srcs: list[dict[str, Any]],
    forced: list[dict[str, Any]],
    trip: dict[int, str],
    ccd_pages: dict[tuple[int, int], str],
    *,
    rank: int,
    n_shown: int,
) -> str:
    from apfast.report.data import significance

    parts, bands = _obj_summary(o)
    kv = [
        ("diaObjectId", str(oid)),
        ("ra, dec (deg)", f"{fmt(o.get('ra'), '.6f')}, {fmt(o.get('dec'), '.6f')}"),
        ("nDiaSources", fmt(o.get("nDiaSources"))),
        (
            "first / last DiaSource MJD",
            f"{fmt(o.get('firstDiaSourceMjdTai'), '.5f')} / {fmt(o.get('lastDiaSourceMjdTai'), '.5f')}",
        ),
        ("max S/N", fmt(significance(srcs), ".1f")),
        ("rank by significance", f"{rank} of {n_shown} shown"),
    ]
    rel = [float(r["reliability"]) for r in srcs if r.get("reliability") is not None]
    kv.append(("reliability (max over DiaSources)", fmt(max(rel), ".3f") if rel else "not set"))
    for b in bands:
        kv.append(
            (
                f"{b}: psfFlux mean ± err, sigma, n (nJy)",
                f"{fmt(o.get(f'{b}_psfFluxMean'), '.1f')} ± {fmt(o.get(f'{b}_psfFluxMeanErr'), '.1f')}, "
                f"{fmt(o.get(f'{b}_psfFluxSigma'), '.1f')}, {fmt(o.get(f'{b}_psfFluxNdata'))}",
            )
        )
        kv.append(
            (
                f"{b}: psfFlux min / max, max slope",
                f"{fmt(o.get(f'{b}_psfFluxMin'), '.1f')} / {fmt(o.get(f'{b}_psfFluxMax'), '.1f')}, "
                f"{fmt(o.get(f'{b}_psfFluxMaxSlope'), '.4g')}",
            )
        )
        kv.append(
            (
                f"{b}: forced / science flux mean (nJy)",
                f"{fmt(o.get(f'{b}_fpFluxMean'), '.1f')} / {fmt(o.get(f'{b}_scienceFluxMean'), '.1f')}",
            )
        )
    pts = [
        {
            "mjd": r["midpointMjdTai"],
            "flux": r.get("psfFlux"),
            "err": r.get("psfFluxErr"),
            "band": r.get("band"),
            "kind": "dia",
            "tip": f"DiaSource {r['diaSourceId']} visit {r['visit']}: {fmt(r.get('psfFlux'), '.0f')} "
            f"± {fmt(r.get('psfFluxErr'), '.0f')} nJy",
        }
        for r in srcs
    ]
    pts += [
        {
            "mjd": r["midpointMjdTai"],
            "flux": r.get("psfFlux"),
            "err": r.get("psfFluxErr"),
            "band": r.get("band"),
            "kind": "forced",
            "tip": f"forced visit {r['visit']}: {fmt(r.get('psfFlux'), '.0f')} "
            f"± {fmt(r.get('psfFluxErr'), '.0f')} nJy",
        }
        for r in forced
    ]
    body = [
        '<div class="flex"><div>',
        "<h2>Statistics (APDB DiaObject, current version)</h2>",
        table(["quantity", "value"], [[esc(k), v] for k, v in kv], left=[0, 1]),
        "</div><div>",
        f"<h2>Light curve ({len(srcs)} DiaSources, {len(forced)} forced)</h2>",
        light_curve_svg(pts),
        "</div></div>",
    ]
    rows = []
    for r in srcs:
        sid = int(r["diaSourceId"])
        key = (int(r["visit"]), int(r["detector"]))
        visit = f'<a href="../{esc(ccd_pages[key])}">{key[0]}</a>' if key in ccd_pages else str(key[0])
        img = (
            f'<img class="pix" src="{esc(trip[sid])}" height="110" alt="science, template, difference">'
            if sid in trip
            else '<span class="muted">no cutout in this output repository</span>'
        )
        rows.append(
            [
                visit,
                str(key[1]),
                fmt(r.get("midpointMjdTai"), ".5f"),
                esc(r.get("band") or ""),
                f"{fmt(r.get('psfFlux'), '.0f')} ± {fmt(r.get('psfFluxErr'), '.0f')}",
                fmt(r.get("snr"), ".1f"),
                "yes" if r.get("isDipole") else "",
                fmt(r.get("reliability"), ".2f"),
                img,
            ]
        )
    body.append("<h2>Detections: science | template | difference (the alert cutouts)</h2>")
    body.append(
        table(
            ["visit", "ccd", "MJD", "band", "psfFlux nJy", "S/N", "dipole", "reliability", "cutouts"],
            rows,
            left=[8],
        )
    )
    if forced:
        frows = [
            [
                str(r["visit"]),
                str(r["detector"]),
                fmt(r.get("midpointMjdTai"), ".5f"),
                esc(r.get("band") or ""),
                f"{fmt(r.get('psfFlux'), '.0f')} ± {fmt(r.get('psfFluxErr'), '.0f')}",
            ]
            for r in sorted(forced, key=lambda r: float(r["midpointMjdTai"]))
        ]
        body.append(f"<h2>Forced photometry ({len(frows)})</h2>")
        body.append(table(["visit", "ccd", "MJD", "band", "psfFlux nJy"], frows, scroll=len(frows) > 15))
    return page(
        f"DiaObject {oid}",
        f"{esc(' · '.join(parts)) or 'no mean fluxes'}",
        "".join(body),
        home="../index.html",
    )
