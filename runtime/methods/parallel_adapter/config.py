"""Parallel bottleneck adapter configuration (LLM-Adapters, Hu et al., 2023; He et al., 2022,
"Towards a Unified View of Parameter-Efficient Transfer Learning")."""

from __future__ import annotations

from dataclasses import dataclass

from ..serial_adapter.config import BottleneckConfig


@dataclass
class ParallelAdapterConfig(BottleneckConfig):
    """H_out ← H_out + s·(f(H_in·W_downᵀ + b_down)·W_upᵀ + b_up) beside a block (attention or
    MLP): the adapter reads the block's input."""

    method = "parallel_adapter"
