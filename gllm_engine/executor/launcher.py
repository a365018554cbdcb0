"""Starting the ranks of a parallel engine: one spawned process per local rank, joined by torch.distributed."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time

from gllm_engine.config import EngineConfig
from gllm_engine.executor.comm import RankDiedError
from gllm_engine.executor.worker import worker_main


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def master_address(config: EngineConfig) -> tuple[str, int]:
    """Where rank 0 holds the rendezvous: the configured address, or a free local port on one node."""
    p = config.parallel
    return p.master_addr, p.master_port or free_port(p.master_addr)


def local_ranks(config: EngineConfig) -> range:
    """The global ranks this node runs: a contiguous slice of the world."""
    p = config.parallel
    per_node = p.world_size // p.nnodes
    return range(p.node_rank * per_node, (p.node_rank + 1) * per_node)


class RankProcesses:
    """The spawned rank processes of this node, and a check that they are all still alive."""

    def __init__(self, config: EngineConfig, ranks: range, master: tuple[str, int]):
        ctx = mp.get_context("spawn")
        self.procs = {r: ctx.Process(target=worker_main, args=(config, r, master), daemon=True,
                                     name=f"gllm-rank-{r}") for r in ranks}
        for proc in self.procs.values():
            proc.start()

    def check_alive(self) -> None:
        """Raise RankDiedError naming the first rank that exited, and how."""
        for rank, proc in self.procs.items():
            if proc.exitcode is not None:
                how = f"exit code {proc.exitcode}" if proc.exitcode >= 0 else f"signal {-proc.exitcode}"
                raise RankDiedError(f"rank {rank} died ({how})")

    def explain(self, error: BaseException, grace_s: float = 3.0) -> None:
        """After a communication error: raise RankDiedError if a rank died (waiting briefly for its exit)."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            self.check_alive()
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout)
