"""LoRA-GA weights on one layer (docs/methods.md).

    ΔW = (α/r) · (B·A − B0·A0),   A, A0 (r, d2),   B, B0 (d1, r)

Before training, A0, B0 are set from the SVD of the loss gradient G = ∂L/∂W0 (``G = U S Vᵀ``):
``A0 = Vᵀ[:r]``, ``B0 = U[:, r:2r]``, both times the stable scale ``d1^(1/4) / √γ``, and A, B
start equal to them, so ΔW = 0 at step 0 while the first step moves along the gradient's
principal directions. A0, B0 are frozen but data-dependent: they are stored (as LoRA-GA's
published checkpoints are), and the adapter serves on the unmodified base as the rank-2r LoRA
``[B, −B0][A; A0]``. Without a gradient initialisation, A = A0 (Kaiming) and B = B0 = 0, i.e.
plain LoRA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
from .config import LoraGaConfig

RANK_DIMS = {"lora_A": 0, "lora_B": 1, "lora_A0": 0, "lora_B0": 1}  # kind -> its rank dimension


class LoraGaWeights(AdapterWeights):
    method = "lora_ga"
    row_constant_fields = ("scaling",)

    def __init__(self, config: LoraGaConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        self.r, self.scaling, self.gamma = config.r, config.scaling, config.stable_gamma
        device, dtype = target.weight.device, target.dtype
        a = kaiming_uniform((config.r, target.d_in), seeded_generator(config.init_seed))
        a = a.to(device=device, dtype=dtype)
        b = torch.zeros(target.d_out, config.r, device=device, dtype=dtype)
        self.lora_A, self.lora_B = nn.Parameter(a.clone()), nn.Parameter(b.clone())
        self.lora_A0 = nn.Parameter(a, requires_grad=False)  # frozen, stored
        self.lora_B0 = nn.Parameter(b, requires_grad=False)

    def initialise_from_gradient(self, grad_oi: torch.Tensor) -> None:
        """Set A0, B0 (and A, B to them) from the gradient ∂L/∂W0 as (d1, d2)."""
        set_factors_from_gradient(self, grad_oi)

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        return (self.lora_B @ self.lora_A - self.lora_B0 @ self.lora_A0) * self.scaling

    @classmethod
    def check_targets(cls, config: LoraGaConfig, targets: Sequence[TargetInfo]) -> None:
        check_rank_per_layer(config, "r", config.r, targets, factor=2)

    @classmethod
    def member_tables(cls, members, shared) -> dict[str, torch.Tensor]:
        """A, A0 (n+1, r_max, d2), B, B0 (n+1, d1, r_max) padded with zeros; scaling (n+1,)."""
        tables = stack_padded_ranks(members, RANK_DIMS)
        tables["scaling"] = constant_table([m.scaling for m in members], members[0].lora_A)
        return tables

    @classmethod
    def table_form(cls, tables, shared, zero_row) -> LayerForm:
        """Rank 2r per table row: ``LowRank([A; A0], (α/r)·[B, −B0])``."""
        a = torch.cat([tables["lora_A"], tables["lora_A0"]], dim=1)  # (n, 2r, d2)
        b = torch.cat([tables["lora_B"], -tables["lora_B0"]], dim=2)  # (n, d1, 2r)
        b = b * tables["scaling"][:, None, None]
        return LayerForm(a.shape[2], b.shape[1], len(a), terms=(LowRank(a, b),))


@torch.no_grad()
def set_factors_from_gradient(weights: nn.Module, grad_oi: torch.Tensor) -> None:
    """LoRA-GA's initialisation of a module holding ``lora_A, lora_B, lora_A0, lora_B0`` (rank
    ``weights.r``, stable-scale ``weights.gamma``): ``A0 = Vᵀ[:r]``, ``B0 = U[:, r:2r]`` of the
    gradient's SVD, times ``d1^(1/4) / √γ``; A, B start equal to them (ΔW stays 0)."""
    r = weights.r
    if 2 * r > min(grad_oi.shape):
        raise ValueError(
            f"{weights.method} needs 2r ≤ min(d1, d2) = {min(grad_oi.shape)}; "
            f"use r ≤ {min(grad_oi.shape) // 2}"
        )
    u, _, vh = torch.linalg.svd(grad_oi.double(), full_matrices=False)
    scale = weights.d_out**0.25 / weights.gamma**0.5
    a0, b0 = vh[:r] * scale, u[:, r : 2 * r] * scale  # (r, d2), (d1, r)
    for target, value in ((weights.lora_A, a0), (weights.lora_A0, a0)):
        target.copy_(value.to(target.dtype))
    for target, value in ((weights.lora_B, b0), (weights.lora_B0, b0)):
        target.copy_(value.to(target.dtype))
