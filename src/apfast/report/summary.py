"""``OUT/summary.json``: the machine-readable per-CCD-visit run summary that ``apfast report`` reads.

One record per CCD-visit (visit, ccdnum), merged across runs into the same output
repository: a new outcome replaces the stored record, except a ``skipped`` one (outputs
existed, nothing ran), which keeps the stored numbers of the run that made them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["SUMMARY_JSON", "read_summary_json", "summary_record", "write_summary_json"]

log = logging.getLogger(__name__)

#: File name of the machine-readable summary in an output repository.
SUMMARY_JSON = "summary.json"
_FORMAT = "apfast-summary-1"


def _jsonable(v: Any) -> Any:
    """Python scalars for numpy scalars; ``None`` for NaN/inf; drop what JSON cannot hold."""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (TypeError, ValueError):
            return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return None


def summary_record(outcome: Any, *, now: str | None = None) -> dict[str, Any]:
    """One JSON record of a :class:`apfast.run.pipeline.CcdOutcome`.

    Parameters
    ----------
    outcome : CcdOutcome
        Has ``visit``, ``ccdnum``, ``status``, ``message``, ``timings`` (seconds) and ``stats``.
    now : str, optional
        ISO UTC time stamp of the record (default: now).

    Returns
    -------
    dict
        ``dataId``, ``visit``, ``ccdnum``, ``status``, ``reason``, ``timings`` (seconds per stage),
        the headline numbers ``fwhm_arcsec``, ``zero_point``, ``astrom_rms_mas``, ``n_src``,
        ``n_dia`` (``None`` when unknown), filtered counts (stats whose key has ``FILT``), every
        other JSON-able stat under ``stats``, and ``recorded_at``.
    """
    s = {k: _jsonable(v) for k, v in outcome.stats.items() if not str(k).startswith("_")}
    s = {k: v for k, v in s.items() if v is not None}
    astr = s.get("ASTR_RMS")
    return {
        "dataId": {"visit": int(outcome.visit), "ccdnum": int(outcome.ccdnum)},
        "visit": int(outcome.visit),
        "ccdnum": int(outcome.ccdnum),
        "status": str(outcome.status),
        "reason": str(outcome.message or ""),
        "timings": {k: round(float(v), 4) for k, v in outcome.timings.items() if _jsonable(v) is not None},
        "fwhm_arcsec": s.get("PSF_FWHM_ARCSEC"),
        "zero_point": s.get("ZP"),
        "astrom_rms_mas": None if astr is None else round(float(astr) * 1000.0, 2),
        "n_src": s.get("N_SRC"),
        "n_dia": s.get("N_DIA"),
        "filtered": {k: v for k, v in s.items() if "FILT" in k.upper()},
        "stats": s,
        "recorded_at": now or datetime.now(UTC).isoformat(timespec="seconds"),
    }


def read_summary_json(out_repo: str | Path) -> dict[tuple[int, int], dict[str, Any]]:
    """The stored records of ``OUT/summary.json`` by ``(visit, ccdnum)``; empty if none or unreadable."""
    path = Path(out_repo) / SUMMARY_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {(int(r["visit"]), int(r["ccdnum"])): r for r in data.get("ccd_visits", [])}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable %s (%s); it is rewritten by the next run", path, exc)
        return {}


def write_summary_json(out_repo: str | Path, outcomes: Iterable[Any]) -> Path | None:
    """Merge ``outcomes`` into ``OUT/summary.json`` (atomically); return its path, or ``None`` on an OS error.

    A ``skipped`` outcome keeps a stored record of the same CCD-visit (its numbers are those
    of the run that wrote the outputs); any other outcome replaces it.
    """
    out_repo = Path(out_repo)
    path = out_repo / SUMMARY_JSON
    records = read_summary_json(out_repo)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for o in outcomes:
        key = (int(o.visit), int(o.ccdnum))
        if o.status == "skipped" and key in records:
            records[key]["last_skipped_at"] = now
            continue
        records[key] = summary_record(o, now=now)
    doc = {"format": _FORMAT, "ccd_visits": [records[k] for k in sorted(records)]}
    try:
        fd, tmp = tempfile.mkstemp(dir=out_repo, prefix=".summary-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)
        return None
    return path
