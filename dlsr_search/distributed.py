"""Single-process or torchrun multi-process training: device choice, process group, gradient averaging.

Under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1) every rank joins a process group (gloo on
CPU, NCCL on CUDA), trains on its own shard of each step's samples, and gradients are averaged with
one flat all-reduce before each optimizer step. We average explicitly instead of wrapping the model
in DistributedDataParallel because the search step takes two backward passes into different
parameter sets (MiLeNAS: weights from L_train, architecture from L_train + lambda * L_val); DDP's hooks
assume one backward per forward. For networks of a few hundred thousand parameters the single flat
all-reduce costs nothing next to the convolutions. Only rank 0 validates, logs and writes files.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str) -> torch.device:
    """'auto': CUDA when available, else the CPU; a name this machine cannot run (CUDA without a GPU, a
    misspelt or missing backend) is a `ConfigError` naming it, not a traceback from torch."""
    from dlsr_infer.upscaling import resolve_device

    from .config import ConfigError

    try:
        return resolve_device(name)
    except ValueError as e:
        raise ConfigError(f"--device: {e}") from None


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            # torch._dynamo (imported by the first optimizer) keeps references to a process group that
            # exists when it is imported. They outlive destroy_process_group(), so gloo's threads ran on
            # into interpreter shutdown and now and then aborted a finished run ("terminate called
            # without an active exception"). Imported first, it holds nothing.
            importlib.import_module("torch._dynamo")  # not `import torch._dynamo`: that binds a local `torch`
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return DistInfo(rank, world, local_rank, dev)


def teardown(info: DistInfo) -> None:
    """Leave the process group; its communication threads stop here, not at interpreter exit."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's weights (fresh init or resumed, it must be identical)."""
    if not info.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """Average ``.grad`` over ranks with one flat all-reduce (params without a grad count as zero)."""
    if not info.enabled:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def mean_over_ranks(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's decision (e.g. 'stop now') shared with every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=info.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


__all__ = ["DistInfo", "average_gradients", "barrier", "broadcast_flag", "broadcast_parameters",
           "mean_over_ranks", "pick_device", "setup", "teardown"]
