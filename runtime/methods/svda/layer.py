"""SvdA weights on one layer (seed 000; SPEC.md §3).

    ΔW = diag(b) · U · diag(s) · Vᵀ,   W0 = U diag(σ) Vᵀ (thin SVD, canonical sign)

Frozen and shared by every SvdA adapter on the layer: U (d1, m), σ (m,), V (d2, m), regenerated
from the base weight (``regeneration.svd_basis``). Trainable: s (k,) for the top-k components
(k = m by default; the rest stay at σ) and the output scale b (d1,).

Fast path, from ``U diag(σ) Vᵀ = W0``:

    h = W0 x + b ⊙ (W0 x + U (δ ⊙ Vᵀ x)),   δ = s − σ

so the ``b`` part costs one elementwise product on the base output, and only the columns of U, V
where some adapter in the batch has δ ≠ 0 are touched (none after training that moved only b).
``get_delta_weight`` keeps the plain formula as the reference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...regeneration.svd_basis import SVD_ALGORITHM
from ..base import ScaledOutputWeights, TargetInfo, per_row
from .config import SvdaConfig


class SvdBasisBuffers(nn.Module):
    """The layer's frozen SVD basis as buffers in the layer's dtype and device."""

    def __init__(self, u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, identity: str = ""):
        super().__init__()
        self.identity = identity  # bit-level identity of the frozen tensors ("" if unknown)
        self.register_buffer("U", u, persistent=False)  # (d1, m)
        self.register_buffer("sigma", sigma, persistent=False)  # (m,)
        self.register_buffer("V", v, persistent=False)  # (d2, m)


class SvdaWeights(ScaledOutputWeights):
    method = "svda"

    def __init__(self, config: SvdaConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        m = shared.sigma.shape[0]
        self.k = min(config.top_k or m, m)
        sigma = shared.sigma[: self.k].detach().clone()
        s0 = sigma if config.s_init == "singular" else torch.full_like(sigma, config.s_constant)
        self.svda_s = nn.Parameter(s0)  # (k,)
        self.svda_b = nn.Parameter(
            torch.zeros(target.d_out, device=sigma.device, dtype=sigma.dtype)
        )

    @classmethod
    def shared_key(cls, config: SvdaConfig, targets: Sequence[TargetInfo]) -> str:
        return "svd"

    @classmethod
    def regeneration_recipe(
        cls, config: SvdaConfig, targets: Sequence[TargetInfo]
    ) -> list[dict[str, Any]]:
        detail = {"algorithm": SVD_ALGORITHM, "of": "each target's base weight W0 (d_out, d_in)"}
        return [{"tensor": "U,sigma,V", "source": "base-svd", "detail": detail}]

    @classmethod
    def build_shared(
        cls, config: SvdaConfig, target: TargetInfo, targets: Sequence[TargetInfo], ctx: Any
    ) -> nn.Module:
        basis = ctx.svd_cache.get(target.weight, target.fingerprint)
        dtype, device = target.dtype, target.weight.device
        identity = hashlib.sha256(f"{basis.identity}:{dtype}".encode()).hexdigest()
        tensors = (t.to(dtype=dtype, device=device) for t in (basis.U, basis.sigma, basis.V))
        return SvdBasisBuffers(*tensors, identity=identity if basis.identity else "")

    def delta(self, shared: nn.Module) -> torch.Tensor:
        """δ = s − σ on the trained components (k,)."""
        return self.svda_s - shared.sigma[: self.k]

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        s_full = torch.cat([self.svda_s, shared.sigma[self.k :].to(self.svda_s.dtype)])
        u, v = shared.U.to(self.svda_s.dtype), shared.V.to(self.svda_s.dtype)
        return self.svda_b[:, None] * ((u * s_full) @ v.T)  # (d1, d2), the plain formula

    @classmethod
    def scale_and_inner(
        cls,
        x: torch.Tensor,
        out0: torch.Tensor,
        members: Sequence[SvdaWeights],
        row_index: torch.Tensor | None,
        shared: nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b per row, W0 x + U (δ ⊙ Vᵀ x)): the delta is their product. With δ = 0 the adapter
        costs one fused kernel on the base output."""
        if row_index is None:
            members = members[:1]
        k = max(m.k for m in members)
        deltas = [F.pad(m.delta(shared), (0, k - m.k)) for m in members]  # each (k,)
        cols = _active_columns(deltas, k, needs_grad=any(m.svda_s.requires_grad for m in members))
        b_rows = per_row([m.svda_b for m in members], row_index, x.dim())
        inner = out0
        if cols is not None:
            delta_rows = per_row(deltas, row_index, x.dim())
            projected = F.linear(x, shared.V[:, cols].T)  # (B, ..., |cols|): once per batch
            inner = out0 + F.linear(projected * delta_rows[..., cols], shared.U[:, cols])
        return b_rows, inner


def _active_columns(
    deltas: list[torch.Tensor], k: int, needs_grad: bool
) -> slice | torch.Tensor | None:
    """Columns of U, V the batch needs: all k while training s, else those where some δ ≠ 0
    (None if δ = 0 everywhere)."""
    if needs_grad and torch.is_grad_enabled():
        return slice(0, k)
    nonzero = torch.stack(deltas).ne(0).any(dim=0)
    count = int(nonzero.sum())
    if count == 0:
        return None
    if count == k:
        return slice(0, k)
    return nonzero.nonzero().flatten()
