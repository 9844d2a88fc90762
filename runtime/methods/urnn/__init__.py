"""uRNN-unitary: W' = R · W0, R = U(θ, v)·U(0, v0)ᴴ with U = D3 R2 F⁻¹ D2 Π R1 F D1."""

from .config import UrnnConfig
from .layer import UrnnShared, UrnnWeights

__all__ = ["UrnnConfig", "UrnnShared", "UrnnWeights"]
