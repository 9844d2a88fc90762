"""BOFT weights on one layer (Liu et al., 2024; docs/methods.md, multiplicative methods).

    W' = diag(s) · W0 · Rᵀ,   R = M_{m-1} ⋯ M_0,   M_i = P_i · blockdiag(B_i1 … B_iD) · P_iᵀ,
    B = (I + Q)(I − Q)⁻¹ (Cayley, Q skew-symmetric b × b),   s = 1 + ds

R rotates the input side, as in HF PEFT (``x_rot = x @ R``, i.e. ``W' x = s ⊙ W0 (Rᵀ x)``).
Trainable and stored: the strict upper triangles of the Q blocks, ``boft_q (m, D, b(b-1)/2)``
(PEFT stores full b × b matrices and uses their skew part: half the payload here), and the scale
offset ``boft_ds (d1,)`` (``s = 1 + ds``; zeros mean "no change", so the zero row of a table is
the identity). Nothing is regenerated except the fixed butterfly permutations (from the config).

Fast path: every batch row's ``Rᵀ x`` is applied factor by factor from its blocks (O(d·b) per
token, R is never formed), then one extra product with the shared base weight:

    ΔW x = W0 (Rᵀx − x) + ds ⊙ (W0 x + W0 (Rᵀx − x))

Merge is multiplicative and exact (float64): ``W ← diag(s) W Rᵀ``; unmerge ``W ← diag(1/s) W R``.
A zero entry of s cannot be divided out: then the original weight is kept while merged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import AdapterStateError
from ...serving_form.primitives import InputRotation, LayerForm, OutputScale
from ..base import AdapterWeights, TargetInfo, table_rows
from .config import BoftConfig
from .ops import (
    BlockDropout,
    block_layout,
    butterfly_permutations,
    cayley,
    dense_rotation,
    rotate_rows,
    triangle_size,
)

ZERO_SCALE = 1e-30  # |s| below this cannot be divided out on unmerge: keep the weight instead


def block_layout_of(config: BoftConfig, target: TargetInfo) -> tuple[int, int]:
    """``(D, b)`` on ``target`` (a clear error if its input size does not fit)."""
    m = config.n_butterfly_factor
    return block_layout(config.block_size, config.block_num, m, target.d_in, target.name)


class BaseWeightShared(nn.Module):
    """Frozen per-layer state of a multiplicative method: a reference to the live base weight
    ``W0 (d1, d2)`` (a plain attribute, never a buffer: it is neither copied nor stored), plus the
    method's own buffers. The model must be moved to its device before adapters are attached."""

    def __init__(self, weight: torch.Tensor, identity: str):
        super().__init__()
        self.identity = identity  # bit-level identity of the buffers (they come from the config)
        self.base_weight = weight  # a view of the base layer's weight as (d1, d2)
        self.kept: dict[int, torch.Tensor] = {}  # weights kept while merged (zero scale)

    def weight_for(self, like: torch.Tensor) -> torch.Tensor:
        w0 = self.base_weight
        if w0.device != like.device:
            raise AdapterStateError(
                f"the base model was moved to {like.device} after multiplicative adapters were "
                f"attached (they read W0 on {w0.device}); move the model first, then attach"
            )
        return w0


class BoftShared(BaseWeightShared):
    def __init__(self, weight: torch.Tensor, perms: torch.Tensor, block_size: int, identity: str):
        super().__init__(weight, identity)
        self.block_size = block_size
        self.register_buffer("perms", perms, persistent=False)  # (m, d2)
        self.register_buffer("inverse", perms.argsort(dim=-1), persistent=False)  # (m, d2)


