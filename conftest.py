"""Fixtures shared by tests/ and bench/: one real PostgreSQL server per session (tests/pgserver.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

from pgserver import make_postgres_fixture

postgres_url = make_postgres_fixture()
