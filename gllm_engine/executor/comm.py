"""torch.distributed plumbing for the ranks: process groups, plans and results, hidden states between stages.

Tensors (hidden states, TP collectives) travel on the default group (NCCL on GPUs, gloo on CPUs);
plans and results are pickled and travel point to point on a separate gloo group, so the engine
rank can send the next micro-batch's plan without waiting for any other rank. Expert parallelism
needs no group of its own: it splits each stage's TP ranks (`EPLayout.over`), and its MoE layers
combine with the TP group's all-reduce.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gllm_engine.config import ParallelConfig
from gllm_engine.layers.parallel import EPLayout, PPStage, TPLayout, split_layers

PLAN_TAG, RESULT_TAG = 1, 2
_MAX_PENDING_SENDS = 64


class RankDiedError(RuntimeError):
    """A rank process ended while the engine needed it."""


class RankComm:
    """This rank's groups and channels; every rank constructs one with the same arguments but its rank."""

    def __init__(self, rank: int, parallel: ParallelConfig, num_layers: int, device: torch.device,
                 master: tuple[str, int], fingerprint: tuple, timeout_s: float = 1800.0,
                 rendezvous_timeout_s: float = 120.0):
        self.rank = rank
        self.world_size = parallel.world_size
        self.tp_size, self.pp_size = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        host, port = master
        try:
            store = dist.TCPStore(host, port, self.world_size, is_master=rank == 0,
                                  timeout=timedelta(seconds=rendezvous_timeout_s))
        except RuntimeError as e:
            raise RuntimeError(f"rank {rank}: could not join the rendezvous at {host}:{port} within "
                               f"{rendezvous_timeout_s:.0f} s ({e}); check that every node uses the same "
                               f"--master-addr/--master-port and that node 0 is running") from None
        dist.init_process_group(backend, store=store, rank=rank, world_size=self.world_size,
                                timeout=timedelta(seconds=timeout_s))
        try:
            self.object_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
            self._check_same_setup(fingerprint)
        except BaseException:  # leave the group, so this process can start another engine
            dist.destroy_process_group()
            raise
        tp_groups = [dist.new_group(list(range(s * self.tp_size, (s + 1) * self.tp_size)))
                     for s in range(self.pp_size)]
        self.pp_rank, tp_rank = divmod(rank, self.tp_size)
        start, end = split_layers(num_layers, self.pp_size, parallel.pp_layer_split)[self.pp_rank]
        self.tp = TPLayout(tp_rank, self.tp_size, tp_groups[self.pp_rank] if self.tp_size > 1 else None)
        self.ep = EPLayout.over(self.tp, parallel.expert_parallel_size)
        self.stage = PPStage(self.pp_rank, self.pp_size, start, end)
        self.sampling_rank = (self.pp_size - 1) * self.tp_size  # tp rank 0 of the last stage
        # Results get their own communicator: the engine receives them on a separate thread.
        self.result_group = (dist.new_group([0, self.sampling_rank], backend="gloo")
                             if self.sampling_rank != 0 else None)
        self._pending: list[tuple[Any, ...]] = []  # in-flight sends and the buffers they read

    def _check_same_setup(self, fingerprint: tuple) -> None:
        """Every rank must run the same model with the same layout; name the first that differs."""
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, fingerprint, group=self.object_group)
        for other_rank, other in enumerate(everyone):
            if other != everyone[0]:
                raise RuntimeError(f"rank {other_rank} was started with {other}, rank 0 with {everyone[0]} "
                                   f"(model, layers, world size, tp, pp, ep, nnodes): "
                                   f"every node needs the same options")

    # ---- pickled objects, point to point ------------------------------------------------------------
    def send_object(self, obj: Any, dst: int, tag: int, group: Any = None) -> None:
        """Send without waiting for the receiver; buffers are kept alive until the send completes."""
        group = group or self.object_group
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        works = [dist.isend(size, dst, group=group, tag=tag), dist.isend(payload, dst, group=group, tag=tag)]
        self._keep(works, size, payload)

    def recv_object(self, src: int, tag: int, group: Any = None) -> Any:
        """Block until the next object from `src` arrives."""
        group = group or self.object_group
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src, group=group, tag=tag)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(payload, src, group=group, tag=tag)
        return pickle.loads(payload.numpy().tobytes())

    # ---- hidden states between pipeline stages --------------------------------------------------------
    def send_intermediate(self, tensors: tuple[torch.Tensor, ...]) -> None:
        dst = self.rank + self.tp_size
        tensors = tuple(t.contiguous() for t in tensors)
        self._keep([dist.isend(t, dst) for t in tensors], *tensors)

    def recv_intermediate(self, num_tokens: int, hidden_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        src = self.rank - self.tp_size
        tensors = tuple(torch.empty(num_tokens, hidden_size, dtype=dtype, device=self.device) for _ in range(2))
        for t in tensors:
            dist.recv(t, src)
        return tensors

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def _keep(self, works: list[Any], *buffers: torch.Tensor) -> None:
        """Hold sends and their buffers; settle the oldest once many are outstanding."""
        self._pending.append((works, buffers))
        while len(self._pending) > _MAX_PENDING_SENDS:
            for w in self._pending.pop(0)[0]:
                w.wait()

    def close(self) -> None:
        """Settle outstanding sends (a peer already gone is no error at this point) and leave the group."""
        for works, _ in self._pending:
            for w in works:
                try:
                    w.wait()
                except RuntimeError:
                    pass
        self._pending = []
        if dist.is_initialized():
            dist.destroy_process_group()
