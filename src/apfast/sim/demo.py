"""``apfast demo DIR``: simulate a small DECam dataset and run every stage that exists, end to end.

Each step prints what it did and where its outputs are, so a new user sees the
whole workflow in one command; the same steps are what a real DECam user types
(printed as commands too).

Running it again in the same folder reuses a complete simulation made with the same seed and
size (``DIR/demo.json`` records them) and the CCDs already processed; templates and the APDB are
made again. A folder holding an incomplete or different demo run is cleared first (with a message);
a folder holding anything else under ``sim``, ``repo``, ``templates`` or ``apdb`` is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apfast.errors import ConfigError

__all__ = ["run_demo"]


def run_demo(
    directory: str | Path,
    *,
    seed: int = 0,
    full: bool = False,
    out: Callable[[str], None] = print,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Run the demo in ``directory``; return the exit status (0 on success).

    Parameters
    ----------
    directory : path
        Where to put ``sim/`` (simulated inputs with truth) and ``repo/`` (the repository).
    seed : int
        Simulation seed.
    full : bool
        Simulate the default-size dataset instead of ``--small``.
    out : callable
        Receives each line of the user-facing report.
    progress : callable, optional
        Receives progress messages of the long steps.
    """
    root = Path(directory).resolve()
    sim_dir, repo = root / "sim", root / "repo"
    timings: list[tuple[str, float]] = []

    def step(name: str) -> Callable[..., None]:
        t0 = time.perf_counter()

        def done(_: float = 0.0) -> None:
            timings.append((name, time.perf_counter() - t0))

        return done

    out(f"apfast demo in {root}")
    done = step("simulate")
    inputs = _simulate_or_reuse(root, sim_dir, seed=seed, full=full, out=out)
    done()

    done = step("ingest")
    _ingest_raws(repo, sim_dir, inputs, out=out, progress=progress)
    done()

    done = step("ingest-calibs")
    _ingest_calibs(repo, sim_dir, inputs, out=out, progress=progress)
    done()

    done = step("ingest-refcat")
    _ingest_refcats(repo, inputs, out=out, progress=progress)
    done()

    done = step("select")
    all_visits = "^".join(str(v) for v in inputs.visits)
    rows = _select(repo, inputs.visits, all_visits, out=out)
    done()

    done = step("butler")
    first = rows[0]
    data_id = {"visit": first["visit"], "ccdnum": first["ccdnum"]}
    _read_back(repo, first, data_id, out=out)
    done()

    done = step("process-ccd")
    cfg, out_repo, outcomes = _process_ccds(repo, rows, data_id, all_visits, out=out, progress=progress)
    done()
    failed = sum(o.status == "failed" for o in outcomes)

    done = step("templates")
    tmpl_root = _make_templates(root, repo, out_repo, cfg, rows, outcomes, inputs.template_visits, out=out,
                                progress=progress)  # fmt: skip
    if tmpl_root is None:
        return 1
    done()

    done = step("make-apdb")
    cfg, apdb, apdb_path = _make_apdb(root, cfg, out=out)
    done()

    done = step("process")
    sci_rows = [r for r in rows if int(r["visit"]) not in inputs.template_visits]
    diff_out = _process_science(repo, out_repo, tmpl_root, cfg, apdb, apdb_path, sci_rows, out=out,
                                progress=progress)  # fmt: skip
    done()
    failed += sum(o.status == "failed" for o in diff_out)

    _report_and_wrap_up(out_repo, repo, sim_dir, tmpl_root, apdb_path, diff_out, timings,
                        sci_rows[0] if sci_rows else first, out=out)  # fmt: skip
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# The steps of run_demo
# --------------------------------------------------------------------------------------------------

#: Receives lines of the report (``out``) or progress messages (``progress``).
_Lines = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class _DemoInputs:
    """The simulated inputs the later steps ingest, and which visits are the template epoch."""

    raw_files: list[Path]
    calib_files: list[Path]
    refcats: tuple[Path, ...]
    visits: list[int]
    template_visits: set[int]


