"""(IA)³: learned vectors that rescale a layer's output (or a feed-forward layer's input)."""

from .config import Ia3Config
from .layer import Ia3Weights

__all__ = ["Ia3Config", "Ia3Weights"]
