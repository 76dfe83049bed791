"""Mask bit planes shared by every image product (Rubin's names and order).

A mask pixel is an ``int32`` whose bit ``MASK_BITS[name]`` is set when the
plane applies. Files carry the planes as ``MP_<NAME>`` header keywords, as
Rubin's afw does, so ds9 users and Rubin tools can decode them.
"""

from __future__ import annotations

from collections.abc import Iterable

MASK_PLANES: tuple[str, ...] = (
    "BAD",
    "SAT",
    "INTRP",
    "CR",
    "EDGE",
    "DETECTED",
    "DETECTED_NEGATIVE",
    "SUSPECT",
    "NO_DATA",
    "CROSSTALK",
    # fake sources added by apfast.ccd.inject (Rubin source_injection's plane names); new planes go at the end
    # so the bits above never change
    "INJECTED",
    "INJECTED_TEMPLATE",
)
MASK_BITS: dict[str, int] = {name: i for i, name in enumerate(MASK_PLANES)}
MASK_DTYPE = "int32"


def bitmask(names: Iterable[str] | str) -> int:
    """Return the integer with the bits of ``names`` set.

    Examples
    --------
    >>> bitmask(["BAD", "SAT"])
    3
    >>> bitmask("EDGE")
    16
    """
    if isinstance(names, str):
        names = [names]
    value = 0
    for name in names:
        try:
            value |= 1 << MASK_BITS[name]
        except KeyError:
            msg = f"unknown mask plane {name!r}; known planes are {', '.join(MASK_PLANES)}"
            raise KeyError(msg) from None
    return value


def header_cards() -> list[tuple[str, int, str]]:
    """Return ``(keyword, bit, comment)`` cards describing the planes, ``MP_BAD = 0`` style."""
    return [(f"MP_{name}", bit, f"mask plane bit of {name}") for name, bit in MASK_BITS.items()]
