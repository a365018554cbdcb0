"""User errors become one red line and exit code 2, never a traceback."""

import functools
import re
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from gllm_cli.options import FLAGS
from gllm_engine.loader import ModelLoadError

_err = Console(stderr=True, highlight=False, soft_wrap=True)
# Option names inside configuration errors become their flags: identifiers with an underscore
# anywhere, plain words (device, dtype, ...) only where they open the message.
_NAMES = re.compile(r"(?<![\w-])(" + "|".join(k for k in FLAGS if "_" in k) + r")\b"
                    r"|^(" + "|".join(k for k in FLAGS if "_" not in k) + r")\b")


def user_message(error: BaseException) -> str:
    """The message of a user error, with engine option names spelled as the flags that set them."""
    from gllm_engine.config import ConfigError  # (torch: only once there is an error to print)

    text = str(error)
    if isinstance(error, ConfigError):
        text = _NAMES.sub(lambda m: FLAGS[m[0]], text)
    return text


def print_error(message: str) -> None:
    """One red `error:` line on stderr, never wrapped."""
    _err.print(f"[bold red]error:[/] {escape(message)}")


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run `command`; configuration, loading and value errors print one line and exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ModelLoadError, ValueError, FileNotFoundError) as e:
            print_error(user_message(e))
            raise typer.Exit(2) from None

    return wrapper
