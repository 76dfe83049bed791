"""Run ``apfast process`` over many CCDs at once: a local process pool (``-j N``) or a Dask cluster.

Every CCD-visit is two tasks:

* the **image task** (processCcd, template, PSF matching, subtraction, decorrelation): any
  number run at once, in any order;
* the **DIA task** (DIA sources, association, APDB transaction, alerts): it starts only after
  its own image task and after the DIA tasks of every *earlier* CCD-visit whose sky footprint
  (grown by the association margin) overlaps it.

So association always sees the visits of one patch of sky in time order, exactly as a serial
run does (a transient seen in N visits becomes one DiaObject with N sources, and DiaObject
versions follow the visits), while neighbouring CCDs and later visits' image work proceed in
parallel. Overlapping CCD-visits are found from the registry's header-WCS footprints.
Each APDB transaction also reads and writes the region atomically (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: a transaction-scoped advisory lock), so even writers outside this scheduler
(two ``apfast process`` runs on one APDB) cannot create duplicate DiaObjects.

Workers are started with ``spawn`` (never ``fork``: numba's OpenMP/TBB threads and FFTW's
threads do not survive a fork) and each gets ``cores // N`` numba threads. They start only once
the kernel cache is complete (the CLI calls :func:`apfast.run.warmup.ensure_kernel_cache` first;
Dask workers run it too, for nodes with their own cache), so a worker loads each kernel from disk
in milliseconds on first use and never compiles. With the cache off (``APFAST_NUMBA_CACHE=0``)
each worker compiles every kernel as it starts, all workers at once, before it takes a task:
compiled lazily, the first DIA task's compilation (tens of seconds) would hold up every DIA task
waiting behind it in time order while the other workers pile up image tasks.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apfast.run.pipeline import CcdOutcome

__all__ = ["RunSpec", "ccd_dependencies", "run_dask", "run_parallel"]

log = logging.getLogger(__name__)


def _cache_on() -> bool:
    from apfast._jit import CACHE

    return CACHE


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Everything a worker needs to rebuild the Butler, config and APDB (picklable)."""

    out_repo: str
    calib: str | None
    template: str | None
    cfg: Any
    template_root: str | None
    template_visit: int | None
    doraise: bool
    clobber_output: bool
    threads: int = 0
    with_apdb: bool = True
    warmup: bool = field(default_factory=lambda: not _cache_on())


def ccd_dependencies(rows: Sequence[dict[str, Any]], margin_deg: float) -> list[list[int]]:
    """For time-ordered rows, the indices of earlier rows whose footprints overlap (grown by margin).

    A footprint is the cap around the registry's CCD centre through its farthest corner;
    rows without a footprint depend on every earlier row (safe, serial).
    """
    from apfast.dia.association import unit_vectors as _unit

    n = len(rows)
    centre = np.full((n, 3), np.nan)
    radius = np.full(n, np.nan)
    for i, r in enumerate(rows):
        try:
            c = _unit(np.array([float(r["ra_center"])]), np.array([float(r["dec_center"])]))[0]
            corners = _unit(np.array([float(r[f"corner_ra_{k}"]) for k in range(4)]),
                            np.array([float(r[f"corner_dec_{k}"]) for k in range(4)]))
        except (KeyError, TypeError, ValueError):
            continue
        if np.all(np.isfinite(c)) and np.all(np.isfinite(corners)):
            centre[i] = c
            radius[i] = float(np.max(np.arccos(np.clip(corners @ c, -1.0, 1.0))))
    m = math.radians(margin_deg)
    deps: list[list[int]] = []
    for i in range(n):
        if not np.isfinite(radius[i]):
            deps.append(list(range(i)))
            continue
        earlier = np.arange(i)
        known = np.isfinite(radius[:i])
        sep = np.arccos(np.clip(np.nan_to_num(centre[:i]) @ centre[i], -1.0, 1.0))
        hit = ~known | (sep <= radius[:i] + radius[i] + m)
        deps.append(earlier[hit].tolist())
    return deps


