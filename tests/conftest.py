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
