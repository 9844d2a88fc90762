"""AdaLoRA weights on one layer: an SVD-shaped update whose rank is pruned during training.

    ΔW = (α/r) · P · diag(λ) · Q,   P (d1, r_l), λ (r_l,), Q (r_l, d2)

``r_l`` is the layer's rank: r while training, the kept ranks after :func:`svda.trainer.adalora_budget.compact_adalora`
(the config's ``layer_ranks``). The batched path is LoRA's with ``B = P·diag(λ)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...regeneration.seeded import seeded_generator
from ...serving_form.primitives import LayerForm, LowRank
from ..base import (
    AdapterWeights,
    TargetInfo,
    check_rank_per_layer,
    constant_table,
    require,
    stack_padded_ranks,
)
from ..lora.layer import add_lora_rows, lora_rows
from .config import AdaLoraConfig


class AdaLoraWeights(AdapterWeights):
    method = "adalora"
    row_constant_fields = ("scaling",)

    def __init__(self, config: AdaLoraConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        self.r, self.scaling = config.rank_of(target.name), config.scaling
        generator = seeded_generator(config.init_seed)
        p = torch.randn(target.d_out, self.r, generator=generator) * 0.02
        q = torch.randn(self.r, target.d_in, generator=generator) * 0.02
        device, dtype = target.weight.device, target.dtype
        self.adalora_P = nn.Parameter(p.to(device=device, dtype=dtype))  # (d1, r_l)
        self.adalora_lambda = nn.Parameter(torch.zeros(self.r, device=device, dtype=dtype))
        self.adalora_Q = nn.Parameter(q.to(device=device, dtype=dtype))  # (r_l, d2)

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        return (self.adalora_P * self.adalora_lambda) @ self.adalora_Q * self.scaling

    def serving_form(self, shared, base_bias=None) -> LayerForm:
        """``LowRank(Q, (α/r)·P·diag(λ))``."""
        b = self.adalora_P * self.adalora_lambda * self.scaling  # (d1, r_l)
        return LayerForm(self.d_in, self.d_out, terms=(LowRank(self.adalora_Q[None], b[None]),))

    @classmethod
    def check_targets(cls, config: AdaLoraConfig, targets: Sequence[TargetInfo]) -> None:
        check_rank_per_layer(config, "r", config.r, targets)
        unknown = sorted(set(config.layer_ranks or {}) - {t.name for t in targets})
        require(
            not unknown,
            f"adalora layer_ranks names layers {unknown[:5]} that are not targets; "
            "name only targeted layers",
        )

    @classmethod
    def member_tables(cls, members, shared) -> dict[str, torch.Tensor]:
        """P (n+1, d1, r_max), λ (n+1, r_max), Q (n+1, r_max, d2) padded with zeros."""
        ranks = {"adalora_P": 1, "adalora_lambda": 0, "adalora_Q": 0}
        tables = stack_padded_ranks(members, ranks)
        tables["scaling"] = constant_table([m.scaling for m in members], members[0].adalora_P)
        return tables

    @classmethod
    def prepare(cls, tables, row_index, shared, ndim) -> dict[str, Any]:
        b = tables["adalora_P"] * tables["adalora_lambda"][:, None, :]  # (n, d1, r)
        return lora_rows(tables["adalora_Q"], b, tables["scaling"], row_index)

    @classmethod
    def add_prepared(cls, result, x, out0, prepared, shared, dropout=None):
        return add_lora_rows(result, x, out0, prepared)
