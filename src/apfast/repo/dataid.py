"""Gen 2 ``--id`` dataId expressions: parse, expand, print and turn into SQL.

The words after one ``--id`` select data by key: ``visit=412518^412568
ccdnum=3^6..12 filter=g``. Values of one key are joined with ``^``; integer keys
also take inclusive ranges ``a..b`` and strided ranges ``a..b:s`` (``1..9:3`` is
1, 4, 7). Keys within one ``--id`` must all match (AND); repeated ``--id``
options add up (OR), as in the Rubin Gen 2 argument parser.

Examples
--------
>>> expr = parse_id(["visit=412518^412568", "ccdnum=3^6..12", "filter=g"])
>>> expr["ccdnum"]
(3, 6, 7, 8, 9, 10, 11, 12)
>>> expr.to_string()
'visit=412518^412568 ccdnum=3^6..12 filter=g'
>>> to_sql_where(parse_id(["visit=1^2", "filter=g"]), ["visit", "filter"])
('visit IN (?, ?) AND filter IN (?)', [1, 2, 'g'])

"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

from apfast.errors import DataIdError, InputError

__all__ = [
    "DEFAULT_KEY_TYPES",
    "MAX_VALUES",
    "DataIdExpr",
    "expand",
    "format_int_values",
    "format_table",
    "parse_id",
    "parse_ids",
    "to_sql_where",
]

#: The dataId keys ``--id`` understands, with the type of their values.
DEFAULT_KEY_TYPES: Mapping[str, type] = {
    "visit": int,
    "ccdnum": int,
    "ccd": int,
    "filter": str,
    "date": str,
    "object": str,
    "tract": int,
    "patch": str,
    "expTime": float,
}

#: Most values one key may select, and most dataIds one expression may expand to.
MAX_VALUES = 1_000_000

#: Integer dataId values must fit a signed 64-bit SQL INTEGER.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

#: Most bound parameters one WHERE fragment may use (SQLite allows 32766 per statement).
MAX_SQL_PARAMS = 30_000

_SYNTAX = (
    "KEY=V1^V2^... with integer ranges a..b and strides a..b:s, e.g. visit=412518 ccdnum=3^6..12 filter=g"
)
_INT_RE = re.compile(r"^([+-]?[0-9]+)(?:\.\.([+-]?[0-9]+)(?::([+-]?[0-9]+))?)?$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Runs of at least this many consecutive integers become one BETWEEN in SQL.
_MIN_SQL_RUN = 3
_IN_CHUNK = 1000


class DataIdExpr(Mapping[str, tuple[Any, ...]]):
    """One parsed ``--id``: a frozen mapping of key to the tuple of selected values.

    From :func:`parse_id`, integer keys hold sorted, unique ints and other keys keep
    the order given with repeats removed; the constructor keeps values as given. A
    dataId matches when, for every key, its value is one of the selected values.

    Parameters
    ----------
    values : mapping of str to sequence
        Key to the non-empty sequence of selected values.

    Examples
    --------
    >>> e = DataIdExpr({"visit": [2, 1], "filter": ["g"]})
    >>> e
    DataIdExpr(visit=(2, 1), filter=('g',))
    >>> e.matches({"visit": 1, "filter": "g", "ccdnum": 5})
    True

    """

    __slots__ = ("_data", "_hash")
    _data: dict[str, tuple[Any, ...]]
    _hash: int | None

    def __init__(self, values: Mapping[str, Sequence[Any]] = ()) -> None:  # type: ignore[assignment]
        data: dict[str, tuple[Any, ...]] = {}
        for key, vals in dict(values).items():
            if isinstance(vals, (str, bytes)) or not isinstance(vals, (Sequence, Collection)):
                vals = (vals,)
            tup = tuple(vals)
            if not tup:
                msg = f"dataId key {key!r} has no values; give at least one, as in {key}=V1^V2"
                raise DataIdError(msg)
            data[str(key)] = tup
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_hash", None)

    def __setattr__(self, name: str, value: Any) -> None:
        msg = "DataIdExpr is immutable; build a new one instead"
        raise AttributeError(msg)

    def __getitem__(self, key: str) -> tuple[Any, ...]:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = hash(frozenset(self._data.items()))
            object.__setattr__(self, "_hash", h)
        return h

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._data.items())
        return f"DataIdExpr({inner})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (DataIdExpr, (self._data,))

    def matches(self, data_id: Mapping[str, Any]) -> bool:
        """Return True if every key of the expression is in ``data_id`` with a selected value."""
        return all(k in data_id and data_id[k] in v for k, v in self._data.items())

    def n_combinations(self) -> int:
        """Return how many dataIds :func:`expand` would give (the product of the value counts)."""
        counts: list[int] = [len(v) for v in self._data.values()]
        return math.prod(counts)

    def to_string(self) -> str:
        """Return the canonical ``--id`` text; parsing it gives back an equal expression.

        Integer values are compressed into ranges and strides (:func:`format_int_values`).
        """
        parts = []
        for k, vals in self._data.items():
            if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
                parts.append(f"{k}={format_int_values(vals)}")
            else:
                parts.append(f"{k}=" + "^".join(_format_scalar(v) for v in vals))
        return " ".join(parts)


def _format_scalar(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def format_int_values(values: Collection[int]) -> str:
    """Write a set of integers compactly in ``--id`` syntax: singles, ranges and strides.

    Parameters
    ----------
    values : collection of int
        The integers; order and repeats do not matter.

    Returns
    -------
    str
        ``^``-joined terms; ``parse_id`` of ``key=<this>`` gives the sorted unique values back.

    Examples
    --------
    >>> format_int_values([3, 6, 7, 8, 9, 10, 11, 12])
    '3^6..12'
    >>> format_int_values([1, 4, 7, 10, 11])
    '1..10:3^11'

    """
    vals = sorted(set(values))
    terms: list[str] = []
    i = 0
    while i < len(vals):
        # Greedy: the longest arithmetic run starting here, if it has 3 or more members.
        if i + 2 < len(vals):
            step = vals[i + 1] - vals[i]
            j = i + 1
            while j + 1 < len(vals) and vals[j + 1] - vals[j] == step:
                j += 1
            if j - i >= 2:
                suffix = "" if step == 1 else f":{step}"
                terms.append(f"{vals[i]}..{vals[j]}{suffix}")
                i = j + 1
                continue
        terms.append(str(vals[i]))
        i += 1
    return "^".join(terms)


def _token_error(token: str, problem: str) -> DataIdError:
    msg = f"bad dataId term {token!r}: {problem}; expected {_SYNTAX}"
    return DataIdError(msg)


def _parse_int_piece(piece: str, token: str, budget: int) -> range:
    m = _INT_RE.match(piece)
    if m is None:
        raise _token_error(token, f"{piece!r} is not an integer, a range a..b or a stride a..b:s")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    s = int(m.group(3)) if m.group(3) is not None else 1
    for v in (a, b, s):
        if not INT64_MIN <= v <= INT64_MAX:
            raise _token_error(token, f"{v} is outside the 64-bit integer range the registry can store")
    if m.group(2) is None:
        return range(a, a + 1)
    if b < a:
        raise _token_error(token, f"range {piece!r} ends before it starts; write it as {b}..{a}")
    if s <= 0:
        raise _token_error(token, f"stride in {piece!r} must be a positive integer")
    r = range(a, b + 1, s)
    if len(r) > budget:
        raise _token_error(
            token, f"{piece!r} selects {len(r)} values, more than the limit of {MAX_VALUES}; narrow the range"
        )
    return r


def _parse_values(key: str, kind: type, raw: str, token: str) -> tuple[Any, ...]:
    pieces = raw.split("^")
    if any(not p for p in pieces):
        raise _token_error(token, f"empty value for {key!r}")
    if kind is int:
        out: set[int] = set()
        for piece in pieces:
            out.update(_parse_int_piece(piece, token, MAX_VALUES - len(out)))
            if len(out) > MAX_VALUES:  # pragma: no cover - the budget check above fires first
                break
        return tuple(sorted(out))
    if kind is float:
        vals: list[Any] = []
        for piece in pieces:
            try:
                v = float(piece)
            except ValueError:
                raise _token_error(token, f"{piece!r} is not a number") from None
            if not math.isfinite(v):
                raise _token_error(token, f"{piece!r} is not a finite number")
            vals.append(v)
        return tuple(dict.fromkeys(vals))
    return tuple(dict.fromkeys(pieces))


def _split_word(word: str) -> list[str]:
    """Split ``"visit=1 filter=g"`` (one quoted ``--id`` word) into terms.

    Only when every whitespace-separated piece is a ``KEY=...`` term; otherwise the
    word is one term whose value holds spaces (a DECam filter name such as
    ``VR DECam c0007 6300.0 2600.0``).
    """
    pieces = word.split()
    if len(pieces) > 1 and all("=" in p for p in pieces):
        return pieces
    return [word.strip()] if word.strip() else []


def parse_id(tokens: Sequence[str] | str, *, key_types: Mapping[str, type] = DEFAULT_KEY_TYPES) -> DataIdExpr:
    """Parse the words after one ``--id`` into a :class:`DataIdExpr`.

    Parameters
    ----------
    tokens : sequence of str, or str
        ``["visit=123456^123457", "ccdnum=3^6..12", "filter=g"]``. A word holding
        several terms (``--id "visit=1 filter=g"``) is split on whitespace when every
        piece has an ``=``; otherwise spaces belong to the value.
    key_types : mapping of str to type, optional
        Allowed keys and their value types (``int``, ``float`` or ``str``).

    Returns
    -------
    DataIdExpr
        Key to the tuple of values, in the order the keys were given.

    Raises
    ------
    DataIdError
        For a word without ``=``, an unknown key (listing the known keys), a key given
        twice, an empty value, a non-integer in an integer key, a reversed range, a
        stride <= 0, or more than :data:`MAX_VALUES` values for one key.

    Examples
    --------
    >>> parse_id(["ccdnum=1..9:3", "filter=g^r"])
    DataIdExpr(ccdnum=(1, 4, 7), filter=('g', 'r'))
    >>> parse_id("visit=5..3")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    apfast.errors.DataIdError: bad dataId term 'visit=5..3': range '5..3' ends before it starts; ...

    """
    if isinstance(tokens, str):
        tokens = [tokens]
    for key, kind in key_types.items():
        if kind not in (int, float, str):
            msg = f"key_types[{key!r}] is {kind!r}; dataId keys must be int, float or str"
            raise InputError(msg)
    words = [w for t in tokens for w in _split_word(str(t))]
    values: dict[str, tuple[Any, ...]] = {}
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            raise _token_error(word, "it has no KEY= part")
        if key not in key_types:
            close = difflib.get_close_matches(key, list(key_types), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(key_types)
            msg = f"unknown dataId key {key!r} in {word!r}; {hint}known keys are {known}"
            raise DataIdError(msg)
        if key in values:
            raise _token_error(word, f"key {key!r} is given twice in one --id; join the values with ^")
        values[key] = _parse_values(key, key_types[key], raw, word)
    return DataIdExpr(values)


def parse_ids(
    id_args: Sequence[Sequence[str] | str], *, key_types: Mapping[str, type] = DEFAULT_KEY_TYPES
) -> list[DataIdExpr]:
    """Parse repeated ``--id`` options; the selection is the union of the expressions.

    Parameters
    ----------
    id_args : sequence of (sequence of str, or str)
        One entry per ``--id`` (argparse ``action="append", nargs="*"``).
    key_types : mapping of str to type, optional
        As for :func:`parse_id`.

    Returns
    -------
    list of DataIdExpr
        One expression per ``--id``, in order, with exact duplicates dropped.

    Raises
    ------
    DataIdError
        As :func:`parse_id`; the message says which ``--id`` (1-based) is wrong.

    Examples
    --------
    >>> parse_ids([["visit=1"], ["visit=2", "ccdnum=3"]])
    [DataIdExpr(visit=(1,)), DataIdExpr(visit=(2,), ccdnum=(3,))]

    """
    out: list[DataIdExpr] = []
    for i, tokens in enumerate(id_args, start=1):
        try:
            expr = parse_id(tokens, key_types=key_types)
        except DataIdError as exc:
            msg = f"--id number {i}: {exc}"
            raise DataIdError(msg) from None
        if expr not in out:
            out.append(expr)
    return out


def expand(expr: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Return every dataId an expression selects (the cartesian product of its values).

    Use this for keys that need no registry lookup; keys the registry must fill in
    (e.g. every ``ccdnum`` of a visit) are resolved by the repository instead.

    Parameters
    ----------
    expr : DataIdExpr or mapping of str to sequence
        The expression.

    Returns
    -------
    list of dict
        One dict per combination, keys in expression order; ``[{}]`` for an empty one.

    Raises
    ------
    DataIdError
        If the product has more than :data:`MAX_VALUES` combinations.

    Examples
    --------
    >>> expand(parse_id(["visit=1^2", "ccdnum=5"]))
    [{'visit': 1, 'ccdnum': 5}, {'visit': 2, 'ccdnum': 5}]

    """
    keys = list(expr)
    counts = [len(expr[k]) for k in keys]
    total = math.prod(counts)
    if total > MAX_VALUES:
        sizes = " x ".join(f"{k}:{n}" for k, n in zip(keys, counts, strict=True))
        msg = (
            f"the dataId expression selects {total} combinations ({sizes}), "
            f"more than {MAX_VALUES}; narrow the --id"
        )
        raise DataIdError(msg)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(expr[k] for k in keys))]


