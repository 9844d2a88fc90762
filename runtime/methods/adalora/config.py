"""AdaLoRA configuration (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import INT_LIMIT, MAX_DIM, AdapterConfig, config_field, require, require_range


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
        require_range(self, "r", 1, MAX_DIM)
        require_range(self, "target_r", 1, self.r)
        require_range(self, "alpha", 0, float("inf"), low_open=True, high_open=True)
        require_range(self, "init_seed", 0, INT_LIMIT, high_open=True)
        for name in ("tinit", "tfinal"):
            require_range(self, name, 0, INT_LIMIT, high_open=True)
        require_range(self, "delta_t", 1, INT_LIMIT, high_open=True)
        for name in ("beta1", "beta2"):
            require_range(self, name, 0.0, 1.0, high_open=True)
        require_range(self, "orth_reg_weight", 0.0, float("inf"), high_open=True)
        for layer, rank in (self.layer_ranks or {}).items():
            require(
                1 <= rank <= self.r,
                f"adalora layer_ranks[{layer!r}]={rank} is out of range: allowed [1, r={self.r}]",
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def rank_of(self, layer_name: str) -> int:
        return (self.layer_ranks or {}).get(layer_name, self.r)