def _simulate_or_reuse(root: Path, sim_dir: Path, *, seed: int, full: bool, out: _Lines) -> _DemoInputs:
    """[1/10] Reuse a complete simulation made with the same settings, else clear the folder and simulate."""
    from apfast.sim.simulate import simulate

    marker = root / _MARKER
    wanted = {"seed": int(seed), "full": bool(full)}
    reuse = _read_marker(marker) == wanted and _simulation_complete(sim_dir)
    present = [d for d in _DEMO_DIRS if (root / d).exists()]
    if not reuse and present:
        if not (marker.exists() or (sim_dir / "truth").is_dir()):  # never delete what a demo did not write
            msg = (f"{root} holds {', '.join(present)}, which apfast demo did not write (no {_MARKER}); "
                   "choose an empty or new folder for the demo")
            raise ConfigError(msg)
        # an earlier demo with other settings, or one interrupted during the simulation: start over
        out(f"      {root} holds an earlier or incomplete demo run; deleting its {', '.join(present)} and "
            "starting over")
        for d in _DEMO_DIRS:
            shutil.rmtree(root / d, ignore_errors=True)
        marker.unlink(missing_ok=True)
    if reuse:
        from apfast.sim.simulate import load_truth

        truth = load_truth(sim_dir)
        raw_files = sorted((sim_dir / "raw").glob("*.fits.fz"))
        calib_files = sorted(p for p in (sim_dir / "calib").iterdir() if p.is_file())
        refcats: tuple[Path, ...] = (sim_dir / "refcat" / "gaia.csv", sim_dir / "refcat" / "ps1.csv")
        out(f"[1/10] reusing the complete simulation in {sim_dir} (seed {seed}; delete it to re-simulate)")
        visits = sorted({int(v) for v in truth.visits["visit"]})
        tmpl_visits = {int(r["visit"]) for r in truth.visits if str(r["epoch"]) == "template"}
    else:
        summary = simulate(sim_dir, small=not full, seed=seed)  # it logs its own progress
        raw_files = list(summary.raw_files)
        calib_files = list(summary.calib_files)
        refcats = summary.refcat_files
        visits = list(summary.visits)
        tmpl_visits = set(summary.template_visits)
        out(
            f"[1/10] simulated {len(summary.visits)} DECam visits ({len(summary.template_visits)} template epoch, "
            f"{len(summary.science_visits)} science) x {len(summary.ccdnums)} full-size CCDs with truth "
            f"-> {sim_dir}  ({summary.elapsed_s:.1f} s)"
        )
        marker.write_text(json.dumps(wanted) + "\n", encoding="utf-8")
    out(f"      $ apfast simulate {sim_dir}{'' if full else ' --small'} --seed {seed}")
    return _DemoInputs(raw_files=raw_files, calib_files=calib_files, refcats=tuple(refcats), visits=visits,
                       template_visits=tmpl_visits)  # fmt: skip


def _ingest_raws(repo: Path, sim_dir: Path, inputs: _DemoInputs, *, out: _Lines, progress: _Lines | None) -> None:
    """[2/10] Ingest the raws into the repository (linked)."""
    from apfast.repo.ingest import ingest_raws

    rep = ingest_raws(repo, inputs.raw_files, mode="link", progress=progress)
    out(
        f"[2/10] ingested {len(rep.ingested)} raw file(s) ({rep.n_rows} CCDs; {len(rep.already_present)} already "
        f"present) -> {repo / 'registry.sqlite3'}"
    )
    out(f"      $ apfast ingest {repo} {sim_dir / 'raw'}/c4d_*_ori.fits.fz")


