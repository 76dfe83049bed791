"""``apfast verify OUT``: completeness, flux pulls and false detections of a processed rerun.

For each CCD-visit of the output repository ``OUT`` (``apfast process``'s rerun), the DIA sources
(from the APDB, or the ``deepDiff_diaSrc`` datasets when there is no APDB URL) are matched within
``--match-radius`` arcsec to

- the fakes of its ``injected_catalog`` (``-c inject.*`` runs): a fake counts when it landed
  (``injected``) and was not also injected into the template; fakes ``on_template`` must vanish and
  are counted apart. Each fake's expected S/N is its flux over the PSF-photometry noise of the
  difference image at its position, ``sqrt(sum P^2 V) / sum P^2`` (``P`` the difference PSF, ``V``
  its variance);
- the simulated truth (``--truth DIR``, or the ``sim`` folder beside the input repository, as
  ``apfast demo`` and ``apfast simulate`` lay it out): the transients of ``truth/transients.csv``
  (with their ``snr_expected``), and variable stars and movers of ``truth/sources.csv``.

A DIA source near neither a fake nor the truth (the radii of
:func:`apfast.dia.truth_match.explained_by_truth`) is unexplained: a false detection.
:func:`run_verify` returns a :class:`VerifyResult`; :func:`format_verify` prints it and
:meth:`VerifyResult.to_dict` is what ``--json`` writes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apfast.dia.truth_match import (
    CompletenessBin,
    completeness,
    explained_by_truth,
    match_nearest,
    pull_stats,
)
from apfast.errors import ApfastError, InputError, NoLocationsError
from apfast.exposure import NJY_AB_ZERO_POINT

__all__ = [
    "MAG_STEP",
    "SNR_EDGES",
    "CcdVisitCounts",
    "VerifyInputError",
    "VerifyResult",
    "find_truth",
    "format_verify",
    "mag_of",
    "run_verify",
    "write_json",
]

log = logging.getLogger(__name__)

#: Expected-S/N bins of the completeness tables.
SNR_EDGES: tuple[float, ...] = (0.0, 3.0, 5.0, 7.0, 10.0, 20.0, math.inf)
#: Width (mag) of the magnitude bins.
MAG_STEP: float = 0.5
#: A fake or transient this close (arcsec) to a DIA source explains it (as the truth radius).
EXPLAIN_RADIUS: float = 2.0


class VerifyInputError(InputError):
    """``apfast verify`` cannot read what it needs (no such rerun, no truth, nothing processed): exit 2."""

    exit_code = 2


@dataclass(slots=True)
class CcdVisitCounts:
    """Counts of one CCD-visit."""

    visit: int
    ccdnum: int
    n_dia: int = 0
    n_fakes: int = 0  # landed, science only
    n_fakes_matched: int = 0
    n_fakes_flagged: int = 0  # matched and pixelFlags_injectedCenter set
    n_template_fakes: int = 0
    n_template_fakes_detected: int = 0  # should be 0: they vanish in the difference
    n_truth: int = 0
    n_truth_matched: int = 0
    n_unexplained: int = 0
    n_alerts: int = 0  # DIA sources at or above alerts.min_reliability (or unscored)
    n_false_alerts: int = 0  # unexplained ones among them


@dataclass(slots=True)
class VerifyResult:
    """What ``apfast verify`` measured (see the module docstring)."""

    out: str
    source: str  # where the DIA sources came from: the APDB URL or 'deepDiff_diaSrc'
    truth: str | None
    match_radius: float
    ccd_visits: list[CcdVisitCounts] = field(default_factory=list)
    fakes_by_mag: list[CompletenessBin] = field(default_factory=list)
    fakes_by_snr: list[CompletenessBin] = field(default_factory=list)
    truth_by_mag: list[CompletenessBin] = field(default_factory=list)
    truth_by_snr: list[CompletenessBin] = field(default_factory=list)
    fake_pulls: dict[str, float] = field(default_factory=dict)
    false_per_ccd_visit: dict[str, float] = field(default_factory=dict)
    false_alerts_per_ccd_visit: dict[str, float] = field(default_factory=dict)
    fakes_alerted_by_snr: list[CompletenessBin] = field(default_factory=list)
    truth_alerted_by_snr: list[CompletenessBin] = field(default_factory=list)
    reliability: dict[str, Any] = field(default_factory=dict)
    alert_threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able numbers (NaN and inf become ``None``)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        def bins(b: list[CompletenessBin]) -> list[dict[str, Any]]:
            return [{"lo": x.lo, "hi": x.hi, "n": x.n, "n_detected": x.n_detected, "fraction": x.fraction} for x in b]

        totals = {k: sum(getattr(c, k) for c in self.ccd_visits)
                  for k in CcdVisitCounts.__dataclass_fields__ if k not in ("visit", "ccdnum")}
        return clean({
            "out": self.out, "source": self.source, "truth": self.truth, "match_radius_arcsec": self.match_radius,
            "ccd_visits": [asdict(c) for c in self.ccd_visits], "totals": totals,
            "fakes": {"by_mag": bins(self.fakes_by_mag), "by_snr": bins(self.fakes_by_snr), "pulls": self.fake_pulls},
            "truth_transients": {"by_mag": bins(self.truth_by_mag), "by_snr": bins(self.truth_by_snr)},
            "false_per_ccd_visit": self.false_per_ccd_visit,
            "false_alerts_per_ccd_visit": self.false_alerts_per_ccd_visit, "alert_threshold": self.alert_threshold,
            "alerted": {"fakes_by_snr": bins(self.fakes_alerted_by_snr),
                        "truth_by_snr": bins(self.truth_alerted_by_snr)},
            "reliability_on_fakes": self.reliability,
        })


def find_truth(butler: Any) -> Path | None:
    """The simulation truth of the input repository: ``REPO/../sim/truth``, or beside its linked raws."""
    root = Path(butler.repo.root)
    cands = [root.parent / "sim"]
    raw_dir = root / "raw"
    if raw_dir.is_dir():
        for p in raw_dir.rglob("*"):
            if p.is_symlink() or p.is_file():
                cands.append(p.resolve().parent.parent)
                break
    for c in cands:
        if (c / "truth" / "visits.csv").is_file():
            return c / "truth"
    return None


def mag_of(flux_njy: np.ndarray) -> np.ndarray:
    """AB magnitude of a flux in nJy (NaN for zero or negative flux)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux_njy > 0, NJY_AB_ZERO_POINT - 2.5 * np.log10(flux_njy), np.nan)


