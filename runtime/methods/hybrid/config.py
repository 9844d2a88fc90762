"""Configuration of the hybrid LoRA-GA / BOFT method (docs/methods.md, "Hybrid")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import config_field, require_range
from ..boft.config import check_butterfly_fields
from ..lora_ga.config import LoraGaConfig


@dataclass
class HybridConfig(LoraGaConfig):
    """W' = W0 + λ·(α/r)(B·A − B0·A0) + (1 − λ)·W0·(Rᵀ − I), one λ per layer set by the trainer
    from smoothed gradient norms and frozen at export. The LoRA-GA fields (inherited: r, alpha,
    init_seed, gradient_batches, stable_gamma) and the BOFT fields mean what they mean in those
    methods."""

    method = "hybrid"

    block_size: int = config_field(
        4, "BOFT block size b (divides every target's input size); 0 to give block_num instead."
    )
    block_num: int = config_field(0, "BOFT blocks per factor, instead of block_size (then 0).")
    n_butterfly_factor: int = config_field(1, "Number of BOFT butterfly factors.")
    lambda_init: float = config_field(0.5, "λ of every layer before training.")
    lambda_smoothing: float = config_field(
        0.9,
        "β of the exponential average that sets λ each step: λ ← β·λ + (1 − β)·λ_step, "
        "λ_step = g_LoRA / (g_LoRA + g_BOFT) from the branches' gradient norms.",
    )
    lambda_min: float = config_field(
        0.05, "λ stays in [lambda_min, 1 − lambda_min], so neither branch stops learning."
    )

    def validate(self) -> None:
        super().validate()  # the LoRA-GA fields
        check_butterfly_fields(self)
        require_range(self, "lambda_min", 0.0, 0.5, high_open=True)
        require_range(self, "lambda_init", self.lambda_min, 1.0 - self.lambda_min)
        require_range(self, "lambda_smoothing", 0.0, 1.0, high_open=True)
