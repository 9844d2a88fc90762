"""E2E NLG benchmark: fine-tune SmolLM2-135M with each adapter method, decode held-out MRs.

    nice .venv/bin/python bench/e2e_bench.py > bench/results/e2e_table.md      # CPU budget
    .venv/bin/python bench/e2e_bench.py --full > bench/results/e2e_table_full.md  # GPU budget

Data: ``/work/shared/data/e2e/devset.csv`` (E2E NLG challenge dev set, CC BY-SA 4.0), split by
meaning representation (MR): no MR is in both the training and the held-out part. Every method
trains with the same seed, data order, batch and steps (hence the same training tokens), then
greedily decodes the held-out MRs; BLEU (sacrebleu) and ROUGE-L are computed against all
references of each MR. Each method runs in its own subprocess, so its peak resident memory
(``ru_maxrss``: base model, frozen shared tensors, activations, optimizer state) is its own.

Methods are rows of ``METHODS``: a later method is one more row.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path("/work/shared/data/e2e/devset.csv")
RESULTS = Path(__file__).resolve().parent / "results"
SYSTEM = "You write one-sentence restaurant descriptions."
QV = "q_proj,v_proj"  # the paper's E2E setting (attention query and value projections)
ALL = "all-linear"


@dataclass(frozen=True)
class Method:
    label: str
    method: str | None  # None: the base model, zero-shot
    adapter: dict = field(default_factory=dict)
    lr: float = 0.0


ADALORA_SCHEDULE = {"tinit": 4, "tfinal": 8, "delta_t": 4}  # for the 40-step CPU budget
METHODS = [  # SvdA first; learning rates set once per method, not tuned on the held-out MRs
    Method("SvdA", "svda", {"targets": QV}, 1e-2),
    Method("SvdA top-64", "svda", {"targets": QV, "top_k": 64}, 1e-2),
    Method("VeRA r=256", "vera", {"targets": QV, "r": 256}, 2e-2),
    Method("LoRA r=8", "lora", {"targets": QV, "r": 8}, 3e-3),
    Method("PiSSA r=8", "pissa", {"targets": QV, "r": 8}, 1e-3),
    Method("LoRA-GA r=8", "lora_ga", {"targets": QV, "r": 8, "gradient_batches": 4}, 3e-3),
    Method(
        "AdaLoRA r=12→8",
        "adalora",
        {"targets": QV, "r": 12, "target_r": 8, **ADALORA_SCHEDULE},
        1e-2,
    ),
    Method("BitFit", "bitfit", {"targets": QV}, 1e-2),
    Method("BOFT b=4 m=2", "boft", {"targets": QV, "block_size": 4, "n_butterfly_factor": 2}, 5e-3),
    Method("uRNN-unitary", "urnn", {"targets": QV}, 5e-3),
    Method(
        "Hybrid LoRA-GA/BOFT",
        "hybrid",
        {"targets": QV, "r": 8, "block_size": 4, "gradient_batches": 4},
        3e-3,
    ),
    Method("Serial adapter (MLP, 8)", "serial_adapter", {"targets": "mlp", "bottleneck": 8}, 3e-3),
    Method(
        "Parallel adapter (attention, 8)",
        "parallel_adapter",
        {"targets": "self_attn", "bottleneck": 8},
        3e-3,
    ),
    Method("zero-shot (no adapter)", None),
]
# Training-step timing on one fixed batch, every linear layer adapted (where SvdA costs most).
TIMED = {
    "LoRA r=8": ("lora", {"targets": ALL, "r": 8}),
    "SvdA (all s)": ("svda", {"targets": ALL}),
    "SvdA top-64": ("svda", {"targets": ALL, "top_k": 64}),
    "VeRA r=256": ("vera", {"targets": ALL, "r": 256}),
}

BUDGETS = {  # same for every method: steps × batch sequences of the same data order
    "cpu": {"steps": 8, "batch": 8, "heldout": 16, "max_new_tokens": 32, "eval_every": 0},
    "full": {"steps": 1200, "batch": 16, "heldout": None, "max_new_tokens": 64, "eval_every": 200},
}


# ----- data ------------------------------------------------------------------------------------
def load_split(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[list, dict[str, list]]:
    """(training (mr, ref) rows, held-out MR -> references); split by MR."""
    with open(DATA, encoding="utf-8", newline="") as fh:
        rows = [(r["mr"], r["ref"]) for r in csv.DictReader(fh)]
    mrs = sorted({mr for mr, _ in rows})
    random.Random(seed).shuffle(mrs)
    held = set(mrs[: round(heldout_fraction * len(mrs))])
    train = [(mr, ref) for mr, ref in rows if mr not in held]
    refs: dict[str, list] = {mr: [] for mr in mrs if mr in held}
    for mr, ref in rows:
        if mr in held:
            refs[mr].append(ref)
    return train, refs


def messages(mr: str, ref: str | None = None) -> list[dict]:
    turns = [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": f"Describe this restaurant: {mr}"}]  # fmt: skip
    return turns + ([{"role": "assistant", "content": ref}] if ref is not None else [])


# ----- metrics ---------------------------------------------------------------------------------
def bleu(hyps: list[str], refs: list[list[str]]) -> float:
    import sacrebleu

    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    return sacrebleu.corpus_bleu(hyps, streams).score


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyps: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    """ROUGE-L F (E2E / coco-caption style: max precision and max recall over the references)."""
    scores = []
    for hyp, rs in zip(hyps, refs, strict=True):
        h = _tokens(hyp)
        precs, recs = [], []
        for r in rs:
            t, lcs = _tokens(r), _lcs(h, _tokens(r))
            precs.append(lcs / len(h) if h else 0.0)
            recs.append(lcs / len(t) if t else 0.0)
        p, r = max(precs), max(recs)
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
    return 100 * sum(scores) / len(scores)


# ----- one method, in its own process ----------------------------------------------------------
def worker(label: str, workdir: Path, budget: dict, device: str) -> None:
    import torch

    from svda.runtime import load_base_model
    from svda.trainer import TrainConfig, train
    from svda.trainer.evaluate import greedy_generate

    spec = next(m for m in METHODS if m.label == label)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _train_rows, refs = load_split()
    heldout = list(refs)[: budget["heldout"]]
    out: dict = {"label": label, "trainable_params": 0, "log": [], "budget": budget}
    if spec.method is None:
        base = load_base_model(device=device)
        model, tokenizer = base.model, base.tokenizer
    else:
        data = workdir / "train.jsonl"
        config = TrainConfig(
            method=spec.method, adapter=spec.adapter, data=str(data), lr=spec.lr,
            max_steps=budget["steps"], batch_size=budget["batch"], warmup_steps=budget["steps"] // 10,
            val_fraction=0.003, eval_every=budget["eval_every"], max_length=160, device=device,
            output_dir=str(workdir / _slug(label)), out_file=str(workdir / f"{_slug(label)}.svda"),
        )  # fmt: skip
        result = train(config)
        model, tokenizer = result.model, result.tokenizer
        times = [
            b["elapsed_s"] - a["elapsed_s"]
            for a, b in zip(result.log[:-1], result.log[1:], strict=True)
        ]
        out.update(
            trainable_params=result.summary["trainable_params"], log=result.log,
            tokens=result.summary["tokens"], tokens_per_s=result.summary["tokens_per_s"],
            step_s=statistics.median(times) if times else result.summary["train_time_s"], train_s=result.summary["train_time_s"],
            final_loss=result.summary["final_loss"], best_val=result.summary["best_val_loss"],
        )  # fmt: skip
    prompts = [
        tokenizer.apply_chat_template(messages(mr), tokenize=False, add_generation_prompt=True)
        for mr in heldout
    ]
    t0 = time.perf_counter()
    hyps = greedy_generate(model, tokenizer, prompts, budget["max_new_tokens"], 16, device)
    out.update(gen_s=time.perf_counter() - t0, hyps=hyps, mrs=heldout)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (workdir / f"{_slug(label)}.json").write_text(json.dumps(out))


def timing_worker(workdir: Path, batch_size: int, reps: int = 1) -> None:
    """Median training-step time (forward, backward, AdamW) per ``TIMED`` config, one batch.

    Steps of the configs are interleaved (round robin), so load from other processes on a shared
    machine affects them alike."""
    import torch

    from svda.runtime import AdapterModel, get_method, load_base_model
    from svda.trainer.data import collate, read_records, tokenize_records
    from svda.trainer.evaluate import token_loss_sum

    base = load_base_model()
    records = read_records(workdir / "train.jsonl")[:batch_size]
    batch = collate(tokenize_records(records, base.tokenizer, 160), base.tokenizer.pad_token_id)
    model = AdapterModel(base.model)
    optimizers = {}
    for i, (label, (method, adapter)) in enumerate(TIMED.items()):
        model.add_adapter(f"a{i}", get_method(method).config_cls(**adapter))
        params = list(model.adapter_parameters(f"a{i}").values())
        optimizers[label] = (f"a{i}", torch.optim.AdamW(params, lr=1e-3))
    times: dict[str, list[float]] = {label: [] for label in TIMED}
    for rep in range(reps + 1):  # the first round warms up
        for label, (name, opt) in optimizers.items():
            model.set_adapter(name)
            t0 = time.perf_counter()
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            token_loss_sum(logits, batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rep:
                times[label].append(time.perf_counter() - t0)
    medians = {label: statistics.median(t) for label, t in times.items()}
    counts = {label: model.trainable_parameter_count(n) for label, (n, _) in optimizers.items()}
    tokens = int(batch["attention_mask"].sum())
    out = {
        "medians": medians,
        "params": counts,
        "tokens": tokens,
        "shape": list(batch["input_ids"].shape),
    }
    (workdir / "timing.json").write_text(json.dumps(out))


def timing_table(timing: dict) -> str:
    lora = timing["medians"]["LoRA r=8"]
    b, t = timing["shape"]
    lines = [
        f"Training step on one batch ({b} sequences, padded to {t} tokens, {timing['tokens']} "
        "real), every linear layer adapted (210 layers); one timed round after a warm-up round, interleaved:",
        "",
        "| adapter (all-linear) | trainable params | step (s) | × LoRA r=8 |",
        "|---|---:|---:|---:|",
    ]
    for label, sec in timing["medians"].items():
        lines.append(f"| {label} | {timing['params'][label]:,} | {sec:.2f} | {sec / lora:.2f} |")
    return "\n".join(lines) + "\n"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


# ----- driver --------------------------------------------------------------------------------
def run_all(args: argparse.Namespace) -> list[dict]:
    budget = dict(BUDGETS["full" if args.full else "cpu"])
    if args.steps:
        budget["steps"] = args.steps
    if args.heldout:
        budget["heldout"] = args.heldout
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="svda-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    train_rows, _ = load_split()
    with open(workdir / "train.jsonl", "w") as fh:
        fh.writelines(json.dumps({"messages": messages(mr, ref)}) + "\n" for mr, ref in train_rows)
    _, refs = load_split()
    chosen = [m for m in METHODS if not args.methods or _slug(m.label) in args.methods.split(",")]
    results = []
    for m in chosen:
        done = workdir / f"{_slug(m.label)}.json"
        if not (done.exists() and json.loads(done.read_text()).get("budget") == budget):
            print(f"[e2e] {m.label} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--worker", m.label, "--workdir", str(workdir),
                   "--budget", json.dumps(budget), "--device", args.device]  # fmt: skip
            subprocess.run(cmd, check=True, stdout=sys.stderr)
        else:
            print(f"[e2e] {m.label}: reusing {done}", file=sys.stderr, flush=True)
        r = json.loads(done.read_text())
        adapter_file = workdir / f"{_slug(m.label)}.svda"
        r["file_bytes"] = adapter_file.stat().st_size if m.method else None
        r["bleu"] = bleu(r["hyps"], [refs[mr] for mr in r["mrs"]])
        r["rouge_l"] = rouge_l(r["hyps"], [refs[mr] for mr in r["mrs"]])
        results.append(r)
        partial = table(results, budget, len(train_rows), len(refs), args)
        (RESULTS / "e2e_table.partial.md").write_text(partial)
    count_parameters(results, workdir)
    timing = None
    if not args.no_timing:
        print("[e2e] step timing ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--timing", "--workdir", str(workdir),
               "--budget", json.dumps(budget)]  # fmt: skip
        if subprocess.run(cmd, stdout=sys.stderr).returncode == 0:
            timing = json.loads((workdir / "timing.json").read_text())
            (RESULTS / "e2e_timing.partial.md").write_text(timing_table(timing))
    return results, timing, budget, len(train_rows), len(refs)


def count_parameters(results: list[dict], workdir: Path) -> None:
    """Trainable values of each adapter file, counted the same way for every method (LoRA-GA's
    A0, B0 and the hybrid's λ are stored but not trained), from the files themselves."""
    from svda.adapters_store import load_adapter
    from svda.runtime import AdapterModel, load_base_model

    model = AdapterModel(load_base_model().model)
    for r in results:
        adapter_file = workdir / f"{_slug(r['label'])}.svda"
        if r.get("file_bytes"):
            load_adapter(adapter_file, model, "counted")
            r["trainable_params"] = model.trainable_parameter_count("counted")
            model.delete_adapter("counted")


def table(results: list[dict], budget: dict, n_train: int, n_held: int, args) -> str:
    import torch

    lora = next((r for r in results if r["label"].startswith("LoRA")), None)
    lines = [
        f"*E2E NLG (dev set split by MR: {n_train} training rows, {n_held} held-out MRs, "
        f"{len(results[0]['mrs'])} decoded) — SmolLM2-135M-Instruct, adapters on q_proj and "
        f"v_proj of all 30 layers (the paper's E2E setting); lr per method in METHODS; "
        f"{budget['steps']} steps × {budget['batch']} sequences, greedy, "
        f"≤{budget['max_new_tokens']} new tokens; measured {time.strftime('%Y-%m-%d')} · "
        f"{platform.machine()} · {_cpus()} · torch {torch.__version__}.*",
        "",
        "| method | trainable params | file bytes | BLEU | ROUGE-L | training tokens | "
        "training tokens/s (median step) | "
        "step (s, median) | × LoRA step | peak RSS (MiB) | final loss | best val loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r['step_s'] / lora['step_s']:.2f}" if lora and "step_s" in r else "—"
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {_num(r.get('file_bytes'), ',')} | "
            f"{r['bleu']:.1f} | {r['rouge_l']:.1f} | "
            f"{_num(r.get('tokens'), ',')} | {_num(_median_rate(r, budget), '.0f')} | "
            f"{_num(r.get('step_s'), '.2f')} | {ratio} | {r['peak_rss_mib']:,.0f} | "
            f"{_num(r.get('final_loss'), '.3f')} | {_num(r.get('best_val'), '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r["log"]:
            (line,) = ax.plot([x["step"] for x in r["log"]], [x["loss"] for x in r["log"]],
                              lw=1, label=r["label"])  # fmt: skip
            val = [(x["step"], x["val_loss"]) for x in r["log"] if x.get("val_loss") is not None]
            if val:
                ax.plot(*zip(*val, strict=True), "o--", color=line.get_color(), ms=3)
    ax.set(
        xlabel="optimizer step",
        ylabel="loss (nats/token)",
        title="E2E: training (—), validation (o)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _median_rate(r: dict, budget: dict) -> float | None:
    """Training tokens per second at the median step time: robust to steps slowed by other
    work on a shared machine (the mean rate is in the worker's JSON as ``tokens_per_s``)."""
    if not r.get("tokens") or not r.get("step_s"):
        return None
    return r["tokens"] / budget["steps"] / r["step_s"]


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _cpus() -> str:
    import os

    return f"{os.cpu_count()} cores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full", action="store_true", help="GPU-size budget (all held-out MRs)")
    p.add_argument("--methods", default="", help="comma-separated slugs, e.g. svda,lora-r-8")
    p.add_argument("--steps", type=int, default=0, help="override the budget's steps")
    p.add_argument("--heldout", type=int, default=0, help="override the number of decoded MRs")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-timing", action="store_true", help="skip the all-linear step timing")
    p.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument(
        "--workdir",
        help="work folder; methods already finished there with the same budget are reused "
        "(a long run can be continued)",
    )
    p.add_argument("--budget", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.timing:
        timing_worker(Path(args.workdir), json.loads(args.budget)["batch"])
        return
    if args.worker:
        worker(args.worker, Path(args.workdir), json.loads(args.budget), args.device)
        return
    results, timing, budget, n_train, n_held = run_all(args)
    RESULTS.mkdir(exist_ok=True)
    plot(results, RESULTS / "e2e_loss.png")
    with open(RESULTS / "e2e_outputs.jsonl", "w") as fh:
        for r in results:
            for mr, hyp in list(zip(r["mrs"], r["hyps"], strict=True))[:10]:
                fh.write(json.dumps({"method": r["label"], "mr": mr, "output": hyp}) + "\n")
    print(table(results, budget, n_train, n_held, args))
    if timing:
        print(timing_table(timing))


if __name__ == "__main__":
    main()
