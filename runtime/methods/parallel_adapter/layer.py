"""Parallel bottleneck adapter on one block: ``H_out ← H_out + s · g(H_in)`` (LLM-Adapters; the
shared bottleneck code and shapes are in ``serial_adapter.layer``)."""

from __future__ import annotations

from ..serial_adapter.layer import BottleneckWeights


class ParallelAdapterWeights(BottleneckWeights):
    method = "parallel_adapter"
    reads_input = True
