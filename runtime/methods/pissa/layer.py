"""PiSSA weights on one layer (docs/methods.md): LoRA factors initialised from the principal part of
W0, served on the unmodified base as

    ΔW = B·A − B0·A0,   A0 = diag(√σ_r)·V_rᵀ (r, d2),   B0 = U_r·diag(√σ_r) (d1, r)

so ``B0·A0 = U_r diag(σ_r) V_rᵀ``. The frozen part comes from the layer's SVD basis (the same
shared, cached basis as SvdA: canonical sign, float64, regenerated from the base weight); only A
and B are stored. Training on the unmodified base with this ΔW is the paper's training on the
residual ``W0 − B0·A0`` (the same function of A, B).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...serving_form.primitives import LayerForm, LowRank
from ..base import (
    AdapterWeights,
    TargetInfo,
    check_rank_any_layer,
    constant_table,
    stack_padded_ranks,
    table_rows,
)
from ..lora.layer import add_lora_rows, lora_rows
from ..svda.layer import SvdaWeights
from .config import PissaConfig


class PissaWeights(AdapterWeights):
    method = "pissa"

    def __init__(self, config: PissaConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        self.r = min(config.r, shared.sigma.shape[0])
        root = shared.sigma[: self.r].detach().sqrt()
        a0 = (root[:, None] * shared.V[:, : self.r].T).contiguous()  # (r, d2)
        b0 = (shared.U[:, : self.r] * root[None, :]).contiguous()  # (d1, r)
        self.lora_A, self.lora_B = nn.Parameter(a0), nn.Parameter(b0)

    @classmethod
    def check_targets(cls, config: PissaConfig, targets: Sequence[TargetInfo]) -> None:
        check_rank_any_layer(config, "r", config.r, targets)

    @classmethod
    def shared_key(cls, config, targets) -> str:
        return "svd"  # the same frozen basis as SvdA's

    @classmethod
    def regeneration_recipe(cls, config, targets) -> list[dict[str, Any]]:
        return SvdaWeights.regeneration_recipe(config, targets)

    @classmethod
    def build_shared(cls, config, target, targets, ctx) -> nn.Module:
        return SvdaWeights.build_shared(config, target, targets, ctx)

    def constants(self) -> dict[str, float]:
        return {"rank": float(self.r)}

    @classmethod
    def row_constants(cls, config: PissaConfig) -> dict[str, float]:
        return {"rank": float(config.r)}  # the bank checks shapes, so r ≤ min(d1, d2) here

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        dtype = self.lora_A.dtype
        u, v = shared.U[:, : self.r].to(dtype), shared.V[:, : self.r].to(dtype)
        principal = (u * shared.sigma[: self.r].to(dtype)) @ v.T  # B0 A0
        return self.lora_B @ self.lora_A - principal  # (d1, d2)

    def serving_form(self, shared, base_bias=None) -> LayerForm:
        """Rank 2r: ``LowRank([A; V_rᵀ], [B, −U_r·diag(σ_r)])``."""
        dtype = self.lora_A.dtype
        u, v = shared.U[:, : self.r].to(dtype), shared.V[:, : self.r].to(dtype)
        a = torch.cat([self.lora_A, v.T])  # (2r, d2)
        b = torch.cat([self.lora_B, -u * shared.sigma[: self.r].to(dtype)], dim=1)  # (d1, 2r)
        return LayerForm(self.d_in, self.d_out, terms=(LowRank(a[None], b[None]),))

    @classmethod
    def member_tables(cls, members, shared) -> dict[str, torch.Tensor]:
        """A (n+1, r_max, d2), B (n+1, d1, r_max) padded with zeros; rank (n+1,)."""
        tables = stack_padded_ranks(members, {"lora_A": 0, "lora_B": 1})
        tables["rank"] = constant_table([float(m.r) for m in members], members[0].lora_A)
        return tables

    @classmethod
    def prepare(cls, tables, row_index, shared, ndim) -> dict[str, Any]:
        """Each row's A, B, and σ_r masked to its rank (zeros for rows at -1)."""
        r = tables["lora_A"].shape[1]
        prepared = lora_rows(tables["lora_A"], tables["lora_B"], None, row_index)
        ranks = table_rows(tables["rank"][:, None], row_index, ndim)  # (B, 1.., 1) or (1,)
        sigma = shared.sigma[:r].to(tables["lora_A"].dtype)
        prepared["sigma"] = sigma * (torch.arange(r, device=sigma.device) < ranks)
        return prepared

    @classmethod
    def add_prepared(cls, result, x, out0, prepared, shared, dropout=None):
        """``result + B (A x) − U_r (σ_r ⊙ V_rᵀ x)``: the principal part once for the batch."""
        result = add_lora_rows(result, x, out0, prepared)
        r = prepared["sigma"].shape[-1]
        projected = F.linear(x, shared.V[:, :r].T)  # (B, ..., r)
        principal = F.linear(projected * prepared["sigma"], shared.U[:, :r])  # (B, ..., d1)
        return result - principal.to(result.dtype)
