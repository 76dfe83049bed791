"""Shared fixtures: a seeded RNG per test and the real data folder beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    env = os.environ.get("APFAST_SHARED_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded generator: tests never touch numpy's global RNG."""
    return np.random.default_rng(20261127)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real telescope data in ``../shared/data`` (or ``$APFAST_SHARED_DATA``)."""
    path = _shared_data()
    if not (path / "README.md").exists():
        msg = f"real test data not found at {path}; set APFAST_SHARED_DATA to the shared/data folder"
        raise RuntimeError(msg)
    return path
