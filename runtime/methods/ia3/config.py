"""(IA)³ configuration (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better
and Cheaper than In-Context Learning")."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import AdapterConfigError
from ...targets import matches, parse_targets
from ..base import AdapterConfig, config_field


@dataclass
class Ia3Config(AdapterConfig):
    """``y = l ⊙ (W0 x + b0)`` on attention layers, ``y = W0 (l ⊙ x) + b0`` on feed-forward
    layers (PEFT's IA3); ``l`` starts at 1."""

    method = "ia3"

    targets: str = config_field(
        "k_proj,v_proj,down_proj",
        "Layers to adapt: comma-separated name suffixes, 're:<regex>' or 'all-linear' (the "
        "paper's choice: keys, values and the feed-forward output).",
    )
    feedforward_modules: str | None = config_field(
        "down_proj",
        "Targets whose *input* is scaled (l ∈ R^{d_in}) instead of their output, in the grammar of "
        "targets; null for none. Names that match no target are ignored.",
    )

    def validate(self) -> None:
        super().validate()
        if self.feedforward_modules is not None:
            try:
                parse_targets(self.feedforward_modules)
            except AdapterConfigError as exc:
                raise AdapterConfigError(
                    f"ia3 feedforward_modules={self.feedforward_modules!r}: {exc}; use null for "
                    "no feed-forward layers"
                ) from None

    def is_feedforward(self, layer: str) -> bool:
        """Whether ``layer`` (a full module name) scales its input."""
        if self.feedforward_modules is None:
            return False
        return any(matches(layer, p) for p in parse_targets(self.feedforward_modules))
