"""DoRA configuration (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation")."""

from __future__ import annotations

from dataclasses import dataclass

from ..lora.config import LoraConfig


@dataclass
class DoraConfig(LoraConfig):
    """LoRA's fields (``r``, ``alpha``, ``dropout``, ``init_seed``): the direction is updated by
    ``(α/r)·B·A`` (A Kaiming-uniform, B = 0) and a magnitude ``m ∈ R^{d1}`` per layer, starting at
    the row norms of W0, rescales every output row (PEFT's ``use_dora=True``)."""

    method = "dora"
