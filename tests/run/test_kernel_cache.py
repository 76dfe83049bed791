"""The on-disk kernel cache (apfast._jit): loads in new processes, survives concurrent builds, never runs stale code.

Every test runs kernels in fresh interpreters with ``APFAST_CACHE_DIR`` in ``tmp_path``, so it starts
from an empty cache and judges by numba's dispatcher statistics (cache hits and misses), not by time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import apfast

SRC = Path(apfast.__file__).resolve().parent
KERNELS = Path(__import__("apfast.kernels", fromlist=["x"]).__file__).resolve().parent

# Runs a serial kernel, a serial caller of a kernel in another module and a parallel kernel on
# float64 or float32 data, checks them against numpy and prints the dispatcher statistics.
_PROBE = r"""
import json, sys
import numpy as np
from apfast.kernels import isr, primitives

dtype = np.dtype(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))
vals = rng.normal(size=101).astype(dtype)
buf = vals.copy()
kth = float(primitives.select_kth(buf, 0, buf.size, 50))
med = float(isr.median_inplace(vals.astype(np.float64), vals.size))
raw = rng.normal(size=(64, 40)).astype(np.float32)
rows = np.empty(64)
isr.overscan_row_medians(raw, 10, 30, rows)
ok = (kth == float(np.sort(vals)[50]) and med == float(np.median(vals.astype(np.float64)))
      and np.array_equal(rows, np.median(raw[:, 10:30].astype(np.float64), axis=1)))
stats = {}
for name, d in (("select_kth", primitives.select_kth), ("median_inplace", isr.median_inplace),
                ("overscan_row_medians", isr.overscan_row_medians)):
    stats[name] = {"hits": int(sum(d.stats.cache_hits.values())), "misses": int(sum(d.stats.cache_misses.values()))}
print(json.dumps({"ok": bool(ok), "med": med, "stats": stats}))
"""


def _run(env: dict[str, str], *args: str, cwd: Path | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("APFAST_NUMBA_CACHE", "NUMBA_CACHE_DIR")}
    env["APFAST_CACHE_DIR"] = str(tmp_path / "cache")
    env.update(extra)
    return env


def test_second_process_loads_every_signature_from_the_cache(tmp_path: Path) -> None:
    env = _env(tmp_path)
    first = _run(env, "float64", "1")
    second = _run(env, "float64", "2")
    assert first["ok"] and second["ok"]
    assert all(s["misses"] >= 1 and s["hits"] == 0 for s in first["stats"].values()), first["stats"]
    assert all(s["misses"] == 0 and s["hits"] >= 1 for s in second["stats"].values()), second["stats"]
    # in apfast's folder, keyed on the sources, never beside them
    from apfast._jit import kernel_source_key

    assert (tmp_path / "cache" / "kernels" / kernel_source_key() / "isr").is_dir()
    assert not list(KERNELS.glob("__pycache__/*.nbi"))


def test_four_processes_building_one_empty_cache_at_once(tmp_path: Path) -> None:
    # the same functions with two dtypes at once: saves of different signatures into the same index
    # file race without the write lock (numba numbers data files from the index it read)
    env = _env(tmp_path)
    args = [("float64", "1"), ("float32", "2"), ("float64", "3"), ("float32", "4")]
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE, *a], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in args]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["ok"]
    # afterwards both signatures load in one process and give the right answers
    for dtype in ("float64", "float32"):
        res = _run(env, dtype, "5")
        assert res["ok"]
        assert all(s["misses"] == 0 for s in res["stats"].values()), res["stats"]
    assert not list((tmp_path / "cache").rglob("*.tmp.*")), "half-written cache files left behind"


def test_editing_a_callee_in_another_module_reaches_the_cached_caller(tmp_path: Path) -> None:
    # a copy of the package whose kernels we may edit: isr.median_inplace calls primitives.select_kth
    site = tmp_path / "site"
    shutil.copytree(SRC, site / "apfast", ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    shutil.copytree(KERNELS, site / "apfast" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    env = _env(tmp_path, PYTHONPATH=str(site))
    before = _run(env, "float64", "7", cwd=tmp_path)
    assert before["ok"]
    again = _run(env, "float64", "7", cwd=tmp_path)
    assert again["stats"]["median_inplace"]["misses"] == 0  # cached

    prim = site / "apfast" / "kernels" / "primitives.py"
    text = prim.read_text()
    assert text.count("    return buf[k]\n") == 1
    prim.write_text(text.replace("    return buf[k]\n", "    return buf[k] + 1000.0\n"))
    after = _run(env, "float64", "7", cwd=tmp_path)
    assert after["stats"]["median_inplace"]["misses"] >= 1  # recompiled, not loaded stale
    assert after["med"] == pytest.approx(before["med"] + 1000.0, abs=1e-9) or \
        after["med"] == pytest.approx(before["med"] + 500.0, abs=1e-9)  # odd n: +1000; even: mean of two
    assert not after["ok"]


def test_cache_can_be_turned_off(tmp_path: Path) -> None:
    env = _env(tmp_path, APFAST_NUMBA_CACHE="0")
    res = _run(env, "float64", "1")
    assert res["ok"]
    assert not (tmp_path / "cache" / "kernels").exists()


def test_import_of_a_kernel_module_stays_light() -> None:
    code = ("import sys, apfast.kernels.detect, apfast.kernels; "
            "print(sorted(m for m in ('astropy', 'sqlalchemy', 'apfast.repo.butler', 'apfast.run.config') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.strip() == "[]"
    code = ("import sys, apfast; apfast.__version__; print('astropy' in sys.modules); apfast.Butler; "
            "print('apfast.repo.butler' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.split() == ["False", "True"]


def test_warmup_check_on_an_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from apfast.run.cli import main

    monkeypatch.setenv("APFAST_CACHE_DIR", str(tmp_path / "empty"))
    assert main(["warmup", "--check"]) == 1
    out = capsys.readouterr().out
    assert "kernel cache incomplete" in out and str(tmp_path / "empty" / "kernels") in out
    assert "run `apfast warmup`" in out


def test_an_unusable_cache_folder_compiles_in_memory_with_one_warning(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = _env(tmp_path)
    env["APFAST_CACHE_DIR"] = str(blocker / "cache")
    proc = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig()\n" + _PROBE, "float64", "1"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"]
    assert proc.stderr.count("WARNING") == 1 and "set APFAST_CACHE_DIR" in proc.stderr
    warm = subprocess.run([sys.executable, "-m", "apfast.run.cli", "warmup", "--no-fftw"], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert warm.returncode == 2, warm.stderr[-3000:]
    assert "Traceback" not in warm.stderr
    assert "cannot build the kernel cache in" in warm.stderr and "set APFAST_CACHE_DIR" in warm.stderr
