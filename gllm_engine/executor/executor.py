"""Executors: run step plans on one rank in this process, or on many ranks through torch.distributed.

Both expose `submit(plan)` (start a micro-batch) and `collect()` (the sampled tokens of the oldest
one not yet collected), so the engine can keep a pipeline's micro-batches in flight, and on one
GPU schedule the next step while the current one runs.
"""

from __future__ import annotations

import queue
import threading
from collections import deque

from gllm_engine.config import EngineConfig
from gllm_engine.executor.comm import PLAN_TAG, RESULT_TAG, RankDiedError
from gllm_engine.executor.launcher import RankProcesses, local_ranks, master_address
from gllm_engine.executor.worker import Worker
from gllm_engine.runner.input_batch import StepPlan
from gllm_engine.runner.model_runner import ModelRunner
from gllm_engine.runner.sampler import PendingSample, SamplerOutput


class UniprocExecutor:
    """The whole model on one device in this process."""

    def __init__(self, config: EngineConfig, *, show_progress: bool = True):
        self.runner = ModelRunner(config, show_progress=show_progress)
        self.num_blocks = self.runner.available_num_blocks()
        self.runner.initialize_cache(self.num_blocks)
        self.decode_graph_sizes = self.runner.decode_graph_sizes
        # Async scheduling: the runner takes a decode's pending input token from the previous step's
        # samples on the device.
        self.runner.feeds_pending_tokens = config.scheduler.async_scheduling
        self._results: deque[PendingSample] = deque()

    @property
    def feeds_pending_tokens(self) -> bool:
        """Whether decodes of tokens still being sampled may be planned (the runner feeds them on the device)."""
        return self.runner.feeds_pending_tokens

    def submit(self, plan: StepPlan) -> None:
        self._results.append(self.runner.execute(plan))

    def collect(self) -> SamplerOutput:
        return self.runner.collect(self._results.popleft())

    def reset(self) -> None:
        """Drop the results of batches the engine rolled back."""
        self._results.clear()
        self.runner.reset()

    def shutdown(self) -> None:
        pass


class MultiprocExecutor:
    """Rank 0 runs in this process (first stage, first TP rank); the other local ranks are spawned.

    Plans go to every rank; hidden states flow stage to stage; the last stage's first TP rank
    returns the sampled tokens. On nodes other than node 0 there is no engine: `serve_forever`.
    """

    # Samples reach the first stage's ranks only through the engine.
    feeds_pending_tokens = False

    def __init__(self, config: EngineConfig, *, show_progress: bool = True):
        self.config = config
        master = master_address(config)
        ranks = local_ranks(config)
        is_engine_node = ranks.start == 0
        self.procs = RankProcesses(config, ranks[1:] if is_engine_node else ranks, master)
        self.worker: Worker | None = None
        self._results: deque[PendingSample | None] = deque()
        self._remote_results: queue.Queue = queue.Queue()
        self._result_thread: threading.Thread | None = None
        if is_engine_node:
            try:
                self.worker = self._start_rank0(config, master, show_progress)
            except BaseException:  # a failed start leaves no rank behind
                self.procs.stop(timeout=5.0)
                raise
            self.num_blocks = self.worker.num_blocks
            self.decode_graph_sizes = self.worker.runner.decode_graph_sizes  # alike on every TP rank
            self.world_size = config.parallel.world_size
            if self.worker.comm.sampling_rank != 0:
                self._result_thread = threading.Thread(target=self._receive_results, daemon=True,
                                                       name="gllm-results")
                self._result_thread.start()

    def _receive_results(self) -> None:
        """Blocking receives of the sampling rank's results, handed to `collect` through a queue."""
        comm = self.worker.comm
        try:
            while (out := comm.recv_object(comm.sampling_rank, RESULT_TAG, comm.result_group)) is not None:
                self._remote_results.put(out)
        except RuntimeError as e:  # the sampling rank went away; collect() names it
            self._remote_results.put(e)

    def _start_rank0(self, config: EngineConfig, master: tuple[str, int], show_progress: bool) -> Worker:
        """Join the group, watching the spawned ranks: one that dies during start-up is reported, not waited on."""
        result: dict = {}

        def start() -> None:
            try:
                result["worker"] = Worker(config, 0, master, show_progress=show_progress)
            except BaseException as e:  # reported below, in the caller's thread
                result["error"] = e

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            if thread.is_alive():
                self.procs.check_alive()
        if "error" in result:
            raise result["error"]
        return result["worker"]

    def submit(self, plan: StepPlan) -> None:
        comm = self.worker.comm
        try:
            for rank in range(1, self.world_size):
                comm.send_object(plan, rank, PLAN_TAG)
            self._results.append(self.worker.run(plan))
        except RuntimeError as e:  # a collective or send failed: name the rank that died, if one did
            self.procs.explain(e)
            raise

    def collect(self) -> SamplerOutput:
        local = self._results.popleft()
        if self.worker.comm.sampling_rank == 0:
            return self.worker.runner.collect(local)
        while True:
            try:
                out = self._remote_results.get(timeout=0.2)
            except queue.Empty:
                self.procs.check_alive()
                continue
            if isinstance(out, Exception):
                self.procs.explain(out)
                raise RankDiedError(f"lost the connection to the sampling rank: {out}")
            return out

    def reset(self) -> None:
        """Drop the local results of batches the engine rolled back."""
        self._results.clear()

    def serve_forever(self) -> None:
        """Non-engine nodes: wait for the local ranks to finish (the engine node ends them)."""
        for proc in self.procs.procs.values():
            proc.join()
        failed = {r: p.exitcode for r, p in self.procs.procs.items() if p.exitcode != 0}
        if failed:
            raise RankDiedError(f"ranks ended with errors (rank: exit code): {failed}")

    def shutdown(self) -> None:
        """Tell every rank to stop, let them finish their sends, then leave the process group."""
        if self.worker is not None:
            try:
                for rank in range(1, self.world_size):
                    self.worker.comm.send_object(None, rank, PLAN_TAG)
            except RuntimeError:
                pass  # a rank is already gone; stop() below ends the rest
            if self._result_thread is not None:
                self._result_thread.join(timeout=10)
            self.procs.stop()
            self.worker.comm.close()
            self.worker = None
        else:
            self.procs.stop()


def serve_node(config: EngineConfig) -> None:
    """Run this node's ranks of a multi-node engine whose engine (and HTTP server) lives on node 0."""
    if config.parallel.node_rank == 0:
        raise ValueError("node 0 runs the engine itself; serve_node is for node_rank >= 1")
    MultiprocExecutor(config, show_progress=False).serve_forever()


def make_executor(config: EngineConfig, *, show_progress: bool = True) -> UniprocExecutor | MultiprocExecutor:
    if config.parallel.world_size == 1:
        return UniprocExecutor(config, show_progress=show_progress)
    return MultiprocExecutor(config, show_progress=show_progress)


__all__ = ["UniprocExecutor", "MultiprocExecutor", "make_executor", "RankDiedError"]
