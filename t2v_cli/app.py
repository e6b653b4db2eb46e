"""How every `t2v` command ends: bad input is one `error: ...` line on stderr and exit status 2.

Only typer, t2v.errors and the standard library are imported here, so that `t2v --help` prints before
torch or Prefect load.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from t2v.errors import T2VError
from t2v_cli.interrupts import Interrupts
from t2v_cli.server import prefect_server_hook

USAGE_ERROR = 2
RUN_FAILED = 1

# The click that typer parses with: recent typer releases vendor their own copy, older ones use click.
_click_errors = sys.modules[typer.BadParameter.__module__]
ClickException: type[Exception] = _click_errors.ClickException
UsageError: type[Exception] = _click_errors.UsageError
# `t2v` alone: click shows the help and exits 2 (a usage error that is not a mistake to put on one line);
# click releases before 8.2 print the help without raising.
_no_args = getattr(_click_errors, "NoArgsIsHelpError", None)
NoArgsIsHelp: tuple[type[Exception], ...] = (_no_args,) if _no_args else ()


def fail(message: object, code: int) -> NoReturn:
    """Print `message` as one `error: ...` line (library messages may span lines) and exit with `code`."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    typer.echo(f"error: {' '.join(lines)}", err=True)
    raise SystemExit(code)


class OneLineErrors(TyperGroup):
    """Reports bad input as `error: ...` and exit status 2, instead of a usage box or a traceback; ends a
    command stopped by Ctrl-C or SIGTERM with status 130 or 143 (t2v_cli.interrupts)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        # Around every command, so that the commands need nothing of their own: the signal handlers,
        # and the temporary Prefect server a flow gets without PREFECT_API_URL (t2v_cli.server).
        with Interrupts() as interrupts, prefect_server_hook():
            try:
                rv = super().main(*args, standalone_mode=False, **kwargs)
            except BaseException as exc:
                if interrupts.signum is not None:
                    # Whatever the signal unwound into (Prefect's TerminationSignal, a command's
                    # `failed` after its server call broke): stopped.
                    interrupts.exit()
                _one_line(exc)
            if interrupts.signum is not None:
                interrupts.exit()  # typer returns a KeyboardInterrupt as exit code 130; SIGTERM's is 143
        code = rv if isinstance(rv, int) else 0  # without standalone mode, typer.Exit comes back as its code
        if not standalone_mode:
            return code
        raise SystemExit(code)


def _one_line(exc: BaseException) -> NoReturn:
    """Re-raise `exc` (from inside its `except`) as one line and an exit status where it is bad input."""
    if isinstance(exc, T2VError):
        fail(exc, USAGE_ERROR)
    if isinstance(exc, NoArgsIsHelp):
        exc.show()
        raise SystemExit(USAGE_ERROR) from None
    if isinstance(exc, UsageError):  # typer.BadParameter among them
        fail(exc.format_message(), USAGE_ERROR)
    if isinstance(exc, ClickException):
        fail(exc.format_message(), exc.exit_code)
    if isinstance(exc, typer.Abort):
        fail("aborted", 130)
    raise exc


def show_t2v_log() -> None:
    """What the library logs at INFO (the plans chosen, the host and card budgets, page-locking) goes to
    the console beside Prefect's lines, and through Prefect's API handler to the run's logs in its UI
    (`PREFECT_LOGGING_EXTRA_LOGGERS`, read when Prefect is imported: after this, in the command)."""
    logging.getLogger("t2v").setLevel(logging.INFO)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "t2v")
    # Lines logged outside a flow run (the CLI's checks, a loader thread) go to the console alone.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def make_app() -> typer.Typer:
    """The app without its commands; `t2v_cli.main` adds them."""
    return typer.Typer(
        cls=OneLineErrors,
        callback=show_t2v_log,
        help="Text-to-video clips with Wan2.2 TI2V-5B, one at a time or a nightly batch.\n\n"
        "Example:\n\n    t2v nightly --catalogue data/templates.toml --model tiny",
        no_args_is_help=True,
        rich_markup_mode=None,
        add_completion=False,
        # Plain tracebacks: rich ones print local variables, the run log URL and its password among them.
        pretty_exceptions_enable=False,
    )