def _mag_edges(*mags: np.ndarray) -> list[float]:
    allm = np.concatenate([np.asarray(m, float) for m in mags]) if mags else np.zeros(0)
    allm = allm[np.isfinite(allm)]
    if allm.size == 0:
        return []
    lo = math.floor(allm.min() / MAG_STEP) * MAG_STEP
    hi = math.floor(allm.max() / MAG_STEP) * MAG_STEP + MAG_STEP
    return [float(v) for v in np.arange(lo, hi + 0.5 * MAG_STEP, MAG_STEP)]


def _expected_snr(diff: Any, x: np.ndarray, y: np.ndarray, flux_njy: np.ndarray) -> np.ndarray:
    """Flux over the PSF-photometry noise ``sqrt(sum P^2 V) / sum P^2`` of the difference at each position."""
    out = np.full(x.size, np.nan)
    if diff.variance is None or diff.psf is None or diff.photo_calib is None:
        return out
    ny, nx = diff.shape
    x0, y0 = diff.xy0
    for i in range(x.size):
        if not (np.isfinite(x[i]) and np.isfinite(y[i])):
            continue
        ix, iy = int(np.floor(x[i] + 0.5)), int(np.floor(y[i] + 0.5))
        if not (0 <= ix < nx and 0 <= iy < ny):
            continue
        p = diff.psf.compute_image(x[i] + x0, y[i] + y0)
        h = p.shape[0] // 2
        ya, yb, xa, xb = max(iy - h, 0), min(iy + h + 1, ny), max(ix - h, 0), min(ix + h + 1, nx)
        pp = p[ya - (iy - h) : yb - (iy - h), xa - (ix - h) : xb - (ix - h)]
        v = diff.variance[ya:yb, xa:xb].astype(float)
        good = np.isfinite(v) & (v > 0)
        s2 = float((pp[good] ** 2).sum())
        if s2 <= 0:
            continue
        sigma_inst = math.sqrt(float((pp[good] ** 2 * v[good]).sum())) / s2
        out[i] = flux_njy[i] / float(diff.photo_calib.instflux_to_njy(sigma_inst))
    return out


