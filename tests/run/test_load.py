"""Load: re-process the same CCD-visits again and again against ONE APDB; nothing drifts, memory stays flat.

Data: the ``dia_dataset`` fixture (one full-size simulated CCD, a coadded template, 3 science
visits). A serial run into a fresh SQLite APDB gives the reference contents; then every
iteration runs ``apfast process ... --clobber-output`` over the same dataIds into the same
rerun and the same APDB, so each CCD-visit is redone and must REPLACE its rows (undo + store in
one transaction). After every iteration the APDB must equal the reference exactly:

* row counts of every DiaObject version, of the current DiaObjects, of DiaSource,
  DiaForcedSource and the stored CCD-visits;
* the DiaSource ids and the DiaObject each one is associated with;
* the current DiaObjects (ids and ``nDiaSources``) and the DiaForcedSource (object, visit) keys.

Memory:

* ``test_in_process_reprocessing``: several serial iterations inside THIS process
  (``apfast.run.cli.main``, where caches, FFTW plans and numba dispatchers accumulate); VmRSS is
  read from ``/proc/self/status`` after each. The first iteration includes compilation and the
  first-use allocations, so the last iteration is compared with the 2nd: it may exceed it by
  at most 100 MB + 10 %. 100 MB is about one full-size CCD's image + variance + mask
  (3 x 2048 x 4096 x 4 bytes = 96 MB), the size of one allocator high-water step; a leak of
  the products of every CCD-visit (3 per iteration) exceeds it within one iteration.
* ``test_parallel_reprocessing_under_load``: ``-j 2`` iterations, each a fresh
  ``python -c 'apfast.run.cli.main(...)'`` subprocess, for ``APFAST_LOAD_SECONDS`` (default 180 s,
  at least 2 iterations); the subprocess reports its own peak RSS and its workers' peak
  (its ``VmHWM``, and ``getrusage(RUSAGE_CHILDREN)`` once the pool has been joined). The same
  tolerance applies to the last iteration vs the 2nd. It starts from a copy of the reference
  APDB, so its result does not depend on the in-process test.

Timings and RSS series are printed (``-s``). Marked slow (several minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apfast.run.cli import main

pytestmark = pytest.mark.slow

LOAD_SECONDS = float(os.environ.get("APFAST_LOAD_SECONDS", "180"))
IN_PROCESS_ITERATIONS = int(os.environ.get("APFAST_LOAD_IN_PROCESS", "3"))  # after the reference run
MB = 1024 * 1024
RSS_SLACK_BYTES = 100 * MB
RSS_SLACK_FRACTION = 0.10

# The parent's own peak is VmHWM (reset at exec): its ru_maxrss is not, and a child started with
# vfork + exec from the pytest process inherits the pytest process's peak in ru_maxrss.
_WRAPPER = (
    "import json, resource, sys\n"
    "from apfast.run.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = [int(ln.split()[1]) * 1024 for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
    "print('LOADRUSAGE ' + json.dumps([rc, hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))\n"
)


def snapshot(db: Path) -> dict[str, object]:
    """What must not change between iterations: counts, ids and associations of the APDB."""
    with sqlite3.connect(db) as con:
        q = con.execute
        counts = {t: q(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]
                  for t in ("DiaObject", "DiaSource", "DiaForcedSource", "apfast_ccd_visit")}
        counts["DiaObject current"] = q(
            'SELECT COUNT(*) FROM "DiaObject" WHERE "validityEndMjdTai" IS NULL').fetchone()[0]
        return {
            "counts": counts,
            "sources": q('SELECT "diaSourceId", "diaObjectId" FROM "DiaSource" ORDER BY 1').fetchall(),
            "current": q('SELECT "diaObjectId", "nDiaSources" FROM "DiaObject" WHERE "validityEndMjdTai" IS NULL '
                         "ORDER BY 1").fetchall(),
            "forced": q('SELECT "diaObjectId", visit, detector FROM "DiaForcedSource" ORDER BY 1, 2, 3').fetchall(),
            "orphans": q('SELECT COUNT(*) FROM "DiaSource" s WHERE NOT EXISTS (SELECT 1 FROM "DiaObject" o '
                         'WHERE o."diaObjectId" = s."diaObjectId")').fetchone()[0],
        }


def differences(got: dict, ref: dict) -> list[str]:
    """What differs from the reference (empty when the APDB is exactly as expected)."""
    out = []
    if got["counts"] != ref["counts"]:
        out.append(f"row counts {got['counts']} != expected {ref['counts']}")
    if got["sources"] != ref["sources"]:
        diff = sorted(set(got["sources"]) ^ set(ref["sources"]))
        out.append(f"DiaSource (diaSourceId, diaObjectId) differ in {len(diff)} row(s), e.g. {diff[:3]}")
    if got["current"] != ref["current"]:
        out.append("current DiaObjects (diaObjectId, nDiaSources) differ in "
                   f"{len(set(got['current']) ^ set(ref['current']))} row(s)")
    if got["forced"] != ref["forced"]:
        out.append("DiaForcedSource (diaObjectId, visit, detector) keys differ")
    if got["orphans"]:
        out.append(f"{got['orphans']} DiaSource(s) point at a diaObjectId with no DiaObject row")
    return out


def vm_rss() -> int:
    """Resident set size of this process in bytes (``VmRSS`` of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    msg = "no VmRSS line in /proc/self/status (this test needs Linux)"
    raise RuntimeError(msg)


def flat(series: list[int], what: str) -> None:
    """The last value may exceed the 2nd by RSS_SLACK_BYTES + RSS_SLACK_FRACTION (module docstring)."""
    base, last = series[1], series[-1]
    limit = base * (1.0 + RSS_SLACK_FRACTION) + RSS_SLACK_BYTES
    assert last <= limit, (f"{what} grew from {base / MB:.0f} MB (2nd iteration) to {last / MB:.0f} MB; "
                           f"series {[round(s / MB) for s in series]} MB")


@pytest.fixture(scope="module")
def reference(dia_dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A serial run into a fresh APDB: the expected contents after every later iteration."""
    d = tmp_path_factory.mktemp("load")
    db = d / "load.db"
    url = f"sqlite:///{db}"
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={url}"]) == 0
    sv = "^".join(str(v) for v in dia_dataset["summary"].science_visits)
    args = ["-q", "process", str(dia_dataset["repo"]), "--rerun", "load", "--id", f"visit={sv}",
            "--template", str(dia_dataset["templates"]), "-c", f"apdb.db_url={url}"]
    t0 = time.perf_counter()
    assert main(args) == 0
    dt = time.perf_counter() - t0
    ref = snapshot(db)
    n = len(dia_dataset["summary"].science_visits)
    assert ref["counts"]["apfast_ccd_visit"] == n
    assert ref["counts"]["DiaSource"] > 0 and ref["counts"]["DiaForcedSource"] > 0
    # at least one object seen in every visit: re-processing must keep its whole version chain
    assert max(k for _, k in ref["current"]) == n
    assert ref["orphans"] == 0
    sys.stdout.write(f"\nload reference: serial run in {dt:.1f} s; counts {ref['counts']}; "
                     f"VmRSS {vm_rss() / MB:.0f} MB\n")
    shutil.copyfile(db, d / "reference.db")
    return {"db": db, "copy": d / "reference.db", "args": args, "ref": ref, "rss0": vm_rss(), "t0": dt}


def test_in_process_reprocessing(reference: dict) -> None:
    """Serial --clobber-output iterations inside this process: exact APDB contents, flat VmRSS."""
    rss = [reference["rss0"]]
    times = [reference["t0"]]
    bad: list[str] = []
    for i in range(IN_PROCESS_ITERATIONS):
        t0 = time.perf_counter()
        assert main([*reference["args"], "--clobber-output"]) == 0
        times.append(time.perf_counter() - t0)
        rss.append(vm_rss())
        bad += [f"iteration {i + 2}: {d}" for d in differences(snapshot(reference["db"]), reference["ref"])]
    sys.stdout.write(f"\nin-process serial iterations: {len(times)}; seconds {[round(t, 1) for t in times]}; "
                     f"VmRSS MB {[round(r / MB) for r in rss]}\n")
    # every iteration runs (the memory series is wanted even when the contents drift); then both checks
    assert not bad, "re-processing changed the APDB:\n" + "\n".join(bad)
    flat(rss, "VmRSS of the process running the iterations")


def test_parallel_reprocessing_under_load(reference: dict) -> None:
    """``-j 2 --clobber-output`` subprocess iterations for LOAD_SECONDS: exact contents, flat peak RSS."""
    shutil.copyfile(reference["copy"], reference["db"])  # the reference state, whatever ran before
    assert not differences(snapshot(reference["db"]), reference["ref"])
    cmd = [sys.executable, "-c", _WRAPPER, *reference["args"], "--clobber-output", "-j", "2"]
    times: list[float] = []
    parent: list[int] = []
    workers: list[int] = []
    sizes: list[int] = []
    bad: list[str] = []
    start = time.monotonic()
    while len(times) < 2 or time.monotonic() - start < LOAD_SECONDS:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        times.append(time.perf_counter() - t0)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADRUSAGE ")]
        assert proc.returncode == 0 and lines, f"iteration {len(times)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
        rc, self_rss, child_rss = json.loads(lines[-1].split(" ", 1)[1])
        assert rc == 0
        parent.append(int(self_rss))
        workers.append(int(child_rss))
        sizes.append(reference["db"].stat().st_size)
        bad += [f"iteration {len(times)}: {d}" for d in differences(snapshot(reference["db"]), reference["ref"])]
    sys.stdout.write(
        f"\n-j 2 iterations: {len(times)} in {time.monotonic() - start:.0f} s; seconds {[round(t, 1) for t in times]}; "
        f"peak RSS MB parent {[round(r / MB) for r in parent]}, largest worker {[round(r / MB) for r in workers]}; "
        f"APDB file MB {[round(s / MB, 2) for s in sizes]}\n")
    assert not bad, "-j 2 re-processing changed the APDB:\n" + "\n".join(bad)
    flat(parent, "peak RSS of the -j 2 parent process")
    flat(workers, "peak RSS of the largest -j 2 worker")