def _ingest_calibs(repo: Path, sim_dir: Path, inputs: _DemoInputs, *, out: _Lines, progress: _Lines | None) -> None:
    """[3/10] Register the master calibrations under ``repo/calibs``."""
    from apfast.repo.calibs import ingest_calibs

    crep = ingest_calibs(repo / "calibs", inputs.calib_files, progress=progress)
    out(
        f"[3/10] registered {crep.n_added} calibration row(s) (bias, flats, defects, crosstalk; "
        f"{len(crep.skipped)} already present) -> {repo / 'calibs' / 'calibRegistry.sqlite3'}"
    )
    out(f"      $ apfast ingest-calibs {repo / 'calibs'} {sim_dir / 'calib'}/*")


def _ingest_refcats(repo: Path, inputs: _DemoInputs, *, out: _Lines, progress: _Lines | None) -> None:
    """[4/10] Shard the Gaia and Pan-STARRS catalogues by HEALPix."""
    from apfast.repo.refcat import ingest_refcat

    for name, path in zip(("gaia", "ps1"), inputs.refcats, strict=True):
        rr = ingest_refcat(repo, name, [path], progress=progress)
        out(
            f"[4/10] reference catalogue {name}: {rr.n_total} sources in {len(list(rr.path.glob('*.fits')))} "
            f"HEALPix shard(s) -> {rr.path}"
        )
        out(f"      $ apfast ingest-refcat {repo} {name} {path}")


def _select(repo: Path, visits: list[int], all_visits: str, *, out: _Lines) -> list[dict[str, Any]]:
    """[5/10] The registry rows of every simulated visit, printed as ``--show data`` does."""
    from apfast.repo.dataid import format_table
    from apfast.repo.registry import Registry

    with Registry(repo) as reg:
        rows = reg.select([{"visit": visits}])
    out(f"[5/10] {len(rows)} CCD(s) selectable; `apfast process {repo} --id visit={all_visits} --show data` "
        "prints:")
    for line in format_table(rows, ["visit", "ccdnum", "detector", "filter", "date", "expTime"]).splitlines():
        out("      " + line)
    return rows


def _read_back(repo: Path, first: dict[str, Any], data_id: dict[str, Any], *, out: _Lines) -> None:
    """[6/10] Read the first CCD's raw, calibrations and Gaia stars back through the Butler."""
    from apfast.repo.butler import Butler
    from apfast.repo.refcat import load_polygon

    butler = Butler(repo)
    raw = butler.get("raw", data_id)
    bias = butler.get("bias", data_id)
    flat = butler.get("flat", data_id)
    defects = butler.get("defects", data_id)
    corners_ra = [first[f"corner_ra_{i}"] for i in range(4)]
    corners_dec = [first[f"corner_dec_{i}"] for i in range(4)]
    gaia = load_polygon(repo, "gaia", corners_ra=corners_ra, corners_dec=corners_dec, margin=0.01)
    out(f"[6/10] read back through apfast.Butler({str(repo)!r}) for {data_id}:")
    out(f"      raw {raw.image.shape} {raw.image.dtype}, bias {_shape(bias)}, flat {_shape(flat)}, "
        f"{len(defects)} defect box(es); {len(gaia)} Gaia star(s) on the CCD from shards {list(gaia.shards_read)}")


