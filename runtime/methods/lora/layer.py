"""LoRA weights on one layer: ΔW = (α/r) · B · A (Hu et al., 2021).

Shapes: A (r, d2), B (d1, r). The batched path gathers each row's A and B (vLLM's
``bgmv`` in plain torch): rows of the same batch may use adapters of different rank, padded with
zeros to the largest rank present.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...regeneration.seeded import kaiming_uniform, seeded_generator
from ..base import AdapterWeights, TargetInfo
from .config import LoraConfig


class LoraWeights(AdapterWeights):
    method = "lora"

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
    def batched_delta(
        cls,
        x: torch.Tensor,
        out0: torch.Tensor,
        members: Sequence[AdapterWeights],
        row_index: torch.Tensor | None,
        shared: nn.Module | None,
    ) -> torch.Tensor:
        if row_index is None:
            m = members[0]
            return F.linear(F.linear(m.dropout(x), m.lora_A), m.lora_B) * m.scaling
        a_table, b_table = _padded_tables(members)  # (n+1, r, d2), (n+1, d1, r); last row zero
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, d2)
        a_rows = a_table[row_index]  # (B, r, d2)
        b_rows = b_table[row_index]  # (B, d1, r), scaling folded in
        hidden = torch.bmm(x3, a_rows.transpose(1, 2))  # (B, T, r)
        out = torch.bmm(hidden, b_rows.transpose(1, 2))  # (B, T, d1)
        return out.reshape(out0.shape)


def _padded_tables(members: Sequence[LoraWeights]) -> tuple[torch.Tensor, torch.Tensor]:
    r_max = max(m.r for m in members)
    first = members[0].lora_A
    n, d_out, d_in = len(members), members[0].d_out, members[0].d_in
    a_table = first.new_zeros(n + 1, r_max, d_in)
    b_table = first.new_zeros(n + 1, d_out, r_max)
    for i, m in enumerate(members):
        a_table[i, : m.r] = m.lora_A
        b_table[i, :, : m.r] = m.lora_B * m.scaling
    return a_table, b_table
