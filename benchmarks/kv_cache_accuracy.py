"""What an 8-bit KV cache changes in a real model's output: ShareGPT questions answered greedily by the
same model with its KV cache in the model dtype, in fp8 and in int8, for each of `--dtypes`, one table.

Each question goes through the model's chat template; every engine answers greedily, `--output-len`
tokens (ignore_eos). Reported against the first run (the first dtype, its own cache dtype): the share
of answer tokens before the first disagreement, the share of answers identical to the end, and the
share with the same first token; beside them the cache's bytes per token. The bfloat16 rows give the
scale: how much rounding the model itself to 16 bits already changes.

    python benchmarks/kv_cache_accuracy.py --device cpu --num-prompts 100 --output-len 64
"""

from __future__ import annotations

import argparse
import gc

from rich.console import Console
from rich.table import Table

from gllm_cli.datasets import read_sharegpt, sample_sharegpt
from gllm_engine import LLM, SamplingParams

CACHE_DTYPES = ("auto", "fp8", "int8")


def chat_prompts(llm: LLM, num: int, seed: int) -> list[list[int]]:
    """The first question of `num` ShareGPT conversations, in the model's chat template, as token ids."""
    tokenizer = llm.engine.tokenizer
    questions = sample_sharegpt(read_sharegpt().records, tokenizer, num, seed=seed)
    return [tokenizer.apply_chat_template([{"role": "user", "content": q.prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for q in questions]


def agreement(answers: list[list[int]], reference: list[list[int]]) -> tuple[float, float, float]:
    """(tokens before the first disagreement, identical answers, same first token), each a share."""
    agreed = identical = first = 0
    for a, b in zip(answers, reference):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        agreed += n
        identical += n == len(b)
        first += n > 0
    total = sum(map(len, reference))
    return agreed / total, identical / len(reference), first / len(reference)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="model dtypes, comma-separated; the first is the "
                                                                 "reference")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    runs = [(dtype, cache) for dtype in args.dtypes.split(",") for cache in CACHE_DTYPES]
    answers, token_bytes, prompts, name = {}, {}, None, ""
    for dtype, cache in runs:
        llm = LLM(args.model, device=args.device, dtype=dtype, kv_cache_dtype=cache, show_progress=False)
        if prompts is None:
            prompts = chat_prompts(llm, args.num_prompts, args.seed)
        runner = llm.engine.executor.runner
        token_bytes[dtype, cache] = runner.kv_block_bytes() // runner.block_size
        name = llm.config.model.name
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        answers[dtype, cache] = [o.outputs[0].token_ids for o in outs]
        del llm, runner
        gc.collect()

    table = Table(title=f"KV-cache dtype vs greedy answers: {name}, {len(prompts)} ShareGPT questions, "
                        f"{args.output_len} tokens each, against the first row")
    for col in ("model dtype", "KV cache", "bytes per token", "tokens before the first disagreement",
                "identical answers", "same first token"):
        table.add_column(col, justify="left" if col in ("model dtype", "KV cache") else "right")
    for dtype, cache in runs:
        tokens, identical, first = agreement(answers[dtype, cache], answers[runs[0]])
        table.add_row(dtype, "model dtype" if cache == "auto" else cache, f"{token_bytes[dtype, cache]:,}",
                      f"{tokens:.1%}", f"{identical:.1%}", f"{first:.1%}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
