"""Atomic file writes: the one helper every writer of apfast goes through (core: imports nothing of apfast).

A writer writes into a temporary file beside the final name and :func:`atomic_path` moves it
into place with :func:`os.replace` only when the block succeeds, so a reader (or a crash) never
sees a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(
    path: str | Path, *, mkdir: bool = True, reserve: bool = True, mode: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file is removed when the block raises (or the move fails), so the final name
    either holds the previous complete file or the new complete file. No ``fsync``: the move is
    atomic for readers, not durable across a power cut.

    Parameters
    ----------
    path : str or Path
        The final file name.
    mkdir : bool
        Create ``path``'s folder (and its parents) first; false leaves a missing folder to
        fail the write.
    reserve : bool
        Create the temporary file (empty, mode 0600, :func:`tempfile.mkstemp`) before yielding
        it; false yields an unused name (``.<name>.tmp-<pid>-<random>``) that does not exist yet,
        for writers that refuse to overwrite a file (astropy's ``writeto``).
    mode : int, optional
        Permission bits set on the temporary file before the move (e.g. ``0o644``); by default
        the file keeps the bits it was created with (0600 when ``reserve``).

    Yields
    ------
    Path
        The temporary file to write.

    Examples
    --------
    >>> d = Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "sub" / "a.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "sub" / "a.txt").read_text()
    'hello'
    >>> sorted(p.name for p in (d / "sub").iterdir())
    ['a.txt']
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    if reserve:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # gone after a successful move; never mask the block's error
            tmp.unlink()
