"""vLLM backend benchmark: generated tokens/s, the same prompts and adapters for every row.

    python bench/vllm_bench.py [--base PATH] [--dtypes bfloat16,float32] [--requests 16]
                               [--new-tokens 64] [--rounds 3] [--swap-repeats 16] [--no-native]

Engine level (no gRPC): ``--requests`` chat requests queued at once, each for ``--new-tokens``
greedy tokens; wall time from the first submit to the last completion. Per dtype:

* plain vLLM (``AsyncLLM``, no svda) on the base, and vLLM's own LoRA path on the 16 LoRA
  adapters exported as PEFT folders (one adapter per request, every slot full); both run in a
  child process without the svda plugin (``SVDA_VLLM_PLUGIN`` unset);
* svda on vLLM: base rows, then 16 different adapters per kind (SvdA on q,v pruned at the
  server's default ε, VeRA r=64, LoRA r=8, DoRA r=8; one per request, every slot full), and
  16 adapters of the four kinds mixed (four methods in every layer's slots);
* the native engine, base and the 16 LoRA adapters (``--no-native`` skips it);
* hot swap on both engines: time to first token of a request whose SvdA adapter is not resident
  minus that of the next one (resident), median over ``--swap-repeats`` pairs. On vLLM three
  times: with every slot holding an SvdA adapter (the new one is written into its slot in
  place), right after the DoRA round (a slot of another method: the layer's slots are stacked
  again), both with the adapter's compiled folder kept from its earlier load (the engine's
  default), and with no compiled folder kept (``max_compiled=0``: every load compiles).

Adapters are "trained-looking": every trained tensor moved by Gaussian noise (dense δ).
Every adapter run sits between two base runs of the same engine; "vs base" is the median over
rounds of the ratio to the base runs beside it (the machine drifts). A kind's rounds run
together after a short run that puts its 16 adapters into the slots (steady serving; vLLM's
own LoRA path likewise keeps its adapters in their slots across rounds). Needs
``make install-vllm``. Default base: the embedded SmolLM2-135M-Instruct. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from serve_bench import CONFIGS, QUESTIONS, TARGETS, hot_swap_ms

from svda.adapters_store import AdapterStore, export_adapter, export_peft, publish_adapter
from svda.runtime import AdapterModel, load_base_model
from svda.runtime.methods import DoraConfig
from svda.server.domain import ChatMessage, Completion, GenerationRequest, SamplingParams
from svda.server.engine import Engine, EngineSettings
from svda.server.engine_vllm.engine import VllmEngine, VllmOptions

KINDS = {  # label -> (adapter id prefix, config): serve_bench's adapters, and DoRA
    "SvdA (pruned)": ("svda", CONFIGS["svda"]),
    "VeRA r=64": ("vera", CONFIGS["vera64"]),
    "LoRA r=8": ("lora", CONFIGS["lora"]),
    "DoRA r=8": ("dora", lambda: DoraConfig(targets=TARGETS, r=8)),
}
PREFIX = {kind: prefix for kind, (prefix, _) in KINDS.items()}
MIXED = "mixed"  # request i takes adapter i of kind i mod 4: four methods in every layer's slots


def requests(n: int, tokens: int, prefix: str | None) -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    return [
        GenerationRequest(
            adapter_id=adapter_of(prefix, i),
            messages=(ChatMessage("user", QUESTIONS[i % len(QUESTIONS)]),),
            params=params,
        )
        for i in range(n)
    ]


def adapter_of(prefix: str | None, i: int) -> str | None:
    """Request ``i``'s adapter id: None (base), ``<prefix>-i``, or for :data:`MIXED` adapter
    ``i`` of kind ``i mod 4``."""
    if prefix == MIXED:
        kinds = list(PREFIX.values())
        prefix = kinds[i % len(kinds)]
    return f"{prefix}-{i}" if prefix else None


def run_engine(engine, reqs: list[GenerationRequest]) -> float:
    """Generated tokens/s for ``reqs`` submitted at once (either engine)."""
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
    return sum(c.completion_tokens for c in completions) / seconds


@torch.no_grad()
def make_adapters(base_path, store: AdapterStore, n: int, dtype, peft_root: Path) -> list[str]:
    """``n`` adapters of each kind on the base in ``dtype`` (fingerprints are per dtype); the
    LoRA ones also as PEFT folders under ``peft_root`` (for vLLM's own LoRA path)."""
    model = AdapterModel(load_base_model(base_path, dtype=dtype).model)
    peft_dirs = []
    for prefix, config in KINDS.values():
        for i in range(n):
            name = f"{prefix}-{i}"
            model.add_adapter(name, config())
            generator = torch.Generator().manual_seed(i)
            for _, p in sorted(model.adapter_parameters(name).items()):  # dense, like training
                noise = torch.randn(p.shape, generator=generator).to(p.dtype)
                p.add_(0.01 * noise * p.abs().mean().clamp_min(1.0))
            publish_adapter(store, export_adapter(model, name), name)
            if prefix == "lora":
                peft_dirs.append(str(export_peft(model, name, peft_root / name)))
            model.delete_adapter(name)
    return peft_dirs


def plain_vllm_child(spec_path: str) -> None:
    """In a child process (no svda plugin): plain vLLM base and vLLM's own LoRA path, per round;
    prints one JSON line {"base": [tok/s], "own LoRA": [tok/s]}."""
    import asyncio

    from vllm import SamplingParams as VllmParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    spec = json.loads(Path(spec_path).read_text())
    prompts, peft = spec["prompts"], spec["peft"]

    async def measure(lora: bool) -> list[float]:
        extra = {"enable_lora": True, "max_loras": len(peft), "max_lora_rank": 8} if lora else {}
        args = AsyncEngineArgs(model=spec["folder"], dtype=spec["dtype"], enforce_eager=True,
                               max_model_len=spec["max_context"], max_num_seqs=len(prompts),
                               seed=0, enable_prefix_caching=False,
                               kv_cache_memory_bytes=1 << 30, **extra)  # fmt: skip
        llm = AsyncLLM.from_engine_args(args)
        params = VllmParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)

        async def one(i, ids, tag):
            req = LoRARequest(f"l{i}", i + 1, peft[i]) if lora else None
            outs = [o async for o in llm.generate({"prompt_token_ids": ids}, params,
                                                  f"{tag}-{i}", lora_request=req)]  # fmt: skip
            return len(outs[-1].outputs[0].token_ids)

        await asyncio.gather(*(one(i, p[:4], "warm") for i, p in enumerate(prompts)))
        rates = []
        for r in range(spec["rounds"]):
            start = time.perf_counter()
            counts = await asyncio.gather(*(one(i, p, r) for i, p in enumerate(prompts)))
            rates.append(sum(counts) / (time.perf_counter() - start))
        llm.shutdown()
        return rates

    result = {"base": asyncio.run(measure(False))}
    if spec["own_lora"]:
        result["own LoRA"] = asyncio.run(measure(True))
    print("PLAIN " + json.dumps(result), flush=True)