def _dia_sources(butler: Any, reader: Any, key: tuple[int, int]) -> dict[str, np.ndarray] | None:
    cols = ("ra", "dec", "psfFlux", "psfFluxErr", "pixelFlags_injectedCenter", "reliability")
    if reader is not None:
        rows = reader.sources_of([key])
        return {c: np.array([np.nan if r.get(c) is None and c == "reliability" else r.get(c) for r in rows],
                            dtype=float if c != "pixelFlags_injectedCenter" else bool)
                for c in cols}
    try:
        t = butler.get("deepDiff_diaSrc", visit=key[0], ccdnum=key[1])
    except NoLocationsError:
        return None
    out = {c: (np.asarray(t[c]) if c in t.colnames else np.zeros(len(t), bool)) for c in cols[:-1]}
    out["reliability"] = np.asarray(t["reliability"], float) if "reliability" in t.colnames else np.full(len(t), np.nan)
    return out


def _alerted(rel: np.ndarray, threshold: float) -> np.ndarray:
    """Sources that got an alert: reliability at or above the threshold, or no score at all."""
    with np.errstate(invalid="ignore"):
        return ~(rel < threshold)


def _reliability_metrics(rel_real: np.ndarray, rel_bogus: np.ndarray, threshold: float) -> dict[str, Any]:
    """Purity and completeness of 'real' among fake-matched (real) and unexplained (bogus) DIA sources."""
    out: dict[str, Any] = {"n_real": int(rel_real.size), "n_bogus": int(rel_bogus.size), "threshold": threshold}
    if not (np.isfinite(rel_real).any() or np.isfinite(rel_bogus).any()):
        return out
    curve = []
    for th in (0.1, 0.3, 0.5, 0.7, 0.9, threshold):
        tp, fp = int(_alerted(rel_real, th).sum()), int(_alerted(rel_bogus, th).sum())
        curve.append({"threshold": th, "purity": tp / max(tp + fp, 1), "completeness": tp / max(rel_real.size, 1)})
    out["curve"] = sorted({c["threshold"]: c for c in curve}.values(), key=lambda c: c["threshold"])
    at = next(c for c in out["curve"] if c["threshold"] == threshold)
    out.update(purity=at["purity"], completeness=at["completeness"])
    return out


