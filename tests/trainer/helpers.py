"""Shared helpers for trainer tests: one short run on the tiny base, adapter comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

from svda.adapters_store import read_adapter
from svda.trainer import TrainConfig, TrainResult, train

ADAPTERS = {
    "svda": {"targets": "all-linear"},
    "vera": {"targets": "all-linear", "r": 16},
    "lora": {"targets": "all-linear", "r": 4},
}


def run(tmp: Path, base: str, data: str, method: str = "lora", hooks=None, **kw) -> TrainResult:
    settings = dict(
        method=method,
        adapter=ADAPTERS.get(method, {}),
        base=base,
        data=data,
        max_steps=6,
        batch_size=8,
        lr=3e-2,
        output_dir=str(tmp / f"run-{method}"),
        progress=False,
    )
    settings.update(kw)
    return train(TrainConfig(**settings), hooks=hooks)


def payload(data: bytes) -> dict[str, torch.Tensor]:
    return read_adapter(data).tensors


def assert_payload_close(a: bytes, b: bytes, rel: float = 1e-6) -> None:
    """Every payload tensor of ``b`` within relative Frobenius error ``rel`` of ``a``'s.

    Per-element tolerances do not fit here: Adam divides by sqrt(v), so parameters whose
    gradient is nearly zero (LoRA's A while B is still ~0) move by amounts that amplify
    float rounding differences (another batch split, another padding width)."""
    ta, tb = payload(a), payload(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        err = float((ta[key] - tb[key]).norm() / ta[key].norm().clamp_min(1e-12))
        assert err <= rel, f"{key}: relative error {err:.2e} > {rel:.0e}"
