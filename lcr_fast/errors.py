"""The errors that mean "your input is wrong", and the wrapper every command line runs under.

Such an error ends a command with one line ``error: <message>`` on stderr and exit status 2, no
traceback: the message names the argument, file or setting to change, and a traceback would bury it.
Every such error derives from ``UserError``; this module imports nothing of lcr_fast, so any module
can define one.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """An input (argument, file, setting, machine) the command cannot use; ``run_cli`` prints it in one line."""


class NonFiniteLossError(UserError, RuntimeError):
    """A loss term became NaN or infinite; training stops before writing another checkpoint."""


class InputError(UserError, ValueError):
    """An argument or input file that cannot be used."""


class FallbackError(UserError, RuntimeError):
    """A component cannot take its fast path here, and strict mode (``engine.strict``, or
    ``kernels.backend=triton`` for the kernels) forbids the fallback that would replace it."""


# What run_cli reports in one line: a file that does not exist is the user's input too.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, FileNotFoundError)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``: exit status 0, or 2 after one line ``error: ...`` on stderr for any error
    of ``USER_ERRORS``. argparse's SystemExit (usage errors, --help) passes through as it is."""
    try:
        main(argv)
    except USER_ERRORS as exc:
        # One line, so that scripts can grep it and the message is not split from its "error:".
        message = " ".join(str(exc).splitlines()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