def _truth_tables(truth_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from apfast.sim.simulate import load_truth

    t = load_truth(truth_dir)
    tr = {k: np.asarray(t.transients[k]) for k in t.transients.colnames}
    src = {k: np.asarray(t.sources[k]) for k in ("ra", "dec", "pmra", "pmdec", "variable")}
    return tr, src


def run_verify(out: str | Path, *, truth: str | Path | None = None, config_overrides: Sequence[str] = (),
               ids: Sequence[Any] = (), match_radius: float = 1.0) -> VerifyResult:
    """Match every CCD-visit's DIA sources to its fakes and the simulated truth (see the module docstring).

    Parameters
    ----------
    out : str or Path
        The output repository of ``apfast process`` (``REPO/rerun/NAME`` or the ``--output`` folder).
    truth : str or Path, optional
        The simulation folder or its ``truth`` folder; default: found beside the input repository.
    config_overrides : sequence of str
        ``-c`` overrides; ``apdb.db_url`` chooses the APDB (default: the rerun's stored config).
    ids : sequence of dict
        Parsed ``--id`` expressions restricting the CCD-visits.
    match_radius : float
        Matching radius in arcsec.

    Raises
    ------
    VerifyInputError
        ``out`` is not an output repository, holds no difference images, or ``truth`` holds no truth.
    """
    from apfast.report.data import ApdbReader, find_ccd_visits, open_output_repo, resolve_db_url

    if not (match_radius > 0 and math.isfinite(match_radius)):
        msg = f"--match-radius {match_radius}: give a positive radius in arcsec, e.g. 1.0"
        raise VerifyInputError(msg)
    try:
        butler = open_output_repo(out)
    except InputError as exc:
        raise VerifyInputError(str(exc)) from None
    outp = Path(out).expanduser()
    truth_dir: Path | None
    if truth is not None:
        tp = Path(truth).expanduser()
        truth_dir = tp / "truth" if (tp / "truth").is_dir() else tp
        if not (truth_dir / "visits.csv").is_file():
            msg = (f"--truth {truth}: no simulation truth there (no truth/visits.csv); give the folder "
                   "`apfast simulate` wrote")
            raise VerifyInputError(msg)
    else:
        truth_dir = find_truth(butler)
    visits = [cv for cv in find_ccd_visits(butler, {}, ids) if _has_diff(butler, cv.key)]
    if not visits:
        msg = (f"{outp} holds no difference images (deepDiff_differenceExp) to verify; run `apfast process` "
               "into it first")
        raise VerifyInputError(msg)
    url = resolve_db_url(outp, list(config_overrides))
    reader = ApdbReader(url) if url else None
    tr_all, truth_src = _truth_tables(truth_dir) if truth_dir is not None else (None, None)
    res = VerifyResult(out=str(outp), source=url or "deepDiff_diaSrc", truth=str(truth_dir) if truth_dir else None,
                       match_radius=float(match_radius), alert_threshold=_alert_threshold(outp, config_overrides))
    thr = res.alert_threshold
    fk_mag, fk_snr, fk_det, tr_mag, tr_snr, tr_det = [], [], [], [], [], []
    fk_alert, tr_alert, rel_real, rel_bogus = [], [], [], []
    pulls_m, pulls_t, pulls_e = [], [], []
    try:
        for cv in visits:
            key = cv.key
            src = _dia_sources(butler, reader, key)
            if src is None:
                log.warning("visit=%d ccdnum=%d: no DIA sources stored; skipped", *key)
                continue
            c = CcdVisitCounts(key[0], key[1], n_dia=int(src["ra"].size))
            explained = np.zeros(c.n_dia, bool)
            alerted = _alerted(src["reliability"], thr)
            fakes = _fakes(butler, key)
            if fakes is not None:
                landed = np.asarray(fakes["injected"], bool)
                on_t = np.asarray(fakes["on_template"], bool)
                fra, fdec = np.asarray(fakes["ra"], float), np.asarray(fakes["dec"], float)
                idx = match_nearest(src["ra"], src["dec"], fra, fdec, match_radius)
                sci = landed & ~on_t
                c.n_fakes, c.n_fakes_matched = int(sci.sum()), int((sci & (idx >= 0)).sum())
                flagged = np.asarray(src["pixelFlags_injectedCenter"], bool)
                c.n_fakes_flagged = int(flagged[idx[sci & (idx >= 0)]].sum())
                c.n_template_fakes = int((landed & on_t).sum())
                c.n_template_fakes_detected = int((landed & on_t & (idx >= 0)).sum())
                explained |= match_nearest(fra[landed], fdec[landed], src["ra"], src["dec"], EXPLAIN_RADIUS) >= 0
                diff = butler.get("deepDiff_differenceExp", visit=key[0], ccdnum=key[1])
                snr = _expected_snr(diff, np.asarray(fakes["x"], float), np.asarray(fakes["y"], float),
                                    np.asarray(fakes["flux_nJy"], float))
                del diff
                fk_mag.append(np.asarray(fakes["mag"], float)[sci])
                fk_snr.append(snr[sci])
                fk_det.append((idx >= 0)[sci])
                fk_alert.append(np.where(idx >= 0, alerted[np.maximum(idx, 0)], False)[sci])
                m = sci & (idx >= 0)
                rel_real.append(src["reliability"][idx[m]])
                pulls_m.append(src["psfFlux"][idx[m]])
                pulls_e.append(src["psfFluxErr"][idx[m]])
                pulls_t.append(np.asarray(fakes["flux_nJy"], float)[m])
            if tr_all is not None and truth_src is not None:
                here = (tr_all["visit"].astype(np.int64) == key[0]) & (tr_all["ccdnum"].astype(np.int64) == key[1])
                idx = match_nearest(src["ra"], src["dec"], tr_all["ra"][here].astype(float),
                                    tr_all["dec"][here].astype(float), match_radius)
                c.n_truth, c.n_truth_matched = int(here.sum()), int((idx >= 0).sum())
                ccd_tr = {k: v[tr_all["ccdnum"].astype(np.int64) == key[1]] for k, v in tr_all.items()}
                explained |= explained_by_truth(src["ra"], src["dec"], key[0], ccd_tr, truth_src)
                # magnitude of |difference flux|: a fading variable has no magnitude of its own (mag 0 in the truth)
                tr_mag.append(mag_of(np.abs(tr_all["flux_njy"][here].astype(float))))
                tr_snr.append(np.abs(tr_all["snr_expected"][here].astype(float)))
                tr_det.append(idx >= 0)
                tr_alert.append(np.where(idx >= 0, alerted[np.maximum(idx, 0)], False))
            c.n_unexplained = int((~explained).sum())
            c.n_alerts = int(alerted.sum())
            c.n_false_alerts = int((alerted & ~explained).sum())
            rel_bogus.append(src["reliability"][~explained])
            res.ccd_visits.append(c)
    finally:
        if reader is not None:
            reader.close()
    if not res.ccd_visits:
        msg = (f"{outp}: no CCD-visit has DIA sources stored (deepDiff_diaSrc or APDB rows); run `apfast process` "
               "first")
        raise VerifyInputError(msg)

    def cat(parts: list[np.ndarray], dtype: Any = float) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    if fk_mag:
        res.fakes_by_mag = completeness(cat(fk_mag), cat(fk_det, bool), _mag_edges(cat(fk_mag)))
        res.fakes_by_snr = completeness(cat(fk_snr), cat(fk_det, bool), SNR_EDGES)
        res.fakes_alerted_by_snr = completeness(cat(fk_snr), cat(fk_alert, bool), SNR_EDGES)
        res.fake_pulls = pull_stats(cat(pulls_m), cat(pulls_t), cat(pulls_e))
        res.reliability = _reliability_metrics(cat(rel_real), cat(rel_bogus), thr)
    if tr_mag:
        res.truth_by_mag = completeness(cat(tr_mag), cat(tr_det, bool), _mag_edges(cat(tr_mag)))
        res.truth_by_snr = completeness(cat(tr_snr), cat(tr_det, bool), SNR_EDGES)
        res.truth_alerted_by_snr = completeness(cat(tr_snr), cat(tr_alert, bool), SNR_EDGES)
    if truth_dir is not None or fk_mag:
        for attr, key_ in (("false_per_ccd_visit", "n_unexplained"), ("false_alerts_per_ccd_visit", "n_false_alerts")):
            v = np.array([getattr(c, key_) for c in res.ccd_visits], float)
            setattr(res, attr, {"median": float(np.median(v)), "max": float(v.max()), "total": float(v.sum())})
    return res


def _alert_threshold(outp: Path, overrides: Sequence[str]) -> float:
    """``alerts.min_reliability`` of the run: a ``-c`` override, the rerun's stored config, else the default."""
    import tomllib

    for o in overrides:
        if o.split("=", 1)[0].strip() == "alerts.min_reliability":
            return float(o.split("=", 1)[1])
    try:
        stored = tomllib.loads((outp / "config" / "apfast.toml").read_text(encoding="utf-8"))
        return float(stored["alerts"]["min_reliability"])
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError):
        from apfast.dia.alerts import AlertsConfig

        return AlertsConfig().min_reliability


