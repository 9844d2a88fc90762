"""BitFit on one layer: only a bias offset β (d1,) is trained; ΔW = 0 (docs/methods.md).

The batched path gathers each row's β; merging adds β into the base bias, or creates the bias
where the base layer has none (and removes it again on unmerge).
"""

from __future__ import annotations

import torch
from torch import nn

from ...serving_form.primitives import BiasDelta, LayerForm
from ..base import AdapterWeights, TargetInfo
from .config import BitFitConfig


class BitFitWeights(AdapterWeights):
    method = "bitfit"

    def __init__(self, config: BitFitConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        device, dtype = target.weight.device, target.dtype
        self.bitfit_bias = nn.Parameter(torch.zeros(target.d_out, device=device, dtype=dtype))

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        return self.bitfit_bias.new_zeros(self.d_out, self.d_in)

    def delta_norm(self, shared: nn.Module | None) -> float:
        """‖β‖: the size of the layer's change (the file's probes sketch ΔW p + β = β)."""
        return float(torch.linalg.norm(self.bitfit_bias.double()))

    def get_delta_bias(self, shared: nn.Module | None) -> torch.Tensor:
        return self.bitfit_bias

    def merge_into(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """ΔW = 0: the weight is untouched; the layer merges the bias (see ``get_delta_bias``)."""

    def unmerge_from(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """Nothing to undo in the weight."""

    @classmethod
    def table_form(cls, tables, shared, zero_row) -> LayerForm:
        """``BiasDelta(β)`` per table row (d_in 0: the tables do not hold it; ``serving_form``
        fills in the layer's)."""
        beta = tables["bitfit_bias"]  # (n, d1)
        return LayerForm(0, beta.shape[1], len(beta), bias=BiasDelta(beta))
