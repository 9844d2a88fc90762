"""Runtime benchmark: forward cost of LoRA, VeRA and SvdA on a real base, alone and mixed.

    python bench/runtime_bench.py [--base PATH] [--batch 8] [--seq 128] [--repeats 3] [--frozen]

Default base: the embedded SmolLM2-135M-Instruct, every linear layer of every block targeted.
Prints a markdown table: trainable parameters per adapter, forward time (best of N, variants
interleaved) and its ratio to the base model measured in the same rounds, memory of the shared frozen matrices as a ratio to the base model's weights; then the time
to build the SvdA bases cold (empty cache) and from the on-disk cache. ``--frozen`` measures
adapters as the server holds them: exported to ``.svda`` and loaded back frozen into slot banks
(default: attached modules, as in training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from svda.adapters_store import export_adapter, load_adapter
from svda.runtime import AdapterModel, LoraConfig, SvdaConfig, SvdBasisCache, VeraConfig
from svda.runtime.base_model import load_base_model

N_MIXED = 8


def forward_seconds(model: AdapterModel, ids: torch.Tensor, active, rows) -> float:
    """Seconds of one forward with ``active`` set (an adapter name or None) or per-row ``rows``."""
    model.set_adapter(active)
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids, adapter_rows=rows)
        return time.perf_counter() - start


def best_times(
    model: AdapterModel, ids: torch.Tensor, variants: list[tuple], repeats: int
) -> list[float]:
    """Best-of-``repeats`` seconds for each (active, rows) variant, measured interleaved (after one
    warm-up each) so that drifts of this shared machine hit every variant alike."""
    for active, rows in variants:
        forward_seconds(model, ids, active, rows)
    samples = [[] for _ in variants]
    for _ in range(repeats):
        for i, (active, rows) in enumerate(variants):
            samples[i].append(forward_seconds(model, ids, active, rows))
    return [min(s) for s in samples]


@torch.no_grad()
def train_like(model: AdapterModel, name: str, seed: int, move_s: bool = True) -> None:
    """Move the adapter's tensors as training would (SvdA: optionally b only, keeping δ = 0)."""
    generator = torch.Generator().manual_seed(seed)
    for key, p in sorted(model.adapter_parameters(name).items()):
        if key.endswith("svda_s") and not move_s:
            continue
        p.add_(0.01 * torch.randn(p.shape, generator=generator) * p.abs().mean().clamp_min(1.0))


def build_bases(model_factory, cache_dir: Path) -> tuple[float, float]:
    """Seconds to attach an all-linear SvdA adapter with an empty cache, then from the cache."""
    timings = []
    for _ in range(2):
        model = AdapterModel(model_factory(), svd_cache=SvdBasisCache(cache_dir))
        start = time.perf_counter()
        model.add_adapter("probe", SvdaConfig(targets="all-linear"))
        timings.append(time.perf_counter() - start)
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="HF model folder (default: embedded SmolLM2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="best of N")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--frozen", action="store_true", help="adapters loaded from files into slot banks"
    )
    args = parser.parse_args()

    def factory():
        return load_base_model(args.base).model

    with tempfile.TemporaryDirectory() as cache_dir:
        cold, warm = build_bases(factory, Path(cache_dir))
        base = load_base_model(args.base)
        model = AdapterModel(base.model, svd_cache=SvdBasisCache(cache_dir))
        rows = run_forward_table(model, args)
    base_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
    print_report(rows, base_bytes, cold, warm, base.name, args)
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "svd_cold_s": cold, "svd_warm_s": warm}, indent=2)
        )


# label -> (adapter name prefix, config factory, whether training moved SvdA's s)
METHODS = {
    "LoRA r=8": ("lora", lambda: LoraConfig(targets="all-linear", r=8), True),
    "VeRA r=256": ("vera", lambda: VeraConfig(targets="all-linear", r=256), True),
    "SvdA (all s trained)": ("svda", lambda: SvdaConfig(targets="all-linear"), True),
    "SvdA (only b moved, δ=0)": ("svda-b", lambda: SvdaConfig(targets="all-linear"), False),
}


def run_forward_table(model: AdapterModel, args) -> list[dict]:
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    base_time = best_times(model, ids, [(None, None)], args.repeats)[0]
    rows = [{"method": "base", "adapters": 0, "params": 0, "seconds": base_time, "shared_bytes": 0}]
    for label, (prefix, make_config, move_s) in METHODS.items():
        names = [f"{prefix}-{i}" for i in range(N_MIXED)]
        for i, name in enumerate(names):
            model.add_adapter(name, make_config())
            train_like(model, name, seed=i, move_s=move_s)
            if args.frozen:  # as the server holds it: from its file into a slot bank
                data = export_adapter(model, name)
                model.delete_adapter(name)
                load_adapter(data, model, name)
        mixed_rows = [names[i % N_MIXED] for i in range(args.batch)]
        variants = [(None, None), (names[0], None), (None, mixed_rows)]
        base_again, one, mixed = best_times(model, ids, variants, args.repeats)
        common = {"method": label, "params": model.trainable_parameter_count(names[0])}
        common["shared_bytes"] = model.shared_frozen_bytes()
        rows.append({**common, "adapters": 1, "seconds": one, "base_seconds": base_again})
        rows.append({**common, "adapters": N_MIXED, "seconds": mixed, "base_seconds": base_again})
        for name in names:
            model.delete_adapter(name)
    return rows


def print_report(
    rows: list[dict], base_bytes: int, cold: float, warm: float, base_name: str, args
) -> None:
    base_time = rows[0]["seconds"]
    single = {r["method"]: r["seconds"] for r in rows if r["adapters"] == 1}
    print(
        f"# svda runtime benchmark — {base_name}, all linear layers, batch {args.batch} × {args.seq} tokens"
    )
    print(
        f"{date.today()} · {platform.machine()} · {os.cpu_count()} cores · {torch.get_num_threads()} "
        f"threads · torch {torch.__version__} · forward time best of {args.repeats} · "
        f"{'frozen adapters in slot banks' if args.frozen else 'attached adapter modules'}\n"
    )
    print(
        "| method | adapters in batch | trainable params / adapter | forward (s) | × base | × one adapter | shared frozen memory / base weights |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vs_one = f"{r['seconds'] / single[r['method']]:.2f}" if r["adapters"] > 1 else "—"
        print(
            f"| {r['method']} | {r['adapters']} | {r['params']:,} | {r['seconds']:.3f} | "
            f"{r['seconds'] / r.get('base_seconds', base_time):.2f} | {vs_one} | "
            f"{r['shared_bytes'] / base_bytes:.2f} |"
        )
    print(
        f"\nSvdA bases (SVD of every targeted weight): cold {cold:.1f} s, from the cache {warm:.2f} s"
    )


if __name__ == "__main__":
    main()
