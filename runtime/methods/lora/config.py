"""LoRA configuration (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import INT_LIMIT, MAX_DIM, AdapterConfig, config_field, require_range


@dataclass
class LoraConfig(AdapterConfig):
    """ΔW = (α/r) · B · A with A ∈ R^{r×d2}, B ∈ R^{d1×r}; A Kaiming-uniform, B = 0."""

    method = "lora"

    r: int = config_field(8, "Rank of the update (r ≥ 1).")
    alpha: float = config_field(16.0, "Scaling numerator: ΔW is multiplied by alpha / r.")
    dropout: float = config_field(0.0, "Dropout on the LoRA branch input, in training only.")
    init_seed: int = config_field(0, "Seed of the generator that initialises A.")

    def validate(self) -> None:
        super().validate()
        require_range(self, "r", 1, MAX_DIM)
        require_range(self, "alpha", 0, float("inf"), low_open=True, high_open=True)
        require_range(self, "dropout", 0.0, 1.0, high_open=True)
        require_range(self, "init_seed", 0, INT_LIMIT, high_open=True)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
