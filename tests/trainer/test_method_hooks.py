"""Trainer cooperation of the hybrid LoRA-GA / BOFT method: λ per layer from gradient norms."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import svda.runtime
from svda.adapters_store import read_adapter
from svda.runtime.methods import HybridConfig, HybridWeights, TargetInfo
from svda.trainer.method_hooks import HybridLambda
from tests.trainer.helpers import run

HYBRID = {"targets": "q_proj,v_proj", "r": 2, "block_size": 4, "lambda_smoothing": 0.5}


def test_hybrid_lambda_is_logged_plotted_and_stored(tmp_path, tiny_base, toy_data):
    result = run(tmp_path, tiny_base, toy_data, "hybrid", max_steps=4, adapter=HYBRID)
    folder = tmp_path / "run-hybrid"
    with open(folder / "lambda.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    layers = [layer.layer_name for layer in result.model.layers_of(result.adapter)]
    assert rows[0] == ["step", *layers] and [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    last = [float(v) for v in rows[-1][1:]]
    assert all(0.05 <= v <= 0.95 for v in last) and max(abs(v - 0.5) for v in last) > 1e-3
    assert (folder / "lambda.png").stat().st_size > 1000
    assert all("hybrid_lambda_mean" in row for row in result.log)
    stored = read_adapter(result.adapter_bytes)
    assert [entry.name for entry in stored.header.layers] == layers
    assert stored.tensors["hybrid_lambda"].tolist() == pytest.approx(last, rel=1e-5)


class _FakeLayer:
    def __init__(self, weights, name):
        self.adapters, self.layer_name = {"a": weights}, name


def _context(lam: float, g_low: float, g_rot: float, smoothing: float = 0.0):
    """A hook context with one hybrid layer whose branch gradients have the given norms."""
    weight = torch.randn(8, 8)
    target = TargetInfo("l", 8, 8, weight, "fp", torch.float32)
    config = HybridConfig(targets="l", r=1, block_size=4, lambda_init=lam,
                          lambda_smoothing=smoothing)  # fmt: skip
    w = HybridWeights(config, target, None)
    w.lora_A.grad = torch.zeros_like(w.lora_A)
    w.lora_A.grad[0, 0] = g_low
    w.lora_B.grad = torch.zeros_like(w.lora_B)
    w.boft_q.grad = torch.zeros_like(w.boft_q)
    w.boft_q.grad.view(-1)[0] = g_rot
    model = SimpleNamespace(configs={"a": config}, layers_of=lambda name: [_FakeLayer(w, "l")])
    ctx = SimpleNamespace(model=model, adapter="a", dist=SimpleNamespace(is_main=False))
    return ctx, w


def test_lambda_uses_the_branches_unit_weight_gradient_norms():
    # at λ = 0.2 the low-rank gradient 0.2 and rotation gradient 0.8 are both 1 at unit weight
    ctx, w = _context(0.2, g_low=0.2, g_rot=0.8)
    out = HybridLambda().after_backward(ctx, 0)
    assert float(w.hybrid_lambda) == pytest.approx(0.5) == out["hybrid_lambda_mean"]
    ctx, w = _context(0.5, g_low=3.0, g_rot=1.0, smoothing=0.5)  # measured 0.75, smoothed
    HybridLambda().after_backward(ctx, 0)
    assert float(w.hybrid_lambda) == pytest.approx(0.625)
    ctx, w = _context(0.5, g_low=1.0, g_rot=0.0)  # clamped at 1 − lambda_min
    HybridLambda().after_backward(ctx, 0)
    assert float(w.hybrid_lambda) == pytest.approx(0.95)


def test_runtime_holds_no_training_code_and_never_imports_the_trainer():
    runtime = Path(svda.runtime.__file__).parent
    importers = [
        str(path.relative_to(runtime))
        for path in runtime.rglob("*.py")
        if re.search(r"^\s*(from|import)\s+(svda\.trainer|\.+trainer)\b", path.read_text(), re.M)
    ]
    assert importers == [], f"runtime files import the trainer: {importers}"
    assert not (runtime / "methods" / "adalora" / "budget.py").exists()
    code = "import sys, svda.runtime, svda.adapters_store; print(sorted(m for m in sys.modules if m.startswith('svda.trainer')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
