"""SvdA: ΔW = diag(b) · U · diag(s) · Vᵀ with U, V from the SVD of the base weight."""

from .config import SvdaConfig
from .layer import SvdaWeights, SvdBasisBuffers

__all__ = ["SvdBasisBuffers", "SvdaConfig", "SvdaWeights"]
