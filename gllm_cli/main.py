"""The `gllm` command: one Typer app, a subcommand per workflow."""

import typer

from gllm_cli.chat import chat
from gllm_cli.serve import serve

app = typer.Typer(name="gllm", help="gLLM: serve, chat with, benchmark and evaluate LLMs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=True)
app.command()(serve)
app.command()(chat)

if __name__ == "__main__":
    app()
