"""The apfast error hierarchy.

Every failure a user can meet is one of these classes, so a caller can catch
exactly what it expects. Messages say what went wrong, the offending value and
the fix. The CLI maps ``exit_code`` to the process exit status.
"""

from __future__ import annotations

__all__ = [
    "ApfastError",
    "ConfigError",
    "InputError",
    "DataIdError",
    "IngestError",
    "MissingTemplateError",
    "CalibrationError",
    "RefcatError",
    "NoLocationsError",
    "OutputError",
    "AlgorithmError",
    "NoWorkFound",
]


class ApfastError(Exception):
    """Base class of every apfast error; ``exit_code`` is what the CLI returns."""

    exit_code: int = 1


class ConfigError(ApfastError, ValueError):
    """A bad configuration key or value (exit status 2, like a usage error)."""

    exit_code = 2


class InputError(ApfastError, ValueError):
    """A bad input file, array or argument."""


class DataIdError(InputError):
    """A dataId expression that is malformed or matches nothing (exit status 2)."""

    exit_code = 2


class IngestError(InputError):
    """A file that cannot be ingested; the registry is left unchanged."""


class MissingTemplateError(InputError):
    """No template covers a science CCD (a failure unless --skip-missing-templates)."""


class CalibrationError(ApfastError):
    """A calibration is missing, invalid, or does not fit the data."""


class RefcatError(ApfastError):
    """A reference catalogue is missing, malformed, or has no sources in a region."""


class OutputError(ApfastError):
    """An output file could not be written (disk full, permissions...): the message names dataset and file."""


class NoLocationsError(ApfastError, LookupError):
    """The Butler found no dataset: the message starts ``No locations for get:``."""


class AlgorithmError(ApfastError):
    """An algorithm could not produce a result; ``metadata`` holds the numbers behind it."""

    def __init__(self, msg: str, **metadata: object) -> None:
        super().__init__(msg)
        self.metadata = dict(metadata)


class NoWorkFound(ApfastError):
    """An expected skip (nothing to do for this dataId): logged, exit status 0."""

    exit_code = 0
