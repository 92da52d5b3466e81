"""The error hierarchy: every failure a user can fix is an ``MlopsError``.

Each message names the field, the value and the fix, so an entry point can print it as
one line and exit non-zero.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = 300) -> str:
    """An error's first line (at most ``limit`` characters), for one-line messages, log lines
    and audit rows; for a database error, the driver's own (SQLAlchemy's wraps it in advice),
    found along the exception's causes."""
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and getattr(cause, "orig", None) is None and id(cause) not in seen:
        seen.add(id(cause))  # the causes Python would show: not a context ``from None`` hid
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    text = str(getattr(cause, "orig", None) or exc)
    line = (text.strip().splitlines() or [exc.__class__.__name__])[0]
    return line if limit is None else line[:limit]


class MlopsError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(MlopsError, ValueError):
    """A configuration file, key or value is invalid."""


class DataValidationError(MlopsError, ValueError):
    """The input data does not satisfy the schema a model needs."""


class RegistryError(MlopsError, RuntimeError):
    """A registry operation could not be carried out (unknown model, version, store)."""


class ReproductionError(MlopsError):
    """A run cannot be reproduced from its record (not a training run, no config, no checkout)."""


class GateFailed(MlopsError):
    """A promotion was refused by one or more validation gates; nothing was changed."""

    def __init__(self, message: str, gates: list = ()) -> None:  # type: ignore[assignment]
        super().__init__(message)
        self.gates = list(gates)


class ExportError(MlopsError):
    """A version could not be exported (no converter for a part of it) or its export failed
    parity with the native model; nothing was logged or tagged."""