class BoftWeights(AdapterWeights):
    method = "boft"

    def __init__(self, config: BoftConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        m = config.n_butterfly_factor
        n_blocks, b = block_layout_of(config, target)
        self.block_size = b
        device, dtype = target.weight.device, target.dtype
        self.boft_q = nn.Parameter(
            torch.zeros(m, n_blocks, triangle_size(b), device=device, dtype=dtype)
        )
        if config.scale:
            self.boft_ds = nn.Parameter(torch.zeros(target.d_out, device=device, dtype=dtype))
        self.dropout = BlockDropout(config.dropout) if config.dropout > 0 else None

    @classmethod
    def check_targets(cls, config: BoftConfig, targets: Sequence[TargetInfo]) -> None:
        for target in targets:
            block_layout_of(config, target)

    @classmethod
    def shared_key(cls, config: BoftConfig, targets: Sequence[TargetInfo]) -> str:
        """Also checks every target's block layout first (the model asks for the key before
        attaching anything), so a layer that does not fit fails before any layer is touched."""
        for target in targets:
            block_layout_of(config, target)
        return f"boft:{config.block_size}:{config.block_num}:{config.n_butterfly_factor}"

    @classmethod
    def build_shared(
        cls, config: BoftConfig, target: TargetInfo, targets: Sequence[TargetInfo], ctx: Any
    ) -> nn.Module:
        m = config.n_butterfly_factor
        n_blocks, b = block_layout_of(config, target)
        perms = butterfly_permutations(target.d_in, n_blocks, b, m).to(target.weight.device)
        key = f"{cls.shared_key(config, [target])}:{target.d_in}"
        return BoftShared(target.weight, perms, b, hashlib.sha256(key.encode()).hexdigest())

    # ----- reference math and merge --------------------------------------------------------
    def rotation(self, shared: BoftShared, dtype: torch.dtype | None = None) -> torch.Tensor:
        """R (d2, d2) (in ``dtype``, default the parameters')."""
        q = self.boft_q if dtype is None else self.boft_q.to(dtype)
        blocks = cayley(q, self.block_size)
        return dense_rotation(blocks, shared.perms, shared.inverse, self.d_in)

    def scale_offset(self) -> torch.Tensor | None:
        return getattr(self, "boft_ds", None)

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        r = self.rotation(shared)
        eye = torch.eye(self.d_in, dtype=r.dtype, device=r.device)
        w0 = shared.weight_for(r).to(r.dtype)
        delta = w0 @ (r - eye).T  # W0 Rᵀ − W0
        ds = self.scale_offset()
        return delta if ds is None else delta + ds[:, None] * (w0 + delta)

    def serving_form(self, shared, base_bias=None) -> LayerForm:
        """``InputRotation(Cayley(Q), mix 1)`` then ``OutputScale(ds)``: ``s ⊙ W0 (Rᵀx)``."""
        blocks = cayley(self.boft_q, self.block_size)[None]  # (1, m, D, b, b)
        rotation = InputRotation(blocks, shared.perms, blocks.new_ones(1))
        ds = self.scale_offset()
        scale = None if ds is None else OutputScale(ds[None])
        return LayerForm(self.d_in, self.d_out, input_rotation=rotation, output_scale=scale)

    def merge_into(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """``W ← diag(s) W Rᵀ`` (float64)."""
        r = self.rotation(shared, torch.float64)
        w = weight_oi.to(torch.float64) @ r.T
        ds = self.scale_offset()
        if ds is not None:
            scale = 1.0 + ds.detach().to(torch.float64)
            if bool((scale.abs() < ZERO_SCALE).any()):
                shared.kept[weight_oi.data_ptr()] = weight_oi.detach().clone()
            w = scale[:, None] * w
        weight_oi.copy_(w.to(weight_oi.dtype))

    def unmerge_from(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """``W ← diag(1/s) W R`` (R orthogonal: Rᵀ R = I), or the kept original weight."""
        kept = shared.kept.pop(weight_oi.data_ptr(), None)
        if kept is not None:
            weight_oi.copy_(kept)
            return
        w = weight_oi.to(torch.float64)
        ds = self.scale_offset()
        if ds is not None:
            w = w / (1.0 + ds.detach().to(torch.float64))[:, None]
        weight_oi.copy_((w @ self.rotation(shared, torch.float64)).to(weight_oi.dtype))

    # ----- batched forward -----------------------------------------------------------------
    @classmethod
    def prepare(cls, tables, row_index, shared, ndim) -> dict[str, Any]:
        """Each row's Cayley blocks ``(B, m, D, b, b)`` (``(m, D, b, b)`` for one adapter) and
        scale offset ``(B, 1.., d1)``; the zero row gives identity blocks and ds = 0."""
        q = tables["boft_q"]
        q_rows = q[0] if row_index is None else q[row_index]
        ds = tables.get("boft_ds")
        return {
            "blocks": cayley(q_rows, shared.block_size),
            "ds": None if ds is None else table_rows(ds, row_index, ndim),
        }

    @classmethod
    def add_prepared(cls, result, x, out0, prepared, shared, dropout=None):
        """``result + W0 (Rᵀx − x) + ds ⊙ (W0 Rᵀ x)`` per row (one product with W0)."""
        blocks = prepared["blocks"]
        if dropout is not None and blocks.dim() == 4:
            blocks = dropout(blocks)
        w0 = shared.weight_for(x)
        moved = rotate_rows(x, blocks, shared.perms, shared.inverse) - x  # (B, ..., d2)
        delta = F.linear(moved.to(w0.dtype), w0).to(result.dtype)  # W0 (Rᵀx − x)
        if prepared["ds"] is not None:
            delta = delta + prepared["ds"].to(result.dtype) * (out0.to(result.dtype) + delta)
        return result + delta
