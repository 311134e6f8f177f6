"""Exceptions for problems a user can fix.

Their messages are one line that names the file, option or value at fault and the fix; the CLI
prints them without a traceback (exit code 2 for usage errors, 1 for the rest). Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatxError(Exception):
    """A problem with the data, the files or the environment (CLI exit code 1)."""

    exit_code = 1


class UsageError(FeatxError):
    """An invalid option, argument or data spec (CLI exit code 2)."""

    exit_code = 2


class Interrupted(FeatxError):
    """Ctrl-C during a long run; what was done is kept (CLI exit code 130)."""

    exit_code = 130


def closest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """A short 'did you mean' list for an unknown `name` among `choices`."""
    choices = list(choices)
    best = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not best:
        best = [c for c in choices if name.lower() in c.lower()][:n]
    return ", ".join(best) if best else ", ".join(choices[:n]) + (", ..." if len(choices) > n else "")


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of `e`'s message, at most `limit` characters; its type's name when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__
