"""LoRA configuration (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import AdapterConfig, config_field, require


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
        require(
            isinstance(self.r, int) and self.r >= 1,
            f"lora r must be an integer ≥ 1, got {self.r!r}",
        )
        require(self.alpha > 0, f"lora alpha must be > 0, got {self.alpha!r}")
        require(0.0 <= self.dropout < 1.0, f"lora dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
