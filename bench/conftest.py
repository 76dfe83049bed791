"""Benchmark fixtures and the environment line every benchmark run logs (numba, threads, CPU)."""

from __future__ import annotations

import os
import platform

import numba
import numpy as np
import pytest


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Log what the numbers depend on: compare only runs from the same machine and job."""
    return [
        f"apfast bench: numba {numba.__version__} threading={numba.config.THREADING_LAYER} "
        f"NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS} numpy {np.__version__} "
        f"cpu={platform.processor() or platform.machine()} cores={os.cpu_count()}"
    ]


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh seeded generator."""
    return np.random.default_rng(12345)
