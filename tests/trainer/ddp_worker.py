"""Entry point of one DDP rank for test_distributed (importable, so spawn can start it)."""

from __future__ import annotations

import os

import torch


def run_rank(rank: int, world: int, port: int, settings: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from svda.trainer import TrainConfig, train

    train(TrainConfig(**settings))
