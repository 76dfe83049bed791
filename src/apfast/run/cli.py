"""The ``apfast`` command line: Gen 2 ``ap_pipe``-style subcommands.

``main(argv)`` returns the exit status: 0 ok, 1 error, 2 usage or config error,
130 on Ctrl-C; an :class:`~apfast.errors.ApfastError`'s ``exit_code`` wins.
User-facing results go to stdout; progress and diagnostics go to the log on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apfast import __version__
from apfast.errors import ApfastError, ConfigError

__all__ = ["build_parser", "main"]

log = logging.getLogger("apfast")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _progress(msg: str) -> None:
    log.info("%s", msg)


# -- subcommand implementations -------------------------------------------------------------------
def _cmd_ingest(args: argparse.Namespace) -> int:
    from apfast.repo.ingest import ingest_raws

    files = _expand_files(args.files)
    t0 = time.perf_counter()
    if args.calibrated:
        from apfast.repo.calibrated import ingest_calibrated

        if args.camera is None:
            msg = "--calibrated needs --camera: decam-instcal, ztf or a TOML description with a [calibrated] table"
            raise ConfigError(msg)
        given = {Path(f) for f in args.files}  # from folders take the FITS files only (not catalogues beside them)
        files = [f for f in files if f in given or f.suffix.lower() in {".fits", ".fz", ".fit"}]
        rep = ingest_calibrated(args.repo, files, camera=args.camera, mode=args.mode, progress=_progress)
    else:
        rep = ingest_raws(args.repo, files, mode=args.mode, camera=args.camera, progress=_progress)
    dt = time.perf_counter() - t0
    _out(
        f"ingested {len(rep.ingested)} file(s), {rep.n_rows} CCD row(s) into {Path(args.repo) / 'registry.sqlite3'}"
        f" in {dt:.2f} s; {len(rep.already_present)} already present"
        + (f"; skipped {len(rep.skipped_hdus)} non-science HDU(s)" if rep.skipped_hdus else "")
    )
    return 0


def _cmd_ingest_calibs(args: argparse.Namespace) -> int:
    from apfast.repo.calibs import ingest_calibs

    files = _expand_files(args.files)
    rep = ingest_calibs(args.calib_root, files, validity_days=args.validity, mode=args.mode, progress=_progress)
    counts: dict[str, int] = {}
    for ref in rep.added:
        counts[ref.calib_type] = counts.get(ref.calib_type, 0) + 1
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "nothing new"
    _out(
        f"registered {rep.n_added} calib row(s) from {len(rep.files)} file(s) in "
        f"{Path(args.calib_root) / 'calibRegistry.sqlite3'}: {kinds}; {len(rep.skipped)} already present"
    )
    return 0


def _cmd_ingest_refcat(args: argparse.Namespace) -> int:
    from apfast.repo.refcat import ingest_refcat

    cmap = None
    if args.column_map:
        cmap = {}
        for item in args.column_map.split(","):
            if "=" not in item:
                msg = f"--column-map item {item!r} is not of the form standard_name=input_column"
                raise ConfigError(msg)
            k, v = item.split("=", 1)
            cmap[k.strip()] = v.strip()
    files = _expand_files(args.files)
    rep = ingest_refcat(args.repo, args.name, files, kind=args.kind, column_map=cmap, nside=args.nside,
                        progress=_progress)
    _out(
        f"{rep.name} ({rep.kind}): +{rep.n_added} sources, {rep.n_total} in total, {len(rep.shards_written)} "
        f"shard(s) written under {rep.path} (nside {rep.nside}) in {rep.elapsed_s:.2f} s; "
        f"{len(rep.files_skipped)} file(s) already ingested"
    )
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from apfast.sim.simulate import simulate

    # no progress callback: simulate logs each step itself (a callback logging it too doubled every line)
    summary = simulate(args.out, small=args.small, seed=args.seed)
    for line in simulation_report(summary):
        _out(line)
    return 0


def simulation_report(summary: Any) -> list[str]:
    """A few readable lines on what ``apfast simulate`` wrote and the commands that use it."""
    out = summary.out
    ccds = ", ".join(map(str, summary.ccdnums))
    first = (f"simulated {len(summary.visits)} DECam visits x {len(summary.ccdnums)} CCD(s) (ccdnum {ccds}; "
             f"filter {', '.join(summary.filters)}; seed {summary.seed}) in {summary.elapsed_s:.1f} s "
             f"under {out}")
    visits = (f"  template visits {', '.join(map(str, summary.template_visits))}; "
              f"science visits {', '.join(map(str, summary.science_visits))}")
    raw = f"  {out / 'raw'}: {len(summary.raw_files)} raw file(s) -> apfast ingest REPO {out / 'raw'}"
    calib = (f"  {out / 'calib'}: bias, flat ({', '.join(summary.flat_files)}), defects, crosstalk "
             f"-> apfast ingest-calibs REPO/calibs {out / 'calib'}")
    refcat = (f"  {out / 'refcat'}: gaia.csv, ps1.csv -> apfast ingest-refcat REPO gaia {summary.gaia_file} "
              f"(and ps1)")
    truth = (f"  {summary.truth_dir}: the truth (sources, transients, visits), "
             f"read with apfast.sim.simulate.load_truth({str(out)!r})")
    return [first, visits, raw, calib, refcat, truth]


def _cmd_demo(args: argparse.Namespace) -> int:
    from apfast.run.warmup import ensure_kernel_cache
    from apfast.sim.demo import run_demo

    ensure_kernel_cache()
    return run_demo(args.dir, seed=args.seed, full=args.full, out=_out, progress=_progress)


def _cache_line(st: dict) -> str:
    return f"{st['path']} ({st['files']} files, {st['size_bytes'] / 2**20:.1f} MB)"


def _cmd_warmup(args: argparse.Namespace) -> int:
    from apfast.diffim.fftw import wisdom_path
    from apfast.run.warmup import build_kernel_cache, kernel_cache_status, warmup_fftw

    st = kernel_cache_status()
    if not st["enabled"]:
        msg = "the kernel cache is off (APFAST_NUMBA_CACHE=0); unset it to warm a cache"
        raise ConfigError(msg)
    if args.check:
        if st["complete"]:
            _out(f"kernel cache complete: {_cache_line(st)}; built {st.get('built_at', '?')} in "
                 f"{st.get('build_seconds', 0):.1f} s, {st.get('signatures', 0)} signatures")
            return 0
        _out(f"kernel cache incomplete: {_cache_line(st)}; run `apfast warmup` to build it "
             f"(~{st.get('build_seconds', 60):.0f} s once per machine)")
        return 1
    t0 = time.perf_counter()
    if st["complete"]:
        _out(f"kernel cache already complete: {_cache_line(st)} (built {st.get('built_at', '?')})")
    else:
        log.info("compiling every kernel into %s with %s process(es); nothing else compiles afterwards",
                 st["path"], args.jobs or min(os.cpu_count() or 1, 4))
        st = build_kernel_cache(jobs=args.jobs)
        _out(f"kernel cache built in {time.perf_counter() - t0:.1f} s: {_cache_line(st)}, "
             f"{st['signatures']} signatures")
    if not args.no_fftw:
        plans = warmup_fftw()
        _out(f"FFTW plans: {len(plans)} in {sum(t for _, t in plans):.1f} s (wisdom {wisdom_path()})")
    return 0


def _cmd_make_apdb(args: argparse.Namespace) -> int:
    from apfast.dia.apdb import make_apdb

    cfg = _load_cfg(args)
    where = make_apdb(cfg.apdb, drop=args.drop)
    url = cfg.apdb.db_url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        # a relative path is relative to the current folder: the hint must work from anywhere
        url = f"sqlite:///{Path(url[len('sqlite:///'):]).absolute()}"
    _out(f"created an empty APDB (Rubin schema 10.0.0) at {where}")
    _out(f"use it with: apfast process REPO --rerun NAME ... -c apdb.db_url={url}")
    return 0


def _config_files(names: Sequence[str]) -> list[Path]:
    """``-C`` files; a name that is not a file but ships with apfast (``calexpTemplates.toml``) is taken from there."""
    packaged = Path(__file__).resolve().parents[1] / "configs"
    out = []
    for name in names:
        p = Path(name)
        if not p.exists() and (packaged / p.name).exists():
            p = packaged / p.name
        elif p.suffix == ".py" and (packaged / f"{p.stem}.toml").exists():
            # Rubin's `-C $AP_PIPE_DIR/config/calexpTemplates.py`: the built-in TOML means the same
            log.info("-C %s: using apfast's built-in %s.toml (Rubin's Python config files are not read)", name,
                     p.stem)
            p = packaged / f"{p.stem}.toml"
        out.append(p)
    return out


def _load_cfg(args: argparse.Namespace):  # PipelineConfig, imported lazily
    from apfast.run.config import load_config

    overrides = list(args.config or ())
    if getattr(args, "no_write_matched", False):  # a flag for a config key: later settings win, so it goes last
        overrides.append("output.write_matched=false")
    return load_config(_config_files(args.config_file or ()), overrides)


def _cmd_config_show(args: argparse.Namespace) -> int:
    from apfast.run.config import config_to_toml

    _out(config_to_toml(_load_cfg(args)).rstrip())
    return 0


def _select(args: argparse.Namespace) -> list[dict]:
    from apfast.repo.dataid import parse_ids

    return _select_rows(args.repo, [dict(e) for e in parse_ids(args.id or [])])


def _select_rows(repo: str, exprs: list[dict]) -> list[dict]:
    from apfast.repo.registry import Registry

    with Registry(repo) as reg:
        return reg.select(exprs)


def _template_visit(tokens: Sequence[str] | None) -> int | None:
    """``--templateId visit=N`` (Gen 2: the visit only)."""
    if not tokens:
        return None
    from apfast.repo.dataid import parse_id

    expr = parse_id(list(tokens))
    visits = expr.get("visit", ())
    if len(visits) != 1 or set(expr) - {"visit"}:
        msg = f"--templateId takes exactly one visit (visit=N), got {' '.join(tokens)!r}"
        raise ConfigError(msg)
    return int(visits[0])


def _cmd_make_templates(args: argparse.Namespace) -> int:
    from apfast.repo.butler import Butler
    from apfast.repo.repository import create_output_repo, write_config
    from apfast.run.config import comparable_settings, config_to_toml
    from apfast.run.pipeline import make_templates
    from apfast.run.warmup import ensure_kernel_cache, write_compile_report

    cfg = _load_cfg(args)
    rows = _select(args)
    if args.show:
        _show(args, cfg, rows)
        return 0
    out_repo = create_output_repo(args.repo, rerun=args.rerun, output=args.output or "templates")
    write_config(out_repo, config_to_toml(cfg), clobber=args.clobber_config, normalize=comparable_settings)
    butler = Butler(out_repo, calib=args.calib, output=cfg.output)
    ensure_kernel_cache()
    outcomes, paths = make_templates(butler, rows, cfg, doraise=args.doraise, progress=_progress)
    write_compile_report()
    _print_summary(args, outcomes, out_repo)
    _out(f"wrote {max(len(paths) - 1, 0)} deepCoadd patch(es) and the sky map under {out_repo / 'deepCoadd'}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


SUMMARY_NAME = "summary.txt"


def _print_summary(args: argparse.Namespace, outcomes: list, out_repo: Path) -> None:
    """Print the per-CCD table (compact unless ``--summary wide``); the wide one goes to OUT/summary.txt."""
    from apfast.run.pipeline import format_summary

    wide = format_summary(outcomes, wide=True)
    path = out_repo / SUMMARY_NAME
    written = True
    try:
        path.write_text(wide + "\n", encoding="utf-8")
    except OSError as exc:  # the table is printed anyway; a full disk shows up in the outputs' errors
        log.warning("could not write %s: %s", path, exc)
        written = False
    from apfast.report.summary import write_summary_json

    write_summary_json(out_repo, outcomes)  # OUT/summary.json: merged across runs, read by `apfast report`
    _out(wide if args.summary == "wide" else format_summary(outcomes))
    if written and args.summary != "wide":
        _out(f"per-stage seconds and full messages: {path} (--summary wide prints them)")


def _cmd_report(args: argparse.Namespace) -> int:
    from apfast.report.build import build_report

    res = build_report(args.out, config_overrides=args.config or (), ids=args.id or (), all_objects=args.all,
                       max_objects=args.max_objects)
    _out(f"report: {res.index} ({res.n_ccd_visits} CCD-visits, {res.n_objects_shown} of {res.n_objects} "
         f"DiaObjects, {res.n_png} PNGs) in {res.seconds:.1f} s")
    if args.open:
        import webbrowser

        webbrowser.open(res.index.as_uri())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from apfast.repo.dataid import parse_ids
    from apfast.run.verify import format_verify, run_verify, write_json

    res = run_verify(args.out, truth=args.truth, config_overrides=args.config or (),
                     ids=[dict(e) for e in parse_ids(args.id or [])], match_radius=args.match_radius)
    for line in format_verify(res):
        _out(line)
    if args.json:
        _out(f"numbers written to {write_json(res, args.json)}")
    return 0


def _show(args: argparse.Namespace, cfg, rows: list[dict]) -> None:  # PipelineConfig
    from apfast.repo.dataid import format_table
    from apfast.run.config import config_to_toml

    for what in args.show:
        if what == "config":
            _out(config_to_toml(cfg).rstrip())
        elif what == "data":
            keys = ["visit", "ccdnum", "detector", "filter", "date", "expTime", "object"]
            _out(format_table(rows, keys))
            _out(f"{len(rows)} dataId(s)")


def _cmd_process(args: argparse.Namespace) -> int:
    """``process`` and ``process-ccd``: select, set up the output repository, run, summarise."""
    if args.processes < 1:
        msg = f"-j {args.processes}: give a number of worker processes >= 1"
        raise ConfigError(msg)
    if getattr(args, "executor", "local") == "dask":
        from apfast.run.executor import require_distributed

        require_distributed()  # before anything is written
    cfg = _load_cfg(args)
    if args.command == "process" and cfg.inject.catalog:
        from apfast.run.inject import check_catalog

        check_catalog(cfg.inject)  # a bad catalogue stops the run here, with one line (exit 2)
    rows = _select(args)
    if args.show:
        _show(args, cfg, rows)
        return 0
    if not args.rerun and not args.output:
        msg = f"give --rerun NAME (writes {args.repo}/rerun/NAME) or --output DIR for the outputs"
        raise ConfigError(msg)
    parallel = args.processes > 1 or getattr(args, "executor", "local") == "dask"
    if args.command == "process" and parallel and cfg.dia_pipe.do_dia and not cfg.output.write_matched:
        msg = ("output.write_matched = false (--no-write-matched) needs a serial run: with -j N or --executor "
               "dask the DIA stage runs in another process and reads deepDiff_matchedExp back from disk. Drop "
               "-j/--executor, or keep the matched template")
        raise ConfigError(msg)
    apdb = None
    if args.command == "process" and cfg.dia_pipe.do_dia:
        from apfast.dia.apdb import Apdb

        apdb = Apdb(cfg.apdb)  # fails here, before any work, if there is no APDB at the URL
    try:
        if args.command == "process":
            cfg = _check_templates(args, cfg, rows)
        return _run_selected(args, cfg, rows, apdb)
    finally:
        if apdb is not None:
            apdb.close()


def _check_templates(args: argparse.Namespace, cfg: Any, rows: list[dict]) -> Any:
    """Fail before any work if the template repository holds no templates for the selected filters.

    ``--skip-missing-templates`` (config ``process.skip_missing_templates``) skips CCDs without a
    template instead; returns the config with that key set from the flag.
    """
    from dataclasses import replace

    from apfast.diffim.template import check_template_repository
    from apfast.repo.repository import Repository

    if args.skip_missing_templates:
        cfg = replace(cfg, process=replace(cfg.process, skip_missing_templates=True))
    if cfg.difference.template_source != "coadd":
        return cfg
    if args.template:
        root, how = Path(args.template), "--template"
    else:
        root, how = Repository(args.repo).root, "template repository (no --template given, so REPO)"
    if not root.is_dir() or not cfg.process.skip_missing_templates:
        check_template_repository(root, sorted({str(r["filter"]) for r in rows}),
                                  coadd_name=cfg.template.coadd_name, how=how)
    return cfg


def _run_selected(args: argparse.Namespace, cfg: Any, rows: list[dict], apdb: Any) -> int:
    """The body of ``process`` / ``process-ccd`` once the config, the rows and the APDB are settled."""
    import numba

    from apfast.repo.butler import Butler
    from apfast.repo.repository import create_output_repo, write_config
    from apfast.run.config import comparable_settings, config_to_toml
    from apfast.run.pipeline import run_process, run_process_ccd
    from apfast.run.warmup import ensure_kernel_cache, write_compile_report

    out_repo = create_output_repo(args.repo, rerun=args.rerun, output=args.output)
    write_config(out_repo, config_to_toml(cfg), clobber=args.clobber_config, normalize=comparable_settings)
    ensure_kernel_cache()  # before any worker starts: workers then load every kernel, none compiles
    if cfg.process.n_threads:
        # numba.config sets its settings at run time; its module has no declaration for them
        numba.set_num_threads(min(cfg.process.n_threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    butler = Butler(out_repo, calib=args.calib, template=args.template, output=cfg.output)
    log.info("processing %d CCD(s) into %s", len(rows), out_repo)
    doraise = args.doraise or cfg.process.doraise
    clobber = args.clobber_output or cfg.process.clobber_output
    t_start = time.perf_counter()
    if args.command == "process":
        template_visit = _template_visit(args.templateId)
        if cfg.difference.template_source == "calexp" and template_visit is not None:
            # Gen 2 calexp-template mode: the template visit's CCDs are processed first if needed
            tmpl_rows = _select_rows(args.repo,
                                     [{"visit": [template_visit], "ccdnum": sorted({r["ccdnum"] for r in rows})}])
            run_process_ccd(butler, tmpl_rows, cfg, doraise=doraise, progress=_progress)
        if args.processes > 1 or args.executor == "dask":
            outcomes = _run_parallel(args, cfg, rows, out_repo, apdb, template_visit, doraise, clobber)
        else:
            outcomes = run_process(butler, rows, cfg, template_root=Path(args.template) if args.template else None,
                                   template_visit=template_visit, apdb=apdb, doraise=doraise,
                                   clobber_output=clobber, progress=_progress)
    else:
        outcomes = run_process_ccd(butler, rows, cfg, doraise=doraise, clobber_output=clobber, progress=_progress)
    wall = time.perf_counter() - t_start
    write_compile_report()
    _print_summary(args, outcomes, out_repo)
    n_ran = sum(o.status != "skipped" for o in outcomes)
    if n_ran:
        _out(f"wall time {wall:.1f} s for {n_ran} CCD(s) processed: {wall / n_ran:.2f} s per CCD "
             "(stages of consecutive CCDs overlap, so per-CCD totals above add up to more)")
    _out(f"outputs: {out_repo}  (read them with apfast.Butler({str(out_repo)!r}))")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _run_parallel(args: argparse.Namespace, cfg, rows: list[dict], out_repo: Path, apdb,
                  template_visit: int | None, doraise: bool, clobber: bool) -> list:
    """``-j N`` (spawned local workers) or ``--executor dask`` (a Dask cluster), see apfast.run.executor."""
    from apfast.repo.butler import Butler
    from apfast.run.executor import RunSpec, run_dask, run_parallel
    from apfast.run.pipeline import _time_order, undo_for_redo

    cores = os.cpu_count() or 1
    n = args.processes if args.processes > 1 else (args.workers or 2)
    threads = cfg.process.n_threads or max(1, cores // n)
    spec = RunSpec(out_repo=str(out_repo), calib=args.calib, template=args.template, cfg=cfg,
                   template_root=args.template, template_visit=template_visit, doraise=doraise,
                   clobber_output=clobber, threads=threads, with_apdb=apdb is not None)
    rows = _time_order(rows)
    butler = Butler(out_repo, calib=args.calib, template=args.template, output=cfg.output)
    stored = undo_for_redo(butler, rows, cfg, apdb, clobber_output=clobber, progress=_progress)
    if args.executor == "dask":
        log.info("dask executor: %s", args.scheduler or f"local cluster of {n} worker processes")
        return run_dask(spec, rows, stored=stored, scheduler=args.scheduler, n_workers=n, progress=_progress)
    log.info("%d worker processes x %d numba threads", max(1, min(n, len(rows))), threads)
    return run_parallel(spec, rows, processes=n, stored=stored, progress=_progress)


# -- parser -----------------------------------------------------------------------------------------
def _expand_files(items: Sequence[str]) -> list[Path]:
    """Expand directories into the FITS/CSV/ECSV/YAML/TXT files they hold (sorted); keep files as given."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*")
                if q.is_file() and q.suffix.lower() in {".fits", ".fz", ".csv", ".ecsv", ".yaml", ".txt", ".fit"}
            )
            out.extend(found)
        else:
            out.append(p)
    return out


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", "--config-file", action="append", metavar="FILE.toml",
                   help="config overrides from a TOML file (repeatable; applied in order)")
    p.add_argument("-c", "--config", action="append", metavar="KEY=VALUE",
                   help="one config override, VALUE a TOML literal (repeatable; later wins)")