# --------------------------------------------------------------------------------------- worker side
_STATE: dict[tuple[Any, ...], Any] = {}  # per-worker Butlers and Apdbs, by their arguments


def _worker_init(threads: int, warm: bool = False) -> None:
    """Pool initializer: one BLAS thread and numba threads per worker, then (``warm``) compile every kernel."""
    from apfast.run.cli import one_blas_thread

    one_blas_thread()
    if threads > 0:
        # set_num_threads only: changing NUMBA_NUM_THREADS after numba's import is refused once its
        # thread pool has started
        import numba

        # numba.config sets its settings at run time; its module has no declaration for them
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    if warm:
        from apfast.run.warmup import warmup

        try:
            warmup(fftw=False)  # FFTW plans come from the wisdom cache on first use
        except Exception:  # a kernel that fails here fails again in its task, with the dataId
            log.warning("worker %d: kernel warm-up failed; kernels compile on first use", os.getpid(),
                        exc_info=True)


def _butler(spec: RunSpec) -> Any:
    from apfast.repo.butler import Butler

    key = ("butler", spec.out_repo, spec.calib, spec.template)
    if key not in _STATE:
        _STATE[key] = Butler(spec.out_repo, calib=spec.calib, template=spec.template, output=spec.cfg.output)
    return _STATE[key]


def _apdb(spec: RunSpec) -> Any:
    from apfast.dia.apdb import Apdb

    key = ("apdb", spec.cfg.apdb.db_url)
    if key not in _STATE:
        _STATE[key] = Apdb(spec.cfg.apdb)
    return _STATE[key]


def image_task(spec: RunSpec, row: dict[str, Any], tag: str) -> tuple[CcdOutcome, bool]:
    """processCcd + differencing of one CCD in a worker; returns (outcome, redone)."""
    from apfast.run.pipeline import process_image_stages

    if spec.threads > 0:
        _worker_init(spec.threads)
    o, redo = process_image_stages(
        _butler(spec), row, spec.cfg, tag=tag,
        template_root=Path(spec.template_root) if spec.template_root else None,
        template_visit=spec.template_visit, doraise=spec.doraise, clobber_output=spec.clobber_output)
    o.stats["_pid"] = os.getpid()
    o.products.clear()  # the DIA task may run in another process: it reads them back from disk
    _report()
    return o, redo


def _report() -> None:
    from apfast.run.warmup import write_compile_report

    write_compile_report()


def dia_task(spec: RunSpec, row: dict[str, Any], tag: str, image: tuple[CcdOutcome, bool], stored: bool,
             *_deps: Any) -> CcdOutcome:
    """The DIA stage of one CCD-visit in a worker (after its image task and its overlapping predecessors)."""
    from apfast.run.pipeline import process_dia_stage

    o, redo = image
    if o.status == "ok" and spec.with_apdb:
        key = (int(row["visit"]), int(row["ccdnum"]))
        process_dia_stage(_butler(spec), row, spec.cfg, o, apdb=_apdb(spec), tag=tag, redo=redo,
                          stored={key} if stored else set(), doraise=spec.doraise)
    _report()
    return o


def _finish(o: CcdOutcome, tag: str, progress: Callable[[str], None] | None) -> CcdOutcome:
    """Parent side: the total is the sum of the stage times (the worker's clock start means nothing here)."""
    from apfast.run.pipeline import finish_outcome

    o.stats.pop("_pid", None)
    if o.stats.pop("_t0", None) is not None:
        o.timings["total"] = sum(o.timings.get(k, 0.0) for k in _TOP_STAGES)
    finish_outcome(o, tag, progress)
    return o


_TOP_STAGES = ("read", "isr", "characterize", "refcat", "calibrate", "write", "difference", "dia")


