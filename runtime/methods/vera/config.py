"""VeRA configuration (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import INT_LIMIT, MAX_DIM, AdapterConfig, config_field, require_range


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
        require_range(self, "r", 1, MAX_DIM)
        require_range(self, "projection_seed", 0, INT_LIMIT, high_open=True)
        require_range(self, "dropout", 0.0, 1.0, high_open=True)
