"""Run the pipeline stages over CCDs: the stages' I/O wrapper (Rubin's ``runQuantum`` beside ``run``).

The single-CCD stages never touch the repository: this module reads their inputs and writes their
outputs through the Butler. Two stage drivers below it do their own repository I/O as well:
template retrieval (:mod:`apfast.diffim.template` reads deepCoadd patches) and the DIA stage
(:mod:`apfast.dia.diapipe` reads the difference products and writes ``deepDiff_diaSrc`` and alerts).

``process_ccd`` is Rubin's ``processCcd`` for one (visit, ccdnum): read the raw
and its calibrations through the Butler, run ISR, characterize and calibrate
(pure functions of arrays), and write ``calexp``, ``calexpBackground``, ``src``
and ``srcMatch`` into the output repository. ``run`` loops over the selected
CCDs, times each stage, keeps going past a failing CCD (or stops with
``doraise``) and returns one :class:`CcdOutcome` per CCD for the summary table.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from apfast.camera import parse_section
from apfast.ccd.calibrate import RefCatalog, mjd_to_epoch, run_calibrate
from apfast.ccd.characterize import run_characterize, summarize
from apfast.ccd.isr import amp_params_from_header, run_isr
from apfast.errors import AlgorithmError, ApfastError, CalibrationError, NoLocationsError, RefcatError
from apfast.exposure import Exposure
from apfast.repo.butler import Butler
from apfast.repo.writer import OutputWriter

__all__ = [
    "CcdOutcome",
    "diffim_outputs",
    "finish_outcome",
    "format_summary",
    "make_templates",
    "process_ccd",
    "process_dia_stage",
    "process_diffim",
    "process_image_stages",
    "run_process",
    "run_process_ccd",
    "undo_for_redo",
    "wait_for_outputs",
]

log = logging.getLogger(__name__)

PROCESS_CCD_OUTPUTS = ("calexp", "calexpBackground", "src")
DIFFIM_OUTPUTS = ("deepDiff_differenceExp", "deepDiff_matchedExp")


def diffim_outputs(cfg: Any) -> tuple[str, ...]:
    """The differencing outputs a run writes: without ``deepDiff_matchedExp`` if ``output.write_matched`` is off."""
    return DIFFIM_OUTPUTS if cfg.output.write_matched else DIFFIM_OUTPUTS[:1]


@dataclass(slots=True)
class CcdOutcome:
    """What happened to one CCD: status, per-stage seconds and headline numbers."""

    visit: int
    ccdnum: int
    status: str  # "ok", "failed", "skipped"
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    # in-memory products handed to the next stage of the same CCD (calexp, src, difference, matched);
    # they are also on disk, so a stage run on its own (or in another process) reads them back
    products: dict[str, Any] = field(default_factory=dict, repr=False)


def _optional_calib(butler: Butler, name: str, did: dict[str, Any]) -> Any:
    try:
        return butler.get(name, did)
    except NoLocationsError:
        return None


def _trim_offset(camera: Any, header: Any) -> tuple[int, int]:
    """``(x0, y0)`` of the trimmed image's first pixel on the raw grid (union of the amp data sections)."""
    xs, ys = [], []
    for amp in camera.amplifiers:
        sec = parse_section(amp.data_section.resolve(header, what=f"amp {amp.name} data section"))
        xs.append(sec.x0)
        ys.append(sec.y0)
    return min(xs), min(ys)


def _trimmed_wcs(raw_wcs: WCS | None, offset: tuple[int, int], did: dict[str, Any]) -> WCS:
    if raw_wcs is None:
        msg = f"raw {did} has no header WCS; astrometry needs an approximate one to start from"
        raise CalibrationError(msg)
    w = raw_wcs.deepcopy()
    w.wcs.crpix = w.wcs.crpix - np.array(offset, dtype=float)
    return w


def _refs(root: Path, name: str, corners_ra: list[float], corners_dec: list[float], margin: float, *,
          mag_col: str, epoch: float | None, did: dict[str, Any], colour: tuple[str, str] | None = None) -> RefCatalog:
    from apfast.repo.refcat import apply_proper_motion, load_polygon

    try:
        region = load_polygon(root, name, corners_ra=corners_ra, corners_dec=corners_dec, margin=margin)
    except RefcatError as exc:
        msg = f"visit={did['visit']} ccdnum={did['ccdnum']}: {exc}"
        raise RefcatError(msg) from None
    src = region.sources
    columns = src.dtype.names
    assert columns is not None  # a structured array
    if mag_col not in columns:
        msg = (
            f"reference catalogue {name!r} has no column {mag_col!r} (columns: {', '.join(columns)}); "
            "set calibrate.astrometry_mag or use a catalogue with this band"
        )
        raise RefcatError(msg)
    if epoch is not None:
        ra, dec = apply_proper_motion(region, epoch)
    else:
        ra, dec = np.asarray(src["ra"], float), np.asarray(src["dec"], float)
    err_col = mag_col.replace("_mag", "_magErr")
    mag_err = np.asarray(src[err_col], float) if err_col in columns else np.zeros(len(src))
    col = None
    if colour is not None and all(f"{b}_mag" in columns for b in colour):
        col = np.asarray(src[f"{colour[0]}_mag"], float) - np.asarray(src[f"{colour[1]}_mag"], float)
    return RefCatalog(np.asarray(ra, float), np.asarray(dec, float), np.asarray(src[mag_col], float), mag_err,
                      name=name, colour=col)


