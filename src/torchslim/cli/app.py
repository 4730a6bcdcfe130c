"""The ``torchslim`` command line's app: global options and the entry point. Commands live beside it, one module
per group, and call the public verbs; errors print one line (``error: ...``) and exit 1; ``--debug`` shows the
traceback."""

from __future__ import annotations

import sys
import warnings

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="torchslim: make trained PyTorch models smaller and faster while keeping their accuracy.",
)
console = Console(width=None if sys.stdout.isatty() else 100)
STATE = {"debug": False}


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE["debug"] = debug
    _reset_output()


def _reset_output() -> None:
    """A command's --quiet / --json lasts for that command only."""
    from torchslim.train.progress import quiet

    console.quiet = False
    quiet(False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app; user errors print one line unless --debug."""
    arguments = sys.argv[1:] if argv is None else argv
    debug = "--debug" in arguments
    try:
        with warnings.catch_warnings():  # --quiet silences warnings for this command only
            code = app(args=arguments, standalone_mode=False)
        if isinstance(code, int):  # typer.Exit(n) inside a command comes back as its exit code
            return code
        from torchslim.train import distributed

        distributed.leave()  # under torchrun: every rank finished; leave together
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as error:  # one clear line for any failure, traceback with --debug
        import click

        if isinstance(error, click.exceptions.Exit):
            return error.exit_code
        if isinstance(error, click.ClickException):
            error.show()
            return error.exit_code
        if debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        _reset_output()
    return 0
