"""The chat REPL's logic with a scripted terminal and a recording backend (no model needed)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from gllm_cli.chat import Conversation, parse_params, run_repl


class ScriptedConsole(Console):
    """A console whose input comes from a list; an exception in the list is raised instead."""

    def __init__(self, lines: list):
        super().__init__(file=io.StringIO(), width=200, color_system=None)
        self.lines = list(lines)

    def input(self, prompt: str = "", **kwargs) -> str:
        self.print(prompt, end="")
        item = self.lines.pop(0) if self.lines else EOFError()
        if isinstance(item, BaseException):
            raise item
        self.print(item)
        return item

    @property
    def text(self) -> str:
        return self.file.getvalue()


class RecordingBackend:
    """Answers "ans-N" in two deltas; on `interrupt_at` it raises KeyboardInterrupt after the first delta."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[tuple[list[dict], dict]] = []
        self.closed = 0
        self.interrupt_at = interrupt_at

    def stream(self, messages, params):
        self.calls.append(([dict(m) for m in messages], dict(params)))
        n = len(self.calls)
        try:
            yield f"ans-{n}"
            if n == self.interrupt_at:
                raise KeyboardInterrupt
            yield "!"
        finally:
            self.closed += 1


def test_parse_params():
    assert parse_params(["temperature=0.5", "max_tokens=8", "stop=[\"x\"]", "seed=None"], {"top_k": 3}) == \
        {"top_k": 3, "temperature": 0.5, "max_tokens": 8, "stop": ["x"], "seed": None}
    for words, fragment in [(["warmth=3"], "unknown parameter 'warmth'"), (["temperature"], "unknown parameter"),
                            (["temperature=-1"], "temperature must be >= 0"), (["top_p=hot"], "top_p"),
                            (['temperature="hot"'], "wrong type"), (["output_kind=2"], "unknown parameter")]:
        with pytest.raises(ValueError, match=fragment):
            parse_params(words, {})


def test_conversation_commands():
    chat = Conversation({"temperature": 0.7})
    chat.history += [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert chat.command("/system  Be brief. ") == "(system prompt set)"
    assert chat.messages()[0] == {"role": "system", "content": "Be brief."} and len(chat.messages()) == 3
    assert chat.command("/reset") == "(conversation cleared)"
    assert chat.messages() == [{"role": "system", "content": "Be brief."}]
    assert chat.command("/system") == "(system prompt cleared)" and chat.messages() == []
    assert chat.command("/params max_tokens=5") == "temperature=0.7, max_tokens=5"
    assert chat.command("/params max_tokens=0").startswith("error: max_tokens must be")
    assert chat.params == {"temperature": 0.7, "max_tokens": 5}  # a bad /params changes nothing
    assert chat.command("/wat").startswith("unknown command /wat")
    assert chat.command("/exit") is None


def test_repl_keeps_the_conversation_and_survives_ctrl_c():
    backend = RecordingBackend(interrupt_at=2)  # Ctrl-C while the second answer streams
    console = ScriptedConsole(["/system Be kind.", "hello", "tell me more", KeyboardInterrupt(),  # Ctrl-C at the prompt
                               "/params seed=3", "go on", "/reset", "again"])
    run_repl(backend, console, {"temperature": 0.0})
    first, second, third, fourth = backend.calls
    assert first[0] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello"}]
    assert second[0][-2:] == [{"role": "assistant", "content": "ans-1!"}, {"role": "user", "content": "tell me more"}]
    # The interrupted answer stays as far as it got; /params applies from the next question on.
    assert third[0][-2:] == [{"role": "assistant", "content": "ans-2"}, {"role": "user", "content": "go on"}]
    assert (second[1], third[1]) == ({"temperature": 0.0}, {"temperature": 0.0, "seed": 3})
    assert fourth[0] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "again"}]
    assert backend.closed == 4  # every stream was closed, the interrupted one included
    assert "ans-1!" in console.text and "(stopped)" in console.text and "(conversation cleared)" in console.text


def test_repl_reports_backend_errors_and_forgets_the_question():
    class Failing:
        def stream(self, messages, params):
            raise ValueError("the server answered 400: nope")
            yield

    console = ScriptedConsole(["hi", "/exit", "never read"])
    run_repl(Failing(), console, {})
    assert "error: the server answered 400: nope" in console.text and console.lines == ["never read"]
