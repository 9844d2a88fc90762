"""AdaLoRA's config and weights (serving); its rank allocator, regulariser and compaction are
training-only and live in :mod:`svda.trainer.adalora_budget`."""

from .config import AdaLoraConfig
from .layer import AdaLoraWeights

__all__ = ["AdaLoraConfig", "AdaLoraWeights"]
