"""How every `t2v` command ends: bad input is one `error: ...` line on stderr and exit status 2.

Only typer and t2v.errors are imported here, so that `t2v --help` prints before torch or Prefect load.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from t2v.errors import T2VError

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
    """Reports bad input as `error: ...` and exit status 2, instead of a usage box or a traceback."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except T2VError as exc:
            fail(exc, USAGE_ERROR)
        except NoArgsIsHelp as exc:
            exc.show()
            raise SystemExit(USAGE_ERROR) from None
        except UsageError as exc:  # typer.BadParameter among them
            fail(exc.format_message(), USAGE_ERROR)
        except ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            fail("aborted", 130)
        code = rv if isinstance(rv, int) else 0  # without standalone mode, typer.Exit comes back as its code
        if not standalone_mode:
            return code
        raise SystemExit(code)


def make_app() -> typer.Typer:
    """The app without its commands; `t2v_cli.main` adds them."""
    return typer.Typer(
        cls=OneLineErrors,
        help="Text-to-video clips with Wan2.2 TI2V-5B, one at a time or a nightly batch.\n\n"
        "Example:\n\n    t2v nightly --catalogue data/templates.toml --model tiny",
        no_args_is_help=True,
        rich_markup_mode=None,
        add_completion=False,
        # Plain tracebacks: rich ones print local variables, the run log URL and its password among them.
        pretty_exceptions_enable=False,
    )
