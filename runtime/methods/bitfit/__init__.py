from .config import BitFitConfig
from .layer import BitFitWeights

__all__ = ["BitFitConfig", "BitFitWeights"]
