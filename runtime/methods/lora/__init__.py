"""LoRA: ΔW = (α/r) · B · A."""

from .config import LoraConfig
from .layer import LoraWeights

__all__ = ["LoraConfig", "LoraWeights"]