def _process_ccds(
    repo: Path,
    rows: list[dict[str, Any]],
    data_id: dict[str, Any],
    all_visits: str,
    *,
    out: _Lines,
    progress: _Lines | None,
) -> tuple[Any, Path, list[Any]]:
    """[7/10] processCcd of every CCD into the ``demo`` rerun; return the config, the rerun and the outcomes."""
    from apfast.repo.butler import Butler
    from apfast.repo.repository import create_output_repo, write_config
    from apfast.run.config import comparable_settings, config_to_toml, load_config
    from apfast.run.pipeline import format_summary, run_process_ccd

    cfg = load_config()
    out_repo = create_output_repo(repo, rerun="demo")
    write_config(out_repo, config_to_toml(cfg), clobber=True, normalize=comparable_settings)
    out(f"[7/10] ISR, characterize and calibrate every CCD into {out_repo} (the first CCD includes compiling "
        "the parallel kernels):")
    out(f"      $ apfast process-ccd {repo} --rerun demo --id visit={all_visits}")
    outcomes = run_process_ccd(Butler(out_repo), rows, cfg, progress=progress)
    n_reused = sum(o.status == "skipped" for o in outcomes)
    if n_reused:
        out(f"      ({n_reused} CCD(s) already processed by an earlier demo run: reused)")
    for line in format_summary(outcomes).splitlines():
        out("      " + line)
    # "skipped" means the outputs exist (an earlier run): they are as good as new ones
    calexp = Butler(out_repo).get("calexp", data_id) if outcomes and outcomes[0].status != "failed" else None
    if calexp is not None:
        out(f"      calexp {data_id}: {calexp.image.shape} image/mask/variance, PSF {type(calexp.psf).__name__}, "
            f"zero point {calexp.photo_calib.zero_point:.3f} (electrons), WCS {calexp.wcs.wcs.ctype[0]}")
    return cfg, out_repo, outcomes


def _make_templates(
    root: Path,
    repo: Path,
    out_repo: Path,
    cfg: Any,
    rows: list[dict[str, Any]],
    outcomes: list[Any],
    tmpl_visits: set[int],
    *,
    out: _Lines,
    progress: _Lines | None,
) -> Path | None:
    """[8/10] Coadd the template-epoch calexps into ``root/templates``; None when none was processed."""
    from apfast.diffim.template import build_templates
    from apfast.repo.butler import Butler
    from apfast.repo.repository import create_output_repo, write_config
    from apfast.run.config import comparable_settings, config_to_toml

    # an output repository, as `apfast make-templates --output` makes, so the printed command works on it
    tmpl_root = create_output_repo(repo, output=root / "templates")
    write_config(tmpl_root, config_to_toml(cfg), clobber=True, normalize=comparable_settings)
    butler = Butler(out_repo)
    calexps = [butler.get("calexp", visit=int(r["visit"]), ccdnum=int(r["ccdnum"]))
               for r, o in zip(rows, outcomes, strict=True)
               if int(r["visit"]) in tmpl_visits and o.status != "failed"]
    if not calexps:
        out("[8/10] no template-epoch CCD was processed (see the failures above); stopping")
        return None
    paths = build_templates({str(rows[0]["filter"]): calexps}, tmpl_root, coadd_config=cfg.coadd,
                            warp_config=cfg.warp, progress=progress)
    out(f"[8/10] coadded {len(calexps)} template-epoch calexps into {len(paths) - 1} deepCoadd patch(es) -> "
        f"{tmpl_root / 'deepCoadd'}")
    out(f"      $ apfast make-templates {repo} --id visit={'^'.join(str(v) for v in sorted(tmpl_visits))} "
        f"--output {tmpl_root}")
    return tmpl_root


def _make_apdb(root: Path, cfg: Any, *, out: _Lines) -> tuple[Any, Any, Path]:
    """[9/10] A fresh SQLite APDB in ``root/apdb``; return the config pointing at it, the open APDB and its path."""
    from dataclasses import replace as _replace

    from apfast.dia.apdb import Apdb, make_apdb

    apdb_path = root / "apdb" / "association.db"
    cfg = _replace(cfg, apdb=_replace(cfg.apdb, db_url=f"sqlite:///{apdb_path}"))
    make_apdb(cfg.apdb, drop=True)
    apdb = Apdb(cfg.apdb)
    out(f"[9/10] created an empty APDB at {apdb_path}")
    out(f"      $ apfast make-apdb --drop -c apdb.db_url=sqlite:///{apdb_path}")
    return cfg, apdb, apdb_path


