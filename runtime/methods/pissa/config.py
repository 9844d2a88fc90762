"""PiSSA configuration (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MAX_DIM, AdapterConfig, config_field, require_range


@dataclass
class PissaConfig(AdapterConfig):
    """ΔW = B·A − B0·A0 on the unmodified base; A0 = diag(√σ_r)·V_rᵀ, B0 = U_r·diag(√σ_r) from
    the top-r SVD of W0 (regenerated, never stored); A, B start at A0, B0."""

    method = "pissa"

    r: int = config_field(8, "Rank: the number of principal singular components adapted (≥ 1).")

    def validate(self) -> None:
        super().validate()
        require_range(self, "r", 1, MAX_DIM)
