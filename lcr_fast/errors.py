"""The errors that mean "your input is wrong", and the wrapper every command line runs under.

Such an error ends a command with one line ``error: <message>`` on stderr and exit status 2, no
traceback: the message names the argument, file or setting to change, and a traceback would bury it.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training stops before writing another checkpoint."""


class InputError(ValueError):
    """An argument or input file that cannot be used."""


class FallbackError(RuntimeError):
    """A component cannot take its fast path here, and strict mode (``engine.strict``, or
    ``kernels.backend=triton`` for the kernels) forbids the fallback that would replace it."""


@functools.cache
def _user_errors() -> tuple[type[Exception], ...]:
    # Imported on first use, not at module level: the modules that define these classes may import
    # this one (for InputError or NonFiniteLossError), which would otherwise be an import cycle.
    from .checkpoint import CheckpointLockError, CheckpointWriteError, NotACheckpointError, UnsafeCheckpointError
    from .compat import CheckpointMismatchError
    from .config import ConfigError
    from .data.folder import DatasetError
    from .engine import ProcessGroupError
    from .models.backbone import PretrainedWeightsError

    return (ConfigError, DatasetError, CheckpointMismatchError, UnsafeCheckpointError, CheckpointWriteError,
            CheckpointLockError, NotACheckpointError, FileNotFoundError, NonFiniteLossError, InputError,
            ProcessGroupError, PretrainedWeightsError, FallbackError)


def __getattr__(name: str) -> tuple[type[Exception], ...]:
    # USER_ERRORS is resolved lazily (PEP 562) for the same reason as _user_errors' imports.
    if name == "USER_ERRORS":
        return _user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``: exit status 0, or 2 after one line ``error: ...`` on stderr for any error
    of USER_ERRORS. argparse's SystemExit (usage errors, --help) passes through as it is."""
    user_errors = _user_errors()
    try:
        main(argv)
    except user_errors as exc:
        # One line, so that scripts can grep it and the message is not split from its "error:".
        message = " ".join(str(exc).splitlines()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
