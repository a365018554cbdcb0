"""The engine loop: schedule -> launch -> collect, and the outputs users see."""

from __future__ import annotations

import atexit
import gc
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch.profiler import record_function

from gllm_engine.config import EngineConfig
from gllm_engine.core.detokenizer import decode_new_text, find_stop_string
from gllm_engine.core.kv_cache import KVCacheManager
from gllm_engine.core.plan_encoder import PlanEncoder
from gllm_engine.core.request import Request, Sequence
from gllm_engine.core.scheduler import Scheduler, SchedulerOutput
from gllm_engine.core.throttling import ChunkedPrefillPolicy, TokenThrottlePolicy
from gllm_engine.executor.comm import RankDiedError
from gllm_engine.executor.executor import make_executor
from gllm_engine.outputs import CompletionOutput, Logprob, RequestOutput
from gllm_engine.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """A snapshot of the engine's queues, KV cache and token counters (for /metrics and logs)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which were found cached


def load_engine_tokenizer(config: EngineConfig) -> Any:
    """The model's tokenizer, or None when it has no tokenizer files or `skip_tokenizer_init` is set."""
    model = config.model
    if model.skip_tokenizer_init or model.files.tokenizer_path is None:
        return None
    return model.files.load_tokenizer()


def _freeze_long_lived_objects() -> None:
    """Keep everything loaded so far (modules, the model's Python objects, graphs), which lives as long as
    the engine, out of the collector's full passes: they otherwise stall steps by up to 0.3 s. Unfrozen
    at exit, so that interpreter shutdown still frees it."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # registered once, however many engines a process makes
    atexit.register(gc.unfreeze)


class EngineCore:
    """Owns the scheduler, the KV-cache bookkeeping and the model runner of a single-rank engine.

    Not thread-safe: one thread drives it.
    """

    def __init__(self, config: EngineConfig, *, show_progress: bool = True):
        self.config = config
        self.tokenizer = load_engine_tokenizer(config)
        if self.tokenizer is None and not config.model.skip_tokenizer_init:
            logger.warning("%s has no tokenizer files: only token-id prompts will work", config.model.name)
        self.eos_token_ids = config.model.files.eos_token_ids(self.tokenizer)
        self.executor = make_executor(config, show_progress=show_progress)
        num_blocks = self.executor.num_blocks
        self.kv_cache = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        pp = config.parallel.pipeline_parallel_size
        policy = (TokenThrottlePolicy(pp, config.scheduler.throttle)
                  if config.scheduler.schedule_method == "token_throttling" else ChunkedPrefillPolicy())
        # Async scheduling: one rank feeds a decode its input token from the previous step's samples
        # on the device, so the next step is launched before this one's tokens reach the host.
        feeds = self.executor.feeds_pending_tokens
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, policy, decode_pending=feeds,
                                   decode_batch_sizes=self.executor.decode_graph_sizes)
        self.encoder = PlanEncoder()
        self.in_flight: deque[SchedulerOutput] = deque()  # micro-batches submitted, not yet collected
        self.max_in_flight = pp + int(feeds)
        self.max_seq_len = self.scheduler.max_seq_len
        self.requests: dict[str, Request] = {}
        # DELTA outputs: per sequence, the output tokens and text characters already reported, and
        # whether its finish was.
        self._reported: dict[int, tuple[int, int, bool]] = {}
        self._deferred: list[RequestOutput] = []  # outputs of an interrupted step, returned by the next
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        _freeze_long_lived_objects()

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, cache_salt: str | None = None) -> None:
        """Queue a request; ValueError (with the numbers) if it cannot be served.

        `cache_salt`: reuse only cached blocks of requests with the same salt (see core.kv_cache).
        """
        max_len = self.max_seq_len
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= max_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, but this engine's context is "
                             f"{max_len} tokens and at least one must be left to generate")
        vocab = self.config.model.hf_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range [0, {vocab})")
        params.eos_token_ids = tuple(self.eos_token_ids)
        req = Request.create(request_id, prompt_token_ids, params, prompt, cache_salt)
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self._num_prompt_tokens += len(prompt_token_ids)

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Finish the given requests with finish_reason "abort"; unknown ids are ignored."""
        outputs = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                self.scheduler.finish(seq, "abort")
            outputs.append(self._output(req))
            self._forget(req)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; outputs of the requests that advanced or finished, as each one's
        `output_kind` asks (FINAL_ONLY requests only once they finish).

        Keeps up to `max_in_flight` batches in flight: a pipeline's micro-batches, plus on one rank
        (async scheduling) the next step, planned and launched before the current one's tokens reach
        the host. A call collects the oldest batch when no more fit and adds its tokens to their
        sequences. If the device still has a batch to run, the call checks stop conditions and builds
        outputs, then launches what fits; if not, it launches first and does that work while the new
        batch runs. Either way a sequence that stops is computed one step further, and that token is
        dropped.
        """
        outputs, self._deferred = self._deferred, []
        ready = None
        try:
            if len(self.in_flight) >= self.max_in_flight:
                ready = self._collect()
                if self.in_flight:  # the device is busy meanwhile: stops apply before the next launch
                    outputs += self._finish(ready)
                    ready = None
            submitted = False
            while len(self.in_flight) < self.max_in_flight:
                with record_function("schedule"):
                    plan = self.scheduler.schedule()
                    if plan.is_empty:
                        break
                    self.in_flight.append(plan)
                    step_plan = self.encoder.encode(plan)
                self.executor.submit(step_plan)
                submitted = True
            if ready is None and self.in_flight and not submitted:  # nothing new to run: wait for what runs
                ready = self._collect()
        except RankDiedError:
            # The engine cannot go on: end every request (blocks back to the pool) and stop the ranks.
            self.abort_requests(list(self.requests))
            self.in_flight.clear()
            self.executor.shutdown()
            raise
        except BaseException:
            # Interrupted (Ctrl-C) or failed mid-step: the batches in flight never finished, so their
            # sequences start over and nothing they were about to write stays in the prefix cache.
            # Outputs of batches already collected come with the next call.
            self._deferred = outputs + (self._finish(ready) if ready is not None else [])
            for plan in self.in_flight:
                self.scheduler.rollback(plan)
                for s in plan.scheduled:
                    self.encoder.forget(s.seq.seq_id)
            self.in_flight.clear()
            self.executor.reset()
            raise
        if ready is not None:
            outputs += self._finish(ready)
        return outputs

    def shutdown(self) -> None:
        """Stop the ranks (a no-op for a single-rank engine)."""
        self.executor.shutdown()

    def _collect(self) -> list[tuple[Sequence, int]]:
        """Wait for the oldest batch in flight; append its sampled tokens. Returns (sequence, token) pairs."""
        sampled = self.executor.collect()
        plan = self.in_flight.popleft()
        advanced: list[tuple[Sequence, int]] = []
        row = 0
        for s in plan.scheduled:
            if not s.samples:
                continue
            seq = s.seq
            token = sampled.token_ids[row]
            entry = sampled.logprobs[row] if sampled.logprobs is not None else None
            row += 1
            seq.num_pending -= 1
            if seq.finished:  # aborted, or stopped, while its micro-batch was in flight
                continue
            if entry is not None and seq.logprobs is not None:
                seq.logprobs.append(self._logprob_entry(token, entry, seq.params.logprobs))
            seq.token_ids.append(token)
            advanced.append((seq, token))
        return advanced

    @record_function("output")
    def _finish(self, advanced: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """Detokenize the new tokens, apply stop conditions; build the outputs users see."""
        self._num_generation_tokens += len(advanced)
        new_chars = [0] * len(advanced)
        if self.tokenizer is not None:
            with record_function("detokenize"):
                new_chars = [len(decode_new_text(self.tokenizer, seq)) for seq, _ in advanced]
        touched: dict[str, Request] = {}  # requests with something to report
        final_only = RequestOutputKind.FINAL_ONLY
        for (seq, token), chars in zip(advanced, new_chars):
            self._check_finished(seq, token, chars)
            if seq.finished or seq.params.output_kind is not final_only:
                touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for req in touched.values():
            finished = req.finished
            if finished or req.params.output_kind is not final_only:
                outputs.append(self._output(req))
            if finished:
                del self.requests[req.request_id]
                self._forget(req)
        return outputs

    def _forget(self, req: Request) -> None:
        for seq in req.seqs:
            self.encoder.forget(seq.seq_id)
            self._reported.pop(seq.seq_id, None)

    def _check_finished(self, seq: Sequence, token: int, new_chars: int) -> None:
        p = seq.params
        past_min = seq.num_output_tokens >= p.min_tokens
        if past_min and not p.ignore_eos and token in p.eos_token_ids:
            self.scheduler.finish(seq, "stop")
        elif past_min and token in p.stop_token_ids:
            self.scheduler.finish(seq, "stop", token)
        elif past_min and (stop := find_stop_string(seq, new_chars)) is not None:
            self.scheduler.finish(seq, "stop", stop)
        elif seq.at_length_limit(self.max_seq_len):
            self.scheduler.finish(seq, "length")

    def _logprob_entry(self, token: int, entry: tuple, top_n: int) -> dict[int, Logprob]:
        logprob, rank, ids, vals = entry
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: None)
        result = {i: Logprob(v, r + 1, decode(i)) for r, (i, v) in enumerate(zip(ids[:top_n], vals[:top_n]))}
        if token not in result:
            result[token] = Logprob(logprob, rank, decode(token))
        return result

    def _output(self, req: Request) -> RequestOutput:
        if req.params.output_kind is RequestOutputKind.DELTA:
            outs = [out for s in req.seqs if (out := self._delta(s)) is not None]
        else:
            outs = [CompletionOutput(index=s.index, text=s.text, token_ids=s.output_token_ids,
                                     finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                                     logprobs=list(s.logprobs) if s.logprobs is not None else None)
                    for s in req.seqs]
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_token_ids=req.prompt_token_ids,
                             num_cached_tokens=max(s.num_cached_tokens for s in req.seqs),
                             finished=req.finished, outputs=outs)

    def _delta(self, seq: Sequence) -> CompletionOutput | None:
        """What `seq` gained since its last report, or None if nothing did.

        While it runs, the last len(longest stop string) - 1 characters are held back: they may
        turn out to begin a stop string, which the final text leaves out.
        """
        num_tokens, num_chars, told_finish = self._reported.get(seq.seq_id, (0, 0, False))
        end = len(seq.text)
        if seq.params.stop and not seq.finished:
            end = max(num_chars, end - max(len(s) for s in seq.params.stop) + 1)
        if seq.num_output_tokens == num_tokens and end == num_chars and told_finish == seq.finished:
            return None
        self._reported[seq.seq_id] = (seq.num_output_tokens, end, seq.finished)
        return CompletionOutput(index=seq.index, text=seq.text[num_chars:end],
                                token_ids=seq.token_ids[seq.num_prompt_tokens + num_tokens:],
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                                logprobs=seq.logprobs[num_tokens:] if seq.logprobs is not None else None)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.kv_cache.num_free_blocks, num_total_blocks=self.kv_cache.pool.num_blocks,
            kv_cache_usage=self.kv_cache.usage, num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens, num_generation_tokens=self._num_generation_tokens,
            prefix_cache_queries=self.kv_cache.num_queries, prefix_cache_hits=self.kv_cache.num_hits)