# --------------------------------------------------------------------------------------- local pool
def run_parallel(spec: RunSpec, rows: Sequence[dict[str, Any]], *, processes: int, stored: set[tuple[int, int]],
                 progress: Callable[[str], None] | None = None) -> list[CcdOutcome]:
    """Process time-ordered ``rows`` with ``processes`` spawned workers (see the module docstring)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    n = len(rows)
    processes = max(1, min(int(processes), n))  # no worker that would only compile
    deps = ccd_dependencies(rows, _margin_deg(spec))
    tags = [f"[{i + 1}/{n}] visit={int(r['visit'])} ccdnum={int(r['ccdnum'])}" for i, r in enumerate(rows)]
    results: list[CcdOutcome | None] = [None] * n
    image_done: dict[int, tuple[CcdOutcome, bool]] = {}
    dia_done: set[int] = set()
    next_image = 0
    running: dict[Future, tuple[str, int]] = {}
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=ctx, initializer=_worker_init,
                             initargs=(spec.threads, spec.warmup)) as pool:
        while len(dia_done) < n:
            # DIA tasks first: they unblock others and hold the APDB only briefly
            for i in sorted(image_done):
                if i not in dia_done and all(j in dia_done for j in deps[i]) and \
                        not any(v == ("dia", i) for v in running.values()) and len(running) < processes:
                    key = (int(rows[i]["visit"]), int(rows[i]["ccdnum"]))
                    running[pool.submit(dia_task, spec, rows[i], tags[i], image_done[i], key in stored)] = ("dia", i)
            while next_image < n and len(running) < processes:
                running[pool.submit(image_task, spec, rows[next_image], tags[next_image])] = ("image", next_image)
                next_image += 1
            if not running:
                msg = "internal scheduling error: nothing runnable"  # pragma: no cover - a dependency cycle
                raise RuntimeError(msg)
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                kind, i = running.pop(fut)
                res = fut.result()  # re-raises a worker's exception (only with --doraise)
                if kind == "image":
                    image_done[i] = res
                else:
                    dia_done.add(i)
                    results[i] = _finish(res, tags[i], progress)
    return [r for r in results if r is not None]


def _margin_deg(spec: RunSpec) -> float:
    # association margin (pixels) at DECam-like 0.27"/px, plus 30" for header-WCS errors
    return float(spec.cfg.association.pixel_margin) * 0.27 / 3600.0 + 30.0 / 3600.0


# --------------------------------------------------------------------------------------- Dask
def require_distributed() -> None:
    """Raise ConfigError (exit 2) unless dask.distributed can be imported (checked before any work)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        from apfast.errors import ConfigError

        msg = "--executor dask needs dask.distributed: pip install 'apfast[dask]' (or pip install distributed)"
        raise ConfigError(msg) from None


def run_dask(spec: RunSpec, rows: Sequence[dict[str, Any]], *, stored: set[tuple[int, int]],
             scheduler: str | None = None, n_workers: int = 2,
             progress: Callable[[str], None] | None = None) -> list[CcdOutcome]:
    """Process ``rows`` as tasks on a Dask distributed cluster (a LocalCluster if no scheduler)."""
    require_distributed()
    from distributed import Client, LocalCluster, as_completed

    n = len(rows)
    deps = ccd_dependencies(rows, _margin_deg(spec))
    tags = [f"[{i + 1}/{n}] visit={int(r['visit'])} ccdnum={int(r['ccdnum'])}" for i, r in enumerate(rows)]
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        from apfast.run.warmup import ensure_kernel_cache

        client.run(ensure_kernel_cache)  # nodes with their own cache folder build it once, before any task
        t0 = time.perf_counter()
        images = [client.submit(image_task, spec, r, tags[i], key=f"image-{tags[i]}", pure=False)
                  for i, r in enumerate(rows)]
        dias: list[Any] = []
        for i, r in enumerate(rows):
            key = (int(r["visit"]), int(r["ccdnum"]))
            dias.append(client.submit(dia_task, spec, r, tags[i], images[i], key in stored,
                                      *[dias[j] for j in deps[i]], key=f"dia-{tags[i]}", pure=False))
        index = {f.key: i for i, f in enumerate(dias)}
        results: list[CcdOutcome | None] = [None] * n
        for fut in as_completed(dias):
            i = index[fut.key]
            results[i] = _finish(fut.result(), tags[i], progress)
        log.info("dask: %d CCD(s) in %.1f s", n, time.perf_counter() - t0)
        return [r for r in results if r is not None]
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
