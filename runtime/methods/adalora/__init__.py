from .budget import AdaLoraBudget, compact_adalora, orthogonal_regularization
from .config import AdaLoraConfig
from .layer import AdaLoraWeights

__all__ = [
    "AdaLoraBudget",
    "AdaLoraConfig",
    "AdaLoraWeights",
    "compact_adalora",
    "orthogonal_regularization",
]