def process_ccd(butler: Butler, row: dict[str, Any], cfg: Any, *, writer: OutputWriter | None = None) -> CcdOutcome:
    """Run ISR, characterize and calibrate on one CCD and write its outputs.

    Parameters
    ----------
    butler : Butler
        On the output repository (reads through to the input repository).
    row : dict
        The raw registry row of the CCD.
    cfg : apfast.run.config.PipelineConfig
    writer : OutputWriter, optional
        Hand the outputs to this background writer (the caller waits for it);
        by default they are written before returning.

    Raises
    ------
    ApfastError
        Any stage failure, with a message naming the CCD and what to change.
    """
    did = {"visit": int(row["visit"]), "ccdnum": int(row["ccdnum"])}
    cal_row = butler.registry.calibrated_row(did["visit"], did["ccdnum"])
    if cal_row is not None:  # ingested with --calibrated: ISR is skipped (apfast.run.calibrated)
        from apfast.run.calibrated import process_calibrated_ccd

        return process_calibrated_ccd(butler, row, cal_row, cfg, writer=writer)
    if "header" in (cfg.calibrate.astrometry_source, cfg.calibrate.zero_point_source):
        msg = (f"visit={did['visit']} ccdnum={did['ccdnum']} is a raw: calibrate.astrometry_source and "
               "calibrate.zero_point_source = 'header' apply to calibrated images only; set them to 'refcat'")
        raise CalibrationError(msg)
    out: Butler | OutputWriter = writer if writer is not None else butler
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    raw = butler.get("raw", did)
    camera = butler.registry.camera
    isr_cfg = cfg.isr
    bias = butler.get("bias", did) if isr_cfg.do_bias else None
    flat = butler.get("flat", did) if isr_cfg.do_flat else None
    defects = butler.get("defects", did) if isr_cfg.do_defects else None
    crosstalk = _optional_calib(butler, "crosstalk", did) if isr_cfg.do_crosstalk else None
    linearizer = _optional_calib(butler, "linearizer", did) if isr_cfg.do_linearize else None
    if isr_cfg.do_crosstalk and crosstalk is None:
        log.warning("visit=%(visit)d ccdnum=%(ccdnum)d: no crosstalk calib; crosstalk not corrected", did)
        isr_cfg = replace(isr_cfg, do_crosstalk=False)
    if isr_cfg.do_linearize and linearizer is None:
        log.info("visit=%(visit)d ccdnum=%(ccdnum)d: no linearizer; linearity not corrected", did)
        isr_cfg = replace(isr_cfg, do_linearize=False)
    timings["read"] = time.perf_counter() - t0

    t = time.perf_counter()
    amps = amp_params_from_header(camera, raw.metadata)
    isr = run_isr(raw.image, amps, config=isr_cfg, bias=bias, flat=flat, defects=defects, crosstalk=crosstalk,
                  linearizer=linearizer, trimmed_shape=tuple(camera.trimmed_shape))
    timings["isr"] = time.perf_counter() - t

    t = time.perf_counter()
    amp_stats = _amp_offsets(isr, amps, cfg.amp_offset, did)
    timings["amp_offset"] = time.perf_counter() - t

    t = time.perf_counter()
    char = run_characterize(isr.image, isr.mask, isr.variance, config=cfg.characterize)
    timings["characterize"] = time.perf_counter() - t

    t = time.perf_counter()
    initial_wcs = _trimmed_wcs(raw.wcs, _trim_offset(camera, raw.metadata), did)
    ny, nx = isr.image.shape
    cra, cdec = initial_wcs.all_pix2world([0, nx - 1, nx - 1, 0], [0, 0, ny - 1, ny - 1], 0)
    corners_ra, corners_dec = [float(v) % 360.0 for v in cra], [float(v) for v in cdec]
    margin = cfg.calibrate.astrometry.max_offset_arcsec / 3600.0 + 0.01
    epoch = mjd_to_epoch(row["mjd"])
    root = butler.repo.root
    astrom_refs = _refs(root, cfg.calibrate.astrometry_refcat, corners_ra, corners_dec, margin,
                        mag_col=cfg.calibrate.astrometry_mag, epoch=epoch, did=did)
    band = str(row["filter"])
    term, colour_range = _colour_term(cfg.calibrate.photocal, camera, band)
    photom_refs = _refs(root, cfg.calibrate.photometry_refcat, corners_ra, corners_dec, margin,
                        mag_col=f"{camera.ref_bands.get(band, band)}_mag", epoch=None, did=did,
                        colour=(term[0], term[1]) if term else None)
    timings["refcat"] = time.perf_counter() - t

    t = time.perf_counter()
    cal = run_calibrate(char.image, char.mask, char.variance, psf=char.psf, psf_sigma=char.psf_sigma,
                        initial_wcs=initial_wcs, astrom_refs=astrom_refs, photom_refs=photom_refs,
                        config=cfg.calibrate, colour_coeffs=term[2] if term else (), colour_range=colour_range)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    meta = fits.Header()
    stats = calexp_stats(char, cal, N_SAT=int(isr.n_saturated), **amp_stats)
    return calexp_outcome(out, did, char, cal, meta=meta, stats=stats, visit_info=raw.visit_info, camera=camera,
                          term=term, cfg=cfg, timings=timings, t_write=t)


