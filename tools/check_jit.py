#!/usr/bin/env python
"""Fail when code decorates with numba directly instead of through ``apfast._jit``.

The decorator policy (cache on serial kernels only, no fastmath, numpy error
model) lives in one place; a bare ``numba.njit``/``@njit``/``fastmath=`` elsewhere
silently escapes it. Usage: ``python tools/check_jit.py [ROOT]``; exit 1 on findings.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PATTERNS = [
    (re.compile(r"^\s*@\s*(numba\.(n?jit|vectorize|guvectorize|stencil)|njit)\b"), "bare numba decorator"),
    (re.compile(r"^\s*from\s+numba\s+import\s+.*\b(n?jit)\b"), "numba jit imported directly"),
    (re.compile(r"\bnumba\.(n?jit)\s*\("), "direct numba.jit/njit call"),
    (re.compile(r"\bfastmath\s*="), "fastmath setting"),
    (re.compile(r"\bnb\.set_num_threads\s*="), "assignment to set_num_threads (a silent no-op)"),
]
ALLOWED = {Path("src/apfast/_jit.py")}


def check(root: Path) -> list[str]:
    """Return one line per offending source line under ``root``'s src/ and kernels/."""
    problems = []
    for sub in ("src", "kernels"):
        for path in sorted((root / sub).rglob("*.py")):
            rel = path.relative_to(root)
            if rel in ALLOWED:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                for pat, what in PATTERNS:
                    if pat.search(line):
                        problems.append(f"{rel}:{n}: {what}: {line.strip()}  (use apfast._jit.jit / pjit)")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    problems = check(root)
    for p in problems:
        sys.stdout.write(p + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
