"""DoRA weights on one layer (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

    W' = g ⊙ (W0 + s·B·A),   g = m / ‖W0 + s·B·A‖_row   (s = α/r; one norm per output row)

as HF PEFT's ``use_dora=True`` on linear layers: the norm is over each row of the ``(d1, d2)``
weight (PEFT's ``torch.linalg.norm(weight, dim=1)``) and is detached in training (the paper's
§4.3, as PEFT). Trainable and stored: A (r, d2), B (d1, r) and the magnitude ``dora_m`` (d1,),
which starts at ‖W0‖_row so that an untouched adapter is the base exactly. Frozen: W0, read by
reference (never stored). The batched path, per row:

    y = W0 x + b0 + (g − 1) ⊙ W0 x + (g·s·B)(A x)

served through its form ``OutputScale(g − 1)`` + ``LowRank(A, g·s·B)`` (``table_form``), with g
computed per table row once per batch composition (for a slot bank, once until its slots
change).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...regeneration.seeded import kaiming_uniform, seeded_generator
from ...serving_form.fast import gather_slots
from ...serving_form.primitives import LayerForm, LowRank, OutputScale
from ..base import (
    AdapterWeights,
    TargetInfo,
    check_rank_per_layer,
    constant_table,
    stack_padded_ranks,
    stack_with_zero_row,
)
from ..boft.layer import BaseWeightShared
from .config import DoraConfig

TINY_NORM = 1e-30  # a zero row of W0 + s·B·A has no direction: g = m / TINY_NORM stays finite


def row_norms(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖W0 + B·A‖`` of every row for stacked factors: A (n, r, d2), B (n, d1, r) (scale folded
    into B) -> (n, d1). Detached (DoRA's norm carries no gradient)."""
    with torch.no_grad():
        merged = torch.baddbmm(w0.to(a.dtype).expand(a.shape[0], -1, -1), b, a)  # (n, d1, d2)
        return torch.linalg.vector_norm(merged, dim=-1).clamp_min(TINY_NORM)


class DoraWeights(AdapterWeights):
    method = "dora"
    row_constant_fields = ("scaling",)

    def __init__(self, config: DoraConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        self.r, self.scaling = config.r, config.scaling
        a = kaiming_uniform((config.r, target.d_in), seeded_generator(config.init_seed))
        device, dtype = target.weight.device, target.dtype
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))  # (r, d2)
        self.lora_B = nn.Parameter(torch.zeros(target.d_out, config.r, device=device, dtype=dtype))
        norm = torch.linalg.vector_norm(target.weight.detach().to(dtype), dim=1)  # B = 0
        self.dora_m = nn.Parameter(norm.clone())  # (d1,)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @classmethod
    def check_targets(cls, config: DoraConfig, targets: Sequence[TargetInfo]) -> None:
        check_rank_per_layer(config, "r", config.r, targets)

    @classmethod
    def shared_key(cls, config: DoraConfig, targets: Sequence[TargetInfo]) -> str:
        return "dora"

    @classmethod
    def build_shared(cls, config, target, targets, ctx) -> nn.Module:
        return BaseWeightShared(target.weight, identity="")

    # ----- reference math and merge --------------------------------------------------------
    def gain(self, shared: BaseWeightShared) -> torch.Tensor:
        """g = m / ‖W0 + s·B·A‖_row (d1,)."""
        b = (self.lora_B * self.scaling)[None]
        return self.dora_m / row_norms(shared.weight_for(self.lora_A), self.lora_A[None], b)[0]

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        w0 = shared.weight_for(self.lora_A).to(self.lora_A.dtype)
        directed = w0 + (self.lora_B @ self.lora_A) * self.scaling  # (d1, d2)
        return self.gain(shared)[:, None] * directed - w0

    def merge_into(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """``W ← W + ΔW`` (float64), keeping the original: ΔW depends on W0 itself."""
        delta = self.get_delta_weight(shared).to(torch.float64)
        shared.kept[weight_oi.data_ptr()] = weight_oi.detach().clone()
        weight_oi.copy_((weight_oi.to(torch.float64) + delta).to(weight_oi.dtype))

    def unmerge_from(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        kept = shared.kept.pop(weight_oi.data_ptr(), None)
        if kept is None:
            raise RuntimeError("dora: unmerge without merge_into; the original weight is unknown")
        weight_oi.copy_(kept)

    # ----- batched forward -----------------------------------------------------------------
    @classmethod
    def member_tables(cls, members, shared) -> dict[str, torch.Tensor]:
        """A (n+1, r_max, d2), B (n+1, d1, r_max) zero-padded, m (n+1, d1), scaling (n+1,); the
        last row is zeros."""
        tables = stack_padded_ranks(members, {"lora_A": 0, "lora_B": 1})
        tables["dora_m"] = stack_with_zero_row([m.dora_m for m in members])
        tables["scaling"] = constant_table([m.scaling for m in members], members[0].lora_A)
        return tables

    @classmethod
    def table_form(cls, tables, shared, zero_row) -> LayerForm:
        """``OutputScale(g − 1)`` and ``LowRank(A, g·s·B)`` per table row; with ``zero_row`` the
        last row gets g = 1 (its m is 0): exactly the base."""
        a, b = tables["lora_A"], tables["lora_B"] * tables["scaling"][:, None, None]
        g = tables["dora_m"] / row_norms(shared.weight_for(a), a, b)  # (n, d1)
        if zero_row:
            g = torch.cat([g[:-1], torch.ones_like(g[-1:])])
        low_rank = LowRank(a, g[:, :, None] * b)
        return LayerForm(
            a.shape[2], b.shape[1], len(a), output_scale=OutputScale(g - 1), terms=(low_rank,)
        )

    @classmethod
    def prepare_bank(cls, bank: Any, row_index: torch.Tensor, ndim: int) -> list[dict[str, Any]]:
        """Per layer, the form of every slot is computed once per bank content (g needs
        ``W0 + s·B·A`` of each slot: O(slots·d1·d2·r)) and kept until an adapter is added or
        removed; a new batch composition only gathers rows."""
        memo = bank.memo.setdefault("dora_forms", {})
        if memo.get("version") != bank.version:
            memo.clear()
            memo["version"] = bank.version
            memo["layers"] = [
                cls.table_form(tables, shared, zero_row=True)
                for tables, shared in zip(bank.layer_tables, bank.shared_modules, strict=True)
            ]
        return [{"form": gather_slots(form, row_index)} for form in memo["layers"]]
