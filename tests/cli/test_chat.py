"""`gllm chat` through a pseudo-terminal, as a person uses it: in-process and against a server."""

from __future__ import annotations

import os
import re
import signal
import sys

import pexpect
import pytest

from gllm_cli.serve import spawn_server as start_server

PROMPT = ">>> "


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "gllm_cli.main", "chat", "--temperature", "0", *args],
                          encoding="utf-8", timeout=120, dimensions=(40, 200), env={**os.environ, "NO_COLOR": "1"})
    child.expect_exact(PROMPT)
    return child


def ask(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect_exact(PROMPT)
    return child.before


def converse(child: pexpect.spawn) -> None:
    assert "Paris" in ask(child, "What is the capital of France?")
    assert "(conversation cleared)" in ask(child, "/reset")
    assert "temperature" in ask(child, "/params max_tokens=400 temperature=0")
    assert "unknown parameter" in ask(child, "/params warmth=3")
    # Ctrl-C during a long answer stops it, and the chat goes on.
    child.sendline("Write a very long story about a dragon.")
    child.expect_exact("dragon.\r\n")  # our line echoed
    child.expect(r"\w+ \w+ \w+")  # then some of the answer streamed
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact(PROMPT)
    assert "Paris" in ask(child, "What is the capital of France? One word.")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_in_process():
    converse(spawn("--device", "cpu"))


@pytest.fixture
def server():
    proc, url = start_server()
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def test_chat_against_a_server(server):
    converse(spawn("--url", f"{server}/v1"))


def test_bad_option_is_one_line():
    child = pexpect.spawn(sys.executable, ["-m", "gllm_cli.main", "chat", "--device", "tpu"], encoding="utf-8",
                          timeout=60, env={**os.environ, "NO_COLOR": "1"})
    child.expect(pexpect.EOF)
    child.close()
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before).strip()
    assert child.exitstatus == 2 and "Traceback" not in out
    assert out.splitlines() == ["error: --device must be 'auto', 'cpu' or 'cuda[:N]', got 'tpu'"]
