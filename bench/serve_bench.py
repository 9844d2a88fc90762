"""Serving-engine benchmark: generated tokens/s for concurrent requests, with and without adapters.

    python bench/serve_bench.py [--base PATH] [--requests 16] [--new-tokens 64] [--rounds 3]

Engine level (no gRPC): ``--requests`` requests are queued at once, each for ``--new-tokens``
greedy tokens, and the wall time from the first submit to the last completion is measured.
Scenarios: the base model; all requests on one SvdA adapter (unmerged, and merged by the policy);
one different SvdA adapter per request, trained by ``svda-train`` on slices of the E2E data (real,
dense δ), served exactly and with δ pruned at the server's default tolerance; one different VeRA
(r=64, r=256) and LoRA r=8 adapter per request; 4× as many different adapters as fit in adapter
memory (forces swaps); and plain ``transformers`` ``generate()`` with the whole batch at once
(left padding, no adapters, same weights). Every adapter targets q_proj and v_proj of all layers.
Each round runs every scenario between two base runs; tokens/s is a scenario's best round, and
"vs base" the median over rounds of its ratio to the base runs beside it (this shared machine
drifts by ±20 % within a minute). Then the hot-swap latency: time to first token of a request
whose SvdA adapter is in the store but not resident, minus the same for the next request on it
(resident by then), as the median over ``--swap-repeats`` such pairs.
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

from svda.adapters_store import AdapterStore, export_adapter, load_adapter, publish_adapter
from svda.runtime import AdapterModel, LoraConfig, SvdaConfig, VeraConfig, load_base_model
from svda.server.domain import ChatMessage, Completion, GenerationRequest, SamplingParams
from svda.server.engine import Engine, EngineSettings
from svda.trainer import TrainConfig, train

E2E_DATA = "../shared/data/e2e/devset.csv"
TARGETS = "q_proj,v_proj"
CONFIGS = {
    "svda": lambda: SvdaConfig(targets=TARGETS),
    "vera64": lambda: VeraConfig(targets=TARGETS, r=64),
    "vera256": lambda: VeraConfig(targets=TARGETS, r=256),
    "lora": lambda: LoraConfig(targets=TARGETS, r=8),
}

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
    """Publish ``count`` trained-looking adapters of ``kind`` (a key of CONFIGS) into ``store``:
    every tensor moved by Gaussian noise, as training moves it."""
    model = AdapterModel(load_base_model(base_path).model)
    ids = []
    for i in range(count):
        name = f"{kind}-{i}"
        model.add_adapter(name, CONFIGS[kind]())
        generator = torch.Generator().manual_seed(i)
        for _, p in sorted(model.adapter_parameters(name).items()):  # dense, like training
            p.add_(0.01 * torch.randn(p.shape, generator=generator) * p.abs().mean().clamp_min(1.0))
        publish_adapter(store, export_adapter(model, name), name)
        model.delete_adapter(name)
        ids.append(name)
    return ids


def train_svda_adapters(base_path, root: str, count: int, steps: int) -> list[str]:
    """``count`` SvdA adapters trained by svda-train (``steps`` steps each, different data order
    per seed) on the E2E data, published into the store at ``root``."""
    ids = []
    for i in range(count):
        config = TrainConfig(
            method="svda", adapter={"targets": TARGETS}, base=base_path, data=E2E_DATA,
            prompt_column="mr", completion_column="ref", max_length=128, batch_size=4,
            max_steps=steps, lr=2e-3, seed=i, out=f"svda-trained-{i}", store=root,
            output_dir=f"{root}/runs/{i}", progress=False,
        )  # fmt: skip
        train(config)
        ids.append(f"svda-trained-{i}")
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


def hot_swap_ms(
    engine: Engine, adapter_ids: list[str], repeats: int = 64
) -> tuple[float, float, float]:
    """Time to first token (ms) of a request whose SvdA adapter is not resident, of the next
    request for the same (now resident) adapter, and the median of their pairwise differences
    (the load cost: slow drifts of this shared machine cancel within a pair). ``repeats`` pairs,
    cycling through ``adapter_ids``; the first two pairs warm up and are not counted."""

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
    for i in range(repeats + 2):
        adapter_id = adapter_ids[i % len(adapter_ids)]
        engine.unload_adapter(adapter_id)
        cold.append(ttft(adapter_id))
        warm.append(ttft(adapter_id))
    cold, warm = cold[2:], warm[2:]
    differences = [c - w for c, w in zip(cold, warm, strict=True)]
    return statistics.median(cold), statistics.median(warm), statistics.median(differences)


def pruned_fraction(base_path, store: AdapterStore, adapter_id: str, tolerance: float) -> str:
    """Components of δ kept when ``adapter_id`` is pruned at ``tolerance`` (all layers)."""
    model = AdapterModel(load_base_model(base_path).model)
    entry = store.get(adapter_id)
    header = load_adapter(store.read_bytes(entry), model, "probe")
    counts = model.prune_adapter("probe", tolerance, [e.delta_norm for e in header.layers])
    return f"{counts['components_kept']:,} of {counts['components_total']:,}"


def scenario_list(n: int, ids: dict[str, list[str]], tol: float) -> list[tuple]:
    """(label, merge policy, prune tolerance, adapter per request, adapter memory in adapters)."""
    trained = ids["svda"]
    return [
        ("base model", "never", 0.0, [None] * n, None),
        (f"{n} × one SvdA adapter, unmerged", "never", 0.0, [trained[0]] * n, None),
        (f"{n} × one SvdA adapter, merged (policy)", "always-single", 0.0, [trained[0]] * n, None),
        (f"{n} different SvdA adapters (svda-train), exact", "never", 0.0, trained, None),
        (f"{n} different SvdA adapters (svda-train), pruned ε={tol:g}", "never", tol, trained, None),
        (f"{n} different VeRA r=64 adapters", "never", 0.0, ids["vera64"], None),
        (f"{n} different VeRA r=256 adapters", "never", 0.0, ids["vera256"], None),
        (f"{n} different LoRA r=8 adapters", "never", 0.0, ids["lora"], None),
        (f"{len(ids['swap'])} different SvdA adapters, memory for {n} (swaps)", "never", tol,
         ids["swap"], n),
    ]  # fmt: skip


def run_scenario(engine: Engine, scenario: tuple, per_adapter: int, new_tokens: int):
    _, policy, tol, adapters, memory = scenario
    engine.settings.merge_policy = policy  # read by the scheduler at every step
    engine.adapters.prune_tolerance = tol  # applied when an adapter is loaded
    engine.adapters.budget = (memory or 10_000) * per_adapter
    for adapter_id in dict.fromkeys(adapters):
        if adapter_id is not None:
            engine.unload_adapter(adapter_id)  # reload with this scenario's tolerance
            if memory is None:
                engine.load_adapter(adapter_id)
    run_batch(engine, adapters[:2], 4)  # warm-up (and merge, for the merged policy)
    return run_batch(engine, adapters, new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="HF model folder (default: SmolLM2-135M)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all scenarios")
    parser.add_argument("--swap-repeats", type=int, default=64, help="hot-swap request pairs")
    parser.add_argument("--train-steps", type=int, default=8, help="svda-train steps per adapter")
    parser.add_argument(
        "--prune-tolerance", type=float, default=EngineSettings().svda_prune_tolerance,
        help="ε of the pruned SvdA scenario (default: the server's default)",
    )  # fmt: skip
    args = parser.parse_args()
    n, new_tokens, tol = args.requests, args.new_tokens, args.prune_tolerance

    root = tempfile.mkdtemp(prefix="svda-serve-bench-")
    store = AdapterStore(root)
    ids = {"svda": train_svda_adapters(args.base, root, n, args.train_steps)}
    for kind in ("vera64", "vera256", "lora"):
        ids[kind] = make_adapters(args.base, store, kind, n)
    ids["swap"] = []
    for j in range(4 * n):  # the trained files again under new ids: 4n distinct adapters
        data = store.read_bytes(store.get(ids["svda"][j % n]))
        ids["swap"].append(publish_adapter(store, data, f"swap-{j}").id)
    per_adapter = store.get(ids["svda"][0]).size
    kept = pruned_fraction(args.base, store, ids["svda"][0], tol)

    base = load_base_model(args.base)
    engine = Engine(base, store, EngineSettings(max_batch_size=n))
    engine.start()
    hf_generate(base, 2, 2)  # warm-up
    scenarios = [*scenario_list(n, ids, tol), (f"transformers generate(), batch {n}", "hf")]
    runs = measure_rounds(engine, base, scenarios, per_adapter, new_tokens, args.rounds)
    engine.settings.merge_policy = "never"
    engine.adapters.prune_tolerance, engine.adapters.budget = tol, 10_000 * per_adapter
    hot = hot_swap_ms(engine, ids["svda"], args.swap_repeats)
    engine.stop()
    print_tables(runs, [s[0] for s in scenarios], hot, n, new_tokens, tol, kept)


def measure_rounds(engine, base, scenarios, per_adapter: int, new_tokens: int, rounds: int):
    """``label -> [(tokens, seconds, ratio to the base runs on either side), ...]``, one entry a
    round. Every scenario runs between two base runs: this shared machine drifts by ±20 % over
    tens of seconds, so a scenario is compared with the base measured next to it in time."""
    runs: dict[str, list[tuple[int, float, float]]] = {}

    def run(scenario) -> tuple[int, float]:
        if scenario[1] == "hf":  # plain transformers on the same weights, engine idle
            with engine.adapters.model_lock:
                assert engine.model.state.merged is None
                engine.model.set_adapter(None)  # the wrapped layers run the base weights only
                seconds, tokens = hf_generate(base, len(scenarios[0][3]), new_tokens)
        else:
            seconds, tokens = run_scenario(engine, scenario, per_adapter, new_tokens)
        print(f"{scenario[0]}: {tokens} tokens in {seconds:.2f} s", flush=True)
        return tokens, seconds

    for round_ in range(rounds):
        print(f"round {round_}", flush=True)
        before = run(scenarios[0])
        runs.setdefault(scenarios[0][0], []).append((*before, 1.0))
        for scenario in scenarios[1:]:
            tokens, seconds = run(scenario)
            after = run(scenarios[0])
            runs[scenarios[0][0]].append((*after, 1.0))
            base_rate = (before[0] / before[1] + after[0] / after[1]) / 2
            runs.setdefault(scenario[0], []).append((tokens, seconds, tokens / seconds / base_rate))
            before = after
    return runs


def print_tables(runs, labels, hot, n: int, new_tokens: int, tol: float, kept: str) -> None:
    rounds = len(runs[labels[-1]])
    print(f"\nserve_bench: {n} concurrent requests × {new_tokens} new tokens, greedy, adapters on "
          f"q_proj,v_proj; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; SvdA δ components kept at ε={tol:g}: {kept}; {rounds} rounds; "
          "tokens/s: the best run; vs base: median over rounds of the ratio to the mean of the "
          "base runs just before and after\n")  # fmt: skip
    print("| scenario | tokens | seconds | tokens/s | vs base | ratios per round |")
    print("|---|---:|---:|---:|---:|---|")
    for label in labels:
        tokens, seconds, _ = max(runs[label], key=lambda r: r[0] / r[1])
        ratios = [r[2] for r in runs[label]]
        per_round = " ".join(f"{x:.2f}" for x in ratios) if label != labels[0] else ""
        print(f"| {label} | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} | "
              f"{statistics.median(ratios):.2f} | {per_round} |")  # fmt: skip
    cold, warm, difference = hot
    print("\n| hot swap (SvdA, median of pairs) | ms |\n|---|---:|")
    print(f"| time to first token, adapter not resident | {cold:.1f} |")
    print(f"| time to first token, adapter resident | {warm:.1f} |")
    print(f"| difference (load from store), median of pairwise differences | {difference:.1f} |")


if __name__ == "__main__":
    main()
