from .config import LoraGaConfig
from .layer import LoraGaWeights

__all__ = ["LoraGaConfig", "LoraGaWeights"]
