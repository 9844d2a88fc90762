"""Hybrid LoRA-GA / BOFT: W' = W0 + λ·ΔW_LoRA-GA + (1 − λ)·W0·(Rᵀ − I)."""

from .config import HybridConfig
from .layer import HybridWeights

__all__ = ["HybridConfig", "HybridWeights"]
