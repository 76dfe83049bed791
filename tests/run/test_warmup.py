"""``apfast warmup`` compiles exactly the kernel signatures a run uses.

``-j N`` workers call :func:`apfast.run.warmup.warmup` as they start (apfast.run.executor), so a
signature the warm-up misses (another dtype, a read-only or non-contiguous array) is compiled
in the middle of a CCD again, tens of seconds on the DIA chain. The slow test processes CCDs
in a fresh interpreter after the warm-up and fails on any kernel that compiles a new signature.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from apfast.run.warmup import kernel_dispatchers

_PROBE = r"""
import json, sys
from apfast.run.warmup import kernel_dispatchers, warmup

def signatures():
    return {k: sorted(map(str, d.signatures)) for k, d in kernel_dispatchers().items()}

warmup(fftw=False)
before = signatures()
from apfast.run.cli import main
rc = main(sys.argv[1:])
after = signatures()
new = {k: sorted(set(v) - set(before.get(k, []))) for k, v in after.items()}
print(json.dumps({"rc": rc, "new": {k: v for k, v in new.items() if v}}))
"""


@pytest.mark.parametrize("module", ["convolve", "fftutil", "htm", "psfmatch"])
def test_warmup_cases_run(module: str) -> None:
    import importlib

    mod = importlib.import_module(f"apfast.kernels.{module}")
    cases = mod._warmup_cases()
    assert cases
    for kernel, args in cases:
        kernel(*args)


def test_every_kernel_module_with_public_kernels_has_warmup_cases() -> None:
    import importlib

    modules = {k.rsplit(".", 1)[0] for k in kernel_dispatchers() if not k.rsplit(".", 1)[1].startswith("_")}
    missing = sorted(m for m in modules
                     if not hasattr(importlib.import_module(m), "_warmup_cases") and not m.endswith(".render"))
    assert not missing, (f"kernel modules without _warmup_cases (apfast warmup skips them; render: simulate only): "
                         f"{missing}")


@pytest.mark.slow
def test_warmup_covers_every_signature_of_a_run(dia_dataset: dict, tmp_path) -> None:
    summary = dia_dataset["summary"]
    visits = "^".join(str(v) for v in summary.science_visits[:2])
    db = f"sqlite:///{tmp_path / 'apdb.db'}"
    from apfast.run.cli import main

    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={db}"]) == 0
    args = ["-q", "process", str(dia_dataset["repo"]), "--output", str(tmp_path / "out"),
            "--template", str(dia_dataset["templates"]), "-c", f"apdb.db_url={db}",
            "--id", f"visit={visits}", f"ccdnum={dia_dataset['ccd']}"]
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=1200,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0, proc.stderr[-4000:]
    assert res["new"] == {}, f"kernels compiled new signatures after the warm-up: {res['new']}"


def test_worker_warmup_failure_is_a_warning_not_a_dead_pool(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    # a kernel that cannot compile in the pool initializer must not break the pool (its task then fails
    # with the dataId); the worker says so in the log
    import apfast.run.warmup
    from apfast.run.executor import _worker_init

    def boom(**_kw: object) -> None:
        raise RuntimeError("numba: cannot compile kernel X")

    monkeypatch.setattr(apfast.run.warmup, "warmup", boom)
    with caplog.at_level("WARNING", logger="apfast.run.executor"):
        _worker_init(0, True)
    assert any("kernel warm-up failed; kernels compile on first use" in r.getMessage() for r in caplog.records)
