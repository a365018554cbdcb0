"""`gllm serve`: the OpenAI-compatible server."""

import logging
import signal
import subprocess
import sys
import tempfile
import time
from typing import Annotated

import httpx
import typer

from gllm_cli.errors import friendly_errors
from gllm_cli.options import ModelArgument, with_engine_options

SERVER = "Server"


@friendly_errors
@with_engine_options
def serve(
    model: ModelArgument = None,
    host: Annotated[str, typer.Option(help="Address to listen on.", rich_help_panel=SERVER)] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", rich_help_panel=SERVER)] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="Model name clients use (default: the model's).",
                                                          rich_help_panel=SERVER)] = None,
    api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY'.", rich_help_panel=SERVER)]
    = None,
    chat_template: Annotated[str | None, typer.Option(help="Jinja chat template file or string.",
                                                      rich_help_panel=SERVER)] = None,
    max_waiting_requests: Annotated[int | None, typer.Option(help="Answer 429 beyond this many waiting requests.",
                                                             rich_help_panel=SERVER)] = None,
    shutdown_grace: Annotated[float, typer.Option(help="Seconds running requests get to finish on SIGINT/SIGTERM.",
                                                  rich_help_panel=SERVER)] = 10.0,
    access_log: Annotated[bool, typer.Option(help="Log a line per HTTP request.", rich_help_panel=SERVER)] = True,
    engine_process: Annotated[bool | None, typer.Option(
        "--engine-process/--no-engine-process",
        help="Run the engine in a process of its own, apart from HTTP (default: on a GPU or with several ranks; "
             "else an engine thread).", rich_help_panel=SERVER)] = None,
    *,
    engine_kwargs: dict,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    import uvicorn

    from gllm_engine.config import EngineConfig
    from gllm_engine.entrypoints.async_llm import AsyncLLM
    from gllm_engine.executor.executor import serve_node
    from gllm_engine.server.app import OpenAIServer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = EngineConfig.create(model, **engine_kwargs)
    if config.parallel.node_rank > 0:
        serve_node(config)  # this node only runs its ranks; node 0 serves HTTP
        return
    template = _read_template(chat_template)
    llm = AsyncLLM(config, max_waiting_requests=max_waiting_requests, engine_process=engine_process)
    server = OpenAIServer(llm, served_model_name=served_model_name, api_key=api_key, chat_template=template)
    # uvicorn handles SIGINT/SIGTERM while serving (stop accepting, let requests finish for the grace
    # period) and re-raises the signal afterwards; these no-op handlers then let us exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(server.app, host=host, port=port, log_level="info", access_log=access_log,
                    timeout_graceful_shutdown=shutdown_grace)
    finally:
        llm.shutdown(grace_s=0)  # uvicorn already gave the requests in flight their grace period


def _read_template(value: str | None) -> str | None:
    from pathlib import Path

    if value is None:
        return None
    path = Path(value)
    return path.read_text() if path.is_file() else value


def spawn_server(*args: str, timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`gllm serve ARGS` (CPU unless --device is given) on a free local port, as a child process.

    Returns the process and its base URL once /health answers; if the server exits first, the
    RuntimeError carries the end of its log.
    """
    from gllm_engine.executor.launcher import free_port

    port = free_port()
    if "--device" not in args:
        args = ("--device", "cpu", *args)
    log = tempfile.TemporaryFile()  # the child keeps writing to it after we let go of it
    proc = subprocess.Popen([sys.executable, "-m", "gllm_cli.main", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    with log:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-15:]
                raise RuntimeError(f"server exited with code {proc.returncode}:\n" + "\n".join(tail))
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout_s:.0f} s")
