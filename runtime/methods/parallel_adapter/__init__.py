from .config import ParallelAdapterConfig
from .layer import ParallelAdapterWeights

__all__ = ["ParallelAdapterConfig", "ParallelAdapterWeights"]
