"""VeRA configuration (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import AdapterConfig, config_field, require


@dataclass
class VeraConfig(AdapterConfig):
    """ΔW = diag(b) · B · diag(d) · A; A, B random from a seed, shared by every layer."""

    method = "vera"

    r: int = config_field(256, "Rank of the shared random projections (r ≥ 1).")
    d_init: float = config_field(0.1, "Initial value of every entry of the scaling vector d.")
    projection_seed: int = config_field(
        0, "Seed of the CPU torch.Generator that regenerates A and B (PEFT's projection_prng_key)."
    )
    dropout: float = config_field(0.0, "Dropout on the VeRA branch input, in training only.")

    def validate(self) -> None:
        super().validate()
        require(
            isinstance(self.r, int) and self.r >= 1,
            f"vera r must be an integer ≥ 1, got {self.r!r}",
        )
        require(
            isinstance(self.projection_seed, int) and 0 <= self.projection_seed < 2**63,
            f"vera projection_seed must be an integer in [0, 2**63), got {self.projection_seed!r}",
        )
        require(0.0 <= self.dropout < 1.0, f"vera dropout must be in [0, 1), got {self.dropout!r}")
