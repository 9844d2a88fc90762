"""Configuration of the hybrid LoRA-GA / BOFT method (seed 003, SPEC.md §3 "Hybrid")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import config_field, require
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
        require(
            isinstance(self.n_butterfly_factor, int) and self.n_butterfly_factor >= 1,
            f"hybrid n_butterfly_factor must be an integer ≥ 1, got {self.n_butterfly_factor!r}",
        )
        require(
            (self.block_size > 0) != (self.block_num > 0) and self.block_size != 1,
            "hybrid needs exactly one of block_size (≥ 2) and block_num > 0, the other 0; got "
            f"block_size={self.block_size}, block_num={self.block_num}",
        )
        require(
            0.0 <= self.lambda_min < 0.5,
            f"hybrid lambda_min must be in [0, 0.5), got {self.lambda_min!r}",
        )
        require(
            self.lambda_min <= self.lambda_init <= 1.0 - self.lambda_min,
            f"hybrid lambda_init must be in [lambda_min, 1 − lambda_min] = "
            f"[{self.lambda_min}, {1 - self.lambda_min}], got {self.lambda_init!r}",
        )
        require(
            0.0 <= self.lambda_smoothing < 1.0,
            f"hybrid lambda_smoothing must be in [0, 1), got {self.lambda_smoothing!r}",
        )
