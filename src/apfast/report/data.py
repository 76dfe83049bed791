"""What ``apfast report`` reads: the CCD-visits of an output repository, their summary, the APDB.

Everything here only reads: products through :class:`apfast.Butler`, the APDB with
read-only SQL (an SQLite file is opened with ``mode=ro``).
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apfast.errors import InputError

__all__ = [
    "ApdbReader",
    "CcdVisit",
    "ReportInputError",
    "find_ccd_visits",
    "open_output_repo",
    "resolve_db_url",
]

log = logging.getLogger(__name__)


class ReportInputError(InputError):
    """The report's input is not what it needs (not an output repository, nothing processed): exit 2."""

    exit_code = 2


_CALEXP_RE = re.compile(r"calexp-(\d+)_(\d+)\.fits$")
_DIFF_RE = re.compile(r"diffexp-(\d+)\.fits$")


@dataclass(slots=True)
class CcdVisit:
    """One CCD-visit of the report: its summary record (if any) and what was measured from its products."""

    visit: int
    ccdnum: int
    record: dict[str, Any] = field(default_factory=dict)  # from OUT/summary.json
    has_calexp: bool = False
    has_diff: bool = False
    mjd: float | None = None
    band: str = ""
    fwhm_arcsec: float | None = None
    zero_point: float | None = None
    astrom_rms_mas: float | None = None
    sky: float | None = None
    n_src: int | None = None
    n_dia: int | None = None
    corners: list[tuple[float, float]] = field(default_factory=list)  # (ra, dec) of the 4 corners
    diff_meta: dict[str, Any] = field(default_factory=dict)
    page: str = ""  # relative link of its page
    n_pos: int = 0
    n_neg: int = 0
    n_dipole: int = 0
    n_flagged: int = 0
    n_filtered: int = 0  # rejected before association (deepDiff_diaSrcRejected)

    @property
    def key(self) -> tuple[int, int]:
        """``(visit, ccdnum)``."""
        return (self.visit, self.ccdnum)

    @property
    def status(self) -> str:
        """The run's status (``ok``/``failed``/``skipped``), or ``ok`` for products without a record."""
        return str(self.record.get("status", "ok" if self.has_calexp else "unknown"))


def open_output_repo(out: str | Path) -> Any:
    """A :class:`apfast.Butler` on ``out`` after checking it is an output repository ``apfast process`` wrote.

    Raises
    ------
    InputError
        If ``out`` is not a folder, or holds neither a stored config, a summary nor any calexp.
    """
    from apfast.repo.butler import Butler
    from apfast.repo.repository import CONFIG_RELPATH, REPO_CFG_NAME

    p = Path(out).expanduser()
    if not p.is_dir():
        msg = (f"{p} is not a folder; give the output repository of `apfast process` "
               "(REPO/rerun/NAME or --output DIR)")
        raise ReportInputError(msg)
    markers = (p / CONFIG_RELPATH, p / REPO_CFG_NAME, p / "summary.txt", p / "summary.json")
    if not any(m.is_file() for m in markers):
        msg = (
            f"{p} is not an output repository of `apfast process` (no {CONFIG_RELPATH}, {REPO_CFG_NAME} or "
            "summary.txt); give REPO/rerun/NAME or the --output folder"
        )
        raise ReportInputError(msg)
    return Butler(p)


