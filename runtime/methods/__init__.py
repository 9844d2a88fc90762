"""Adapter methods, one folder each, registered in :mod:`.registry`."""

from .adalora import AdaLoraConfig, AdaLoraWeights
from .base import AdapterConfig, AdapterWeights, TargetInfo
from .bitfit import BitFitConfig, BitFitWeights
from .boft import BoftConfig, BoftWeights
from .dora import DoraConfig, DoraWeights
from .hybrid import HybridConfig, HybridWeights
from .ia3 import Ia3Config, Ia3Weights
from .lora import LoraConfig, LoraWeights
from .lora_ga import LoraGaConfig, LoraGaWeights
from .parallel_adapter import ParallelAdapterConfig, ParallelAdapterWeights
from .pissa import PissaConfig, PissaWeights
from .registry import (
    MethodSpec,
    available_methods,
    config_from_dict,
    get_method,
    linear_methods,
    register_method,
)
from .serial_adapter import SerialAdapterConfig, SerialAdapterWeights
from .svda import SvdaConfig, SvdaWeights
from .urnn import UrnnConfig, UrnnWeights
from .vera import VeraConfig, VeraWeights

register_method(SvdaConfig, SvdaWeights, "SVD-based adaptation: ΔW = diag(b)·U·diag(s)·Vᵀ")
register_method(VeraConfig, VeraWeights, "Vector-based random matrices: ΔW = diag(b)·B·diag(d)·A")
register_method(LoraConfig, LoraWeights, "Low-rank adaptation: ΔW = (α/r)·B·A")
register_method(
    PissaConfig, PissaWeights, "LoRA from the principal SVD part: ΔW = B·A − B0·A0 (A0, B0 from W0)"
)
register_method(
    LoraGaConfig, LoraGaWeights, "LoRA from gradient SVD: ΔW = (α/r)·(B·A − B0·A0), A0, B0 stored"
)
register_method(
    AdaLoraConfig, AdaLoraWeights, "Budgeted SVD-shaped LoRA: ΔW = (α/r)·P·diag(λ)·Q, rank pruned"
)
register_method(BitFitConfig, BitFitWeights, "Bias only: ΔW = 0, bias' = bias + β")
register_method(
    BoftConfig,
    BoftWeights,
    "Butterfly orthogonal: W' = diag(s)·W0·Rᵀ, R = Π_i P_i·blockdiag(Cayley(Q))·P_iᵀ",
)
register_method(
    UrnnConfig,
    UrnnWeights,
    "uRNN-unitary: W' = R·W0, R = U(θ,v)·U(0,v0)ᴴ, U = D3 R2 F⁻¹ D2 Π R1 F D1",
)
register_method(
    HybridConfig,
    HybridWeights,
    "Hybrid LoRA-GA/BOFT: ΔW = λ·(α/r)(B·A − B0·A0) + (1 − λ)·W0·(Rᵀ − I), λ per layer stored",
)
register_method(
    DoraConfig,
    DoraWeights,
    "Weight-decomposed LoRA: W' = m ⊙ (W0 + (α/r)·B·A) / ‖W0 + (α/r)·B·A‖_row",
)
register_method(
    Ia3Config, Ia3Weights, "(IA)³: y = l ⊙ (W0 x + b0), or W0 (l ⊙ x) + b0 on feed-forward layers"
)
register_method(
    SerialAdapterConfig,
    SerialAdapterWeights,
    "Bottleneck after a block: H ← H + s·(f(H·W_downᵀ)·W_upᵀ) (not mergeable)",
)
register_method(
    ParallelAdapterConfig,
    ParallelAdapterWeights,
    "Bottleneck beside a block: H_out ← H_out + s·(f(H_in·W_downᵀ)·W_upᵀ) (not mergeable)",
)

__all__ = [
    "AdaLoraConfig",
    "AdaLoraWeights",
    "AdapterConfig",
    "AdapterWeights",
    "BitFitConfig",
    "BitFitWeights",
    "BoftConfig",
    "BoftWeights",
    "DoraConfig",
    "DoraWeights",
    "HybridConfig",
    "HybridWeights",
    "Ia3Config",
    "Ia3Weights",
    "LoraConfig",
    "LoraGaConfig",
    "LoraGaWeights",
    "LoraWeights",
    "MethodSpec",
    "ParallelAdapterConfig",
    "ParallelAdapterWeights",
    "PissaConfig",
    "PissaWeights",
    "SerialAdapterConfig",
    "SerialAdapterWeights",
    "SvdaConfig",
    "SvdaWeights",
    "TargetInfo",
    "UrnnConfig",
    "UrnnWeights",
    "VeraConfig",
    "VeraWeights",
    "available_methods",
    "config_from_dict",
    "get_method",
    "linear_methods",
    "register_method",
]
