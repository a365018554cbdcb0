"""`gllm chat`: a terminal chat, in-process or against any OpenAI-compatible server.

Both ways share the REPL and its rendering; only where the tokens come from differs (`Backend`).
"""

import itertools
import json
from collections.abc import Iterator
from dataclasses import fields
from typing import Annotated, Protocol

import typer
from rich.console import Console

from gllm_cli.errors import friendly_errors
from gllm_cli.options import with_engine_options
from gllm_engine.sampling_params import SamplingParams

HELP = "Commands: /system TEXT, /reset, /params key=value ..., /exit (or Ctrl-D). Ctrl-C stops an answer."
_PARAM_TYPES = {f.name: f.type for f in fields(SamplingParams)}


class Backend(Protocol):
    def stream(self, messages: list[dict], params: dict) -> Iterator[str]:
        """Text deltas of the assistant's answer; closing the iterator early cancels the request."""


class LocalBackend:
    """The engine in this process, stepped on this thread."""

    def __init__(self, config):
        from gllm_engine.core.engine_core import EngineCore

        self.engine = EngineCore(config)
        self._ids = itertools.count()

    def stream(self, messages: list[dict], params: dict) -> Iterator[str]:
        from gllm_engine.loader.tokenizer import apply_chat_template

        ids = apply_chat_template(self.engine.tokenizer, messages)
        rid = f"chat-{next(self._ids)}"
        sent, done = 0, False
        try:
            self.engine.add_request(rid, ids, SamplingParams(**params))
            while not done:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    done = out.finished
        finally:
            if not done:
                self.engine.abort_requests([rid])


class RemoteBackend:
    """Any OpenAI-compatible server's /v1/chat/completions, streamed."""

    def __init__(self, url: str, api_key: str | None, model: str | None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=None)
        self.model = model or self.client.get("/models").raise_for_status().json()["data"][0]["id"]

    def stream(self, messages: list[dict], params: dict) -> Iterator[str]:
        body = {"model": self.model, "messages": messages, "stream": True, **params}
        with self.client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise ValueError(response.json().get("error", {}).get("message", response.text))
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise ValueError(event["error"]["message"])
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {}).get("content")
                    if delta:
                        yield delta


def parse_params(words: list[str], current: dict) -> dict:
    """`key=value` words merged into `current`, checked by SamplingParams (ValueError names the field)."""
    updated = dict(current)
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or key not in _PARAM_TYPES:
            raise ValueError(f"unknown parameter {key!r}; use key=value with SamplingParams names "
                             f"(temperature, top_p, top_k, max_tokens, seed, ...)")
        updated[key] = json.loads(raw) if raw not in ("", "None") else None
    SamplingParams(**updated)
    return updated


def run_repl(backend: Backend, console: Console, params: dict) -> None:
    """Read questions, stream answers, keep the conversation, handle the slash commands."""
    system: str | None = None
    history: list[dict] = []
    console.print(f"[dim]{HELP}[/]")
    while True:
        try:
            line = console.input("[bold green]>>> [/]").strip()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print()
            continue
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/exit":
                return
            if command == "/reset":
                history.clear()
                console.print("[dim](conversation cleared)[/]")
            elif command == "/system":
                system = rest or None
                console.print(f"[dim](system prompt {'set' if system else 'cleared'})[/]")
            elif command == "/params":
                try:
                    params = parse_params(rest.split(), params)
                    console.print(f"[dim]{params}[/]")
                except (ValueError, json.JSONDecodeError) as e:
                    console.print(f"[red]error:[/] {e}")
            else:
                console.print(f"[red]unknown command {command}[/]. {HELP}")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        answer: list[str] = []
        stream = None
        try:
            stream = backend.stream(messages, params)
            for delta in stream:
                answer.append(delta)
                console.print(delta, end="", markup=False, highlight=False)
            console.print()
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            console.print("\n[dim](stopped)[/]")
        except ValueError as e:
            console.print(f"\n[red]error:[/] {e}")
            history.pop()
            continue
        history.append({"role": "assistant", "content": "".join(answer)})


@friendly_errors
@with_engine_options
def chat(
    model: Annotated[str | None, typer.Argument(help="HF model directory or .gguf file (default: embedded SmolLM2).")]
    = None,
    url: Annotated[str | None, typer.Option(help="Chat with an OpenAI-compatible server, e.g. http://host:8000/v1.")]
    = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --url.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 512,
    *,
    engine_kwargs: dict,
) -> None:
    """Chat with a model in the terminal, streamed."""
    console = Console(highlight=False)
    params = parse_params([], {"temperature": temperature, "max_tokens": max_tokens})
    backend: Backend
    if url:
        backend = RemoteBackend(url, api_key, model)
    else:
        from gllm_engine.config import EngineConfig

        config = EngineConfig.create(model, **engine_kwargs)  # bad options fail here, before any loading
        with console.status("Loading the model..."):
            backend = LocalBackend(config)
    run_repl(backend, console, params)