def resolve_db_url(out: Path, overrides: Sequence[str]) -> str | None:
    """The APDB URL: ``-c apdb.db_url=...`` if given, else the stored config's ``apdb.db_url``, else ``None``.

    Other ``-c`` keys are validated as config overrides (an unknown key is a ConfigError) and ignored.
    """
    from apfast.repo.repository import CONFIG_RELPATH
    from apfast.run.config import canonical_key, load_config

    if overrides:
        cfg = load_config((), list(overrides))
        # Rubin's -c diaPipe.apdb.db_url=... means apdb.db_url too
        if any(canonical_key(o.split("=", 1)[0].strip()) == "apdb.db_url" for o in overrides):
            return str(cfg.apdb.db_url)
    stored = out / CONFIG_RELPATH
    if stored.is_file():
        try:
            data = tomllib.loads(stored.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            log.warning("cannot read %s (%s); give -c apdb.db_url=...", stored, exc)
            return None
        url = data.get("apdb", {}).get("db_url")
        return str(url) if url else None
    return None


def find_ccd_visits(
    butler: Any, records: dict[tuple[int, int], dict[str, Any]], ids: Sequence[Any] = ()
) -> list[CcdVisit]:
    """CCD-visits of the output repository: those of ``summary.json`` plus every calexp/difference found.

    ``ids`` are parsed ``--id`` expressions (:func:`apfast.repo.dataid.parse_ids`); a CCD-visit is kept if
    any expression matches its ``visit`` and ``ccdnum`` (other keys are matched later, on the band).
    """
    root = butler.repo.write_root
    keys = set(records)
    for p in root.glob("*/calexp/calexp-*.fits"):
        m = _CALEXP_RE.search(p.name)
        if m:
            keys.add((int(m.group(1)), int(m.group(2))))
    for p in root.glob("deepDiff/v*/diffexp-*.fits"):
        m = _DIFF_RE.search(p.name)
        if m and p.parent.name[1:].isdigit():
            keys.add((int(p.parent.name[1:]), int(m.group(1))))
    out = []
    for v, c in sorted(keys):
        if ids and not any(_matches(e, {"visit": v, "ccdnum": c}) for e in ids):
            continue
        out.append(CcdVisit(v, c, record=records.get((v, c), {})))
    return out


def _matches(expr: Any, values: dict[str, Any]) -> bool:
    for k, allowed in expr.items():
        if k in values and values[k] not in allowed and str(values[k]) not in {str(a) for a in allowed}:
            return False
    return True


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ApdbReader:
    """Read-only queries on an APDB (Rubin schema) at an SQLAlchemy URL.

    Raises
    ------
    ConfigError
        If there is no APDB at the URL (no file, no DiaObject table) or the database cannot be opened.
    """

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        from apfast.errors import ConfigError

        self.url = url
        engine_url = url
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///") :])
            if not path.is_file():
                msg = (
                    f"no APDB at {url}: {path.absolute()} does not exist (a relative SQLite path is relative "
                    "to the current folder); give -c apdb.db_url=sqlite:////absolute/path.db"
                )
                raise ConfigError(msg)
            engine_url = f"sqlite:///file:{path.absolute()}?mode=ro&uri=true"
        try:
            self.engine = sa.create_engine(engine_url)
            tables = set(sa.inspect(self.engine).get_table_names())
        except Exception as exc:
            msg = f"cannot open the APDB at {url}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            raise ConfigError(msg) from None
        missing = {"DiaObject", "DiaSource", "DiaForcedSource"} - tables
        if missing:
            self.engine.dispose()
            msg = (
                f"no APDB at {url}: the database has no {', '.join(sorted(missing))} table(s); "
                "give the apdb.db_url that `apfast process` used (-c apdb.db_url=...)"
            )
            raise ConfigError(msg)

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        with self.engine.connect() as con:
            res = con.execute(sa.text(sql), params or {})
            return [dict(r._mapping) for r in res]

    def _in_chunks(self, sql_head: str, column: str, values: Sequence[int]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        vals = [int(v) for v in values]
        for i in range(0, len(vals), 1000):
            chunk = vals[i : i + 1000]
            names = {f"v{j}": v for j, v in enumerate(chunk)}
            marks = ", ".join(f":{n}" for n in names)
            out += self._query(f"{sql_head} WHERE {_quote(column)} IN ({marks})", names)
        return out

    def sources_of(self, ccd_visits: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        """DiaSources (not withdrawn) of the given ``(visit, detector)`` CCD-visits."""
        wanted = set(ccd_visits)
        rows = self._in_chunks('SELECT * FROM "DiaSource"', "visit", sorted({v for v, _ in wanted}))
        return [
            r
            for r in rows
            if (int(r["visit"]), int(r["detector"])) in wanted and r.get("timeWithdrawnMjdTai") is None
        ]

    def sources_of_objects(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Every DiaSource (not withdrawn) of the given DiaObjects."""
        rows = self._in_chunks('SELECT * FROM "DiaSource"', "diaObjectId", ids)
        return [r for r in rows if r.get("timeWithdrawnMjdTai") is None]

    def forced_of_objects(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Every DiaForcedSource (not withdrawn) of the given DiaObjects."""
        rows = self._in_chunks('SELECT * FROM "DiaForcedSource"', "diaObjectId", ids)
        return [r for r in rows if r.get("timeWithdrawnMjdTai") is None]

    def objects(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """The current version (``validityEndMjdTai`` NULL) of each given DiaObject, by id."""
        rows = self._in_chunks('SELECT * FROM "DiaObject"', "diaObjectId", ids)
        out: dict[int, dict[str, Any]] = {}
        for r in rows:
            oid = int(r["diaObjectId"])
            if r.get("validityEndMjdTai") is None or oid not in out:
                if (
                    r.get("validityEndMjdTai") is None
                    or out.get(oid, {}).get("validityEndMjdTai") is not None
                ):
                    out[oid] = r
        return out


def significance(rows: Sequence[dict[str, Any]]) -> float:
    """Max |psfFlux / psfFluxErr| (or |snr|) of an object's DiaSources: how the report ranks objects."""
    best = 0.0
    for r in rows:
        f, e = r.get("psfFlux"), r.get("psfFluxErr")
        if f is not None and e:
            s = abs(float(f) / float(e))
        else:
            s = abs(float(r.get("snr") or 0.0))
        if np.isfinite(s):
            best = max(best, s)
    return best
