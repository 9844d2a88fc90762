"""SvdA configuration (SVD-based adaptation; docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MAX_DIM, AdapterConfig, config_field, require, require_range

S_INITS = ("singular", "constant")


@dataclass
class SvdaConfig(AdapterConfig):
    """ΔW = diag(b) · U · diag(s) · Vᵀ; U, V frozen from the SVD of W0; s, b trained."""

    method = "svda"

    s_init: str = config_field(
        "singular", "Initial s: 'singular' (the singular values σ of W0) or 'constant'."
    )
    s_constant: float = config_field(1.0, "Value of every entry of s when s_init='constant'.")
    top_k: int | None = config_field(
        None,
        "Train s on the top-k singular components only (others stay at σ, so δ = s − σ is "
        "sparse by construction and the forward touches only k columns of U, V). None: all.",
    )

    def validate(self) -> None:
        super().validate()
        require(
            self.s_init in S_INITS, f"svda s_init must be one of {S_INITS}, got {self.s_init!r}"
        )
        if self.top_k is not None:
            require_range(self, "top_k", 1, MAX_DIM)
