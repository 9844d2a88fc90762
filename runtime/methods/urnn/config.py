"""uRNN-unitary configuration (Arjovsky et al., 2016, "Unitary Evolution Recurrent Neural
Networks"; applied here to transformer weights)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import INT_LIMIT, AdapterConfig, config_field, require_range


@dataclass
class UrnnConfig(AdapterConfig):
    """W' = R · W0, R = U(θ, v) · U(0, v0)ᴴ orthogonal on R^{d1} (d1 even), O(d1) parameters."""

    method = "urnn"

    permutation_seed: int = config_field(
        0,
        "Seed of the CPU torch.Generator that regenerates, per layer width, the fixed "
        "permutation Π and the initial reflection vectors v0 (never stored).",
    )

    def validate(self) -> None:
        super().validate()
        require_range(self, "permutation_seed", 0, INT_LIMIT, high_open=True)
