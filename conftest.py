"""Fixtures shared by tests/ and bench/: one real PostgreSQL server per session (tests/pgserver.py) and
one simulated two-CCD DECam repository per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

from pgserver import make_postgres_fixture

postgres_url = make_postgres_fixture()


@pytest.fixture(scope="session")
def sim_ccds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Full-size simulated DECam CCDs 35 and 36 in one template and one science visit (seed 11), ingested.

    Raws (copied in), calibs and both refcats are in ``repo``; no rerun. Session-scoped and
    read-only for its users (tests/ccd/test_process_ccd.py, tests/run/test_faults.py,
    tests/run/test_calibrated.py, bench/test_bench_process_ccd.py): who writes into the repository
    works on a copy (tests/simrepo.py ``linked_repo_copy``). Keys: ``dir``, ``repo``, ``summary``, ``visits``, ``ccds``.
    """
    from simrepo import build_sim_repo

    ccds = (35, 36)
    ds = build_sim_repo(tmp_path_factory.mktemp("sim_ccds"), ccdnums=ccds, n_template=1, n_science=1, seed=11,
                        mode="copy")
    return {**ds, "ccds": ccds}

