"""One place for FFTW plans and a persistent FFTW wisdom cache.

Every FFT in apfast that runs through pyfftw gets its plans from
:func:`rfft2_pair`: a forward real 2-D transform and its inverse for one
padded shape, built once per process and shared by every caller (one lock per
plan pair). ``FFTW_MEASURE`` planning times candidate algorithms and costs
seconds for a 2048x4096 CCD grid; FFTW records the winners as *wisdom*. This
module keeps that wisdom on disk so only the first process on a machine pays
for a shape:

* before the first plan of a process, the wisdom file is imported (once);
* each plan is first tried from wisdom alone (``FFTW_WISDOM_ONLY``, milliseconds);
  only when that fails is it planned with the requested effort;
* after a new measured plan the file is rewritten: the file on disk is re-read
  and merged (FFTW's import is additive), then written to a temporary name in
  the same directory and moved into place with :func:`os.replace`, so
  concurrent writers never leave a torn file and each keeps the other's plans.

A corrupt, unreadable or foreign file (another pyfftw/FFTW build, another CPU)
is logged as a warning and ignored; wisdom problems never stop a run.

Cache location: ``$APFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/apfast``, else
``~/.cache/apfast``. The file name carries a hash of the pyfftw and FFTW
versions, the machine type, the CPU model and the core count, because wisdom is
only valid where it was measured. ``APFAST_FFTW_WISDOM=0`` disables reading
and writing the file (plans are still cached in the process).

Plan-sharing contract
---------------------
The plans own their arrays and several modules use the same pair, so callers
must hold ``lock`` while they touch the arrays and must look the arrays up on
the plan objects (``fwd.input_array`` ...) at each use. A caller that passes
other arrays to a plan (``inv(spec, output_array=out)``, which rebinds them
inside pyfftw) must rebind the originals before releasing the lock. The forward
plan preserves its input (callers may reuse a zeroed buffer); the inverse plan
destroys its input. ``inv()`` returns ``irfft2`` normalised by ``1/N``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EFFORTS",
    "PlanRecord",
    "plan_records",
    "rfft2_pair",
    "wisdom_enabled",
    "wisdom_path",
]

logger = logging.getLogger(__name__)

EFFORTS = ("FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT", "FFTW_EXHAUSTIVE")
"""Planner efforts accepted by :func:`rfft2_pair` (fastest planning first)."""

_FORMAT = "apfast-fftw-wisdom"
_FORMAT_VERSION = 1

_LOCK = threading.RLock()
_PAIRS: dict[tuple[tuple[int, int], str, int, str], tuple[Any, Any, threading.Lock]] = {}
_RECORDS: list[PlanRecord] = []
_STATE: dict[str, Any] = {"loaded": False}


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanRecord:
    """How one plan pair of this process was made (see :func:`plan_records`).

    Attributes
    ----------
    shape : (int, int)
        Real-space shape ``(ny, nx)``.
    dtype : str
        ``"float32"`` or ``"float64"``.
    threads : int
        FFTW threads of the plans.
    effort : str
        Requested planner effort.
    from_wisdom : bool
        True when both plans were created from wisdom alone (no measuring).
    seconds : float
        Wall time spent creating the pair.
    """

    shape: tuple[int, int]
    dtype: str
    threads: int
    effort: str
    from_wisdom: bool
    seconds: float


# ----------------------------------------------------------------------------------------------- settings
def wisdom_enabled() -> bool:
    """Whether the on-disk wisdom cache is used (``APFAST_FFTW_WISDOM`` is not ``0``/``false``/``no``/``off``).

    Examples
    --------
    >>> isinstance(wisdom_enabled(), bool)
    True
    """
    return os.environ.get("APFAST_FFTW_WISDOM", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    from apfast._jit import cache_root

    return cache_root()


def convolve_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full 2-D linear convolution of two small arrays by zero-padded real FFTs (float64).

    The same arithmetic as ``scipy.signal.fftconvolve(a, b, mode="full")``, without importing
    scipy.signal (half a second of every process's start-up) for PSF- and kernel-sized stamps.

    Examples
    --------
    >>> a = np.zeros((3, 3)); a[1, 1] = 1.0
    >>> bool(np.allclose(convolve_full(a, np.ones((2, 2))), np.pad(np.ones((2, 2)), ((1, 1), (1, 1)))))
    True
    """
    import scipy.fft

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    shape = (a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1)
    fshape = tuple(scipy.fft.next_fast_len(s, real=True) for s in shape)
    out = scipy.fft.irfft2(scipy.fft.rfft2(a, fshape) * scipy.fft.rfft2(b, fshape), fshape)
    return np.ascontiguousarray(out[: shape[0], : shape[1]])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _identity() -> dict[str, str]:
    """What wisdom depends on: library versions and the CPU it was measured on."""
    import pyfftw

    return {
        "pyfftw": str(pyfftw.__version__),
        "fftw": str(getattr(pyfftw, "fftw_version", "unknown")),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
    }


