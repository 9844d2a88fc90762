"""Hybrid LoRA-GA / BOFT weights on one layer (docs/methods.md, "Hybrid").

    W' = W0 + λ · (α/r)(B·A − B0·A0) + (1 − λ) · W0 · (Rᵀ − I)

``B·A − B0·A0`` is LoRA-GA's update (A0, B0 from the gradient's SVD, stored), ``R`` a BOFT
rotation of the input side (butterfly product of Cayley-orthogonal blocks; the seed rotates the
output side, ``(R − I)·W0``: both sides allow the input-side equivalent, which reuses BOFT's
kernels and PEFT's layout). ``λ ∈ [0, 1]`` is one number per layer, set by the trainer from the
branches' smoothed gradient norms (``svda.trainer.method_hooks.HybridLambda``), frozen at export
and stored as the tensor ``hybrid_lambda (1,)``. Unlike the seed's Algorithm 2, the hybrid delta
is never added into W during training: the adapter would then depend on the whole trajectory and
could not be stored as one.

Everything is linear in W0, so ΔW is additive: it merges as ``W ← W + ΔW`` and batches across
tenants. Fast path per batch row (one extra product with the shared base weight):

    ΔW x = λ (α/r) [B, −B0]([A; A0] x) + (1 − λ) W0 (Rᵀx − x)

Unmerge restores the original weight kept at merge time: inverting ``W0 (λI + (1 − λ)Rᵀ)`` can be
ill-conditioned, a copy is exact (it costs one weight copy per merged layer while merged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...regeneration.seeded import kaiming_uniform, seeded_generator
from ...serving_form.primitives import InputRotation, LayerForm, LowRank
from ..base import AdapterWeights, TargetInfo, check_rank_per_layer, stack_with_zero_row, table_rows
from ..boft.layer import BoftShared, BoftWeights, block_layout_of
from ..boft.ops import cayley, dense_rotation, rotate_rows, triangle_size
from ..lora.layer import add_lora_rows, lora_rows
from ..lora_ga.layer import LoraGaWeights, set_factors_from_gradient
from .config import HybridConfig


class HybridWeights(AdapterWeights):
    method = "hybrid"
    row_constant_fields = ("scaling",)

    def __init__(self, config: HybridConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        self.r, self.scaling, self.gamma = config.r, config.scaling, config.stable_gamma
        n_blocks, self.block_size = block_layout_of(config, target)
        device, dtype = target.weight.device, target.dtype
        a = kaiming_uniform((config.r, target.d_in), seeded_generator(config.init_seed))
        a = a.to(device=device, dtype=dtype)  # (r, d2)
        b = torch.zeros(target.d_out, config.r, device=device, dtype=dtype)  # (d1, r)
        self.lora_A, self.lora_B = nn.Parameter(a.clone()), nn.Parameter(b.clone())
        self.lora_A0 = nn.Parameter(a, requires_grad=False)  # frozen, data-dependent: stored
        self.lora_B0 = nn.Parameter(b, requires_grad=False)
        q = torch.zeros(config.n_butterfly_factor, n_blocks, triangle_size(self.block_size))
        self.boft_q = nn.Parameter(q.to(device=device, dtype=dtype))  # (m, D, b(b-1)/2)
        lam = torch.full((1,), config.lambda_init, device=device, dtype=dtype)
        self.hybrid_lambda = nn.Parameter(lam, requires_grad=False)  # set by the trainer

    def initialise_from_gradient(self, grad_oi: torch.Tensor) -> None:
        """LoRA-GA's initialisation of the low-rank branch from ∂L/∂W0 (d1, d2)."""
        set_factors_from_gradient(self, grad_oi)

    # ----- shared frozen state: BOFT's (the live base weight and the butterfly permutations) ----
    @classmethod
    def check_targets(cls, config: HybridConfig, targets: Sequence[TargetInfo]) -> None:
        check_rank_per_layer(config, "r", config.r, targets, factor=2)
        for target in targets:
            block_layout_of(config, target)

    @classmethod
    def shared_key(cls, config: HybridConfig, targets: Sequence[TargetInfo]) -> str:
        return BoftWeights.shared_key(config, targets)

    @classmethod
    def build_shared(cls, config, target, targets, ctx) -> nn.Module:
        return BoftWeights.build_shared(config, target, targets, ctx)

    # ----- reference math and merge --------------------------------------------------------
    def low_rank_delta(self) -> torch.Tensor:
        """(α/r)(B·A − B0·A0) as (d1, d2)."""
        return (self.lora_B @ self.lora_A - self.lora_B0 @ self.lora_A0) * self.scaling

    def rotation_delta(self, shared: BoftShared) -> torch.Tensor:
        """W0 (Rᵀ − I) as (d1, d2)."""
        r = dense_rotation(
            cayley(self.boft_q, self.block_size), shared.perms, shared.inverse, self.d_in
        )
        w0 = shared.weight_for(r).to(r.dtype)
        return w0 @ r.T - w0

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        lam = self.hybrid_lambda
        return lam * self.low_rank_delta() + (1 - lam) * self.rotation_delta(shared)

    def serving_form(self, shared, base_bias=None) -> LayerForm:
        """``InputRotation(Cayley(Q), mix 1 − λ)`` and rank-2r ``LowRank`` scaled by λ·α/r."""
        lam = self.hybrid_lambda  # (1,)
        blocks = cayley(self.boft_q, self.block_size)[None]  # (1, m, D, b, b)
        rotation = InputRotation(blocks, shared.perms, 1 - lam)
        a = torch.cat([self.lora_A, self.lora_A0])  # (2r, d2)
        b = torch.cat([self.lora_B, -self.lora_B0], dim=1) * (lam * self.scaling)  # (d1, 2r)
        terms = (LowRank(a[None], b[None]),)
        return LayerForm(self.d_in, self.d_out, input_rotation=rotation, terms=terms)

    def merge_into(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """``W ← W + ΔW`` (float64), keeping the original for an exact unmerge."""
        shared.kept[weight_oi.data_ptr()] = weight_oi.detach().clone()
        super().merge_into(weight_oi, shared)

    def unmerge_from(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        kept = shared.kept.pop(weight_oi.data_ptr(), None)
        if kept is None:  # merged by a caller that bypassed merge_into: subtract in float64
            super().unmerge_from(weight_oi, shared)
        else:
            weight_oi.copy_(kept)

    # ----- batched forward -----------------------------------------------------------------
    @classmethod
    def member_tables(cls, members, shared) -> dict[str, torch.Tensor]:
        """LoRA-GA's padded factor tables plus ``boft_q (n+1, m, D, t)`` and λ ``(n+1, 1)``."""
        tables = LoraGaWeights.member_tables(members, shared)
        for kind in ("boft_q", "hybrid_lambda"):
            tables[kind] = stack_with_zero_row([getattr(m, kind) for m in members])
        return tables

    @classmethod
    def prepare(cls, tables, row_index, shared, ndim) -> dict[str, Any]:
        """Each row's rank-2r factors scaled by λ·α/r, Cayley blocks and ``1 − λ``. The zero row
        has λ = 0 and identity blocks, so it adds nothing."""
        lam = tables["hybrid_lambda"]  # (n, 1)
        a = torch.cat([tables["lora_A"], tables["lora_A0"]], dim=1)  # (n, 2r, d2)
        b = torch.cat([tables["lora_B"], -tables["lora_B0"]], dim=2)  # (n, d1, 2r)
        prepared = lora_rows(a, b, tables["scaling"] * lam[:, 0], row_index)
        q = tables["boft_q"]
        prepared["blocks"] = cayley(q[0] if row_index is None else q[row_index], shared.block_size)
        prepared["rotation_weight"] = table_rows(1 - lam, row_index, ndim)  # (B, 1.., 1) or (1,)
        return prepared

    @classmethod
    def add_prepared(cls, result, x, out0, prepared, shared, dropout=None):
        result = add_lora_rows(result, x, out0, prepared)
        w0 = shared.weight_for(x)
        moved = rotate_rows(x, prepared["blocks"], shared.perms, shared.inverse) - x
        rotated = F.linear(moved.to(w0.dtype), w0).to(result.dtype)  # W0 (Rᵀx − x)
        return result + prepared["rotation_weight"].to(result.dtype) * rotated
