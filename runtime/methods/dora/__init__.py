"""DoRA: W' = m ⊙ (W0 + (α/r)·B·A) / ‖W0 + (α/r)·B·A‖ (norm of each output row)."""

from .config import DoraConfig
from .layer import DoraWeights

__all__ = ["DoraConfig", "DoraWeights"]