def wisdom_path() -> Path:
    """Path of this machine's wisdom file (it may not exist yet).

    Returns
    -------
    pathlib.Path
        ``<cache dir>/fftw-wisdom-<hash>.json``, the hash over pyfftw and FFTW
        versions, machine, CPU model and core count.

    Examples
    --------
    >>> wisdom_path().name.startswith("fftw-wisdom-")
    True
    """
    ident = json.dumps(_identity(), sort_keys=True)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return _cache_dir() / f"fftw-wisdom-{digest}.json"


# ----------------------------------------------------------------------------------------------- wisdom file
def _read_wisdom(path: Path) -> tuple[bytes, ...] | None:
    """Wisdom tuple stored in ``path``; None (with a warning) if missing-but-expected, corrupt or foreign."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("cannot read FFTW wisdom file %s (%s); planning without it", path, exc)
        return None
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("version") != _FORMAT_VERSION:
            msg = "not an apfast FFTW wisdom file"
            raise ValueError(msg)
        if doc.get("identity") != _identity():
            logger.warning(
                "FFTW wisdom file %s was made by another pyfftw/FFTW build or CPU (%s); ignoring it, it will be "
                "replaced",
                path,
                doc.get("identity"),
            )
            return None
        wisdom = tuple(base64.b64decode(s.encode("ascii"), validate=True) for s in doc["wisdom"])
        if len(wisdom) != 3:
            msg = f"expected 3 wisdom strings (double, single, long double), found {len(wisdom)}"
            raise ValueError(msg)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        logger.warning("ignoring corrupt FFTW wisdom file %s (%s); it will be replaced", path, exc)
        return None
    return wisdom


def _import(wisdom: tuple[bytes, ...], path: Path) -> None:
    import pyfftw

    try:
        ok = pyfftw.import_wisdom(wisdom)
    except Exception as exc:  # pyfftw/FFTW raise assorted types on bad input; never fatal
        logger.warning("FFTW rejected the wisdom in %s (%s); ignoring it", path, exc)
        return
    if any(w and not good for w, good in zip(wisdom, ok, strict=False)):
        logger.warning("FFTW rejected part of the wisdom in %s; those plans will be measured again", path)


def _load_once() -> None:
    """Import the wisdom file into FFTW, the first time this process plans (caller holds ``_LOCK``)."""
    if _STATE["loaded"]:
        return
    _STATE["loaded"] = True
    if not wisdom_enabled():
        return
    path = wisdom_path()
    wisdom = _read_wisdom(path)
    if wisdom is not None:
        _import(wisdom, path)
        logger.debug("imported FFTW wisdom from %s", path)


def _save() -> None:
    """Merge this process's wisdom with the file on disk and replace the file atomically (holds ``_LOCK``)."""
    if not wisdom_enabled():
        return
    import pyfftw

    path = wisdom_path()
    on_disk = _read_wisdom(path)  # another process may have added plans since we loaded
    if on_disk is not None:
        _import(on_disk, path)
    doc = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "identity": _identity(),
        "wisdom": [base64.b64encode(w).decode("ascii") for w in pyfftw.export_wisdom()],
    }
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        os.replace(tmp_name, path)
        tmp_name = None
        logger.debug("saved FFTW wisdom to %s", path)
    except OSError as exc:
        logger.warning(
            "cannot write FFTW wisdom to %s (%s); set APFAST_CACHE_DIR to a writable directory or "
            "APFAST_FFTW_WISDOM=0",
            path,
            exc,
        )
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------- plans
def _build(shape: tuple[int, int], dtype: np.dtype, threads: int, flags: tuple[str, ...]) -> tuple[Any, Any]:
    import pyfftw

    ctype = np.complex64 if dtype == np.float32 else np.complex128
    spec_shape = (shape[0], shape[1] // 2 + 1)
    real_in = pyfftw.empty_aligned(shape, dtype=dtype)
    spec = pyfftw.empty_aligned(spec_shape, dtype=ctype)
    real_out = pyfftw.empty_aligned(shape, dtype=dtype)
    # forward: default FFTW_PRESERVE_INPUT for r2c (callers keep zeroed buffers between calls);
    # inverse: multi-dimensional c2r always destroys its input
    fwd = pyfftw.FFTW(real_in, spec, axes=(0, 1), direction="FFTW_FORWARD", flags=flags, threads=threads)
    inv = pyfftw.FFTW(
        spec,
        real_out,
        axes=(0, 1),
        direction="FFTW_BACKWARD",
        flags=(*flags, "FFTW_DESTROY_INPUT"),
        threads=threads,
    )
    return fwd, inv


def rfft2_pair(
    shape: tuple[int, int], dtype: Any = np.float32, threads: int = 2, effort: str = "FFTW_MEASURE"
) -> tuple[Any, Any, threading.Lock]:
    """Cached forward and inverse real 2-D FFTW plans for one shape (wisdom-backed).

    Parameters
    ----------
    shape : (int, int)
        Real-space shape ``(ny, nx)``; the spectrum is ``(ny, nx // 2 + 1)``.
    dtype : {numpy.float32, numpy.float64}
        Real dtype (spectra are complex64 / complex128).
    threads : int
        FFTW threads (>= 1).
    effort : {"FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT", "FFTW_EXHAUSTIVE"}
        Planner effort when no wisdom covers the shape. Measured plans are saved
        to the wisdom file (see the module docstring).

    Returns
    -------
    fwd : pyfftw.FFTW
        ``fwd.input_array`` (real, ``shape``) -> ``fwd.output_array`` (complex); input preserved.
    inv : pyfftw.FFTW
        ``inv.input_array`` (complex, the same array as ``fwd.output_array``) ->
        ``inv.output_array`` (real); ``inv()`` normalises by ``1/N``; input destroyed.
    lock : threading.Lock
        Hold it while using the plans or their arrays (they are shared, see the module docstring).

    Raises
    ------
    ValueError
        Bad shape, dtype, threads or effort (an ``apfast.errors.InputError``).

    Examples
    --------
    >>> fwd, inv, lock = rfft2_pair((8, 6), np.float32, 1, "FFTW_ESTIMATE")
    >>> with lock:
    ...     fwd.input_array[...] = np.arange(48, dtype=np.float32).reshape(8, 6)
    ...     _ = fwd()
    ...     back = inv().copy()
    >>> bool(np.allclose(back, np.arange(48).reshape(8, 6), atol=1e-4))
    True
    """
    from apfast.errors import InputError

    try:
        shp = (int(shape[0]), int(shape[1]))
        ok_shape = len(shape) == 2 and shp[0] >= 1 and shp[1] >= 2
    except (TypeError, ValueError, IndexError):
        ok_shape = False
    if not ok_shape:
        msg = f"FFT plan shape must be two positive integers (ny, nx) with nx >= 2, got {shape!r}"
        raise InputError(msg)
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        msg = (
            f"FFT plan dtype must be float32 or float64, got {dt}; convert the image with astype(np.float32)"
        )
        raise InputError(msg)
    if not isinstance(threads, int | np.integer) or isinstance(threads, bool) or threads < 1:
        msg = f"FFT plan threads must be a positive integer, got {threads!r}"
        raise InputError(msg)
    if effort not in EFFORTS:
        msg = f"FFTW planner effort must be one of {', '.join(EFFORTS)}, got {effort!r}"
        raise InputError(msg)
    key = (shp, dt.name, int(threads), effort)
    with _LOCK:
        pair = _PAIRS.get(key)
        if pair is not None:
            return pair
        _load_once()
        t0 = time.perf_counter()
        from_wisdom = True
        try:
            fwd, inv = _build(shp, dt, int(threads), (effort, "FFTW_WISDOM_ONLY"))
        except RuntimeError:  # pyfftw: no wisdom known for this plan
            from_wisdom = False
            fwd, inv = _build(shp, dt, int(threads), (effort,))
        seconds = time.perf_counter() - t0
        pair = (fwd, inv, threading.Lock())
        _PAIRS[key] = pair
        _RECORDS.append(
            PlanRecord(
                shape=shp,
                dtype=dt.name,
                threads=int(threads),
                effort=effort,
                from_wisdom=from_wisdom,
                seconds=seconds,
            )
        )
        logger.debug(
            "FFTW plans %s %s threads=%d %s: %.3f s%s",
            shp,
            dt.name,
            threads,
            effort,
            seconds,
            " (from wisdom)" if from_wisdom else "",
        )
        if not from_wisdom and effort != "FFTW_ESTIMATE":
            _save()
        return pair


def plan_records() -> list[PlanRecord]:
    """How each plan pair of this process was made, in creation order (for run records and tests).

    Examples
    --------
    >>> all(isinstance(r, PlanRecord) for r in plan_records())
    True
    """
    with _LOCK:
        return list(_RECORDS)


def _reset_for_tests() -> None:
    """Forget cached plans, records and the loaded flag, and clear FFTW's in-process wisdom."""
    import pyfftw

    with _LOCK:
        _PAIRS.clear()
        _RECORDS.clear()
        _STATE["loaded"] = False
        pyfftw.forget_wisdom()
