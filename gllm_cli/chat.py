"""`gllm chat`: a terminal chat, in-process or against any OpenAI-compatible server.

Both ways share the REPL and its rendering; only where the tokens come from differs (`Backend`).
"""

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Annotated, Protocol

import typer
from rich.console import Console

from gllm_cli.errors import friendly_errors
from gllm_cli.options import ModelOrServedArgument, with_engine_options
from gllm_cli.remote import checked
from gllm_engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from gllm_engine.config import EngineConfig

HELP = "Commands: /system TEXT, /reset, /params key=value ..., /exit (or Ctrl-D). Ctrl-C stops an answer."
_PARAMS = {f.name for f in fields(SamplingParams)} - {"output_kind", "eos_token_ids"}  # what users may set


class Backend(Protocol):
    def stream(self, messages: list[dict], params: dict) -> Iterator[str]:
        """Text deltas of the assistant's answer; closing the iterator early cancels the request."""


class LocalBackend:
    """The engine in this process, stepped on this thread."""

    def __init__(self, config: "EngineConfig"):
        from gllm_engine.core.engine_core import EngineCore

        self.engine = EngineCore(config)
        if self.engine.tokenizer is None:
            raise ValueError(f"{config.model.name} has no tokenizer, so it cannot chat")
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
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=None)
        if model is None:
            try:
                response = self.client.get("/models")
            except httpx.HTTPError as e:
                raise ValueError(f"cannot reach {self.url}: {e}") from None
            self.model = checked(response).json()["data"][0]["id"]
        else:
            self.model = model

    def stream(self, messages: list[dict], params: dict) -> Iterator[str]:
        import httpx

        body = {"model": self.model, "messages": messages, "stream": True, **params}
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    checked(response)
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
        except httpx.HTTPError as e:
            raise ValueError(f"lost the connection to {self.url}: {e}") from None


def parse_params(words: list[str], current: dict) -> dict:
    """`key=value` words merged into `current`, checked by SamplingParams (ValueError names the field)."""
    updated = dict(current)
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or key not in _PARAMS:
            raise ValueError(f"unknown parameter {key!r}; use key=value with SamplingParams names "
                             f"(temperature, top_p, top_k, max_tokens, seed, ...)")
        try:
            updated[key] = json.loads(raw) if raw not in ("", "None", "null") else None
        except json.JSONDecodeError:
            raise ValueError(f"{key}: {raw!r} is not a number, true/false or a quoted string") from None
    try:
        SamplingParams(**updated)
    except TypeError:  # a value of the wrong type, e.g. temperature="hot"
        raise ValueError(f"wrong type among {', '.join(f'{k}={v!r}' for k, v in updated.items())}") from None
    return updated


@dataclass
class Conversation:
    """What the REPL remembers: sampling parameters, the system prompt and the turns so far."""

    params: dict
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, line: str) -> str | None:
        """Apply one slash command; returns the note to show (markup-free), or None for /exit."""
        command, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if command == "/exit":
            return None
        if command == "/reset":
            self.history.clear()
            return "(conversation cleared)"
        if command == "/system":
            self.system = rest or None
            return f"(system prompt {'set' if self.system else 'cleared'})"
        if command == "/params":
            try:
                self.params = parse_params(rest.split(), self.params)
            except ValueError as e:
                return f"error: {e}"
            return ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"unknown command {command}. {HELP}"


def run_repl(backend: Backend, console: Console, params: dict) -> None:
    """Read questions, stream answers, keep the conversation, handle the slash commands."""
    chat = Conversation(params)
    console.print(HELP, style="dim", markup=False)
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
            note = chat.command(line)
            if note is None:
                return
            console.print(note, style="red" if note.startswith(("error", "unknown")) else "dim", markup=False)
            continue
        chat.history.append({"role": "user", "content": line})
        answer: list[str] = []
        stream = None
        try:
            stream = backend.stream(chat.messages(), chat.params)
            for delta in stream:
                answer.append(delta)
                console.print(delta, end="", markup=False, highlight=False)
            console.print()
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            console.print("\n(stopped)", style="dim", markup=False)
        except ValueError as e:
            console.print(f"\nerror: {e}", style="red", markup=False)
            chat.history.pop()
            continue
        chat.history.append({"role": "assistant", "content": "".join(answer)})


@friendly_errors
@with_engine_options
def chat(
    model: ModelOrServedArgument = None,
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
