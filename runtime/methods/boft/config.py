"""BOFT configuration (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"; field names follow HF PEFT's ``BOFTConfig`` without the ``boft_`` prefix)."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import AdapterConfig, config_field, require


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
        for name in ("block_size", "block_num", "n_butterfly_factor"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"boft {name} must be an integer ≥ 0, got {value!r}",
            )
        require(
            (self.block_size > 0) != (self.block_num > 0),
            "boft needs exactly one of block_size and block_num > 0 (the other 0), got "
            f"block_size={self.block_size}, block_num={self.block_num}",
        )
        require(
            self.n_butterfly_factor >= 1,
            f"boft n_butterfly_factor must be ≥ 1, got {self.n_butterfly_factor}",
        )
        require(
            self.block_size != 1,
            "boft block_size must be ≥ 2 (a 1×1 orthogonal block is fixed): got 1",
        )
        spread = 2 ** (self.n_butterfly_factor - 1)
        if spread > 1 and self.block_size:
            require(
                self.block_size % 2 == 0,
                f"boft with n_butterfly_factor {self.n_butterfly_factor} needs an even block_size, "
                f"got {self.block_size}",
            )
        if spread > 1 and self.block_num:
            require(
                self.block_num % max(spread, 2) == 0,
                f"boft with n_butterfly_factor {self.n_butterfly_factor} needs block_num divisible "
                f"by {max(spread, 2)}, got {self.block_num}",
            )
        require(
            isinstance(self.scale, bool), f"boft scale must be true or false, got {self.scale!r}"
        )
        require(0.0 <= self.dropout < 1.0, f"boft dropout must be in [0, 1), got {self.dropout!r}")
