"""A rank: its model runner, and the loop that runs plans as they arrive."""

from __future__ import annotations

import logging
import os

import torch

from gllm_engine.config import EngineConfig
from gllm_engine.executor.comm import PLAN_TAG, RESULT_TAG, RankComm
from gllm_engine.runner.input_batch import StepPlan
from gllm_engine.runner.model_runner import ModelRunner, RankLayout

logger = logging.getLogger(__name__)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """GPU `local rank` on CUDA machines; the CPU otherwise."""
    device = config.device.device
    if device.type != "cuda":
        return device
    local = rank % (config.parallel.world_size // config.parallel.nnodes)
    return torch.device("cuda", local)


def setup_fingerprint(config: EngineConfig) -> tuple:
    """What every rank must agree on."""
    p = config.parallel
    return (config.model.architecture, config.model.hf_config.num_hidden_layers, p.world_size,
            p.tensor_parallel_size, p.pipeline_parallel_size, p.expert_parallel_size, p.nnodes)


class Worker:
    """One rank's share of every step: receive hidden states, run the runner, pass results on."""

    def __init__(self, config: EngineConfig, rank: int, master: tuple[str, int], *, show_progress: bool = False):
        self.config = config
        device = rank_device(config, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            if torch.version.cuda:
                # cuBLASLt's picks for decode-sized matmuls match or beat the default's on an H100
                # (benchmarks/RESULTS.md, 2026-12-07: ShareGPT 1,000 +0.1-0.5%)
                torch.backends.cuda.preferred_blas_library("cublaslt")
        else:
            # Ranks share the machine's cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.parallel.world_size))
        self.comm = RankComm(rank, config.parallel, config.model.hf_config.num_hidden_layers, device, master,
                             setup_fingerprint(config))
        layout = RankLayout(device=device, tp=self.comm.tp, stage=self.comm.stage, ep=self.comm.ep)
        self.runner = ModelRunner(config, layout, show_progress=show_progress)
        self.num_blocks = self.comm.min_over_ranks(self.runner.available_num_blocks())
        self.runner.initialize_cache(self.num_blocks)

    def run(self, plan: StepPlan):
        """Run this rank's part of `plan`; returns the sampled tokens on the sampling rank."""
        intermediate = None
        if not self.comm.stage.is_first:
            intermediate = self.comm.recv_intermediate(plan.num_tokens, self.runner.hidden_size, self.runner.dtype)
        out = self.runner.execute(plan, intermediate)
        if not self.comm.stage.is_last:
            self.comm.send_intermediate(out)
            return None
        return out


def worker_main(config: EngineConfig, rank: int, master: tuple[str, int]) -> None:
    """Entry point of a spawned rank (every rank but the engine's): serve plans until told to stop."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    worker = Worker(config, rank, master)
    comm = worker.comm
    try:
        while (plan := comm.recv_object(0, PLAN_TAG)) is not None:
            out = worker.run(plan)
            if rank == comm.sampling_rank:
                comm.send_object(worker.runner.collect(out), 0, RESULT_TAG, comm.result_group)
        if rank == comm.sampling_rank:
            comm.send_object(None, 0, RESULT_TAG, comm.result_group)  # ends the engine's receiver thread
    finally:
        comm.close()
