"""vLLM backend benchmark: generated tokens/s, the same prompts on both engines.

    python bench/vllm_bench.py [--base PATH] [--requests 16] [--new-tokens 64]

Engine level (no gRPC): ``--requests`` chat requests queued at once, each for ``--new-tokens``
greedy tokens; wall time from the first submit to the last completion. Rows: plain vLLM
(``AsyncLLM``, no LoRA, no svda) on the base; svda on vLLM, base rows; svda on vLLM with one
different LoRA r=8 adapter (q_proj, v_proj) per request (``max_loras`` = requests, every slot
full); the native engine in float32 and bfloat16, base and the same adapters. Default base: the
embedded SmolLM2-135M-Instruct. Needs ``make install-vllm``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import threading
import time

import torch

from svda.adapters_store import AdapterStore, export_adapter, publish_adapter
from svda.runtime import AdapterModel, LoraConfig, load_base_model
from svda.server.domain import ChatMessage, Completion, GenerationRequest, SamplingParams
from svda.server.engine import Engine, EngineSettings
from svda.server.engine_vllm.engine import VllmEngine, VllmOptions

QUESTIONS = (
    "Explain what a low-rank adapter is.",
    "Write a short story about a lighthouse keeper.",
    "List five uses of a paperclip and explain each.",
    "Why is the sky blue? Answer in detail.",
)


def requests(n: int, tokens: int, adapters: bool) -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    return [
        GenerationRequest(
            adapter_id=f"lora-{i}" if adapters else None,
            messages=(ChatMessage("user", QUESTIONS[i % len(QUESTIONS)]),),
            params=params,
        )
        for i in range(n)
    ]


def run_engine(engine, reqs: list[GenerationRequest]) -> tuple[float, int]:
    """(seconds, generated tokens) for ``reqs`` submitted at once."""
    done, completions = threading.Semaphore(0), []

    def on_event(event):
        if isinstance(event, (Completion, BaseException)):
            completions.append(event)
            done.release()

    start = time.perf_counter()
    for r in reqs:
        engine.submit(r, on_event)
    for _ in reqs:
        done.acquire()
    seconds = time.perf_counter() - start
    errors = [c for c in completions if isinstance(c, BaseException)]
    if errors:
        raise errors[0]
    return seconds, sum(c.completion_tokens for c in completions)


def make_store(base_folder, n: int, root: str, dtype: torch.dtype) -> AdapterStore:
    """``n`` LoRA r=8 adapters made on the base in ``dtype`` (a base's fingerprint is per dtype)."""
    store = AdapterStore(root)
    for i in range(n):
        model = AdapterModel(load_base_model(base_folder, dtype=dtype).model)
        model.add_adapter("a", LoraConfig(targets="q_proj,v_proj", r=8))
        gen = torch.Generator().manual_seed(i)
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith(".B"):
                p.data.normal_(0, 0.02, generator=gen)
        publish_adapter(store, export_adapter(model, "a", name=f"lora-{i}"), f"lora-{i}")
    return store


def run_plain_vllm(folder: str, engine: Engine, reqs, max_context: int, dtype: str):
    """Plain vLLM (no LoRA, no svda plugin) on the same prompt tokens."""
    from vllm import SamplingParams as VllmParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    prompts = [engine.encode_prompt(r) for r in reqs]
    tokens = reqs[0].params.max_new_tokens

    async def main():
        args = AsyncEngineArgs(model=folder, dtype=dtype, enforce_eager=True,
                               max_model_len=max_context, max_num_seqs=len(reqs), seed=0,
                               enable_prefix_caching=False, kv_cache_memory_bytes=1 << 30)  # fmt: skip
        llm = AsyncLLM.from_engine_args(args)
        params = VllmParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

        async def one(i, ids):
            outs = [o async for o in llm.generate({"prompt_token_ids": ids}, params, f"r{i}")]
            return len(outs[-1].outputs[0].token_ids)

        await asyncio.gather(one("warm", prompts[0]))
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        seconds = time.perf_counter() - start
        llm.shutdown()
        return seconds, sum(counts)

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=None, help="base model folder (default: embedded)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-plain", action="store_true", help="no plain vLLM row")
    args = ap.parse_args()
    base32 = load_base_model(args.base)
    folder = base32.source
    rows: list[tuple[str, float, int]] = []
    n, t = args.requests, args.new_tokens
    with tempfile.TemporaryDirectory() as root:
        settings = lambda: EngineSettings(max_batch_size=n, svda_prune_tolerance=0.0)  # noqa: E731
        for dtype in ("float32", "bfloat16"):
            torch_dtype = getattr(torch, dtype)
            base = base32 if dtype == "float32" else load_base_model(args.base, dtype=torch_dtype)
            store = make_store(args.base, n, f"{root}/{dtype}", torch_dtype)
            engine = Engine(base, store, settings())
            engine.start()
            run_engine(engine, requests(n, 2, adapters=True))  # warm: adapters resident
            for adapters in (False, True):
                s, k = run_engine(engine, requests(n, t, adapters))
                rows.append((f"native {dtype}, {'16 adapters' if adapters else 'base'}", s, k))
                print("ROW", rows[-1], flush=True)
            if not args.skip_plain:
                s, k = run_plain_vllm(
                    folder, engine, requests(n, t, False), engine.max_context, dtype
                )
                rows.append((f"plain vLLM {dtype}, base", s, k))
                print("ROW", rows[-1], flush=True)
            engine.stop()
            options = VllmOptions(dtype=dtype, max_loras=n)
            base = load_base_model(args.base, dtype=torch_dtype)  # fresh: an engine wraps layers
            engine = VllmEngine(base, store, settings(), options=options)
            engine.start()
            run_engine(engine, requests(n, 2, adapters=True))  # warm: every adapter exported
            for adapters in (False, True):
                s, k = run_engine(engine, requests(n, t, adapters))
                rows.append(
                    (f"svda on vLLM {dtype}, {'16 adapters' if adapters else 'base'}", s, k)
                )
                print("ROW", rows[-1], flush=True)
            engine.stop()
    print_table(rows, n, t)


def print_table(rows, n: int, t: int) -> None:
    print(f"\n*{n} concurrent chat requests x {t} new tokens (greedy), engine level; "
          f"{platform.machine()} · {torch.get_num_threads()} threads · torch {torch.__version__}*\n")  # fmt: skip
    print("| scenario | tokens | seconds | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, seconds, tokens in rows:
        print(f"| {name} | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} |")


if __name__ == "__main__":
    main()