def _sub(sub: Any, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` starts with ``description`` (the one-line ``help_text`` in the list)."""
    return sub.add_parser(name, help=help_text, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


_REPO_HELP = "the input repository: the folder `apfast ingest` wrote (holds registry.sqlite3)"


def _add_data_commands(sub: Any) -> None:
    """The subcommands that bring data in: ingest, ingest-calibs, ingest-refcat, simulate, demo."""
    p = _sub(sub, "ingest", "register raw exposures in REPO/registry.sqlite3",
             "Register raw DECam exposures (one row per CCD) in REPO/registry.sqlite3, creating the\n"
             "repository if needed. Files already registered are reported and left alone.")
    p.add_argument("repo", help="repository root (created if needed)")
    p.add_argument("files", nargs="+", help="raw files (e.g. c4d_*_ori.fits.fz) or folders holding them")
    p.add_argument("--mode", choices=["link", "copy", "move"], default="link", help="how files enter the repo")
    p.add_argument("--camera", default=None, help="camera name or TOML description for a new repo (default DECam)")
    p.add_argument("--calibrated", action="store_true",
                   help="the files are calibrated images (with weight and mask files); ISR will be skipped. "
                        "Needs --camera decam-instcal|ztf|FILE.toml")
    p.set_defaults(func=_cmd_ingest)

    p = _sub(sub, "ingest-calibs", "register master calibrations in CALIB_ROOT/calibRegistry.sqlite3",
             "Register master calibrations (bias, flats, defects, crosstalk, linearizer) in\n"
             "CALIB_ROOT/calibRegistry.sqlite3 with their validity ranges.")
    p.add_argument("calib_root", help="the calib repository, usually REPO/calibs")
    p.add_argument("files", nargs="+", help="bias/flat/defects/crosstalk/linearizer files or folders")
    p.add_argument("--validity", type=float, default=None, metavar="DAYS",
                   help="validity half-width in days (default: per format; curated files until the next one)")
    p.add_argument("--mode", choices=["copy", "link", "move"], default="copy",
                   help="how files enter the repo")
    p.set_defaults(func=_cmd_ingest_calibs)

    p = _sub(sub, "ingest-refcat", "shard a reference catalogue under REPO/ref_cats/NAME",
             "Shard a reference catalogue (Gaia, PS1 or a generic table) into HEALPix FITS shards under\n"
             "REPO/ref_cats/NAME; running it again with new files merges them.")
    p.add_argument("repo", help=_REPO_HELP)
    p.add_argument("name", help="catalogue name, e.g. gaia or ps1 (config calibrate.astrometry_refcat and "
                        "calibrate.photometry_refcat name the ones used)")
    p.add_argument("files", nargs="+", help="CSV or FITS tables")
    p.add_argument("--kind", choices=["auto", "gaia", "ps1", "generic"], default="auto",
                   help="the table's column convention (default: guessed from the columns)")
    p.add_argument("--column-map", default=None, metavar="STD=COL,...",
                   help="map standard column names to the input's, e.g. id=SOURCE_ID,ra=RA_ICRS")
    p.add_argument("--nside", type=int, default=None,
                   help="HEALPix nside of new shards (default 32; a merge keeps the stored one)")
    p.set_defaults(func=_cmd_ingest_refcat)

    p = _sub(sub, "simulate", "write realistic simulated DECam data with truth",
             "Write simulated DECam data with its truth: OUT/raw (raw files), OUT/calib (bias, flats,\n"
             "defects, crosstalk), OUT/refcat (gaia.csv, ps1.csv) and OUT/truth; these are the inputs of\n"
             "the README workflow (ingest, ingest-calibs, ingest-refcat).")
    p.add_argument("out", help="folder to write raw/, calib/, refcat/ and truth/ into (created if needed)")
    p.add_argument("--small", action="store_true", help="2 CCDs, 2 template + 3 science visits")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same data")
    p.set_defaults(func=_cmd_simulate)

    p = _sub(sub, "demo", "simulate a small dataset and run every stage on it",
             "Simulate a small dataset in DIR/sim and run every stage on it (ingest, calibs, refcats,\n"
             "process-ccd, templates, APDB, process), printing the equivalent commands. Running it again\n"
             "in the same DIR reuses the simulation and starts the rest over.")
    p.add_argument("dir", help="working folder for sim/, repo/, templates/ and apdb/ (created if needed)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    p.add_argument("--full", action="store_true", help="the default-size simulation instead of --small")
    p.set_defaults(func=_cmd_demo)


def _add_setup_commands(sub: Any) -> None:
    """The subcommands that prepare a machine or a database: warmup, make-apdb, config."""
    p = _sub(sub, "warmup", "compile every numba kernel into the on-disk cache, once per machine",
             "Compile every numba kernel into the kernel cache ($APFAST_CACHE_DIR/kernels/<key>, default\n"
             "~/.cache/apfast) and measure the FFTW plans of a full CCD. Once done, no apfast process on this\n"
             "machine compiles anything; the cache is keyed on the kernel sources and the numba/numpy versions,\n"
             "so an upgrade or an edited kernel builds a new one. Processing commands build it themselves when\n"
             "it is missing; batch systems run this once per node first.")
    p.add_argument("--check", action="store_true",
                   help="only say whether the cache is complete (exit 0) or not (exit 1), with its path and size")
    p.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="compile in N processes at once (default: cores, at most 4)")
    p.add_argument("--no-fftw", action="store_true", help="skip the FFTW plans (wisdom) of a full CCD")
    p.set_defaults(func=_cmd_warmup)

    p = _sub(sub, "make-apdb", "create an empty Alert Production Database (make_apdb.py)",
             "Create an empty Alert Production Database (Rubin APDB schema 10.0.0) at apdb.db_url, e.g.\n"
             "  apfast make-apdb -c apdb.db_url=sqlite:///apdb/association.db\n"
             "An SQLite path after sqlite:/// is relative to the current folder (sqlite://// for absolute);\n"
             "its folder is created.")
    p.add_argument("--drop", action="store_true", help="drop the tables of an existing APDB at the URL first")
    _add_config_args(p)
    p.set_defaults(func=_cmd_make_apdb)

    p = _sub(sub, "config", "configuration tools",
             "Configuration tools: `apfast config show` prints every key.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    ps = _sub(csub, "show", "print the effective config as TOML",
              "Print the effective configuration (defaults, then -C files, then -c overrides) as TOML, with\n"
              "each key's documentation. Its header lists the other spellings accepted (Rubin's ap_pipe keys\n"
              "such as diaPipe.apdb.db_url, keys of earlier apfast versions such as diffim.*) and the keys they\n"
              "set, and the keys that were removed.")
    _add_config_args(ps)
    ps.set_defaults(func=_cmd_config_show)


def _add_processing_commands(sub: Any) -> None:
    """The subcommands that process dataIds: process, process-ccd, make-templates."""
    descriptions = {
        "process": ("Process dataIds end to end (ap_pipe.py): ISR, characterize, calibrate, template,\n"
                    "PSF matching, subtraction, DIA sources, association in the APDB and alerts. Steps\n"
                    "whose outputs exist in the output repository are skipped (--clobber-output redoes\n"
                    "them)."),
        "process-ccd": "ISR, characterize and calibrate dataIds into calexps (processCcd.py).",
        "make-templates": ("Process good-seeing visits and coadd them into deepCoadd templates, written to\n"
                           "the output repository (use it as `apfast process --template`)."),
    }
    for name, help_text in (("process", "process dataIds end to end (ap_pipe.py)"),
                            ("process-ccd", "ISR, characterize and calibrate dataIds into calexps (processCcd.py)"),
                            ("make-templates", "process good-seeing visits and coadd them into deepCoadd templates")):
        p = _sub(sub, name, help_text, descriptions[name])
        p.add_argument("repo", help=_REPO_HELP)
        p.add_argument("--calib", default=None, help="calib repository (default REPO/calibs)")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--rerun", default=None, metavar="[IN:]OUT", help="write to REPO/rerun/OUT")
        g.add_argument("--output", default=None, metavar="DIR", help="write to a standalone output repository")
        p.add_argument("--id", action="append", nargs="+", metavar="KEY=VALUES",
                       help="dataId expression, e.g. visit=1^2 ccdnum=3^6..12 filter=g (repeatable)")
        p.add_argument("--show", action="append", choices=["data", "config"],
                       help="print the selected dataIds or the effective config and exit")
        p.add_argument("--doraise", action="store_true", help="stop at the first failing CCD")
        if name != "make-templates":
            p.add_argument("--clobber-output", action="store_true", help="redo CCDs whose outputs exist")
        p.add_argument("--clobber-config", action="store_true",
                       help="replace a stored config that differs in a key that changes products")
        p.add_argument("--summary", choices=["compact", "wide"], default="compact",
                       help=f"per-CCD table: compact fits 120 columns (default); wide has every stage "
                            f"(always written to OUT/{SUMMARY_NAME})")
        p.set_defaults(template=None, templateId=None, processes=1, clobber_output=False,
                       skip_missing_templates=False, executor="local")
        if name == "process":
            _add_process_options(p)
        _add_config_args(p)
        p.set_defaults(func=_cmd_make_templates if name == "make-templates" else _cmd_process)


def _add_process_options(p: argparse.ArgumentParser) -> None:
    """The options of `apfast process` alone (templates, parallel execution, matched output)."""
    p.add_argument("--template", default=None,
                   help="template repository: the --output of make-templates (default: REPO)")
    p.add_argument("--templateId", nargs="+", default=None, metavar="visit=N",
                   help="calexp-template mode (-C calexpTemplates.toml): the template visit")
    p.add_argument("--skip-missing-templates", action="store_true",
                   help="skip (exit 0) CCDs that no template covers instead of failing them "
                        "(exit 1); config process.skip_missing_templates")
    p.add_argument("-j", "--processes", type=int, default=1, metavar="N",
                   help="process N CCDs at once in spawned worker processes "
                        "(cores // N numba threads each)")
    p.add_argument("--executor", choices=["local", "dask"], default="local",
                   help="local processes (-j N) or tasks on a Dask distributed cluster")
    p.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                   help="Dask scheduler address (default: start a local cluster)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes of the local Dask cluster (default -j or 2)")
    p.add_argument("--no-write-matched", action="store_true",
                   help="do not write deepDiff_matchedExp, the PSF-matched template (~1/3 of the image "
                        "output; same as -c output.write_matched=false; serial runs only)")


def _add_result_commands(sub: Any) -> None:
    """The subcommands that read a run's results: report, verify."""
    p = _sub(sub, "report", "write a static HTML report (pages and PNGs) of an output repository",
             "Write OUT/report/index.html: the run summary, image-quality plots and a sky map; a page per\n"
             "CCD-visit (calexp and difference thumbnails with DIA sources, PSF-matching diagnostics) and per\n"
             "DiaObject (alert cutouts, light curve from the APDB). Static files only: open index.html from\n"
             "disk or copy the folder to any web server. The APDB URL is the stored config's unless -c gives one.")
    p.add_argument("out", help="the output repository of `apfast process` (REPO/rerun/NAME or the --output DIR)")
    p.add_argument("--id", action="append", nargs="+", metavar="KEY=VALUES",
                   help="only these CCD-visits, e.g. visit=1^2 ccdnum=35 (repeatable)")
    p.add_argument("--open", action="store_true", help="open index.html in a web browser when done")
    p.add_argument("--all", action="store_true", help="a page for every DiaObject (default: the most significant)")
    p.add_argument("--max-objects", type=int, default=200, metavar="N",
                   help="DiaObject pages for the N most significant objects (default 200)")
    p.add_argument("-c", "--config", action="append", metavar="KEY=VALUE",
                   help="config override, e.g. apdb.db_url=sqlite:///apdb/association.db (repeatable)")
    p.set_defaults(func=_cmd_report)

    p = _sub(sub, "verify", "completeness, flux pulls and false detections of a run against fakes and truth",
             "Match each CCD-visit's DIA sources (APDB, or deepDiff_diaSrc without an APDB URL) to the fakes\n"
             "injected by `apfast process -c inject.*` (injected_catalog) and to the simulated truth (--truth,\n"
             "or the sim/ folder beside the input repository as `apfast demo` writes it). Prints per CCD-visit\n"
             "counts, completeness vs magnitude and expected S/N, flux pulls of the fakes and the false\n"
             "(unexplained) detections per CCD-visit.")
    p.add_argument("out", help="the output repository of `apfast process` (REPO/rerun/NAME or the --output DIR)")
    p.add_argument("--truth", default=None, metavar="SIM_DIR",
                   help="simulation folder (or its truth/ folder); default: REPO/../sim when it exists")
    p.add_argument("--id", action="append", nargs="+", metavar="KEY=VALUES",
                   help="only these CCD-visits, e.g. visit=1^2 ccdnum=35 (repeatable)")
    p.add_argument("--match-radius", type=float, default=1.0, metavar="ARCSEC",
                   help="largest distance of a DIA source from a fake or transient it matches (default 1.0)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON to FILE")
    p.add_argument("-c", "--config", action="append", metavar="KEY=VALUE",
                   help="config override, e.g. apdb.db_url=sqlite:///apdb/association.db (repeatable)")
    p.set_defaults(func=_cmd_verify)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="apfast",
        description="Fast alert production: ingest raws, calibs and refcats, process CCDs, read results.",
    )
    parser.add_argument("--version", action="version", version=f"apfast {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_data_commands(sub)
    _add_setup_commands(sub)
    _add_processing_commands(sub)
    _add_result_commands(sub)

    from apfast.run.subtract import add_subtract_parser

    add_subtract_parser(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and notebooks replace it between calls)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger("apfast")
    root.setLevel(level)
    if not any(getattr(h, "_apfast", False) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        h._apfast = True  # type: ignore[attr-defined]
        root.addHandler(h)


def one_blas_thread() -> None:
    """Limit OpenBLAS/MKL to one thread in this process (apfast's own parallelism is numba's and its pools).

    Two BLAS threads next to numba's on two cores, or next to another pipeline process, made single
    LAPACK calls 5-40x slower (an SVD of the PSF stamps 0.05 s -> 0.4-2.2 s, a 1300-unknown Cholesky
    0.05 -> 3.9 s, measured under load); one thread loses little on the small matrices apfast has.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``apfast`` command line and return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    _setup_logging(args.verbose, args.quiet)
    one_blas_thread()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except ApfastError as exc:
        if exc.exit_code == 0:
            log.info("%s", exc)
            return 0
        sys.stderr.write(f"apfast {args.command}: error: {exc}\n")
        return exc.exit_code


def run() -> None:
    """The ``apfast`` console script: :func:`main`, then exit without tearing the interpreter down.

    Once ``main`` has returned every output file is closed, the APDB committed and closed, and worker
    pools are shut down; ``atexit`` handlers still run and the streams are flushed. What is skipped is
    the interpreter's module-by-module finalization (numba/LLVM, OpenMP and FFTW state, ~0.3 s of a
    one-CCD run), as mypy does for its command line.
    """
    import atexit

    rc = main()
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc)


if __name__ == "__main__":  # pragma: no cover
    run()
