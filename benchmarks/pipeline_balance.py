"""Simulated pipeline of P stages driven by the real scheduler, without a model.

Each micro-batch spends `overhead + per_token * tokens` seconds in every stage; P micro-batches
are in flight; a finished micro-batch's sequences get their tokens and the next one is formed.
Compares token throttling with greedy first-come micro-batching on a ShareGPT-like trace and
prints the spread of per-micro-batch token counts (the pipeline bubbles) and the throughput.

    python benchmarks/pipeline_balance.py --pp 4 --requests 400
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from gllm_engine.config import SchedulerConfig
from gllm_engine.core.kv_cache import KVCacheManager
from gllm_engine.core.request import Request
from gllm_engine.core.scheduler import Scheduler
from gllm_engine.core.throttling import ChunkedPrefillPolicy, TokenThrottlePolicy
from gllm_engine.sampling_params import SamplingParams


@dataclass
class TraceRequest:
    arrival: float
    prompt_len: int
    output_len: int


def sharegpt_like_trace(num: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    """Poisson arrivals; log-normal prompt and output lengths shaped like ShareGPT's (medians ~ 100-200)."""
    rng = random.Random(seed)
    t, trace = 0.0, []
    for _ in range(num):
        t += rng.expovariate(rate)
        prompt = min(1024, max(4, int(rng.lognormvariate(5.0, 1.0))))
        output = min(2048 - prompt, max(4, int(rng.lognormvariate(5.2, 0.9))))
        trace.append(TraceRequest(t, prompt, output))
    return trace


@dataclass
class SimResult:
    policy: str
    batch_tokens: list[int]
    duration: float
    output_tokens: int

    pp: int = 1

    @property
    def cv(self) -> float:
        """Coefficient of variation of micro-batch token counts."""
        return statistics.pstdev(self.batch_tokens) / statistics.mean(self.batch_tokens)

    @property
    def bubble(self) -> float:
        """Mean idle share of the stages over each round of P consecutive micro-batches (1 - mean/max).

        The micro-batches of one round share the pipeline, so the largest sets the pace for all.
        """
        rounds = [self.batch_tokens[i:i + self.pp] for i in range(0, len(self.batch_tokens) - self.pp + 1, self.pp)]
        return statistics.mean(1 - statistics.mean(r) / max(r) for r in rounds)


def simulate(trace: list[TraceRequest], pp: int, throttle: bool, num_blocks: int = 4096, block_size: int = 16,
             max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, overhead: float = 2e-3,
             per_token: float = 2e-5) -> SimResult:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=4096)
    policy = TokenThrottlePolicy(pp) if throttle else ChunkedPrefillPolicy()
    sched = Scheduler(cfg, KVCacheManager(num_blocks, block_size), policy)
    pending = sorted(trace, key=lambda r: r.arrival)
    targets: dict[int, int] = {}
    now, next_arrival = 0.0, 0
    stage_free = [0.0] * pp
    in_flight: list[tuple[float, int, object]] = []  # (finish time, tiebreak, plan)
    batch_tokens, output_tokens, counter = [], 0, 0
    while next_arrival < len(pending) or sched.num_unfinished or in_flight:
        while next_arrival < len(pending) and pending[next_arrival].arrival <= now:
            r = pending[next_arrival]
            seq = Request.create(str(next_arrival), [1] * r.prompt_len, SamplingParams(max_tokens=r.output_len)).seqs[0]
            targets[seq.seq_id] = r.output_len
            sched.add(seq)
            next_arrival += 1
        plan = sched.schedule() if len(in_flight) < pp else None
        if plan is not None and not plan.is_empty:
            start = max(now, stage_free[0])
            t = start
            for stage in range(pp):  # the micro-batch walks the stages in order
                t = max(t, stage_free[stage]) + overhead + per_token * plan.num_tokens
                stage_free[stage] = t
            heapq.heappush(in_flight, (t, counter, plan))
            counter += 1
            batch_tokens.append(plan.num_tokens)
            continue
        # Advance time to the next event: a micro-batch leaving the pipeline, or an arrival.
        times = [in_flight[0][0]] if in_flight else []
        if next_arrival < len(pending):
            times.append(pending[next_arrival].arrival)
        now = max(now, min(times))
        while in_flight and in_flight[0][0] <= now:
            _, _, done = heapq.heappop(in_flight)
            for s in done.scheduled:
                if s.samples:
                    s.seq.num_pending -= 1
                if s.samples and not s.seq.finished:
                    s.seq.token_ids.append(2)
                    output_tokens += 1
                    if s.seq.num_output_tokens >= targets[s.seq.seq_id]:
                        sched.finish(s.seq, "length")
    return SimResult("token throttling" if throttle else "greedy first-come", batch_tokens, now, output_tokens, pp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=50.0, help="arrivals per simulated second")
    args = ap.parse_args()
    trace = sharegpt_like_trace(args.requests, args.rate)
    table = Table(title=f"{args.pp}-stage pipeline, {args.requests} ShareGPT-like requests (simulated)")
    for col in ("policy", "micro-batches", "mean tokens", "CV", "bubble", "output tok/s"):
        table.add_column(col, justify="right")
    for throttle in (False, True):
        r = simulate(trace, args.pp, throttle)
        table.add_row(r.policy, str(len(r.batch_tokens)), f"{statistics.mean(r.batch_tokens):.0f}", f"{r.cv:.2f}",
                      f"{r.bubble:.1%}", f"{r.output_tokens / r.duration:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
