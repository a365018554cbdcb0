"""User errors become one red line and exit code 2, never a traceback."""

import functools
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from gllm_engine.loader import ModelLoadError

_err = Console(stderr=True)


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run `command`; configuration, loading and value errors print one line and exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ModelLoadError, ValueError, FileNotFoundError) as e:
            _err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper
