"""The embedded default model, SmolLM2-135M-Instruct (GGUF), end to end against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gllm_engine import LLM, SamplingParams
from gllm_engine.loader.default_model import default_model_path
from gllm_engine.loader.tokenizer import apply_chat_template

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", show_progress=False)


def test_capital_of_france_is_paris(llm):
    out = llm.chat([{"role": "user", "content": QUESTIONS[0]}], SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in out[0].outputs[0].text


def test_greedy_chat_equals_transformers_on_the_same_gguf(llm):
    path = Path(default_model_path())
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    ours = llm.chat(convs, SamplingParams(temperature=0, max_tokens=24))
    for conv, out in zip(convs, ours):
        ids = apply_chat_template(tok, conv)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        got = out.outputs[0].token_ids
        # transformers stops at EOS and keeps it; so do we (finish_reason "stop").
        assert got == ref[: len(got)] and len(got) == len(ref), (conv, got, ref)
