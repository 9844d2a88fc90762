"""Serial (Houlsby-style) bottleneck adapter configuration (LLM-Adapters, Hu et al., 2023; Houlsby et
al., 2019, "Parameter-Efficient Transfer Learning for NLP")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import INT_LIMIT, MAX_DIM, AdapterConfig, config_field, require, require_range

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclass
class BottleneckConfig(AdapterConfig):
    """Fields shared by serial and parallel bottleneck adapters."""

    targets: str = config_field(
        "mlp", "Blocks to adapt: 'mlp', 'self_attn' (GPT-2: 'attn'), or 're:<regex>'."
    )
    bottleneck: int = config_field(16, "Width of the bottleneck (≥ 1).")
    activation: str = config_field("relu", f"Non-linearity f: one of {ACTIVATIONS}.")
    scale: float = config_field(1.0, "Multiplier of the adapter's output.")
    init_seed: int = config_field(0, "Seed of the initialisation of W_down (W_up starts at 0).")

    def validate(self) -> None:
        super().validate()
        require_range(self, "bottleneck", 1, MAX_DIM)
        require_range(self, "init_seed", 0, INT_LIMIT, high_open=True)
        require(
            self.activation in ACTIVATIONS,
            f"{self.method} activation must be one of {ACTIVATIONS}, got {self.activation!r}",
        )


@dataclass
class SerialAdapterConfig(BottleneckConfig):
    """H ← H + s·(f(H·W_downᵀ + b_down)·W_upᵀ + b_up) on a block's output H (after the MLP)."""

    method = "serial_adapter"
