from .config import PissaConfig
from .layer import PissaWeights

__all__ = ["PissaConfig", "PissaWeights"]
