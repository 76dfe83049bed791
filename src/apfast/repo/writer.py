"""Output files written on a background thread while the pipeline computes.

Writing one CCD's outputs (calexp, difference, matched template: ~300 MB of
FITS, plus catalogues and alerts) takes 0.4-0.8 s, most of it in the kernel
copying pages and waiting for dirty-page write-back. None of it needs the CPU
the next stage wants, so :class:`OutputWriter` hands each :meth:`Butler.put`
to one writer thread and the pipeline goes on.

Guarantees (what ``apfast process`` relies on):

- A file appears under its final name only when complete (the same temporary
  name + rename as a direct ``put``); a failed write leaves the previous file, if
  any, and no temporary file.
- :meth:`OutputWriter.put` checks the put and copies metadata and catalogues in
  the caller's thread (:meth:`apfast.repo.butler.Butler.prepare_put`); the writer
  thread converts pixel planes to FITS byte order in copies, never in place
  (astropy would byte-swap native arrays in place while writing), so the
  pipeline keeps *using* an exposure it handed over. It must not change the
  planes until :meth:`OutputWriter.wait` returns; no stage does (each writes
  new arrays).
- :meth:`OutputWriter.wait` returns only when every write handed over so far
  is on disk, and raises :class:`apfast.errors.OutputError` naming the dataset,
  the dataId and the file of the first one that failed. The pipeline waits
  before a CCD-visit's APDB transaction (rows in the APDB imply its image
  outputs exist) and before it reports the CCD.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

from apfast._configbase import ConfigSection, opt
from apfast.errors import OutputError
from apfast.exposure import COMPRESSIONS

if TYPE_CHECKING:
    from apfast.repo.butler import Butler

log = logging.getLogger(__name__)

__all__ = ["OutputConfig", "OutputWriter", "output_error"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputConfig(ConfigSection):
    """Output image files: FITS tile compression and which optional products are written.

    Measured per full 2048x4096 exposure file, three per CCD-visit
    (``bench/test_bench_output_compression.py``, README "Output compression"): ``none`` 101 MB in
    0.05 s, ``mask`` 68 MB in 0.06 s, ``lossless`` 52 MB in 3.1 s, ``quantized`` 15 MB in 0.8 s (writes
    into the page cache; the compression is CPU time of the writer thread). The default, ``mask``,
    saves a third of the disk for nothing: bit-exact and as fast as ``none``. ``quantized`` saves
    85% for ~2.4 s of CPU per CCD-visit and a rounding error of 0.018 sigma.
    """

    compression: Literal["none", "mask", "lossless", "quantized"] = opt(
        "mask",
        "FITS tile compression of calexp, deepDiff_differenceExp and deepDiff_matchedExp (and every other "
        "Exposure output; deepCoadd templates stay uncompressed, so patches are memory-mapped).",
        choices=COMPRESSIONS,
    )
    quantize_level: float = opt(
        16.0,
        "With compression = 'quantized': quantisation steps per noise sigma (> 0); the rounding error rms is "
        "sigma / (quantize_level * sqrt(12)), sigma/55 at 16.",
    )
    write_matched: bool = opt(
        True,
        "Write deepDiff_matchedExp (the PSF-matched template, ~1/3 of the image output). The DIA stage of "
        "the same run uses it from memory; false needs a serial run (-j N and Dask workers read it back).",
    )

    def _validate(self) -> None:
        q = self.quantize_level
        if not (math.isfinite(q) and q > 0):
            self._fail("quantize_level", q, "use a finite number of steps per noise sigma > 0, e.g. 16")


class OutputWriter:
    """Write :class:`~apfast.repo.butler.Butler` datasets on one background thread.

    Parameters
    ----------
    butler : Butler
        The output Butler (paths, checks and snapshots are made through it).
    background : bool
        ``False`` writes in :meth:`put` itself (same errors, no thread).

    Use it as a context manager, or call :meth:`wait` / :meth:`close`: a write
    handed over is only known to be on disk after :meth:`wait` returned.

    """

    def __init__(self, butler: Butler, *, background: bool = True) -> None:
        self.butler = butler
        self.background = background
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Future[Path], str, frozenset[tuple[str, Any]]]] = []
        self._lock = threading.Lock()

    def put(self, obj: Any, dataset: str, dataId: Mapping[str, Any] | None = None, **kwargs: Any) -> Path:
        """Hand a dataset over for writing; return the path it will have.

        Raises
        ------
        InputError
            At once, for what :meth:`Butler.put` refuses (unknown dataset, wrong type, bad dataId).
        OutputError
            Without ``background``: the write failed.
        """
        path, write = self.butler.prepare_put(obj, dataset, dataId, **kwargs)
        did = dict(dataId or {}, **kwargs)
        what = f"{dataset} {did} -> {path}"
        if not self.background:
            try:
                write()
            except Exception as exc:  # reported as OutputError naming the file
                raise output_error(what, exc) from exc
            return path
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apfast-writer")
            self._pending.append((self._pool.submit(write), what, _group(did)))
        return path

    def wait(self, dataId: Mapping[str, Any] | None = None) -> float:
        """Block until the writes handed over so far are done; return the seconds waited.

        Parameters
        ----------
        dataId : dict, optional
            Only the writes of datasets with this dataId (e.g. one CCD-visit's
            ``{"visit": v, "ccdnum": c}``); by default all of them.

        Raises
        ------
        OutputError
            The first write that failed (the others that failed are logged).
        """
        import time

        t = time.perf_counter()
        with self._lock:
            if dataId is None:
                pending, self._pending = self._pending, []
            else:
                g = _group(dataId)
                pending = [p for p in self._pending if p[2] == g]
                self._pending = [p for p in self._pending if p[2] != g]
        first: OutputError | None = None
        for fut, what, _g in pending:
            exc = fut.exception()
            if exc is None:
                continue
            err = output_error(what, exc)
            if first is None:
                first = err
            else:
                log.error("%s", err)
        if first is not None:
            raise first
        return time.perf_counter() - t

    def close(self) -> None:
        """Wait for the pending writes (errors are logged, not raised) and stop the thread."""
        try:
            self.wait()
        except OutputError as exc:
            log.error("%s", exc)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            try:
                self.wait()
            finally:
                self.close()
        else:
            self.close()


def _group(did: Mapping[str, Any]) -> frozenset[tuple[str, Any]]:
    return frozenset((str(k), int(v) if isinstance(v, int) else v) for k, v in did.items())


def output_error(what: str, exc: BaseException) -> OutputError:
    """The :class:`OutputError` for a failed write of ``what`` (dataset, dataId and file)."""
    hint = ""
    if isinstance(exc, OSError):
        # numpy reports a short write ("N requested and M written") without an errno: a full disk,
        # a quota or a file-size limit look the same from here
        hint = ("; check free disk space, quotas and write permission there, then re-run the same command "
                "(finished CCDs are kept, this one is redone)")
    return OutputError(f"writing {what} failed: {type(exc).__name__}: {exc}{hint}")