def calexp_stats(char: Any, cal: Any, **extra: Any) -> dict[str, Any]:
    """processCcd's summary numbers (raws and calibrated inputs alike): characterize's, the zero point's,
    the astrometric fit's and the source count, then ``extra`` (e.g. ``N_SAT``), in that order."""
    stats = summarize(char)
    stats.update(ZP=round(cal.photocal.zero_point, 5), ZP_ERR=round(cal.photocal.zero_point_err, 5),
                 ZP_N=cal.photocal.n_used, ASTR_RMS=round(cal.astrometry.rms_arcsec, 5),
                 ASTR_N=cal.astrometry.n_matches, N_SRC=len(cal.catalog), **extra)
    return stats


def calexp_outcome(out: Butler | OutputWriter, did: dict[str, Any], char: Any, cal: Any, *, meta: fits.Header,
                   stats: dict[str, Any], visit_info: Any, camera: Any, term: Any, cfg: Any,
                   timings: dict[str, float], t_write: float) -> CcdOutcome:
    """processCcd's last step (raws and calibrated inputs alike): header cards, calexp and catalogues out.

    ``meta`` gets the ``stats`` (non-finite ones left out), which colour term and flux the zero point
    refers to (``ZPCTERM``, ``ZPFLUX``; see :mod:`apfast.ccd.photocal`) and the aperture correction.
    """
    if char.variance_scale is not None:  # the cards with their comments; the stats loop keeps them
        for k, card in char.variance_scale.header_cards().items():
            meta[k] = card
    for k, v in stats.items():
        if not (isinstance(v, float) and not math.isfinite(v)):  # e.g. no astrometric fit: no ASTR_RMS card
            meta[k] = v
    meta["ZPCTERM"] = (",".join(str(x) for x in (*term[:2], *term[2])) if term else "none", "ZP colour term")
    meta["ZPFLUX"] = (f"calib aperture r={cfg.calibrate.calib_flux_radius:g} px", "ZP calibrates fluxes in it")
    for k, v, c in cal.apcorr.to_header_cards():
        meta[k] = (v, c)
    calexp = Exposure(char.image, char.mask, char.variance, wcs=cal.wcs, psf=char.psf,
                      photo_calib=cal.photocal.photo_calib, visit_info=visit_info, metadata=meta)
    out.put(calexp, "calexp", did)
    out.put(char.background.to_container(), "calexpBackground", did)
    out.put(cal.catalog, "src", did)
    out.put(cal.matches, "srcMatch", did)
    timings["write"] = time.perf_counter() - t_write
    for k, v in char.timings.items():
        timings[f"char.{k}"] = v
    for k, v in cal.timings.items():
        timings[f"cal.{k}"] = v
    stats["PSF_FWHM_ARCSEC"] = round(stats["PSF_FWHM"] * camera.pixel_scale, 3)
    return CcdOutcome(did["visit"], did["ccdnum"], "ok", "", timings, stats,
                      products={"calexp": calexp, "src": cal.catalog})


def _colour_term(pcfg: Any, camera: Any, band: str
                 ) -> tuple[tuple[str, str, tuple[float, ...]] | None, tuple[float, float] | None]:
    """The colour term of ``band``: ``calibrate.photocal.colour_terms``, else the camera description's."""
    from apfast.ccd.photocal import PhotoCalConfig

    term = pcfg.colour_term(band)
    if term is not None:
        return term, None
    if pcfg.camera_colour_terms and camera.colour_terms:
        term = PhotoCalConfig(colour_terms=camera.colour_terms).colour_term(band)
        if term is not None:
            return term, camera.colour_range
    return None, None


def _amp_offsets(isr: Any, amps: Any, acfg: Any, did: dict[str, Any]) -> dict[str, float]:
    """Measure (and with ``amp_offset.do_correct`` remove) background steps between amps; warn on large ones.

    Returns the header cards ``AMPSTEPn`` (step across the n-th shared boundary, image units) and
    ``AMPPEDn`` (pedestal subtracted from amp n).
    """
    from apfast.ccd.ampoffset import measure_amp_offsets

    if not acfg.do_measure:
        return {}
    sections = {a.name: a.trimmed_section for a in amps}
    res = measure_amp_offsets(isr.image, isr.mask, sections, config=acfg)
    for w in res.warnings:
        log.warning("visit=%d ccdnum=%d: %s", did["visit"], did["ccdnum"], w)
    cards: dict[str, float] = {}
    for i, st in enumerate(res.steps):
        cards[f"AMPSTEP{i + 1}"] = round(st.step, 4)
    if acfg.do_correct and res.steps:
        for i, (name, ped) in enumerate(res.pedestals.items()):
            sec = sections[name]
            isr.image[sec.y0:sec.y1, sec.x0:sec.x1] -= np.float32(ped)
            cards[f"AMPPED{i + 1}"] = round(ped, 4)
    return cards


