"""Shared base of every config section: field helpers, type checking, the ``ConfigSection`` class.

Stage modules (``isr.py``, ``background.py`` ...) define their config classes on
this base; :mod:`apfast.run.config` nests them in ``PipelineConfig``. Keeping the base
here lets ``config.py`` import the stage modules without an import cycle.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import field
from typing import Any, ClassVar, Literal

from apfast.errors import ConfigError

#: The string that sets an ``X | None`` field to ``None`` (TOML has no null).
NONE_TEXT = "none"


def opt(default: Any, doc: str, *, choices: Mapping[str, str] | None = None) -> Any:
    """Make a config field with its default, its doc and (for ``Literal`` fields) a doc per choice.

    Parameters
    ----------
    default : object
        An immutable default (use a tuple, not a list).
    doc : str
        One sentence for ``config show``, with units and what special values mean.
    choices : mapping of str to str, optional
        For a ``Literal`` field: each allowed value and what it does.

    Returns
    -------
    dataclasses.Field
        To assign to an annotated attribute of a :class:`ConfigSection` dataclass.
    """
    meta: dict[str, Any] = {"doc": doc}
    if choices is not None:
        meta["choices"] = dict(choices)
    return field(default=default, metadata=meta)


def subsection(cls: type, *, doc: str | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """Make a nested section field.

    Parameters
    ----------
    cls : type
        The section class.
    doc : str, optional
        What the section is for here; default: the first line of the class docstring.
    factory : callable, optional
        Makes the default instance when this place needs other defaults than the class
        (characterize's detection is 5 sigma ``stdev`` x 10, DIA's both polarities).

    Returns
    -------
    dataclasses.Field
        To assign to an annotated attribute of a :class:`ConfigSection` dataclass.
    """
    text = doc if doc is not None else (cls.__doc__ or cls.__name__).strip().splitlines()[0]
    return field(default_factory=factory if factory is not None else cls, metadata={"doc": text})


#: The dotted prefix of the section being built by the loader (``None``: use the class's own
#: ``_key_prefix``). A section class used in several places (``DetectionConfig`` in characterize,
#: calibrate and dia) then names the key where the value was set.
_PREFIX: ContextVar[str | None] = ContextVar("apfast_config_prefix", default=None)


@contextmanager
def key_prefix(prefix: str) -> Iterator[None]:
    """Make sections constructed inside the ``with`` block name their keys under ``prefix``.

    Parameters
    ----------
    prefix : str
        The dotted prefix ending in ``.`` (``"characterize.detection."``), or ``""``.

    Examples
    --------
    >>> from apfast.ccd.detection import DetectionConfig
    >>> with key_prefix("dia.detection."):
    ...     DetectionConfig(threshold=-1.0)
    Traceback (most recent call last):
    ...
    apfast.errors.ConfigError: dia.detection.threshold = -1.0 is invalid; it must be a positive finite number (e.g. 5.0)
    """
    token = _PREFIX.set(prefix)
    try:
        yield
    finally:
        _PREFIX.reset(token)


def _ConfigError(msg: str, key: str) -> ConfigError:
    """Make a ConfigError that remembers the dotted key, so the loader can name the setting."""
    err = ConfigError(msg)
    err.key = key  # type: ignore[attr-defined]
    return err


class ConfigSection:
    """Base of every config class: type-checks every field, then runs ``_validate``.

    A new stage section is a ``@dataclass(frozen=True, slots=True, kw_only=True)``
    subclass whose fields are made with :func:`opt` (or :func:`subsection` for a
    nested sub-config), whose ``_validate`` calls ``self._fail(name, value, fix)``
    for range and cross-field rules, plus one line in :class:`PipelineConfig`::

        warp: WarpConfig = subsection(WarpConfig)

    Supported annotations: ``bool``, ``int``, ``float`` (ints are accepted and
    stored as float), ``str``, ``Literal[...]``, ``tuple[T, ...]`` (lists become
    tuples), ``X | None`` and nested sections. ``_key_prefix`` is filled in from
    where the class sits in :class:`PipelineConfig`, so messages name the full
    dotted key; a class nested in several places keeps its own short prefix and the
    loader names the place it builds (:func:`key_prefix`). A stage section lives in
    its stage's module and imports only this module, never :mod:`apfast.run`.
    """

    __slots__ = ()
    _key_prefix: ClassVar[str] = ""

    @property
    def _prefix(self) -> str:
        """The dotted prefix of this section's keys: where the loader is building it, else the class's."""
        prefix = _PREFIX.get()
        return self._key_prefix if prefix is None else prefix

    def __post_init__(self) -> None:
        prefix = self._prefix
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            tp = _hints(type(self))[f.name]
            key = f"{prefix}{f.name}"
            value = _check_value(getattr(self, f.name), tp, key)
            if value is not getattr(self, f.name):
                object.__setattr__(self, f.name, value)  # normalise int -> float, list -> tuple
        self._validate()

    def _validate(self) -> None:
        """Range and cross-field checks; sections override this."""

    def _fail(self, name: str, value: Any, expected: str) -> typing.NoReturn:
        key = f"{self._prefix}{name}"
        msg = f"config key '{key}' = {value!r} is invalid: {expected}"
        raise _ConfigError(msg, key)

    def _raise(self, name: str, text: str) -> typing.NoReturn:
        """Raise a ConfigError for field ``name`` with ``text`` after its dotted key (``key = 3 must be ...``)."""
        key = f"{self._prefix}{name}"
        raise _ConfigError(f"{key}{text}", key)

    def _check_ranges(self, checks: list[tuple[str, bool, str]]) -> None:
        """Raise for the first ``(field, ok, allowed)`` check that fails.

        The message names the dotted key, its value and the allowed values, e.g.
        ``calibrate.astrometry.sip_order = 9 is invalid; allowed: an integer 1..6``.
        """
        for name, ok, allowed in checks:
            if not ok:
                self._raise(name, f" = {getattr(self, name)!r} is invalid; allowed: {allowed}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Return the resolved field annotations of a config class (cached; they are strings here)."""
    hints = _HINTS.get(cls)
    if hints is None:
        all_hints = typing.get_type_hints(cls)
        hints = {f.name: all_hints[f.name] for f in dataclasses.fields(cls)}
        _HINTS[cls] = hints
    return hints