def format_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """Format dataIds (or any records) as an aligned text table, as ``--show data`` prints.

    Numbers are right-aligned and text left-aligned; a key missing from a row shows ``-``.

    Parameters
    ----------
    rows : sequence of mapping
        The records.
    keys : sequence of str
        The columns, in order.

    Returns
    -------
    str
        A header line, a rule of dashes, and one line per row (no trailing newline).

    Raises
    ------
    InputError
        If ``keys`` is empty.

    Examples
    --------
    >>> rows = [{"visit": 411420, "filter": "g"}, {"visit": 7, "filter": "VR"}]
    >>> print(format_table(rows, ["visit", "filter"]))
     visit  filter
    ------  ------
    411420  g
         7  VR

    """
    keys = list(keys)
    if not keys:
        msg = "format_table needs at least one column key, e.g. ['visit', 'ccdnum']"
        raise InputError(msg)
    cells = [[_cell(row.get(k, "-")) for k in keys] for row in rows]
    numeric = [
        all(
            isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
            for row in rows
            if k in row
        )
        for k in keys
    ]
    widths = [max([len(k)] + [len(c[j]) for c in cells]) for j, k in enumerate(keys)]

    def line(values: Sequence[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(out).rstrip()

    lines = [line(keys), line(["-" * w for w in widths])]
    lines.extend(line(c) for c in cells)
    return "\n".join(lines)


def _cell(value: Any) -> str:
    text = _format_scalar(value) if isinstance(value, float) else str(value)
    # One row per line: a newline inside a value would break the table.
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", " ")


def _int_runs(values: Sequence[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Split sorted unique ints into runs of consecutive values (>= _MIN_SQL_RUN long) and singles."""
    runs: list[tuple[int, int]] = []
    singles: list[int] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i + 1 >= _MIN_SQL_RUN:
            runs.append((values[i], values[j]))
        else:
            singles.extend(values[i : j + 1])
        i = j + 1
    return runs, singles


def to_sql_where(
    expr: Mapping[str, Sequence[Any]], allowed_columns: Mapping[str, str] | Collection[str]
) -> tuple[str, list[Any]]:
    """Turn an expression into an SQL ``WHERE`` fragment with ``?`` placeholders.

    Values are only ever bound parameters, never text in the SQL. Column names come
    only from ``allowed_columns`` and must be plain identifiers. Runs of three or more
    consecutive integers become ``BETWEEN ? AND ?``; other values go in ``IN`` lists
    of at most 1000 (the APDB's own batching rule).

    Parameters
    ----------
    expr : DataIdExpr or mapping of str to sequence
        The selection.
    allowed_columns : mapping of str to str, or collection of str
        The dataId keys the table can filter on; a mapping renames a key to its
        column (``{"ccdnum": "ccd"}``).

    Returns
    -------
    sql : str
        ``"visit IN (?, ?) AND filter IN (?)"``; ``"1 = 1"`` for an empty expression.
    params : list
        The values, in placeholder order, as Python ``int``/``float``/``str``.

    Raises
    ------
    DataIdError
        For a key the table has no column for (listing the allowed keys), or more than
        :data:`MAX_SQL_PARAMS` parameters.
    InputError
        For an ``allowed_columns`` entry that is not a plain SQL identifier.

    Examples
    --------
    >>> to_sql_where(parse_id(["ccdnum=3^6..12"]), {"ccdnum": "ccd"})
    ('(ccd IN (?) OR ccd BETWEEN ? AND ?)', [3, 6, 12])

    """
    columns = (
        dict(allowed_columns) if isinstance(allowed_columns, Mapping) else {c: c for c in allowed_columns}
    )
    clauses: list[str] = []
    params: list[Any] = []
    for key, vals in expr.items():
        if key not in columns:
            allowed = ", ".join(columns) or "(none)"
            msg = f"dataId key {key!r} cannot select this dataset; use only the keys {allowed}"
            raise DataIdError(msg)
        col = columns[key]
        if not isinstance(col, str) or not _IDENT_RE.match(col):
            msg = (
                f"column name {col!r} for dataId key {key!r} is not a plain SQL identifier; "
                "fix allowed_columns"
            )
            raise InputError(msg)
        parts: list[str] = []
        values = [_py(v) for v in vals]
        runs: list[tuple[int, int]] = []
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            runs, values = _int_runs(sorted(set(values)))
        for start in range(0, len(values), _IN_CHUNK):
            chunk = values[start : start + _IN_CHUNK]
            parts.append(f"{col} IN ({', '.join('?' * len(chunk))})")
            params.extend(chunk)
        for lo, hi in runs:
            parts.append(f"{col} BETWEEN ? AND ?")
            params.extend((lo, hi))
        clauses.append(parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")")
        if len(params) > MAX_SQL_PARAMS:
            msg = (
                f"the dataId selection needs more than {MAX_SQL_PARAMS} SQL parameters (key {key!r}); "
                "use ranges a..b or narrow the --id"
            )
            raise DataIdError(msg)
    if not clauses:
        return "1 = 1", []
    return " AND ".join(clauses), params


def _py(value: Any) -> Any:
    """Cast numpy scalars to Python types so every DB driver binds them."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (str, bytes)) else value
