"""User errors, and how every entry point reports them. The lowest floor: imports nothing of the package.

A user error is one the person at the keyboard can fix — a config key, a flag, a path, a data file, a stage's
lineage, the way processes were launched. Entry points (`pipeline …`, `recipes/*.py`) run through
`run_entry_point`: a user error prints one line, `error: <message>`, on stderr and exits 1, with no traceback.
`--debug` anywhere on the command line, or PIPELINE_DEBUG=1, shows the traceback. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable, Iterable


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
    """A bad key, value or combination in a stage config or on the command line; YAML problems start with
    `file:line: key:`."""


class DataError(UserError, ValueError):
    """A dataset that cannot be read or used as asked (a missing file, a bad row in strict mode, a wrong format)."""


class LaunchError(UserError, RuntimeError):
    """A distributed misconfiguration: processes that would not train together as launched."""


# A missing or already-existing path is the user's to fix too; these come from the standard library unwrapped.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError)

DEBUG_FLAG = "--debug"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether tracebacks were asked for, argv without `--debug`)."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    return len(rest) != len(argv) or os.environ.get("PIPELINE_DEBUG", "") not in ("", "0"), rest


def run_entry_point(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Call `main(argv)` (argv without `--debug`); a user error becomes one line on stderr and exit status 1."""
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
