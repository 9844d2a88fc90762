"""Serving-engine benchmark: generated tokens/s for concurrent requests, with and without adapters.

    python bench/serve_bench.py [--base PATH] [--requests 16] [--new-tokens 64] [--rounds 2]

Engine level (no gRPC): ``--requests`` requests are queued at once, each for ``--new-tokens``
greedy tokens, and the wall time from the first submit to the last completion is measured.
Scenarios: the base model; all requests on one SvdA adapter (unmerged, and merged by the policy);
one different SvdA adapter per request (dense δ and b, all linear layers); one different LoRA r=8
adapter (q,v) per request; and plain ``transformers`` ``generate()`` with the whole batch at once
(left padding, no adapters). Engine scenarios run interleaved, best of ``--rounds``. Then the hot-swap latency: time to first token of a request whose
SvdA adapter is in the store but not resident, minus the same for a resident one.
Prints markdown tables. Default base: the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time

import torch

from svda.adapters_store import AdapterStore, export_adapter, publish_adapter
from svda.runtime import AdapterModel, LoraConfig, SvdaConfig, load_base_model
from svda.server.domain import ChatMessage, Completion, GenerationRequest, SamplingParams
from svda.server.engine import Engine, EngineSettings

QUESTIONS = [
    "Explain what a low-rank adapter is.",
    "Write a short story about a lighthouse keeper.",
    "List five uses of a paperclip and explain each.",
    "Why is the sky blue? Answer in detail.",
    "Describe how a compiler works, step by step.",
    "What are the benefits of regular exercise?",
    "Summarise the history of the printing press.",
    "Give advice to someone learning to cook.",
]


def messages(i: int) -> tuple[ChatMessage, ...]:
    return (ChatMessage("user", QUESTIONS[i % len(QUESTIONS)]),)


@torch.no_grad()
def make_adapters(base_path, store: AdapterStore, kind: str, count: int) -> list[str]:
    """Publish ``count`` trained-looking adapters of ``kind`` ("svda" or "lora") into ``store``."""
    model = AdapterModel(load_base_model(base_path).model)
    ids = []
    for i in range(count):
        name = f"{kind}-{i}"
        config = (
            SvdaConfig(targets="all-linear")
            if kind == "svda"
            else LoraConfig(targets="q_proj,v_proj", r=8)
        )
        model.add_adapter(name, config)
        generator = torch.Generator().manual_seed(i)
        for _, p in sorted(model.adapter_parameters(name).items()):  # dense, like training
            p.add_(0.01 * torch.randn(p.shape, generator=generator) * p.abs().mean().clamp_min(1.0))
        publish_adapter(store, export_adapter(model, name), name)
        model.delete_adapter(name)
        ids.append(name)
    return ids


def run_batch(engine: Engine, adapter_ids: list[str | None], new_tokens: int) -> tuple[float, int]:
    """(seconds, generated tokens) for one request per entry of ``adapter_ids``, all at once."""
    done, results, lock = threading.Event(), [], threading.Lock()

    def on_event(event):
        if isinstance(event, (Completion, BaseException)):
            with lock:
                results.append(event)
                if len(results) == len(adapter_ids):
                    done.set()

    params = SamplingParams(max_new_tokens=new_tokens)
    start = time.perf_counter()
    for i, adapter_id in enumerate(adapter_ids):
        engine.submit(GenerationRequest(adapter_id, messages=messages(i), params=params), on_event)
    done.wait()
    seconds = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return seconds, sum(r.completion_tokens for r in results)


@torch.no_grad()
def hf_generate(base, n: int, new_tokens: int) -> tuple[float, int]:
    tok = base.tokenizer
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(n)
    ]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    out = base.model.generate(
        **batch, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id
    )
    seconds = time.perf_counter() - start
    generated = out[:, batch.input_ids.shape[1] :].tolist()
    eos = tok.eos_token_id
    tokens = sum(row.index(eos) + 1 if eos in row else len(row) for row in generated)
    return seconds, tokens


def hot_swap_ms(engine: Engine, adapter_ids: list[str], repeats: int = 5) -> tuple[float, float]:
    """Median time to first token (ms) for a non-resident and a resident SvdA adapter."""

    def ttft(adapter_id: str) -> float:
        result = []
        finished = threading.Event()

        def on_event(event):
            if isinstance(event, Completion):
                result.append(event.time_to_first_token_s)
                finished.set()

        params = SamplingParams(max_new_tokens=1)
        engine.submit(GenerationRequest(adapter_id, prompt="Hello", params=params), on_event)
        finished.wait()
        return result[0] * 1000

    cold, warm = [], []
    for adapter_id in adapter_ids[:repeats]:
        engine.unload_adapter(adapter_id)
        cold.append(ttft(adapter_id))
        warm.append(ttft(adapter_id))
    return statistics.median(cold), statistics.median(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="HF model folder (default: SmolLM2-135M)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many rounds")
    args = parser.parse_args()
    n, new_tokens = args.requests, args.new_tokens

    root = tempfile.mkdtemp(prefix="svda-serve-bench-")
    store = AdapterStore(root)
    svda_ids = make_adapters(args.base, store, "svda", n)
    lora_ids = make_adapters(args.base, store, "lora", n)
    base = load_base_model(args.base)
    engine = Engine(base, store, EngineSettings(max_batch_size=n))
    engine.start()
    scenarios = [
        ("base model", "never", [None] * n),
        (f"{n} × one SvdA adapter, unmerged", "never", [svda_ids[0]] * n),
        (f"{n} × one SvdA adapter, merged (policy)", "always-single", [svda_ids[0]] * n),
        (f"{n} different SvdA adapters", "never", svda_ids),
        (f"{n} different LoRA r=8 adapters", "never", lora_ids),
    ]
    best: dict[str, tuple[int, float]] = {}
    for round_ in range(args.rounds):  # interleaved, best of rounds: this machine is shared
        for label, policy, adapters in scenarios:
            engine.settings.merge_policy = policy  # read by the scheduler at every step
            for adapter_id in dict.fromkeys(adapters):
                if adapter_id is not None:
                    engine.load_adapter(adapter_id)
            run_batch(engine, adapters[:2], 4)  # warm-up (and merge, for the merged policy)
            seconds, tokens = run_batch(engine, adapters, new_tokens)
            if label not in best or tokens / seconds > best[label][0] / best[label][1]:
                best[label] = (tokens, seconds)
            print(f"round {round_}: {label}: {tokens} tokens in {seconds:.2f} s", flush=True)
    rows = [(label, *best[label]) for label, _, _ in scenarios]
    engine.settings.merge_policy = "never"
    hot = hot_swap_ms(engine, svda_ids)
    engine.stop()
    assert engine.model.state.merged is None
    engine.model.set_adapter(None)  # the wrapped layers now run the base weights only
    hf_generate(base, 2, 2)  # warm-up
    seconds, tokens = hf_generate(base, n, new_tokens)
    rows.append((f"transformers generate(), batch {n}", tokens, seconds))

    base_rate = rows[0][1] / rows[0][2]
    print(f"\nserve_bench: {n} requests × {new_tokens} new tokens, greedy, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}\n")  # fmt: skip
    print("| scenario | tokens | seconds | tokens/s | vs base |")
    print("|---|---:|---:|---:|---:|")
    for label, tokens, secs in rows:
        print(f"| {label} | {tokens} | {secs:.2f} | {tokens / secs:.1f} | {tokens / secs / base_rate:.2f} |")  # fmt: skip
    cold, warm = hot
    print("\n| hot swap (SvdA) | ms |\n|---|---:|")
    print(f"| time to first token, adapter not resident | {cold:.1f} |")
    print(f"| time to first token, adapter resident | {warm:.1f} |")
    print(f"| difference (load from store) | {cold - warm:.1f} |")


if __name__ == "__main__":
    main()
