"""Token sampling on the device: penalties, temperature, top-k/top-p/min-p, seeds and logprobs.

Random sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which draws one vector
per row, so a seeded request's draws depend only on its own generator, never on its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gllm_engine.kernels import reference
from gllm_engine.runner.input_batch import SeqState


@dataclass
class SamplingBatch:
    """Per-row sampling settings of the sequences sampled in a step."""

    temperature: torch.Tensor | None  # [N] float32, 1.0 on greedy rows (None when all rows are greedy)
    greedy: torch.Tensor | None  # [N] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [N] int64, vocab size where disabled
    top_p: torch.Tensor | None  # [N] float32
    min_p: torch.Tensor | None  # [N] float32
    generators: dict[int, torch.Generator]  # row -> seeded generator
    banned: list[tuple[int, list[int]]]  # rows below min_tokens: token ids they may not sample yet
    penalty_rows: list[int]
    penalty_seqs: list[SeqState]
    max_logprobs: int | None  # largest top-N any row asked for

    @classmethod
    def build(cls, seqs: list[SeqState], device: torch.device, vocab_size: int,
              generators: dict[int, torch.Generator]) -> SamplingBatch:
        """`generators` maps seq_id to that sequence's seeded generator (created on first use)."""
        params = [s.params for s in seqs]
        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        rows_gen = {}
        if not all_greedy:
            for row, seq in enumerate(seqs):
                if seq.params.seed is not None and not greedy[row]:
                    gen = generators.get(seq.seq_id)
                    if gen is None:
                        gen = generators[seq.seq_id] = torch.Generator(device=device).manual_seed(seq.params.seed)
                    rows_gen[row] = gen
        banned = []
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.min_tokens and seq.num_output_tokens < p.min_tokens:
                ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(p.eos_token_ids))
                if ids:
                    banned.append((row, ids))
        penalty_rows = [row for row, p in enumerate(params) if p.has_penalties]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        random_rows = not all_greedy
        any_top_k = random_rows and any(p.top_k > 0 for p in params)
        any_top_p = random_rows and any(p.top_p < 1.0 for p in params)
        any_min_p = random_rows and any(p.min_p > 0.0 for p in params)
        wants = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32)
            if random_rows else None,
            greedy=tensor(greedy, torch.bool) if random_rows else None,
            all_greedy=all_greedy,
            top_k=tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64)
            if any_top_k else None,
            top_p=tensor([p.top_p for p in params], torch.float32) if any_top_p else None,
            min_p=tensor([p.min_p for p in params], torch.float32) if any_min_p else None,
            generators=rows_gen,
            banned=banned,
            penalty_rows=penalty_rows,
            penalty_seqs=[seqs[r] for r in penalty_rows],
            max_logprobs=max(wants) if wants else None,
        )


@dataclass
class SamplerOutput:
    """One step's sampled tokens on the host, one per sampling row."""

    token_ids: list[int]
    # Per row: (sampled token logprob, its rank, top-N ids, top-N logprobs), when logprobs were asked for.
    logprobs: list[tuple[float, int, list[int], list[float]]] | None = None


@dataclass
class PendingSample:
    """A step's sampled tokens while they are still on the device; `to_host` waits for them.

    Returning this instead of host lists lets the engine schedule and launch the next step before
    the GPU has finished this one. On a GPU, `start_copy` queues the copy to pinned host memory
    right behind the sampling kernels, so `to_host` waits for this step only, not for steps
    launched after it.
    """

    tokens: torch.Tensor  # [N] int64
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # chosen, rank, top ids, top
    # Per row, set by the runner: its mirror of the sequence and the token's position there, where a
    # later step may already hold a placeholder (`ModelRunner.collect` fills it in).
    positions: list[tuple[SeqState, int]] = field(default_factory=list)
    _host: list[torch.Tensor] | None = None
    _copied: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """On a GPU, queue the copy of the samples to pinned host memory behind the kernels that made them."""
        if self.tokens.device.type != "cuda":
            return
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                      for t in (self.tokens, *(self.logprobs or ()))]
        self._copied = torch.cuda.Event()
        self._copied.record()

    def to_host(self) -> SamplerOutput:
        """Wait for the samples and return them as host lists."""
        if self._copied is not None:
            self._copied.synchronize()
            tokens, *logprobs = self._host
        else:
            tokens, *logprobs = (self.tokens, *(self.logprobs or ()))
        token_list = tokens.tolist()
        if not logprobs:
            return SamplerOutput(token_list)
        chosen, ranks, top_ids, top_vals = (t.tolist() for t in logprobs)
        return SamplerOutput(token_list, list(zip(chosen, ranks, top_ids, top_vals)))


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    vocab = logits.shape[-1]
    for row, seq in zip(batch.penalty_rows, batch.penalty_seqs):
        p = seq.params
        out_ids = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=logits.device)
        counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
        counts.scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
        row_logits = logits[row]
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            seen[torch.tensor(seq.token_ids, dtype=torch.int64, device=logits.device)] = True
            penalized = torch.where(row_logits > 0, row_logits / p.repetition_penalty,
                                    row_logits * p.repetition_penalty)
            row_logits = torch.where(seen, penalized, row_logits)
        row_logits = row_logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(counts)
        logits[row] = row_logits


def _filter(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k / top-p / min-p; logits are already temperature-scaled."""
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if batch.top_k is None and batch.top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if batch.top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        mask |= ranks >= batch.top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    if batch.top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        mask |= before > batch.top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch, argmax: Callable = reference.argmax) -> PendingSample:
    """Sample one token per row of `logits` `[N, V]` (the model's dtype), without waiting for the device.

    A batch of plain greedy rows takes the argmax of the logits as they are (widening changes no
    order); anything else is computed on float32 logits. `argmax` picks the largest entry of each
    row (the kernel set's: `KernelOps.argmax`)."""
    if batch.all_greedy and batch.max_logprobs is None and not batch.banned and not batch.penalty_rows:
        return PendingSample(argmax(logits))
    logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1) if batch.max_logprobs is not None else None
    for row, ids in batch.banned:
        logits[row, ids] = float("-inf")
    if batch.penalty_rows:
        _apply_penalties(logits, batch)

    if batch.all_greedy:
        tokens = argmax(logits)
    else:
        scaled = _filter(logits / batch.temperature[:, None], batch)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in batch.generators.items():
            noise[row].exponential_(generator=gen)
        tokens = torch.where(batch.greedy, argmax(logits), argmax(probs / noise))

    if raw_logprobs is None:
        return PendingSample(tokens)
    top_vals, top_ids = raw_logprobs.topk(max(batch.max_logprobs, 1), dim=-1)
    chosen = raw_logprobs.gather(-1, tokens[:, None])  # [N, 1]
    ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
    return PendingSample(tokens, (chosen[:, 0], ranks, top_ids, top_vals))