def _has_diff(butler: Any, key: tuple[int, int]) -> bool:
    try:
        return Path(butler.getUri("deepDiff_differenceExp", visit=key[0], ccdnum=key[1])).is_file()
    except ApfastError:  # not locatable: not there
        return False


def _fakes(butler: Any, key: tuple[int, int]) -> Any:
    try:
        return butler.get("injected_catalog", visit=key[0], ccdnum=key[1])
    except NoLocationsError:
        return None


def _bins_lines(title: str, bins: list[CompletenessBin], fmt: str) -> list[str]:
    if not bins or not any(b.n for b in bins):
        return []
    lines = [title, f"  {'bin':>13}  {'n':>5}  {'found':>5}  {'complete':>8}"]
    for b in bins:
        if b.n == 0:
            continue
        hi = "inf" if math.isinf(b.hi) else format(b.hi, fmt)
        lines.append(f"  {format(b.lo, fmt):>6}-{hi:<6}  {b.n:>5}  {b.n_detected:>5}  {b.fraction:>8.1%}")
    return lines


def format_verify(res: VerifyResult) -> list[str]:
    """The printed report of :func:`run_verify`: per CCD-visit counts, completeness tables, pulls, false detections."""
    lines = [f"verify {res.out}: DIA sources from {res.source}; truth {res.truth or 'none (fakes only)'}; "
             f"match radius {res.match_radius:g}\""]
    head = ["visit", "ccdnum", "n_dia", "fakes", "found", "flagged", "tmpl_fakes", "tmpl_found", "truth", "found",
            "unexplained", "alerts", "false_alerts"]
    keys = ("visit", "ccdnum", "n_dia", "n_fakes", "n_fakes_matched", "n_fakes_flagged", "n_template_fakes",
            "n_template_fakes_detected", "n_truth", "n_truth_matched", "n_unexplained", "n_alerts", "n_false_alerts")
    rows = [[str(getattr(c, k)) for k in keys] for c in res.ccd_visits]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines += _bins_lines("fakes: completeness vs magnitude", res.fakes_by_mag, ".1f")
    lines += _bins_lines("fakes: completeness vs expected S/N", res.fakes_by_snr, "g")
    lines += _bins_lines("simulated transients: completeness vs magnitude", res.truth_by_mag, ".1f")
    lines += _bins_lines("simulated transients: completeness vs expected S/N", res.truth_by_snr, "g")
    lines += _bins_lines(f"fakes alerted (reliability >= {res.alert_threshold:g}) vs expected S/N",
                         res.fakes_alerted_by_snr, "g")
    lines += _bins_lines(f"simulated transients alerted (reliability >= {res.alert_threshold:g}) vs expected S/N",
                         res.truth_alerted_by_snr, "g")
    if res.fake_pulls.get("n"):
        p = res.fake_pulls
        lines.append(f"flux pulls of matched fakes, (psfFlux - injected) / psfFluxErr: n {p['n']}, median "
                     f"{p['median']:+.2f}, robust sigma {p['robust_sigma']:.2f}")
    if res.false_per_ccd_visit:
        f = res.false_per_ccd_visit
        lines.append(f"false detections (unexplained DIA sources) per CCD-visit: median {f['median']:g}, max "
                     f"{f['max']:g} ({f['total']:g} in {len(res.ccd_visits)} CCD-visits)")
    if res.false_alerts_per_ccd_visit:
        f = res.false_alerts_per_ccd_visit
        lines.append(f"false alerts (unexplained, reliability >= {res.alert_threshold:g}) per CCD-visit: median "
                     f"{f['median']:g}, max {f['max']:g} ({f['total']:g} in all)")
    r = res.reliability
    if r.get("curve"):
        lines.append(f"reliability on fakes ({r['n_real']} matched fakes real, {r['n_bogus']} unexplained bogus): "
                     + ", ".join(f"{c['threshold']:g}: purity {c['purity']:.3f} completeness {c['completeness']:.3f}"
                                 for c in r["curve"]))
    return lines


def write_json(res: VerifyResult, path: str | Path) -> Path:
    """Write :meth:`VerifyResult.to_dict` to ``path`` (indented JSON)."""
    p = Path(path)
    p.write_text(json.dumps(res.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return p