def _is_section(tp: Any) -> bool:
    # every section, nested ones included, is a ConfigSection dataclass (one config style)
    return isinstance(tp, type) and issubclass(tp, ConfigSection) and dataclasses.is_dataclass(tp)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _is_optional(tp: Any) -> bool:
    args = _union_args(tp)
    return args is not None and type(None) in args


def _is_text(tp: Any) -> bool:
    """Return True for str, Literal-of-str and their Optional forms, which take raw override text."""
    args = _union_args(tp)
    if args is not None:
        return any(_is_text(a) for a in args if a is not type(None))
    if tp is str:
        return True
    return typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))


def describe_type(tp: Any) -> str:
    """Describe a config annotation for people: ``'float or none'``, ``"one of 'a', 'b'"``.

    Parameters
    ----------
    tp : type or typing form
        The resolved annotation of a config field.

    Returns
    -------
    str
        A short phrase used in error messages and ``config show``.

    Examples
    --------
    >>> describe_type(float | None)
    'a number (float) or none'
    >>> describe_type(Literal["a", "b"])
    "one of 'a', 'b'"

    """
    args = _union_args(tp)
    if args is not None:
        parts = [describe_type(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append(NONE_TEXT)
        return " or ".join(parts)
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        (item, *_rest) = typing.get_args(tp)
        return f"an array of {describe_type(item)}"
    names = {bool: "true or false", int: "an integer", float: "a number (float)", str: "a string"}
    if tp in names:
        return names[tp]
    if _is_section(tp):
        return f"a table of {tp.__name__} keys"
    return getattr(tp, "__name__", str(tp))


_MISSING = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float, list -> tuple) or ``_MISSING``."""
    args = _union_args(tp)
    if args is not None:
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() == NONE_TEXT and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            out = _coerce(value, a)
            if out is not _MISSING:
                return out
        return _MISSING
    if typing.get_origin(tp) is Literal:
        for a in typing.get_args(tp):
            if type(value) is type(a) and value == a:
                return a
        return _MISSING
    if typing.get_origin(tp) is tuple:
        item_args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return _MISSING
        if len(item_args) == 2 and item_args[1] is Ellipsis:
            items = [_coerce(v, item_args[0]) for v in value]
        elif len(item_args) == len(value):
            items = [_coerce(v, a) for v, a in zip(value, item_args, strict=True)]
        else:
            return _MISSING
        return _MISSING if any(i is _MISSING for i in items) else tuple(items)
    if tp is bool:
        return value if isinstance(value, bool) else _MISSING
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _MISSING
        return float(value)
    if tp is str:
        return value if isinstance(value, str) else _MISSING
    if _is_section(tp):
        return value if isinstance(value, tp) else _MISSING
    msg = f"config annotation {tp!r} is not supported; use bool, int, float, str, Literal, tuple or X | None"
    raise TypeError(msg)


#: Integers must fit the signed 64-bit integers the numba kernels and SQL use.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _bad_scalar(value: Any) -> str:
    """Why a type-correct value is still unusable (NaN, an int beyond 64 bits), or ``''``."""
    if isinstance(value, tuple):
        return next((p for p in (_bad_scalar(v) for v in value) if p), "")
    if isinstance(value, float) and value != value:  # NaN test without importing math
        return "NaN is not a finite number; give a number"
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _INT64_MAX:
        return f"the integer is outside the 64-bit range {_INT64_MIN}..{_INT64_MAX}"
    return ""


def _one_line(text: str) -> str:
    """``text`` with control characters written as escapes, so an error message stays on one line."""
    return "".join(c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or ord(c) == 127 else c for c in text)


def _check_value(value: Any, tp: Any, key: str, source: str = "") -> Any:
    out = _coerce(value, tp)
    where = f" ({_one_line(source)})" if source else ""
    if out is _MISSING:
        what = "is not allowed" if "one of" in describe_type(tp) else "has the wrong type"
        msg = f"config key '{key}' = {value!r} {what}: expected {describe_type(tp)}{where}"
        raise _ConfigError(msg, key)
    problem = _bad_scalar(out)
    if problem:
        msg = f"config key '{key}' = {value!r} is invalid: {problem}{where}"
        raise _ConfigError(msg, key)
    return out
