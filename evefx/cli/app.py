"""The Typer app every ``evefx`` command registers on, and what the commands share: the consoles,
one-line errors, warning and logging set-up, and the options that name a model.

Example:
    >>> from evefx.cli.app import app, fail
"""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, NoReturn

import typer
from rich.console import Console

from evefx import __version__
from evefx.errors import EvefxWarning

__all__ = ["app", "console", "err_console", "fail", "log_progress", "MODEL", "MODEL_KWARGS", "SPEC", "INPUT_SHAPE"]

app = typer.Typer(help="evefx: a declarative graph compiler for PyTorch models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)

# the options that name a model, shared by the commands that take one (one typer.Option serves many)
MODEL = typer.Option(..., help="package.module:attr (a class, factory or instance) or torchvision:NAME")
MODEL_KWARGS = typer.Option(None, help="constructor arguments of --model as JSON, e.g. '{\"num_classes\": 10}'")
SPEC = typer.Option(..., help="spec file")
INPUT_SHAPE = typer.Option(None, help="example input shape, e.g. 1,3,224,224", show_default="trace.input_shape")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """EvefxWarnings as one ``warning: ...`` line on stderr (no file:line of evefx's source)."""
    if issubclass(category, EvefxWarning):
        err_console.print(f"warning: {message}", style="yellow", highlight=False, markup=False, soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _version(value: bool) -> None:
    if value:
        console.print(f"evefx {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """evefx: a declarative graph compiler for PyTorch models."""
    warnings.showwarning = _show_warning
    root = logging.getLogger("evefx")
    if not root.handlers:  # the library's warnings, one line each; demo and search add progress (INFO)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # every command starts quiet (one process may run several, as tests do)


def log_progress() -> None:
    """Long jobs log their progress line by line, so a piped or redirected run shows it too."""
    logging.getLogger("evefx").setLevel(logging.INFO)
    logging.getLogger("examples").setLevel(logging.INFO)
    if not logging.getLogger("examples").handlers:
        logging.getLogger("examples").handlers = logging.getLogger("evefx").handlers


def fail(err: Exception, code: int = 1) -> NoReturn:
    """Print ``error: ...`` (one line, red, on stderr) and exit with ``code``."""
    err_console.print(f"error: {err}", style="red", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)
