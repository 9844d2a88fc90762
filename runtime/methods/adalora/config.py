"""AdaLoRA configuration (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import AdapterConfig, config_field, require


@dataclass
class AdaLoraConfig(AdapterConfig):
    """ΔW = (α/r)·P·diag(λ)·Q, P ∈ R^{d1×r}, Q ∈ R^{r×d2}, λ = 0 at init; during training the
    least important triplets (P_i, λ_i, Q_i) are pruned until ``target_r`` ranks per layer remain
    on average; the file stores each layer's kept ranks only (``layer_ranks``)."""

    method = "adalora"

    r: int = config_field(12, "Initial rank of every layer (≥ 1).")
    target_r: int = config_field(
        8, "Average rank per layer after budget pruning (1 ≤ target_r ≤ r)."
    )
    alpha: float = config_field(16.0, "Scaling numerator: ΔW is multiplied by alpha / r.")
    init_seed: int = config_field(0, "Seed of the Gaussian initialisation of P and Q.")
    tinit: int = config_field(0, "Steps of warm-up before pruning starts.")
    tfinal: int = config_field(0, "Steps at the end with the final budget fixed (fine-tuning).")
    delta_t: int = config_field(10, "Prune every delta_t steps between tinit and the end phase.")
    beta1: float = config_field(0.85, "EMA coefficient of the sensitivity (importance).")
    beta2: float = config_field(0.85, "EMA coefficient of the uncertainty of the sensitivity.")
    orth_reg_weight: float = config_field(
        0.5, "Weight of the orthogonality regulariser ‖PᵀP − I‖ + ‖QQᵀ − I‖ in the loss."
    )
    layer_ranks: dict[str, int] | None = config_field(  # noqa: RUF009 (default None)
        None, "Kept rank per layer after pruning (set at export; None: every layer has rank r)."
    )

    def validate(self) -> None:
        super().validate()
        require(
            isinstance(self.r, int) and self.r >= 1,
            f"adalora r must be an integer ≥ 1, got {self.r!r}",
        )
        require(
            isinstance(self.target_r, int) and 1 <= self.target_r <= self.r,
            f"adalora target_r must be an integer in [1, r={self.r}], got {self.target_r!r}",
        )
        require(self.alpha > 0, f"adalora alpha must be > 0, got {self.alpha!r}")
        require(
            min(self.tinit, self.tfinal) >= 0 and self.delta_t >= 1,
            "adalora tinit, tfinal must be ≥ 0 and delta_t ≥ 1",
        )
        require(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "adalora beta1, beta2 must be in [0, 1)"
        )
        require(self.orth_reg_weight >= 0, "adalora orth_reg_weight must be ≥ 0")
        ranks = self.layer_ranks
        require(
            ranks is None
            or (
                isinstance(ranks, dict)
                and all(isinstance(v, int) and 1 <= v <= self.r for v in ranks.values())
            ),
            f"adalora layer_ranks must map layer names to ranks in [1, {self.r}]",
        )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def rank_of(self, layer_name: str) -> int:
        return (self.layer_ranks or {}).get(layer_name, self.r)
