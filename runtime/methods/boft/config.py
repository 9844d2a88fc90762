"""BOFT configuration (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"; field names follow HF PEFT's ``BOFTConfig`` without the ``boft_`` prefix)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import (
    MAX_BUTTERFLY_FACTORS,
    MAX_DIM,
    AdapterConfig,
    config_field,
    require,
    require_range,
)


@dataclass
class BoftConfig(AdapterConfig):
    """W' = diag(s) · W0 · Rᵀ with R a product of butterfly factors of Cayley-orthogonal blocks."""

    method = "boft"

    block_size: int = config_field(
        4,
        "Size b of the orthogonal blocks (PEFT's boft_block_size); it must divide every target's "
        "input size. Set 0 to give block_num instead.",
    )
    block_num: int = config_field(
        0,
        "Number of blocks per factor (PEFT's boft_block_num), instead of block_size (then 0).",
    )
    n_butterfly_factor: int = config_field(
        1,
        "Number m of butterfly factors (1: plain block-diagonal OFT; m > 1 needs an even block "
        "size and b·2^(m-1) dividing the input size).",
    )
    scale: bool = config_field(
        True, "Train a per-output-channel scale s (PEFT's boft_s); False stores R only."
    )
    dropout: float = config_field(
        0.0,
        "PEFT's multiplicative dropout, in training only: this fraction of the blocks of one "
        "random factor is replaced by the identity.",
    )

    def validate(self) -> None:
        super().validate()
        check_butterfly_fields(self)
        require_range(self, "dropout", 0.0, 1.0, high_open=True)


def check_butterfly_fields(config: AdapterConfig) -> None:
    """The block fields BOFT and the hybrid share (``block_size``, ``block_num``,
    ``n_butterfly_factor``), bounded before any power of two is computed from them."""
    require_range(config, "n_butterfly_factor", 1, MAX_BUTTERFLY_FACTORS)
    require_range(config, "block_size", 0, MAX_DIM)
    require_range(config, "block_num", 0, MAX_DIM)
    size, num, m = config.block_size, config.block_num, config.n_butterfly_factor
    require(
        (size > 0) != (num > 0),
        f"{config.method} needs exactly one of block_size and block_num > 0 (the other 0), got "
        f"block_size={size}, block_num={num}",
    )
    require(
        size != 1,
        f"{config.method} block_size=1 is out of range: allowed ≥ 2 (a 1×1 orthogonal block "
        "is fixed)",
    )
    spread = 2 ** (m - 1)
    if spread > 1 and size:
        require(
            size % 2 == 0,
            f"{config.method} with n_butterfly_factor {m} needs an even block_size, got {size}",
        )
    if spread > 1 and num:
        require(
            num % max(spread, 2) == 0,
            f"{config.method} with n_butterfly_factor {m} needs block_num divisible by "
            f"{max(spread, 2)}, got {num}",
        )
