from .config import SerialAdapterConfig
from .layer import SerialAdapterWeights

__all__ = ["SerialAdapterConfig", "SerialAdapterWeights"]
