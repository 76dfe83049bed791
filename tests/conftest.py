"""Shared fixtures: a seeded RNG per test and the real telescope data in tests/data/real."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


REAL_DATA = REPO_ROOT / "tests" / "data" / "real"


@pytest.fixture(scope="session", autouse=True)
def _fftw_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep FFTW wisdom out of ~/.cache but let it persist across test runs (pytest's temp root)."""
    if "APFAST_CACHE_DIR" not in os.environ:
        os.environ["APFAST_CACHE_DIR"] = str(tmp_path_factory.getbasetemp().parent / "apfast-cache")


# one throw-away PostgreSQL server per test session (skips where PostgreSQL or psycopg is missing)
@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded generator: tests never touch numpy's global RNG."""
    return np.random.default_rng(20261127)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real telescope data in the repository, ``tests/data/real`` (provenance in tests/data/README.md)."""
    return REAL_DATA


@pytest.fixture(scope="session")
def dia_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One simulated full-size CCD (35): 2 template visits coadded into templates, 3 science visits ingested.

    Session-scoped and read-only for its users: each test module processes it into its own rerun
    and its own APDB. Keys: ``dir``, ``repo``, ``templates``, ``summary``, ``ccd``.
    """
    from simrepo import build_sim_repo

    ccd = 35
    ds = build_sim_repo(tmp_path_factory.mktemp("dia_dataset"), ccdnums=(ccd,), n_template=2, n_science=3, seed=5,
                        templates=True)
    return {**ds, "ccd": ccd}


@pytest.fixture(scope="session")
def dia_run(dia_dataset: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``apfast process`` of the 3 science visits of ``dia_dataset`` (CCD 35) into rerun ``p``, SQLite APDB.

    Processed once per session: the full pipeline (calexp, matched template, decorrelated difference,
    DIA sources, APDB, alerts) of three full-size CCD-visits is the costliest product of the test run.
    tests/dia/test_dia_pipeline.py owns it: its re-run tests process into it again and leave it as
    they found it (same outputs, same APDB rows). Other modules only read it
    (tests/diffim/test_diffim_pipeline.py) or work on a hard-linked copy of the rerun
    (tests/report/test_report.py); outputs are written atomically (write, then rename), so a
    re-processed file never changes a copy's. Keys: ``d``, ``repo``, ``url``, ``db``, ``args``
    (the ``process`` command line), ``truth``, ``visits``, ``out`` (the rerun), ``ccd``, ``dataset``.
    """
    from apfast.run.cli import main
    from apfast.sim.simulate import load_truth

    d = tmp_path_factory.mktemp("dia_run")
    repo, summary, ccd = dia_dataset["repo"], dia_dataset["summary"], dia_dataset["ccd"]
    url = f"sqlite:///{d / 'apdb' / 'association.db'}"
    assert main(["-q", "make-apdb", "-c", f"apdb.db_url={url}", "-c", "apdb.isolation_level=READ_UNCOMMITTED"]) == 0
    sv = "^".join(str(v) for v in summary.science_visits)
    args = ["-q", "process", str(repo), "--rerun", "p", "--id", f"visit={sv}", f"ccdnum={ccd}", "filter=g",
            "--template", str(dia_dataset["templates"]), "-c", f"apdb.db_url={url}",
            "-c", "apdb.isolation_level=READ_UNCOMMITTED"]
    assert main(args) == 0
    return {"d": d, "repo": repo, "url": url, "db": d / "apdb" / "association.db", "args": args,
            "truth": load_truth(dia_dataset["dir"] / "sim"), "visits": list(summary.science_visits),
            "out": repo / "rerun" / "p", "ccd": ccd, "dataset": dia_dataset}