def _process_science(
    repo: Path,
    out_repo: Path,
    tmpl_root: Path,
    cfg: Any,
    apdb: Any,
    apdb_path: Path,
    sci_rows: list[dict[str, Any]],
    *,
    out: _Lines,
    progress: _Lines | None,
) -> list[Any]:
    """[10/10] Difference imaging, DIA sources, association and alerts of every science CCD; closes ``apdb``."""
    from apfast.repo.butler import Butler
    from apfast.run.pipeline import format_summary, run_process

    diff_out = run_process(Butler(out_repo), sci_rows, cfg, template_root=tmpl_root, apdb=apdb, progress=progress)
    out("[10/10] per science CCD: warp the template, PSF-match (Alard-Lupton), subtract, decorrelate, detect and")
    out("      measure DIA sources, associate them with DiaObjects in the APDB, forced photometry, Avro alerts:")
    sci_visits = "^".join(str(v) for v in sorted({int(r["visit"]) for r in sci_rows}))
    out(f"      $ apfast process {repo} --rerun demo --id visit={sci_visits} --template {tmpl_root} "
        f"-c apdb.db_url=sqlite:///{apdb_path}")
    for line in format_summary(diff_out).splitlines():
        out("      " + line)
    counts = {t: apdb.count(t) for t in ("DiaObject", "DiaSource", "DiaForcedSource")}
    n_obj = len(apdb.dia_objects(latest=True).get("diaObjectId", ()))
    apdb.close()
    out(f"      APDB: {n_obj} DiaObjects ({counts['DiaObject']} versions), {counts['DiaSource']} DiaSources, "
        f"{counts['DiaForcedSource']} DiaForcedSources; alerts in {out_repo / 'alerts'}")
    return diff_out


def _report_and_wrap_up(
    out_repo: Path,
    repo: Path,
    sim_dir: Path,
    tmpl_root: Path,
    apdb_path: Path,
    diff_out: list[Any],
    timings: list[tuple[str, float]],
    example: dict[str, Any],
    *,
    out: _Lines,
) -> None:
    """Write the HTML report, then print the step timings and where every output is."""
    from apfast.report import build_report, write_summary_json

    write_summary_json(out_repo, diff_out)  # what `apfast process` writes next to summary.txt
    rep = build_report(out_repo, db_url=f"sqlite:///{apdb_path}")
    out(f"report: {rep.index} ({rep.n_ccd_visits} CCD-visits, {rep.n_objects_shown} DiaObjects) in "
        f"{rep.seconds:.1f} s; open it in a browser, or rebuild it with: apfast report {out_repo}")
    out("")
    out("step timings: " + ", ".join(f"{n} {t:.2f} s" for n, t in timings))
    out(f"outputs: repository {repo}, calexps and differences {out_repo} (deepDiff/), templates {tmpl_root}, "
        f"simulated inputs and truth {sim_dir}, APDB {apdb_path}")
    out(f"read them: apfast.Butler({str(out_repo)!r}).get('deepDiff_diaSrc', visit={int(example['visit'])}, "
        f"ccdnum={int(example['ccdnum'])}); the APDB with any SQLite client or lsst.dax.apdb")


#: What a demo writes in its folder besides the marker; a run that cannot reuse them deletes them.
_DEMO_DIRS = ("sim", "repo", "templates", "apdb")
#: Written once the simulation is complete: the settings it was made with.
_MARKER = "demo.json"


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _simulation_complete(sim_dir: Path) -> bool:
    """Whether ``sim_dir`` holds a finished simulation: the truth tables (written last) and every raw file."""
    try:
        from apfast.sim.simulate import load_truth

        truth = load_truth(sim_dir)
        raws = [sim_dir / "raw" / str(f) for f in truth.visits["filename"]]
    except Exception:  # any unreadable truth means: simulate again
        return False
    refcats = (sim_dir / "refcat" / "gaia.csv", sim_dir / "refcat" / "ps1.csv")
    calib = sim_dir / "calib"
    return (all(p.is_file() for p in (*raws, *refcats)) and calib.is_dir()
            and any(p.is_file() for p in calib.iterdir()))


def _shape(obj: object) -> str:
    image = getattr(obj, "image", obj)
    return str(getattr(image, "shape", "?"))