def run_plain(folder: str, prompts, peft: list[str], dtype: str, args, max_context: int,
              own_lora: bool = True):  # fmt: skip
    spec = {"folder": folder, "prompts": prompts, "peft": peft, "dtype": dtype,
            "tokens": args.new_tokens, "rounds": args.rounds, "max_context": max_context,
            "own_lora": own_lora}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if k != "SVDA_VLLM_PLUGIN"}
    out = subprocess.run([sys.executable, __file__, "--plain-child", f.name], env=env,
                         capture_output=True, text=True, check=False)  # fmt: skip
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PLAIN ")]
    if not lines:
        raise RuntimeError(f"plain vLLM child failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def rounds_vs_base(engine, n: int, tokens: int, prefixes: list[str], rounds: int) -> dict:
    """Per label: tok/s per round and its ratio to the mean of the base runs beside it. A
    kind's rounds run one after another, after a short run that puts its adapters into the
    slots (steady serving of 16 adapters, as vLLM's own LoRA path is measured: its adapters
    stay in their slots across rounds; the cost of a new adapter is the hot-swap table's)."""
    out = {"base": {"rates": [], "ratios": []}} | {p: {"rates": [], "ratios": []} for p in prefixes}
    before = run_engine(engine, requests(n, tokens, None))
    out["base"]["rates"].append(before)
    for prefix in prefixes:
        run_engine(engine, requests(n, 2, prefix))  # this kind's adapters into the slots
        for _ in range(rounds):
            rate = run_engine(engine, requests(n, tokens, prefix))
            after = run_engine(engine, requests(n, tokens, None))
            out["base"]["rates"].append(after)
            out[prefix]["rates"].append(rate)
            out[prefix]["ratios"].append(rate / ((before + after) / 2))
            before = after
    return out


def bench_dtype(dtype: str, args, root: Path, rows: list, swaps: list) -> None:
    """Every row of one dtype: plain vLLM before and after svda on vLLM (their mean is the
    plain base: the machine drifts), vLLM's own LoRA path, the native engine."""
    n, t, torch_dtype = args.requests, args.new_tokens, getattr(torch, dtype)
    store = AdapterStore(root / dtype / "store")
    peft = make_adapters(args.base, store, n, torch_dtype, root / dtype / "peft")
    base = load_base_model(args.base, dtype=torch_dtype)
    native = Engine(base, store, EngineSettings(max_batch_size=n))  # default ε
    prompts = [native.encode_prompt(r) for r in requests(n, t, None)]
    plain = run_plain(base.source, prompts, peft, dtype, args, native.max_context)
    if not args.no_native:
        native_rows(native, dtype, args, rows, swaps)
    native.stop()
    svda_rows = svda_on_vllm_rows(store, dtype, args, swaps)
    after = run_plain(base.source, prompts, peft, dtype, args, native.max_context, False)
    plain_base = statistics.mean(
        [statistics.median(plain["base"]), statistics.median(after["base"])]
    )
    own = statistics.median(plain["own LoRA"])
    rows.append((f"plain vLLM {dtype}, base (before / after)", plain_base,
                 f"{statistics.median(plain['base']):.1f} / {statistics.median(after['base']):.1f}"))  # fmt: skip
    rows.append((f"vLLM's own LoRA path {dtype}, 16 LoRA r=8", own, f"{own / plain_base:.2f}"))
    for label, rate, ratio, note in svda_rows:
        if ratio is None:  # svda's base row: against plain vLLM
            note = f"{rate / plain_base:.2f} of plain vLLM"
        elif label.endswith("LoRA r=8"):
            note += f"; {rate / own:.2f}× vLLM's own LoRA"
        rows.append((label, rate, note))
    for row in rows:
        print("ROW", row, flush=True)


def native_rows(native: Engine, dtype: str, args, rows: list, swaps: list) -> None:
    n, t = args.requests, args.new_tokens
    native.start()
    run_engine(native, requests(n, 2, "lora"))  # adapters resident
    result = rounds_vs_base(native, n, t, ["lora"], 1)
    rows.append((f"native {dtype}, base", max(result["base"]["rates"]), ""))
    rows.append((f"native {dtype}, 16 LoRA r=8", result["lora"]["rates"][0],
                 f"{result['lora']['ratios'][0]:.2f}"))  # fmt: skip
    ids = [f"svda-{i}" for i in range(n)]
    swaps.append((f"native {dtype}", *hot_swap_ms(native, ids, args.swap_repeats)))


def svda_on_vllm_rows(store: AdapterStore, dtype: str, args, swaps: list) -> list[tuple]:
    """(label, tok/s, ratio to its base or None, per-round note) for svda on vLLM."""
    n, t = args.requests, args.new_tokens
    base = load_base_model(args.base, dtype=getattr(torch, dtype))
    options = VllmOptions(dtype=dtype, max_loras=n, max_cpu_loras=4 * n)
    engine = VllmEngine(base, store, EngineSettings(max_batch_size=n), options=options)
    engine.start()
    prefixes = list(PREFIX.values())
    for prefix in prefixes:
        run_engine(engine, requests(n, 2, prefix))  # every adapter exported and loaded
    result = rounds_vs_base(engine, n, t, [*prefixes, MIXED], args.rounds)
    out = [(f"svda on vLLM {dtype}, base", statistics.median(result["base"]["rates"]), None, "")]
    for kind, prefix in [*PREFIX.items(), ("mixed (4 each of the above)", MIXED)]:
        r = result[prefix]
        ratio = statistics.median(r["ratios"])
        note = f"{ratio:.2f} of its base ({', '.join(f'{x:.2f}' for x in r['ratios'])})"
        out.append((f"svda on vLLM {dtype}, 16 {kind}", statistics.median(r["rates"]), ratio, note))
    ids = [f"svda-{i}" for i in range(n)]
    run_engine(engine, requests(n, 2, "dora"))  # every slot holds a DoRA adapter
    mixed = hot_swap_ms(engine, ids, args.swap_repeats)  # SvdA into a slot of another method
    run_engine(engine, requests(n, 2, "svda"))  # every slot holds an SvdA adapter
    swaps.append((f"svda on vLLM {dtype}", *hot_swap_ms(engine, ids, args.swap_repeats)))
    swaps.append((f"svda on vLLM {dtype}, into slots of DoRA adapters", *mixed))
    engine.options.max_compiled = 0  # an unload deletes the compiled folder: each load compiles
    compiling = hot_swap_ms(engine, ids, args.swap_repeats)
    swaps.append((f"svda on vLLM {dtype}, compiling on every load", *compiling))
    engine.stop()
    return out


def print_tables(rows, swaps, args) -> None:
    print(f"\n*{args.requests} concurrent chat requests × {args.new_tokens} new tokens (greedy), "
          f"engine level, {args.rounds} rounds; {platform.machine()} · {os.cpu_count()} cores · "
          f"torch {torch.__version__}*\n")  # fmt: skip
    print("| scenario | tokens/s | ratio (per round) |")
    print("|---|---:|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate:.1f} | {note} |")
    print("\n| hot swap (SvdA, cold − warm TTFT) | cold ms | warm ms | median difference ms |")
    print("|---|---:|---:|---:|")
    for name, cold, warm, diff in swaps:
        print(f"| {name} | {cold:.1f} | {warm:.1f} | {diff:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=None, help="base model folder (default: embedded)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--swap-repeats", type=int, default=16)
    ap.add_argument("--no-native", action="store_true", help="skip the native engine rows")
    ap.add_argument("--plain-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_child:
        return plain_vllm_child(args.plain_child)
    rows, swaps = [], []
    with tempfile.TemporaryDirectory() as root:
        for dtype in args.dtypes.split(","):
            bench_dtype(dtype, args, Path(root), rows, swaps)
    print_tables(rows, swaps, args)


if __name__ == "__main__":
    main()
