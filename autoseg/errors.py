"""Domain errors. Each carries one line for the user: what is wrong, where, and how to fix it.

The CLI catches :class:`AutosegError` and prints ``str(error)`` without a traceback; anything
else reaching the CLI is a bug in autoseg and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AutosegError(Exception):
    """Base class of every error caused by user input (data, options, files)."""

    exit_code: int = 1


class DatasetError(AutosegError):
    """The raw dataset cannot be read or is invalid."""


class PlanError(AutosegError):
    """Planning failed, or a plans file is invalid."""


class ConfigError(AutosegError):
    """An option, preset or configuration file has an invalid value."""

    exit_code = 2


class UnknownNameError(ConfigError):
    """A name (preset, scheme, configuration, key) is not one of the known ones."""

    def __init__(self, kind: str, name: str, known: Iterable[str], where: str = "") -> None:
        known_sorted = sorted(known)
        self.kind, self.name, self.known = kind, name, known_sorted
        super().__init__(f"{where}{'' if not where else ': '}unknown {kind} {name!r}{did_you_mean(name, known_sorted)}")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """A suffix for an error message: ``"; did you mean 'x'?"`` or the list of valid names."""
    known_list = sorted(known)
    by_lower = {k.lower(): k for k in known_list}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {by_lower[close[0]]!r}?"
    if len(known_list) > 12:
        return f"; expected one of: {', '.join(repr(k) for k in known_list[:12])}, ..."
    return f"; expected one of: {', '.join(repr(k) for k in known_list)}"
