"""``apfast demo DIR``: simulate a small DECam dataset and run every stage that exists, end to end.

Each step prints what it did and where its outputs are, so a new user sees the
whole workflow in one command; the same steps are what a real DECam user types
(printed as commands too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

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
    from apfast.butler import Butler
    from apfast.calibs import ingest_calibs
    from apfast.dataid import format_table
    from apfast.ingest import ingest_raws
    from apfast.refcat import load_polygon
    from apfast.refcat import ingest_refcat
    from apfast.registry import Registry
    from apfast.simulate import simulate

    root = Path(directory).resolve()
    sim_dir, repo = root / "sim", root / "repo"
    timings: list[tuple[str, float]] = []

    def step(name: str) -> Callable[[float], None]:
        t0 = time.perf_counter()

        def done(_: float = 0.0) -> None:
            timings.append((name, time.perf_counter() - t0))

        return done

    out(f"apfast demo in {root}")
    done = step("simulate")
    if (sim_dir / "truth").exists() and any((sim_dir / "raw").glob("*.fits.fz")):
        from apfast.simulate import load_truth

        summary = None
        truth = load_truth(sim_dir)
        raw_files = sorted((sim_dir / "raw").glob("*.fits.fz"))
        calib_files = sorted(p for p in (sim_dir / "calib").iterdir() if p.is_file())
        refcats = (sim_dir / "refcat" / "gaia.csv", sim_dir / "refcat" / "ps1.csv")
        out(f"[1/10] simulated data already in {sim_dir} (delete it to re-simulate)")
        visits = sorted({int(v) for v in truth.visits["visit"]})
    else:
        summary = simulate(sim_dir, small=not full, seed=seed, progress=progress)
        raw_files = list(summary.raw_files)
        calib_files = list(summary.calib_files)
        refcats = summary.refcat_files
        visits = list(summary.visits)
        out(
            f"[1/10] simulated {len(summary.visits)} DECam visits ({len(summary.template_visits)} template epoch, "
            f"{len(summary.science_visits)} science) x {len(summary.ccdnums)} full-size CCDs with truth "
            f"-> {sim_dir}  ({summary.elapsed_s:.1f} s)"
        )
        out(f"      $ apfast simulate {sim_dir}{'' if full else ' --small'} --seed {seed}")
    done()

    done = step("ingest")
    rep = ingest_raws(repo, raw_files, mode="link", progress=progress)
    out(
        f"[2/10] ingested {len(rep.ingested)} raw file(s) ({rep.n_rows} CCDs; {len(rep.already_present)} already "
        f"present) -> {repo / 'registry.sqlite3'}"
    )
    out(f"      $ apfast ingest {repo} {sim_dir / 'raw'}/c4d_*_ori.fits.fz")
    done()

    done = step("ingest-calibs")
    crep = ingest_calibs(repo / "calibs", calib_files, progress=progress)
    out(
        f"[3/10] registered {crep.n_added} calibration row(s) (bias, flats, defects, crosstalk; "
        f"{len(crep.skipped)} already present) -> {repo / 'calibs' / 'calibRegistry.sqlite3'}"
    )
    out(f"      $ apfast ingest-calibs {repo / 'calibs'} {sim_dir / 'calib'}/*")
    done()

    done = step("ingest-refcat")
    for name, path in zip(("gaia", "ps1"), refcats, strict=True):
        rr = ingest_refcat(repo, name, [path], progress=progress)
        out(
            f"[4/10] reference catalogue {name}: {rr.n_total} sources in {len(list(rr.path.glob('*.fits')))} "
            f"HEALPix shard(s) -> {rr.path}"
        )
        out(f"      $ apfast ingest-refcat {repo} {name} {path}")
    done()

    done = step("select")
    with Registry(repo) as reg:
        rows = reg.select([{"visit": visits}])
    out(f"[5/10] {len(rows)} CCD(s) selectable; `apfast process {repo} --id visit=... --show data` prints:")
    for line in format_table(rows, ["visit", "ccdnum", "detector", "filter", "date", "expTime"]).splitlines():
        out("      " + line)
    done()

    done = step("butler")
    butler = Butler(repo)
    first = rows[0]
    data_id = {"visit": first["visit"], "ccdnum": first["ccdnum"]}
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
    done()

    done = step("process-ccd")
    from apfast.config import config_to_toml, load_config
    from apfast.pipeline import format_summary, run_process_ccd
    from apfast.repository import create_output_repo, write_config

    cfg = load_config()
    out_repo = create_output_repo(repo, rerun="demo")
    write_config(out_repo, config_to_toml(cfg), clobber=True)
    out(f"[7/10] ISR, characterize and calibrate every CCD into {out_repo} (the first CCD includes compiling "
        "the parallel kernels):")
    out(f"      $ apfast process-ccd {repo} --rerun demo --id visit={'^'.join(str(v) for v in visits)}")
    outcomes = run_process_ccd(Butler(out_repo), rows, cfg, progress=progress)
    for line in format_summary(outcomes).splitlines():
        out("      " + line)
    calexp = Butler(out_repo).get("calexp", data_id) if outcomes and outcomes[0].status == "ok" else None
    if calexp is not None:
        out(f"      calexp {data_id}: {calexp.image.shape} image/mask/variance, PSF {type(calexp.psf).__name__}, "
            f"zero point {calexp.photo_calib.zero_point:.3f} (electrons), WCS {calexp.wcs.wcs.ctype[0]}")
    done()
    failed = sum(o.status == "failed" for o in outcomes)

    done = step("templates")
    from apfast.pipeline import run_process
    from apfast.template import build_templates

    tmpl_visits = set(summary.template_visits) if summary is not None else {
        int(r["visit"]) for r in truth.visits if str(r["epoch"]) == "template"}
    tmpl_root = root / "templates"
    butler = Butler(out_repo)
    calexps = [butler.get("calexp", visit=int(r["visit"]), ccdnum=int(r["ccdnum"]))
               for r, o in zip(rows, outcomes, strict=True) if int(r["visit"]) in tmpl_visits and o.status == "ok"]
    paths = build_templates({str(rows[0]["filter"]): calexps}, tmpl_root, coadd_config=cfg.coadd,
                            warp_config=cfg.warp, progress=progress)
    out(f"[8/10] coadded {len(calexps)} template-epoch calexps into {len(paths) - 1} deepCoadd patch(es) -> "
        f"{tmpl_root / 'deepCoadd'}")
    out(f"      $ apfast make-templates {repo} --id visit={'^'.join(str(v) for v in sorted(tmpl_visits))} "
        f"--output {tmpl_root}")
    done()

    done = step("make-apdb")
    from dataclasses import replace as _replace

    from apfast.apdb import Apdb, make_apdb

    apdb_path = root / "apdb" / "association.db"
    cfg = _replace(cfg, apdb=_replace(cfg.apdb, db_url=f"sqlite:///{apdb_path}"))
    make_apdb(cfg.apdb, drop=True)
    apdb = Apdb(cfg.apdb)
    out(f"[9/10] created an empty APDB at {apdb_path}")
    out(f"      $ apfast make-apdb -c apdb.db_url=sqlite:///{apdb_path}")
    done()

    done = step("process")
    sci_rows = [r for r in rows if int(r["visit"]) not in tmpl_visits]
    diff_out = run_process(butler, sci_rows, cfg, template_root=tmpl_root, apdb=apdb, progress=progress)
    out("[10/10] per science CCD: warp the template, PSF-match (Alard-Lupton), subtract, decorrelate, detect and")
    out("      measure DIA sources, associate them with DiaObjects in the APDB, forced photometry, Avro alerts:")
    out(f"      $ apfast process {repo} --rerun demo --id visit=... --template {tmpl_root} "
        f"-c apdb.db_url=sqlite:///{apdb_path}")
    for line in format_summary(diff_out).splitlines():
        out("      " + line)
    failed += sum(o.status == "failed" for o in diff_out)
    counts = {t: apdb.count(t) for t in ("DiaObject", "DiaSource", "DiaForcedSource")}
    n_obj = len(apdb.dia_objects(latest=True).get("diaObjectId", ()))
    apdb.close()
    out(f"      APDB: {n_obj} DiaObjects ({counts['DiaObject']} versions), {counts['DiaSource']} DiaSources, "
        f"{counts['DiaForcedSource']} DiaForcedSources; alerts in {out_repo / 'alerts'}")
    done()

    out("")
    out("step timings: " + ", ".join(f"{n} {t:.2f} s" for n, t in timings))
    out(f"outputs: repository {repo}, calexps and differences {out_repo} (deepDiff/), templates {tmpl_root}, "
        f"simulated inputs and truth {sim_dir}, APDB {apdb_path}")
    out(f"read them: apfast.Butler({str(out_repo)!r}).get('deepDiff_diaSrc', visit=..., ccdnum=...); "
        "the APDB with any SQLite client or lsst.dax.apdb")
    return 1 if failed else 0


def _shape(obj: object) -> str:
    image = getattr(obj, "image", obj)
    return str(getattr(image, "shape", "?"))
