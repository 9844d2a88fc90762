"""BitFit configuration (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning
for Transformer-based Masked Language-models")."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import AdapterConfig, config_field


@dataclass
class BitFitConfig(AdapterConfig):
    """ΔW = 0, bias' = bias + β with β ∈ R^{d1} (β = 0 at init); a bias is added where the base
    layer has none."""

    method = "bitfit"

    targets: str = config_field(
        "all-linear",
        "Layers whose bias is trained: comma-separated name suffixes, 're:<regex>', or "
        "'all-linear' (every linear layer except the output head).",
    )
