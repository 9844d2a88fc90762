"""LoRA weights on one layer: ΔW = (α/r) · B · A (Hu et al., 2021).

Shapes: A (r, d2), B (d1, r). The batched path gathers each row's A and B (vLLM's
``bgmv`` in plain torch): rows of the same batch may use adapters of different rank, padded with
zeros to the largest rank present; α/r is a per-row constant beside the tables. It runs through
the serving form (``table_form``: ``LowRank(A, (α/r)·B)``, ``serving_form.fast``);
``lora_rows``/``add_lora_rows`` stay for the methods that build on them (PiSSA, the hybrid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...regeneration.seeded import kaiming_uniform, seeded_generator
from ...serving_form.primitives import LayerForm, LowRank
from ..base import (
    AdapterWeights,
    TargetInfo,
    check_rank_per_layer,
    constant_table,
    stack_padded_ranks,
)
from .config import LoraConfig


class LoraWeights(AdapterWeights):
    method = "lora"
    row_constant_fields = ("scaling",)

    def __init__(self, config: LoraConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        self.r, self.scaling = config.r, config.scaling
        generator = seeded_generator(config.init_seed)
        a = kaiming_uniform((config.r, target.d_in), generator)
        device, dtype = target.weight.device, target.dtype
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))  # (r, d2)
        self.lora_B = nn.Parameter(torch.zeros(target.d_out, config.r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (d1, d2)

    @classmethod
    def check_targets(cls, config: LoraConfig, targets: Sequence[TargetInfo]) -> None:
        check_rank_per_layer(config, "r", config.r, targets)

    @classmethod
    def member_tables(cls, members, shared) -> dict[str, torch.Tensor]:
        """A (n+1, r_max, d2), B (n+1, d1, r_max), scaling (n+1,); ranks padded with zeros."""
        tables = stack_padded_ranks(members, {"lora_A": 0, "lora_B": 1})
        tables["scaling"] = constant_table([m.scaling for m in members], members[0].lora_A)
        return tables

    @classmethod
    def table_form(cls, tables, shared, zero_row) -> LayerForm:
        """``LowRank(A, (α/r)·B)`` per table row."""
        a, b = tables["lora_A"], tables["lora_B"] * tables["scaling"][:, None, None]
        return LayerForm(a.shape[2], b.shape[1], len(a), terms=(LowRank(a, b),))  # A (n, r, d2)


def lora_rows(
    a_table: torch.Tensor,
    b_table: torch.Tensor,
    scaling: torch.Tensor | None,
    row_index: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Each row's A (B, r, d2) and scaled B (B, d1, r); with ``row_index`` None, table row 0 as
    (r, d2), (d1, r). ``scaling``: (n,) per table row, or None for 1."""
    if row_index is None:
        b = b_table[0] if scaling is None else b_table[0] * scaling[0]
        return {"A": a_table[0], "B": b}
    b = b_table[row_index]
    if scaling is not None:
        b = b * scaling[row_index, None, None]
    return {"A": a_table[row_index], "B": b}


def add_lora_rows(
    result: torch.Tensor, x: torch.Tensor, out0: torch.Tensor, rows: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``result + B_row (A_row x_row)`` (vLLM's bgmv in plain torch: two batched products)."""
    a, b = rows["A"], rows["B"]
    if a.dim() == 2:
        return result + F.linear(F.linear(x, a), b).to(result.dtype)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d2)
    hidden = torch.bmm(x3, a.transpose(1, 2))  # (B, T, r)
    out = torch.bmm(hidden, b.transpose(1, 2))  # (B, T, d1)
    return result + out.reshape(out0.shape).to(result.dtype)
