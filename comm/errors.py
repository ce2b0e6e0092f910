"""Expected user errors and the one wrapper every command runs under: one ``error:`` line, exit 2, no traceback."""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable
from typing import NoReturn

from comm.extras import MissingExtraError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's arguments, files or setup that is not a more specific built-in error."""


# What a command reports as one line: bad arguments and data (ValueError, the data checks' DataError included),
# missing or unreadable files (OSError), refused pickles, missing extras. Anything else is a bug: traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    OSError,
    ValueError,
    pickle.UnpicklingError,
    MissingExtraError,
)


def one_line(error: BaseException) -> str:
    """The error's message on one line (line breaks inside it become ``"; "``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 2 and lines[1].startswith("Original Traceback"):
        # torch re-raises a DataLoader worker's error with the worker's traceback in the message; the error itself
        # is the last line, "module.ErrorType: message".
        lines = [lines[-1].partition(": ")[2] or lines[-1]]
    return "; ".join(lines) or type(error).__name__


def run_command(
    body: Callable[[], int | None],
    prefix: str = "error",
    interrupted: str = "interrupted",
) -> int:
    """Run a command's body and return its exit status: the body's (None is 0), 2 for a user error, 130 on Ctrl-C.

    A user error (`USER_ERRORS`) prints ``{prefix}: {message}`` as one line on stderr; Ctrl-C prints
    ``interrupted``. Other exceptions propagate with their traceback.
    """
    try:
        status = body()
    except USER_ERRORS as error:
        print(f"{prefix}: {one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0 if status is None else int(status)


class OneLineUsageErrors:
    """An argparse mixin: a usage error is one line naming the problem (not the whole usage), exit status 2."""

    prog: str

    def error(self, message: str) -> NoReturn:
        """Print ``{prog}: error: {message} (see {prog} --help)`` on stderr and exit 2."""
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")  # type: ignore[attr-defined]


class ArgumentParser(OneLineUsageErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` with one-line usage errors; its subcommand parsers are of this class too."""
