"""BOFT: W' = diag(s) · W0 · Rᵀ, R a butterfly product of Cayley-orthogonal blocks."""

from .config import BoftConfig
from .layer import BaseWeightShared, BoftShared, BoftWeights

__all__ = ["BaseWeightShared", "BoftConfig", "BoftShared", "BoftWeights"]
