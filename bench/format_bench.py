"""Adapter file benchmark: bytes on disk versus trainable payload, and load time from the store.

    python bench/format_bench.py [--base PATH] [--repeats 20]

For the base (default: the embedded SmolLM2-135M-Instruct) with adapters on all linear layers:
bytes of svda's SvdA, VeRA r=256 and LoRA r=8 files next to PEFT's own LoRA r=8 and VeRA r=256
folders (PEFT defaults, so VeRA saves its projections), with the ratio file bytes / payload bytes;
then the time to load one adapter from a store into a model whose SVD bases are cached: read,
every check including the regeneration probe, attach (median of N).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from svda.adapters_store.checkpoint import publish_adapter, read_stored_adapter
from svda.adapters_store.format import export_adapter, read_adapter
from svda.adapters_store.header import layer_columns
from svda.adapters_store.loader import load_adapter
from svda.adapters_store.store import AdapterStore
from svda.runtime import AdapterModel, LoraConfig, SvdaConfig, VeraConfig, load_base_model

CONFIGS = {
    "SvdA": lambda: SvdaConfig(targets="all-linear"),
    "VeRA r=256": lambda: VeraConfig(targets="all-linear", r=256),
    "LoRA r=8": lambda: LoraConfig(targets="all-linear", r=8),
}


@torch.no_grad()
def trained(model: AdapterModel, name: str, make_config) -> None:
    model.add_adapter(name, make_config())
    generator = torch.Generator().manual_seed(0)
    for _, p in sorted(model.adapter_parameters(name).items()):
        p.add_(0.01 * torch.randn(p.shape, generator=generator))


def svda_rows(model: AdapterModel) -> tuple[list[dict], dict[str, bytes]]:
    rows, files = [], {}
    for label, make_config in CONFIGS.items():
        trained(model, label.split()[0].lower(), make_config)
        data = export_adapter(model, label.split()[0].lower())
        adapter_file = read_adapter(data)
        files[label] = data
        rows.append(
            {"what": f"svda {label}", "bytes": len(data), "payload": adapter_file.payload_bytes}
        )
    return rows, files


def peft_rows(base_path: str | None, folder: Path) -> list[dict]:
    from peft import LoraConfig as PeftLora
    from peft import VeraConfig as PeftVera
    from peft import get_peft_model

    rows = []
    for label, config in {
        "LoRA r=8": PeftLora(r=8, target_modules="all-linear"),
        "VeRA r=256": PeftVera(r=256, target_modules="all-linear"),
    }.items():
        peft_model = get_peft_model(load_base_model(base_path).model, config)
        out = folder / label.replace(" ", "_")
        peft_model.save_pretrained(out)
        size = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".safetensors", ".json"))
        payload = sum(p.numel() * 4 for p in peft_model.parameters() if p.requires_grad)
        rows.append({"what": f"PEFT {label}", "bytes": size, "payload": payload})
    return rows


def load_times(
    model: AdapterModel, store: AdapterStore, data: bytes, repeats: int
) -> dict[str, float]:
    entry = publish_adapter(store, data, "bench-svda")
    times: dict[str, list[float]] = {
        "read (index lookup, file, object sha256)": [],
        "load+verify": [],
        "load, no probe": [],
        "load+verify, first of its layout (layer table not cached)": [],
    }
    runs = (
        ("load+verify", True, False),
        ("load, no probe", False, False),
        ("load+verify, first of its layout (layer table not cached)", True, True),
    )
    for _ in range(repeats):
        start = time.perf_counter()
        blob = store.read_bytes(store.get(entry.id))
        times["read (index lookup, file, object sha256)"].append(time.perf_counter() - start)
        for key, verify, cold in runs:
            if cold:
                layer_columns.cache_clear()
            start = time.perf_counter()
            stored = read_stored_adapter(store, store.get(entry.id))  # sha256 of the object
            load_adapter(stored, model, "timed", verify=verify)
            times[key].append(time.perf_counter() - start)
            model.delete_adapter("timed")
    del blob
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    base = load_base_model(args.base)
    model = AdapterModel(base.model)
    rows, files = svda_rows(model)
    with tempfile.TemporaryDirectory() as tmp:
        rows += peft_rows(args.base, Path(tmp))
        timings = load_times(model, AdapterStore(Path(tmp) / "store"), files["SvdA"], args.repeats)
    print(
        f"# svda adapter files — {base.name}, all linear layers ({len(model.fingerprint.layers)})"
    )
    print(f"{date.today()} · float32 payloads · load times median of {args.repeats}\n")
    print(
        "| file | bytes on disk | trainable payload bytes | bytes / payload | ≤ 1.01·payload + 4 KiB |"
    )
    print("|---|---:|---:|---:|:---:|")
    for r in rows:
        ok = "yes" if r["bytes"] <= 1.01 * r["payload"] + 4096 else "no"
        print(
            f"| {r['what']} | {r['bytes']:,} | {r['payload']:,} | {r['bytes'] / r['payload']:.3f} | {ok} |"
        )
    print("\n| SvdA adapter from the store (bases cached) | ms |\n|---|---:|")
    for key, seconds in timings.items():
        print(f"| {key} | {1000 * seconds:.1f} |")


if __name__ == "__main__":
    main()
