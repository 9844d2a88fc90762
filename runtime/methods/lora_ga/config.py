"""LoRA-GA configuration (Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation with Gradient
Approximation")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import INT_LIMIT, MAX_DIM, AdapterConfig, config_field, require_range

MAX_GRADIENT_BATCHES = 1_000_000


@dataclass
class LoraGaConfig(AdapterConfig):
    """ΔW = (α/r)·(B·A − B0·A0): a rank-2r LoRA ``[B, −B0][A; A0]`` on the unmodified base.
    A0, B0 come from the SVD of the loss gradient with respect to W0 (``svda-train`` estimates it
    on a few batches before step 0); they depend on data, so the file stores them."""

    method = "lora_ga"

    r: int = config_field(8, "Rank of the trained factors (the stored LoRA has rank 2r).")
    alpha: float = config_field(16.0, "Scaling numerator: ΔW is multiplied by alpha / r.")
    init_seed: int = config_field(0, "Seed of A = A0 before the gradient initialisation.")
    gradient_batches: int = config_field(
        8, "Batches whose gradients are averaged for the initialisation (svda-train)."
    )
    stable_gamma: float = config_field(
        16.0,
        "γ of the paper's stable scale: A0, B0 are multiplied by d1^(1/4) / sqrt(γ) so updates "
        "keep their size across widths.",
    )

    def validate(self) -> None:
        super().validate()
        positive = {"low_open": True, "high_open": True}
        require_range(self, "r", 1, MAX_DIM // 2)
        require_range(self, "alpha", 0, float("inf"), **positive)
        require_range(self, "init_seed", 0, INT_LIMIT, high_open=True)
        require_range(self, "gradient_batches", 1, MAX_GRADIENT_BATCHES)
        require_range(self, "stable_gamma", 0, float("inf"), **positive)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
