"""AdaLoRA weights on one layer: an SVD-shaped update whose rank is pruned during training.

    ΔW = (α/r) · P · diag(λ) · Q,   P (d1, r_l), λ (r_l,), Q (r_l, d2)

``r_l`` is the layer's rank: r while training, the kept ranks after :func:`svda.trainer.adalora_budget.compact_adalora`
(the config's ``layer_ranks``). The batched path is LoRA's with ``B = P·diag(λ)``.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    def table_form(cls, tables, shared, zero_row) -> LayerForm:
        """``LowRank(Q, (α/r)·P·diag(λ))`` per table row."""
        q, p = tables["adalora_Q"], tables["adalora_P"]  # (n, r, d2), (n, d1, r)
        b = p * (tables["adalora_lambda"] * tables["scaling"][:, None])[:, None, :]
        return LayerForm(q.shape[2], p.shape[1], len(q), terms=(LowRank(q, b),))
