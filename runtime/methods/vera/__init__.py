"""VeRA: ΔW = diag(b) · B · diag(d) · A with A, B regenerated from a seed."""

from .config import VeraConfig
from .layer import VeraProjections, VeraWeights

__all__ = ["VeraConfig", "VeraProjections", "VeraWeights"]
