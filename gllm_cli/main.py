"""The `gllm` command: one Typer app, a subcommand per workflow (each in its own module)."""

import sys
from typing import Any

import typer

from gllm_cli.bench import bench
from gllm_cli.chat import chat
from gllm_cli.errors import print_error
from gllm_cli.eval_mmlu_pro import eval_app
from gllm_cli.profile import profile
from gllm_cli.serve import serve

# The click that this typer parses with (recent typer versions vendor their own copy).
_click = getattr(typer.core, "_click", None) or __import__("click")
_errors = _click.exceptions


class _Gllm(typer.Typer):
    """Typer, but a usage error (unknown flag, bad value) is one line naming it instead of a box."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except _errors.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # the help is already on screen
                sys.exit(e.exit_code)
            hint = f"; see '{e.ctx.command_path} --help'" if e.ctx is not None else ""
            print_error(e.format_message() + hint)
            sys.exit(e.exit_code)
        except _errors.ClickException as e:
            print_error(e.format_message())
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.exit(1)
        if isinstance(code, int) and code:  # typer.Exit(code) raised by a command
            sys.exit(code)
        return code


app = _Gllm(name="gllm", help="gLLM: serve, chat with, benchmark and evaluate LLMs.", no_args_is_help=True,
            pretty_exceptions_enable=False, add_completion=True)
app.command()(serve)
app.command()(chat)
app.command()(bench)
app.add_typer(eval_app)
app.command()(profile)

if __name__ == "__main__":
    app()