def _background_image(butler: Butler, did: dict[str, Any]) -> np.ndarray:
    from apfast.ccd.background import BackgroundModel

    return BackgroundModel.from_container(butler.get("calexpBackground", did)).image()


def process_diffim(butler: Butler, row: dict[str, Any], cfg: Any, *, template_root: Path | None,
                   template_visit: int | None = None, products: dict[str, Any] | None = None,
                   writer: OutputWriter | None = None) -> CcdOutcome:
    """Template, PSF matching, subtraction and decorrelation of one processed CCD; writes deepDiff_*.

    Raises
    ------
    NoWorkFound
        No template covers the CCD (the message names the CCD and the repository searched).
    """
    from apfast.diffim.stage import calexp_template, run_image_difference
    from apfast.diffim.template import get_template
    from apfast.errors import NoWorkFound

    did = {"visit": int(row["visit"]), "ccdnum": int(row["ccdnum"])}
    timings: dict[str, float] = {}
    t = time.perf_counter()
    have = products or {}
    calexp = have["calexp"] if "calexp" in have else butler.get("calexp", did)
    src = have["src"] if "src" in have else butler.get("src", did)
    dcfg = cfg.difference
    if dcfg.template_source == "calexp":
        if template_visit is None:
            msg = "difference.template_source = 'calexp' needs --templateId visit=N"
            raise CalibrationError(msg)
        tdid = {"visit": int(template_visit), "ccdnum": did["ccdnum"]}
        try:
            tcal = butler.get("calexp", tdid)
        except NoLocationsError as exc:
            msg = f"visit={did['visit']} ccdnum={did['ccdnum']}: template calexp {tdid} not found ({exc})"
            raise NoWorkFound(msg) from None
        bkg = _background_image(butler, tdid) if dcfg.calexp_template_add_background else None
        template = calexp_template(tcal, calexp, background=bkg, warp_config=cfg.warp)
    else:
        root = template_root if template_root is not None else butler.repo.root
        template = get_template(root, calexp, filter=str(row["filter"]), config=cfg.template, warp_config=cfg.warp)
    timings["template"] = time.perf_counter() - t
    if cfg.inject.enabled:  # fakes in memory only: the calexp on disk stays as processCcd wrote it
        from apfast.run.inject import inject_for_difference

        t = time.perf_counter()
        calexp, template, _ = inject_for_difference(writer if writer is not None else butler, calexp, template,
                                                    visit=did["visit"], ccdnum=did["ccdnum"], config=cfg.inject,
                                                    sources=src)
        timings["inject"] = time.perf_counter() - t
    res = run_image_difference(calexp, template, sources=src, config=dcfg)
    timings.update(res.timings)
    t = time.perf_counter()
    for k, v in res.stats.items():
        res.difference.metadata[k] = v
    out: Butler | OutputWriter = writer if writer is not None else butler
    out.put(res.difference, "deepDiff_differenceExp", did)
    if cfg.output.write_matched:  # the DIA stage of this CCD gets it in memory (products) either way
        out.put(res.matched, "deepDiff_matchedExp", did)
    _put_psfmatch_record(out, res, did)
    timings["diff_write"] = time.perf_counter() - t
    return CcdOutcome(did["visit"], did["ccdnum"], "ok", "", timings, dict(res.stats),
                      products={"calexp": calexp, "difference": res.difference, "matched": res.matched})


def _put_psfmatch_record(out: Butler | OutputWriter, res: Any, did: dict[str, Any]) -> None:
    """Hand over ``deepDiff_psfMatch``, the PSF-matching record of the difference (always: ~0.2 MB, ~1 ms).

    It is a diagnostic (``apfast report`` draws it), not an input of a later stage, so it is not
    among :data:`DIFFIM_OUTPUTS`: an output repository without it (written before it existed) is
    complete and is not redone.
    """
    from apfast.diffim.diagnostics import psfmatch_diagnostics

    out.put(psfmatch_diagnostics(res.subtraction), "deepDiff_psfMatch", did)


