"""LoRA-GA configuration (Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation with Gradient
Approximation")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import AdapterConfig, config_field, require


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
        require(
            isinstance(self.r, int) and self.r >= 1,
            f"{self.method} r must be an integer ≥ 1, got {self.r!r}",
        )
        require(self.alpha > 0, f"{self.method} alpha must be > 0, got {self.alpha!r}")
        require(
            isinstance(self.gradient_batches, int) and self.gradient_batches >= 1,
            f"{self.method} gradient_batches must be an integer ≥ 1, got {self.gradient_batches!r}",
        )
        require(
            self.stable_gamma > 0,
            f"{self.method} stable_gamma must be > 0, got {self.stable_gamma!r}",
        )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
