"""Throughput of ``apfast process``: full-size simulated DECam CCDs per minute with 1 and 2 workers.

Data: 2 full-size (2048x4096) simulated CCDs (35 and 36), 2 template visits coadded into
``deepCoadd`` templates, 5 science visits: 10 CCD-visits, each run end to end (ISR,
characterize, calibrate, template, PSF matching, subtraction, decorrelation, DIA sources,
association, APDB, alerts) through the real command line (``python -m apfast.run.cli process``) into
its own rerun and its own SQLite APDB:

* **serial**: one process, ``process.n_threads`` = all cores (2 numba threads here);
* ``-j 2``: two spawned worker processes with ``cores // 2`` = 1 numba thread each.

How start-up is kept out of the rate
------------------------------------
Kernels load from the on-disk kernel cache (built once, before the first run, by the CLI), but
every new process still spawns, imports and loads its kernels and FFTW plans. The rate is the
*marginal* (steady-state) rate from the wall clock of two runs per worker count: a short one
(the first science visit: ``n_s`` = 2 CCD-visits) and a long one (all 5 visits: ``n_l`` = 10),
each a fresh ``python -m apfast.run.cli process`` into its own rerun and APDB, so both pay the same
start-up and

    rate = (n_l - n_s) / (wall_l - wall_s)  CCD-visits per second,
    overhead_s = wall_s - n_s / rate       (spawn + imports + kernel loading + the pipeline drain).

(Before the kernel cache held the parallel kernels, each ``-j 2`` worker compiled them for ~10-20 s
and how much of that hid behind other work depended on the run's length: the marginal rate came
out up to 3x too high. Workers now start on a complete cache and compile nothing.)
Per-CCD completion times of one run are recorded for reference only
(``long_completions_after_first_s``): with ``-j 2`` completions arrive in bursts, as DIA tasks
run in time order after image tasks.

Scaling efficiency = rate(2 workers) / (2 x rate(1 worker)); on 2 cores ~0.5 is the ceiling, as one
serial process already uses both cores, and it is reported, not judged: the two rates come from
four runs minutes apart, and the load of a shared machine moves them about as much as the
difference between "concurrent" (measured 0.31-0.38) and "one task at a time" (~0.25) on 2 cores.
What is judged is concurrency itself, within the same runs: ``busy = sum of per-CCD stage times /
wall``, marginal between the short and the long run. Two busy workers give ~2 (measured 1.73: the
DIA chain idles a worker at times), one task at a time ~1; ``-j 2`` must exceed 1.3. (The serial
run's figure, ~1.4, is not comparable: its per-CCD totals are latencies, the DIA stage of CCD i
overlapping CCD i+1.) With 4+ cores the efficiency must also exceed 0.5. Both runs must give
identical APDB contents (row counts, DiaSource ids and their DiaObjects, current DiaObjects,
forced sources).

Run for real with ``python -m pytest bench/test_bench_throughput.py -m slow --benchmark-enable -s``.
The numbers are noisy on a shared machine: the load average at start and end is recorded.
No quick variant: simulated CCDs are always full size.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from apfast.run.cli import main
from simrepo import build_sim_repo

CCDS = (35, 36)
N_TEMPLATE = 2
N_SCIENCE = 5

# "[3/6] visit=289401 ccdnum=35: calexp; difference (...); 59 DIA sources (...) in 25.15 s"
_DONE = re.compile(r"^\[(\d+)/(\d+)\] visit=(\d+) ccdnum=(\d+): (?!FAILED)(.*) in ([0-9.]+) s$")


@dataclass(frozen=True, slots=True)
class Run:
    """One ``apfast process`` run: wall seconds, completion times (s after start), per-CCD totals, its APDB."""

    workers: int
    wall_s: float
    done_s: tuple[float, ...]
    ccd_s: tuple[float, ...]
    db: Path


def marginal_rate(n_short: int, wall_short: float, n_long: int, wall_long: float) -> tuple[float, float]:
    """Steady-state CCD-visits per minute from a short and a long run, and the start-up overhead (s).

    ``rate = 60 (n_long - n_short) / (wall_long - wall_short)`` and
    ``overhead = wall_short - n_short / rate`` (see the module docstring).
    """
    if n_long <= n_short:
        msg = f"the long run ({n_long} CCD-visits) must process more than the short one ({n_short})"
        raise ValueError(msg)
    dt = float(wall_long) - float(wall_short)
    if dt <= 0:
        msg = (f"the long run took {wall_long:.1f} s, not longer than the short one ({wall_short:.1f} s): "
               "the machine load changed too much between them; rerun the benchmark")
        raise ValueError(msg)
    rate_s = (n_long - n_short) / dt
    return 60.0 * rate_s, float(wall_short) - n_short / rate_s


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_sim_repo(tmp_path_factory.mktemp("bench_throughput"), ccdnums=CCDS, n_template=N_TEMPLATE,
                          n_science=N_SCIENCE, seed=11, templates=True)


@pytest.fixture(scope="module")
def measured() -> dict[str, dict]:
    """Results measured so far in this module (the -j 2 test compares with the serial one)."""
    return {}


def _measure(dataset: dict, name: str, workers: int, visits: tuple[int, ...]) -> Run:
    """One ``apfast process`` in a fresh interpreter.

    Each loads its kernels from the cache, as every -j 2 worker does.
    """
    d = Path(dataset["dir"])
    db = d / f"{name}.db"
    url = f"sqlite:///{db}"
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={url}"]) == 0
    sv = "^".join(str(v) for v in visits)
    extra = ["-j", str(workers)] if workers > 1 else ["-c", f"process.n_threads={os.cpu_count() or 1}"]
    cmd = [sys.executable, "-m", "apfast.run.cli", "process", str(dataset["repo"]), "--rerun", name,
           "--id", f"visit={sv}", "--template", str(dataset["templates"]), "-c", f"apdb.db_url={url}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    done = []  # "HH:MM:SS INFO apfast: [i/n] visit=... in X s" (1 s resolution: for the record only)
    for line in proc.stderr.splitlines():
        head, _, msg = line.partition(" INFO apfast: ")
        m = _DONE.match(msg)
        if m:
            h, mi, se = (int(x) for x in head.split(":"))
            done.append((3600 * h + 60 * mi + se, int(m.group(3)), int(m.group(4)), float(m.group(6))))
    n = len(visits) * len(CCDS)
    assert len(done) == n, f"expected {n} per-CCD completion lines in the log, got {done}"
    assert len({(v, c) for _, v, c, _ in done}) == n
    first = min(t for t, _, _, _ in done)
    # the outputs are not looked at again (the APDB is): ~0.35 GB per CCD-visit, 24 CCD-visits in all
    shutil.rmtree(Path(dataset["repo"]) / "rerun" / name, ignore_errors=True)
    return Run(workers, wall, tuple(sorted(float(t - first) for t, _, _, _ in done)),
               tuple(x for _, _, _, x in done), db)


def _measure_pair(dataset: dict, name: str, workers: int) -> dict:
    """The short and the long run of one worker count and the marginal rate (module docstring)."""
    visits = tuple(dataset["visits"])
    short = _measure(dataset, f"{name}_short", workers, visits[:1])
    long = _measure(dataset, name, workers, visits)
    rate, overhead = marginal_rate(len(short.done_s), short.wall_s, len(long.done_s), long.wall_s)
    busy = (sum(long.ccd_s) - sum(short.ccd_s)) / (long.wall_s - short.wall_s)
    return {"short": short, "long": long, "rate": rate, "overhead": overhead, "busy": busy}


def _apdb_contents(db: Path) -> dict[str, object]:
    with sqlite3.connect(db) as con:
        q = con.execute
        return {
            "counts": {t: q(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]
                       for t in ("DiaObject", "DiaSource", "DiaForcedSource", "apfast_ccd_visit")},
            "sources": q('SELECT "diaSourceId", "diaObjectId" FROM "DiaSource" ORDER BY 1').fetchall(),
            "current": q('SELECT "diaObjectId", "nDiaSources" FROM "DiaObject" WHERE "validityEndMjdTai" IS NULL '
                         "ORDER BY 1").fetchall(),
            "forced": q('SELECT "diaObjectId", visit, detector FROM "DiaForcedSource" ORDER BY 1, 2, 3').fetchall(),
        }


def _report(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's output capture (the numbers belong in the CI log)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(text)


def _run(request: pytest.FixtureRequest, benchmark, dataset: dict, name: str, workers: int) -> dict:
    load0 = [round(x, 2) for x in os.getloadavg()]
    r = benchmark.pedantic(_measure_pair, args=(dataset, name, workers), rounds=1, iterations=1)
    short, long = r["short"], r["long"]
    benchmark.extra_info.update({
        "workers": workers,
        "numba_threads_per_worker": (os.cpu_count() or 1) // workers,
        "ccds_per_min": round(r["rate"], 3),
        "startup_overhead_s": round(r["overhead"], 2),
        "short_ccd_visits": len(short.done_s),
        "short_wall_s": round(short.wall_s, 2),
        "long_ccd_visits": len(long.done_s),
        "long_wall_s": round(long.wall_s, 2),
        "long_completions_after_first_s": [round(t) for t in long.done_s],
        "long_ccd_s_median": round(statistics.median(long.ccd_s), 2),
        "busy_ccd_s_per_wall_s": round(r["busy"], 3),
        "loadavg_start": load0,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    })
    _report(request, f"\nthroughput {name}: {benchmark.extra_info}")
    return r


# ------------------------------------------------------------------------------------------- quick
def test_marginal_rate_cancels_startup() -> None:
    # 40 s of start-up and compilation, then 10 s per CCD-visit: 2 in 60 s, 6 in 100 s
    rate, overhead = marginal_rate(2, 60.0, 6, 100.0)
    assert rate == pytest.approx(6.0)
    assert overhead == pytest.approx(40.0)
    with pytest.raises(ValueError, match="must process more"):
        marginal_rate(6, 60.0, 6, 100.0)
    with pytest.raises(ValueError, match="machine load changed"):
        marginal_rate(2, 100.0, 6, 90.0)


def test_done_line_pattern_matches_cli_progress() -> None:
    line = ("[3/6] visit=289401 ccdnum=35: calexp; difference (convolveTemplate, 137 stamps); 59 DIA sources "
            "(51+ 8- 0 dipoles), 11 new / 48 updated DiaObjects, 59 alerts in 25.15 s")
    m = _DONE.match(line)
    assert m is not None and (m.group(3), m.group(4), m.group(6)) == ("289401", "35", "25.15")
    assert _DONE.match("[3/6] visit=289401 ccdnum=35: FAILED: processCcd: boom in 2 s") is None
    assert _DONE.match("[3/6] visit=289401 ccdnum=35: outputs exist, skipped") is None


# -------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.benchmark(group="throughput")
def test_ccds_per_minute_serial(request: pytest.FixtureRequest, benchmark, dataset: dict, measured: dict) -> None:
    r = _run(request, benchmark, dataset, "serial", 1)
    measured["serial"] = r
    assert r["rate"] > 0 and 0 < r["overhead"] < r["short"].wall_s


@pytest.mark.slow
@pytest.mark.benchmark(group="throughput")
def test_ccds_per_minute_two_workers(request: pytest.FixtureRequest, benchmark, dataset: dict,
                                     measured: dict) -> None:
    r = _run(request, benchmark, dataset, "j2", 2)
    serial = measured.get("serial") or _measure_pair(dataset, "serial", 1)
    eff = r["rate"] / (2.0 * serial["rate"])
    benchmark.extra_info["serial_ccds_per_min"] = round(serial["rate"], 3)
    benchmark.extra_info["scaling_efficiency"] = round(eff, 3)
    _report(request, f"scaling efficiency {eff:.3f} (serial {serial['rate']:.2f}, -j 2 {r['rate']:.2f} CCD-visits/min)")
    a, b = _apdb_contents(serial["long"].db), _apdb_contents(r["long"].db)
    assert a["counts"]["apfast_ccd_visit"] == len(r["long"].done_s)
    assert b["counts"] == a["counts"]
    assert b["sources"] == a["sources"], "-j 2 stored other DiaSource ids or associations than the serial run"
    assert b["current"] == a["current"]
    assert b["forced"] == a["forced"]
    # two workers each busy with a CCD most of the time (the module docstring): ~2; one at a time: ~1
    assert r["busy"] > 1.3, (f"-j 2 kept only {r['busy']:.2f} CCDs in work on average (serial run: "
                             f"{serial['busy']:.2f}): the workers do not run concurrently ({benchmark.extra_info})")
    if (os.cpu_count() or 1) >= 4:  # two 2-thread workers must beat one
        assert eff > 0.5, f"-j 2: scaling efficiency {eff:.2f} <= 0.5 with {os.cpu_count()} cores"
