"""Scale-out under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on GPU).

Without ``WORLD_SIZE`` > 1 in the environment everything here is a no-op, so one code path serves
a laptop and ``torchrun --nproc-per-node N``. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; returns the rank and the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    resolved = resolve_device(device, info)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info, resolved


def resolve_device(device: str, info: DistInfo) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but no CUDA GPU is available")
        if resolved.index is None:
            resolved = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(resolved)
    return resolved


def wrap(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the trainable (adapter) parameters when distributed."""
    if not info.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    # broadcast_buffers=False: shared frozen buffers (SVD bases, projections) are regenerated
    # identically on every rank and never change, so re-broadcasting them each step is waste.
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=ids, broadcast_buffers=False
    )


def all_reduce_sum(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