def _guarded(outcome: CcdOutcome, tag: str, what: str, fn: Callable[[], Any], *, doraise: bool) -> Any:
    """Run one stage of one CCD; on failure record it in ``outcome`` (or re-raise with ``doraise``).

    Returns the stage's result, or ``None`` if it failed. :class:`NoWorkFound` passes
    through (the caller decides whether a missing input is a skip).
    """
    from apfast.errors import NoWorkFound

    try:
        return fn()
    except NoWorkFound:
        raise
    except (ApfastError, AlgorithmError) as exc:
        if doraise:
            raise
        outcome.status, outcome.message = "failed", f"{what}: {type(exc).__name__}: {exc}"
        log.error("%s %s failed: %s", tag, what, exc)
    except Exception as exc:  # one CCD's bug must not stop the night; the traceback is logged
        if doraise:
            raise
        outcome.status, outcome.message = "failed", f"{what}: {type(exc).__name__}: {exc}"
        log.error("%s %s failed with an unexpected error:\n%s", tag, what, traceback.format_exc())
    return None


def _time_order(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in observation order (association must see the visits in time order)."""
    return sorted(rows, key=lambda r: (float(r.get("mjd") or 0.0), int(r["visit"]), int(r["ccdnum"])))


def run_process(
    butler: Butler, rows: Sequence[dict[str, Any]], cfg: Any, *, template_root: Path | None = None,
    template_visit: int | None = None, apdb: Any = None, doraise: bool = False, clobber_output: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[CcdOutcome]:
    """``apfast process``: per CCD, in time order, processCcd -> differencing -> DIA sources, APDB, alerts.

    A stage whose outputs already exist in the output repository (and, for the DIA stage, whose
    CCD-visit is stored in the APDB) is skipped unless ``clobber_output``; a stage after a
    redone one is always redone. Without ``apdb`` the chain stops after differencing.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    rows = _time_order(rows)
    stored = undo_for_redo(butler, rows, cfg, apdb, clobber_output=clobber_output, progress=progress)
    futures: list[Future[CcdOutcome]] = []

    def dia_and_finish(row: dict[str, Any], o: CcdOutcome, redo: bool, tag: str) -> CcdOutcome:
        if o.status == "ok" and apdb is not None:
            process_dia_stage(butler, row, cfg, o, apdb=apdb, tag=tag, redo=redo, stored=stored,
                              doraise=doraise, writer=writer)
        wait_for_outputs(o, writer, tag, doraise=doraise, data_id=_did(row))
        finish_outcome(o, tag, progress)
        return o

    # The DIA stage of CCD i (association needs time order: one lane) runs on a thread while the image
    # stages of CCD i+1 run here; at most one CCD waits for the lane, so at most three CCDs' images are
    # in memory. Kernels of both threads share the cores (numba's OpenMP layer is thread-safe).
    with OutputWriter(butler) as writer, ThreadPoolExecutor(1, thread_name_prefix="apfast-dia") as lane:
        for i, row in enumerate(rows, 1):
            tag = f"[{i}/{len(rows)}] visit={int(row['visit'])} ccdnum={int(row['ccdnum'])}"
            o, redo = process_image_stages(butler, row, cfg, tag=tag, template_root=template_root,
                                           template_visit=template_visit, doraise=doraise,
                                           clobber_output=clobber_output, writer=writer)
            if len(futures) >= 2:
                futures[-2].result()  # re-raises a --doraise failure of an earlier CCD here
            futures.append(lane.submit(dia_and_finish, row, o, redo, tag))
        return [f.result() for f in futures]


def undo_for_redo(butler: Butler, rows: Sequence[dict[str, Any]], cfg: Any, apdb: Any, *, clobber_output: bool,
                  progress: Callable[[str], None] | None = None) -> set[tuple[int, int]]:
    """Remove from the APDB, latest first, the stored CCD-visits of ``rows`` that this run will redo.

    A CCD-visit is redone with ``clobber_output`` or when any of its outputs is missing.
    Undoing them all before processing (each in its own transaction, the latest
    first) lets the run associate them again in time order, exactly as the first
    time; undoing one in place while a later one still holds versions of its
    DiaObjects would lose that history. Returns the CCD-visits still stored.

    Raises
    ------
    ApdbError
        If a CCD-visit to redo has later CCD-visits, not selected, that associated
        sources with its DiaObjects (the message says which to add to ``--id``).
    """
    if apdb is None or not cfg.dia_pipe.do_dia:
        return set()
    stored = set(apdb.ccd_visits())
    outputs = [*PROCESS_CCD_OUTPUTS, *diffim_outputs(cfg), "deepDiff_diaSrc"]
    if cfg.dia_pipe.do_alerts:
        outputs.append("alerts")
    redo = [r for r in rows if (int(r["visit"]), int(r["ccdnum"])) in stored
            and (clobber_output or not all(_exists_here(butler, d, _did(r)) for d in outputs))]
    if not redo:
        return stored
    from apfast.dia.apdb_schema import ApdbError

    keys = {(int(r["visit"]), int(r["ccdnum"])) for r in redo}
    for r in redo:  # check everything before undoing anything
        with apdb.ccd_visit(int(r["visit"]), int(r["ccdnum"]), float(r.get("mjd") or 0.0)) as tx:
            later = [k for k in tx.later_ccd_visits() if k not in keys]
        if later:
            shown = ", ".join(f"visit={v} ccdnum={d}" for v, d in later[:6]) + (" ..." if len(later) > 6 else "")
            msg = (
                f"cannot redo visit={int(r['visit'])} ccdnum={int(r['ccdnum'])} in {apdb.url}: later CCD-visits "
                f"not selected ({shown}) associated their sources with its DiaObjects, and association must see "
                "the visits in time order. Re-process from this visit onwards: add those CCD-visits to --id "
                "(with --clobber-output), or use a fresh APDB"
            )
            raise ApdbError(msg)
    if progress:
        progress(f"removing {len(redo)} stored CCD-visit(s) from the APDB, latest first, to redo them in time order")
    for r in reversed(_time_order(redo)):
        with apdb.ccd_visit(int(r["visit"]), int(r["ccdnum"]), float(r.get("mjd") or 0.0)) as tx:
            tx.undo()
        stored.discard((int(r["visit"]), int(r["ccdnum"])))
    return stored


def _did(row: dict[str, Any]) -> dict[str, int]:
    return {"visit": int(row["visit"]), "ccdnum": int(row["ccdnum"])}


def wait_for_outputs(o: CcdOutcome, writer: OutputWriter, tag: str, *, doraise: bool,
                     data_id: dict[str, Any] | None = None) -> None:
    """Wait until the CCD's outputs are on disk; a failed write fails the CCD (``write_wait`` timed)."""
    waited = _guarded(o, tag, "writing outputs", lambda: writer.wait(data_id), doraise=doraise)
    if waited is not None:
        o.timings["write_wait"] = o.timings.get("write_wait", 0.0) + waited


def process_image_stages(
    butler: Butler, row: dict[str, Any], cfg: Any, *, tag: str, template_root: Path | None,
    template_visit: int | None, doraise: bool, clobber_output: bool, writer: OutputWriter | None = None,
) -> tuple[CcdOutcome, bool]:
    """processCcd and differencing of one CCD (each skipped if its outputs exist); returns (outcome, redone).

    With ``writer`` the outputs are handed to it (the caller waits for them);
    without, they are on disk when this returns (a failed write fails the CCD).
    """
    if writer is None:
        with OutputWriter(butler) as own:
            o, redo = process_image_stages(butler, row, cfg, tag=tag, template_root=template_root,
                                           template_visit=template_visit, doraise=doraise,
                                           clobber_output=clobber_output, writer=own)
            wait_for_outputs(o, own, tag, doraise=doraise)
        return o, redo
    from apfast.errors import MissingTemplateError, NoWorkFound

    did = {"visit": int(row["visit"]), "ccdnum": int(row["ccdnum"])}
    o = CcdOutcome(did["visit"], did["ccdnum"], "ok")
    o.stats["_t0"] = time.perf_counter()
    o.stats["_ran"] = []
    redo = clobber_output
    if redo or not all(_exists_here(butler, d, did) for d in PROCESS_CCD_OUTPUTS):
        r = _guarded(o, tag, "processCcd", lambda: process_ccd(butler, row, cfg, writer=writer), doraise=doraise)
        if r is None:
            return o, redo
        o.timings.update(r.timings)
        o.stats.update(r.stats)
        o.products.update(r.products)
        redo = True
        o.stats["_ran"].append("calexp")
    if redo or not all(_exists_here(butler, d, did) for d in diffim_outputs(cfg)):
        t = time.perf_counter()
        try:
            r = _guarded(o, tag, "difference", lambda: process_diffim(
                butler, row, cfg, template_root=template_root, template_visit=template_visit,
                products=o.products, writer=writer), doraise=doraise)
        except NoWorkFound as exc:
            if cfg.process.skip_missing_templates:
                o.status, o.message = "skipped", f"no template: {exc}"
                o.stats["_ran"].append(f"difference skipped: {exc}")
                return o, redo
            # a missing template is a failure unless the user asked to skip such CCDs
            msg = f"{exc}; or pass --skip-missing-templates to skip such CCDs"
            if doraise:
                raise MissingTemplateError(msg) from None
            o.status, o.message = "failed", f"difference: no template: {msg}"
            log.error("%s difference failed: %s", tag, msg)
            return o, redo
        if r is None:
            return o, redo
        o.timings.update(r.timings)
        o.timings["difference"] = time.perf_counter() - t
        o.stats.update(r.stats)
        o.products.update(r.products)
        redo = True
        o.stats["_ran"].append(f"difference ({r.stats['DIFFMODE']}, {r.stats['DIFFNSTP']} stamps)")
    return o, redo


def process_dia_stage(
    butler: Butler, row: dict[str, Any], cfg: Any, o: CcdOutcome, *, apdb: Any, tag: str, redo: bool,
    stored: set[tuple[int, int]] | None, doraise: bool, writer: OutputWriter | None = None,
) -> None:
    """DIA sources, association, APDB and alerts of one CCD-visit, unless already done (see run_process).

    With ``writer``, earlier outputs handed to it are on disk before the APDB
    transaction starts, and this stage's outputs are handed to it too (the
    caller waits); without, they are on disk when this returns.
    """
    if not cfg.dia_pipe.do_dia:
        return
    if writer is None:
        with OutputWriter(butler) as own:
            process_dia_stage(butler, row, cfg, o, apdb=apdb, tag=tag, redo=redo, stored=stored,
                              doraise=doraise, writer=own)
            wait_for_outputs(o, own, tag, doraise=doraise)
        return
    did = {"visit": int(row["visit"]), "ccdnum": int(row["ccdnum"])}
    key = (did["visit"], did["ccdnum"])
    in_apdb = key in (stored if stored is not None else set(apdb.ccd_visits()))
    done = in_apdb and _exists_here(butler, "deepDiff_diaSrc", did) and (
        not cfg.dia_pipe.do_alerts or _exists_here(butler, "alerts", did))
    if done and not redo:
        return
    from apfast.dia.diapipe import process_dia
    from apfast.run.inject import dia_products

    t = time.perf_counter()
    # with injection on, a calexp read back from disk gets the fakes the difference saw, again
    r = _guarded(o, tag, "DIA", lambda: process_dia(butler, row, cfg, apdb, writer=writer,
                                                    products=dia_products(butler, did, cfg.inject, o.products)),
                 doraise=doraise)
    if r is None:
        return
    o.timings.update(r.timings)
    o.timings["dia"] = time.perf_counter() - t
    o.stats.update(N_DIA=r.n_sources, N_DIPOLE=r.n_dipole, N_NEW_OBJ=r.n_new_objects,
                   N_UPD_OBJ=r.n_updated_objects, N_FORCED=r.n_forced, N_ALERTS=r.n_alerts,
                   **{f"N_FILT_{k.upper()}": v for k, v in r.filtered.items()})
    o.stats.setdefault("_ran", []).append(
        f"{r.n_sources} DIA sources ({r.n_positive}+ {r.n_negative}- {r.n_dipole} dipoles"
        + (f"; {sum(r.filtered.values())} filtered" if r.filtered else "") + "), "
        f"{r.n_new_objects} new / {r.n_updated_objects} updated DiaObjects, {r.n_alerts} alerts")


def finish_outcome(o: CcdOutcome, tag: str, progress: Callable[[str], None] | None) -> None:
    """Total time, the 'skipped' status when nothing ran, and the progress line."""
    t0 = o.stats.pop("_t0", None)
    ran = o.stats.pop("_ran", [])
    o.products.clear()
    if t0 is not None:
        o.timings["total"] = time.perf_counter() - t0
    if o.status == "ok" and not ran:
        o.status, o.message = "skipped", "outputs exist (--clobber-output redoes)"
    if progress:
        if o.status == "failed":
            progress(f"{tag}: FAILED: {o.message}")
        elif ran:
            progress(f"{tag}: " + "; ".join(ran) + f" in {o.timings.get('total', 0.0):.2f} s")
        else:
            progress(f"{tag}: outputs exist, skipped")


def make_templates(
    butler: Butler, rows: Sequence[dict[str, Any]], cfg: Any, *, doraise: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[CcdOutcome], list[Path]]:
    """``apfast make-templates``: processCcd the given visits into the template repository and coadd them."""
    from apfast.diffim.template import build_templates

    outcomes = run_process_ccd(butler, rows, cfg, doraise=doraise, progress=progress)
    by_filter: dict[str, list[Exposure]] = {}
    for row, o in zip(rows, outcomes, strict=True):
        if o.status != "failed":
            by_filter.setdefault(str(row["filter"]), []).append(
                butler.get("calexp", visit=int(row["visit"]), ccdnum=int(row["ccdnum"]))
            )
    paths: list[Path] = []
    if by_filter:
        paths = list(build_templates(by_filter, butler.repo.write_root, coadd_config=cfg.coadd,
                                     warp_config=cfg.warp, progress=progress))
    return outcomes, paths


def run_process_ccd(
    butler: Butler, rows: Sequence[dict[str, Any]], cfg: Any, *, doraise: bool = False, clobber_output: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[CcdOutcome]:
    """Process each CCD row in turn; failures are recorded (or raised with ``doraise``).

    CCDs whose ``calexp``, ``calexpBackground`` and ``src`` already exist in the
    output repository are skipped unless ``clobber_output``.
    """
    out: list[CcdOutcome] = []
    n = len(rows)
    for i, row in enumerate(rows, 1):
        did = {"visit": int(row["visit"]), "ccdnum": int(row["ccdnum"])}
        tag = f"[{i}/{n}] visit={did['visit']} ccdnum={did['ccdnum']}"
        if not clobber_output and all(_exists_here(butler, d, did) for d in PROCESS_CCD_OUTPUTS):
            out.append(CcdOutcome(did["visit"], did["ccdnum"], "skipped", "outputs exist (--clobber-output redoes)"))
            if progress:
                progress(f"{tag}: outputs exist, skipped")
            continue
        t = time.perf_counter()
        res = CcdOutcome(did["visit"], did["ccdnum"], "ok")
        # _guarded calls the stage at once, so the lambda sees this iteration's row
        r = _guarded(res, tag, "processCcd", lambda: process_ccd(butler, row, cfg), doraise=doraise)  # noqa: B023
        if r is not None:
            res = r
            res.products.clear()  # outcomes are kept for the summary: never hold the images
        res.timings["total"] = time.perf_counter() - t
        out.append(res)
        if progress and res.status == "ok":
            s = res.stats
            progress(
                f"{tag}: ok in {res.timings['total']:.2f} s: FWHM {s['PSF_FWHM_ARCSEC']}\" "
                f"zp {s['ZP']:.3f} astrometry {s['ASTR_RMS'] * 1000:.0f} mas ({s['ASTR_N']} stars), "
                f"{s['N_SRC']} sources"
            )
    return out


def _exists_here(butler: Butler, dataset: str, did: dict[str, Any]) -> bool:
    """Whether the dataset exists in the output (first) repository itself, not a parent."""
    try:
        uri = Path(butler.getUri(dataset, did))
    except ApfastError:
        return False
    return uri.exists() and butler.repo.write_root in uri.parents


#: Width the default (compact) summary keeps to: a 120-column terminal.
SUMMARY_WIDTH = 120
_CALEXP_STAGES = ("read", "isr", "amp_offset", "characterize", "refcat", "calibrate", "write")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return lines


def _n_filtered(stats: dict[str, Any]) -> str:
    """DIA sources rejected before association (the N_FILT_* counts, alert thresholds aside), or '-'."""
    n = [v for k, v in stats.items() if k.startswith("N_FILT_") and not k.startswith("N_FILT_ALERT")]
    return str(sum(n)) if n else "-"


def format_summary(outcomes: Sequence[CcdOutcome], *, wide: bool = False) -> str:
    """A per-CCD table: status, seconds per stage, PSF FWHM, zero point, astrometric RMS, sources.

    Parameters
    ----------
    outcomes : sequence of CcdOutcome
        One per CCD, as returned by :func:`run_process` / :func:`run_process_ccd`.
    wide : bool
        Every stage's seconds in its own column and failure messages in full (what
        ``OUT/summary.txt`` holds and ``--summary wide`` prints). The default groups the
        stages (``calexp`` = read to write, ``diff``, ``dia``) and wraps long ``FAILED``
        lines (continuations indented by four spaces) so no line exceeds
        :data:`SUMMARY_WIDTH` (120) characters.

    Returns
    -------
    str
        The table, then one ``FAILED`` line per failed CCD and a totals line.
    """
    has_diff = any("difference" in o.timings for o in outcomes)
    dia = any("dia" in o.timings for o in outcomes)
    if wide:
        stages = list(_CALEXP_STAGES)
        if has_diff:
            stages += ["template", "psfmatch", "decorrelate", "difference"]
        if dia:
            stages += ["dia_detect", "association", "alerts", "dia"]
    else:
        stages = ["calexp"] + (["diff"] if has_diff else []) + (["dia"] if dia else [])
    stages.append("total")
    head = ["visit", "ccdnum", "status", *stages, "fwhm\"", "zp", "astr_mas", "n_src"]
    if dia:
        head += ["n_dia", "filt", "new_obj", "upd_obj"]

    def seconds(o: CcdOutcome, k: str) -> str:
        if k == "calexp":
            parts = [o.timings[s] for s in _CALEXP_STAGES if s in o.timings]
            return f"{sum(parts):.2f}" if parts else "-"
        k = {"diff": "difference"}.get(k, k)
        return f"{o.timings[k]:.2f}" if k in o.timings else "-"

    rows = []
    for o in outcomes:
        s = o.stats
        rows.append(
            [str(o.visit), str(o.ccdnum), o.status]
            + [seconds(o, k) for k in stages]
            + [str(s.get("PSF_FWHM_ARCSEC", "-")), f"{s['ZP']:.3f}" if "ZP" in s else "-",
               f"{s['ASTR_RMS'] * 1000:.0f}" if "ASTR_RMS" in s else "-", str(s.get("N_SRC", "-"))]
            + ([str(s.get("N_DIA", "-")), _n_filtered(s), str(s.get("N_NEW_OBJ", "-")), str(s.get("N_UPD_OBJ", "-"))]
               if dia else [])
        )
    lines = _table(head, rows)
    for o in outcomes:
        if o.status == "failed":
            lines.append(f"FAILED visit={o.visit} ccdnum={o.ccdnum}: {o.message}")
    ok = [o for o in outcomes if o.status == "ok"]
    if ok:
        tot = [o.timings["total"] for o in ok]
        lines.append(f"{len(ok)} ok, {sum(o.status == 'failed' for o in outcomes)} failed, "
                     f"{sum(o.status == 'skipped' for o in outcomes)} skipped; median {np.median(tot):.2f} s per CCD")
    if not wide:  # long FAILED messages wrap at spaces, continuation lines indented by 4
        import textwrap

        lines = [w for ln in lines for w in (textwrap.wrap(ln, SUMMARY_WIDTH, subsequent_indent="    ",
                                                           break_on_hyphens=False) or [ln])]
    return "\n".join(lines)
