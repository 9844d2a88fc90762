"""SvdA weights on one layer (SVD-based adaptation; docs/methods.md).

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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...regeneration.svd_basis import SVD_ALGORITHM
from ...serving_form.primitives import LayerForm, OutputScale, SharedBasisLowRank
from ..base import AdapterWeights, TargetInfo, check_rank_any_layer, stack_with_zero_row, table_rows
from .config import SvdaConfig


class SvdBasisBuffers(nn.Module):
    """The layer's frozen SVD basis as buffers in the layer's dtype and device."""

    def __init__(self, u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, identity: str = ""):
        super().__init__()
        self.identity = identity  # bit-level identity of the frozen tensors ("" if unknown)
        self.register_buffer("U", u, persistent=False)  # (d1, m)
        self.register_buffer("sigma", sigma, persistent=False)  # (m,)
        self.register_buffer("V", v, persistent=False)  # (d2, m)


class SvdaWeights(AdapterWeights):
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
    def check_targets(cls, config: SvdaConfig, targets: Sequence[TargetInfo]) -> None:
        if config.top_k is not None:
            check_rank_any_layer(config, "top_k", config.top_k, targets)

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

    def serving_form(self, shared, base_bias=None) -> LayerForm:
        return self.slot_serving_form(
            {"svda_s": self.svda_s, "svda_b": self.svda_b}, shared, base_bias
        )

    @classmethod
    def slot_serving_form(cls, tensors, shared, base_bias=None) -> LayerForm:
        """``OutputScale(b)`` and ``SharedBasisLowRank(Vᵀ, U, inner=δ, outer=b)``, δ = s − σ
        (zero beyond the top k): ``h = W0x + b ⊙ (W0x + U(δ ⊙ Vᵀx))``."""
        s, b = tensors["svda_s"].detach(), tensors["svda_b"].detach()
        k = s.shape[0]
        delta = torch.zeros_like(shared.sigma, dtype=s.dtype)
        delta[:k] = s - shared.sigma[:k]
        b = b.clone()[None]  # (1, d1): a copy, the slot may be reused
        term = SharedBasisLowRank(
            shared.V.T.to(s.dtype),
            shared.U.to(s.dtype),
            delta[None],
            b,
            key=getattr(shared, "identity", ""),
        )
        d_in, d_out = shared.V.shape[0], b.shape[1]
        return LayerForm(d_in, d_out, output_scale=OutputScale(b), terms=(term,))

    @classmethod
    def packed_form_rows(cls, tensors, layers, shared, memo=None) -> torch.Tensor:
        """The one flat tensor :meth:`packed_serving_forms` views: δ = s − σ scattered into
        zeros of Σm (zero beyond each layer's k), then b (a slot bank keeps both in its dtype)."""
        s, b = tensors["svda_s"].detach(), tensors["svda_b"].detach()
        memo = memo if memo is not None else {}
        plan = _prune_plan(layers, shared, s, memo)
        places = _form_places(shared, plan, s.dtype, memo)
        rows = s.new_zeros(places.total_m + b.numel())
        rows[: places.total_m].index_copy_(0, places.k_to_m, s - plan.sigma)
        rows[places.total_m :].copy_(b)
        return rows

    @classmethod
    def packed_serving_forms(cls, tensors, layers, shared, memo=None) -> list[LayerForm]:
        """:meth:`slot_serving_form` of every layer in two flat operations: each layer's form
        holds views of :meth:`packed_form_rows` (a new tensor: the forms outlive the slot, which
        may be reused, and a writer can store it whole) and its ``Vᵀ, U`` (made once per bank
        and dtype)."""
        memo = memo if memo is not None else {}
        rows = cls.packed_form_rows(tensors, layers, shared, memo)
        plan = _prune_plan(layers, shared, tensors["svda_s"], memo)
        places = _form_places(shared, plan, rows.dtype, memo)
        delta, b = rows[: places.total_m], rows[places.total_m :]
        forms = []
        for (m, m_at), (d1, b_at), (v_t, u, key) in zip(
            places.m_spans, places.b_spans, places.bases, strict=True
        ):
            b_row = b[b_at : b_at + d1].view(1, d1)
            term = SharedBasisLowRank(v_t, u, delta[m_at : m_at + m].view(1, m), b_row, key=key)
            forms.append(
                LayerForm(v_t.shape[1], d1, output_scale=OutputScale(b_row), terms=(term,))
            )
        return forms

    def delta_norm(self, shared: nn.Module | None) -> float:
        return self.slot_delta_norm({"svda_s": self.svda_s, "svda_b": self.svda_b}, shared)

    @classmethod
    def slot_delta_norm(cls, tensors, shared) -> float:
        """‖ΔW‖_F² = Σ_j b_j² Σ_i s_i² U_ji² (V has orthonormal columns): O(d1·m), no d1×d2;
        products in float32 (or wider), the final sum in float64."""
        s, b = tensors["svda_s"].detach(), tensors["svda_b"].detach()
        s_full = torch.cat([s, shared.sigma[s.shape[0] :].to(s.dtype)]).float()
        scaled = shared.U * s_full  # (d1, m), promoted to float32 in one pass (no U copy)
        rows = (scaled * scaled).sum(1)  # (d1,) Σ_i s_i² U_ji²
        return float((b.double().square() @ rows.double()).sqrt())

    @classmethod
    def member_tables(cls, members, shared) -> dict[str, torch.Tensor]:
        """s (n+1, k_max) — a member with smaller k is padded with σ, so its δ is 0 there — and
        b (n+1, d1)."""
        k = max(m.k for m in members)
        sigma = shared.sigma[:k].to(members[0].svda_s.dtype)
        s = [torch.cat([m.svda_s, sigma[m.k :]]) for m in members]
        return {
            "svda_s": stack_with_zero_row(s),
            "svda_b": stack_with_zero_row([m.svda_b for m in members]),
        }

    prunable = True

    @classmethod
    def packed_norm_bounds(cls, tensors, layers, shared, memo=None):
        """docs/methods.md: with σ̃ = σ in s's dtype and D = s² − σ̃² (zero beyond k),
        ``‖ΔW‖² = Σ_j b_j² r_j + c``, ``r_j = Σ_i σ̃_i² U_ji²`` (a constant of the layer) and
        ``c = Σ_j b_j² Σ_i U_ji² D_i``. With ρ_j = Σ_i U_ji² (row sums of U∘U) and κ its largest
        column sum (1 for orthonormal columns), ``|c| ≤ min(max|D| Σ_j b_j² ρ_j,
        Σ|D| · max b² · κ, ‖b²‖ ‖D‖ √(κ max ρ))``: O(k + d1) per layer, no pass over U (its
        constants are made once per bank). Tight when δ is small against σ (trained s)."""
        s, b = tensors["svda_s"], tensors["svda_b"]
        memo = memo if memo is not None else {}
        plan = _prune_plan(layers, shared, s, memo)
        rows = _norm_bound_rows(shared, plan, s.dtype, memo)
        b2, d = b.double().square(), s.double().square() - plan.sigma.double().square()

        d_abs, per_b, per_k = d.abs(), plan.b_lengths, plan.k_lengths
        base = _per_layer(b2 * rows.r, per_b)
        on_d = _per_layer(d_abs, per_k, "max") * _per_layer(b2 * rows.rho, per_b)
        on_b = _per_layer(d_abs, per_k) * _per_layer(b2, per_b, "max")
        both = (_per_layer(b2 * b2, per_b) * _per_layer(d * d, per_k)).sqrt()
        c = torch.minimum(torch.minimum(on_d, on_b * rows.kappa), both * rows.spectral)
        return (base - c).clamp_min(0).sqrt(), (base + c).sqrt()

    @classmethod
    def prune_packed(
        cls, tensors, layers, shared, delta_norms, tolerance, memo=None
    ) -> dict[str, int]:
        """docs/methods.md: dropping component i changes ΔW by ``|δ_i| · ‖b ⊙ u_i‖`` in Frobenius
        norm, orthogonally across i, and ``‖b ⊙ u_i‖ ≤ max|b|`` (u_i has unit norm). Per layer,
        the components with the smallest bounds ``|δ_i| · max|b|`` are dropped (δ_i := 0, i.e.
        s_i := σ_i) while the sum of their squares stays within ``(tolerance · ‖ΔW‖_F)²``: an
        exact bound, computed for all layers at once without touching U; a layer whose bounds
        all fit drops every component without a sort. ``memo`` (a bank's) keeps the layer-table
        constants between adapters."""
        s, b = tensors["svda_s"], tensors["svda_b"]
        plan = _prune_plan(layers, shared, s, memo if memo is not None else {})
        b_max = _per_layer(b.abs().double(), plan.b_lengths, "max")  # (L,)
        bound_sq = ((s - plan.sigma).double() * b_max[plan.layer_of_k]) ** 2  # (Σk,)
        budget = (tolerance * delta_norms.to(s.device, torch.float64)) ** 2  # (L,)
        totals = _per_layer(bound_sq, plan.k_lengths)
        whole = totals <= budget  # layers where every component may go: no sort needed
        drop = whole[plan.layer_of_k]  # (Σk,) bool
        partial = (~whole).nonzero().flatten()
        if partial.numel():
            drop[_smallest_within_budget(bound_sq, plan, partial, budget[partial])] = True
        s.copy_(torch.where(drop, plan.sigma, s))
        nonzero = int((s != plan.sigma).sum())
        return {"components_kept": nonzero, "components_total": int(s.numel())}

    @classmethod
    def prepare(cls, tables, row_index, shared, ndim) -> dict[str, Any]:
        """Each row's b and δ = s − σ, and the columns of U, V some row needs (δ ≠ 0), copied
        contiguous when they are a subset (a decode loop then reads only those)."""
        s_table, b_table = tables["svda_s"], tables["svda_b"]
        k = s_table.shape[1]
        delta = table_rows(s_table, row_index, ndim) - shared.sigma[:k].to(s_table.dtype)
        prepared = {"b": table_rows(b_table, row_index, ndim), "delta": None}
        cols = _active_columns(delta, row_index, k, needs_grad=s_table.requires_grad)
        if isinstance(cols, slice):
            prepared.update(delta=delta, V_t=shared.V[:, :k].T, U=shared.U[:, :k])
        elif cols is not None:
            prepared.update(
                delta=delta[..., cols],
                V_t=shared.V[:, cols].T.contiguous(),  # (|cols|, d2)
                U=shared.U[:, cols].contiguous(),  # (d1, |cols|)
            )
        return prepared

    @classmethod
    def prepare_bank(cls, bank, row_index, ndim) -> list[dict[str, Any]]:
        """:meth:`prepare` for all layers of a slot bank at once: one gather of s and b rows
        over the flat storage, δ = s − σ against the concatenated σ of all layers, and one host
        sync for every layer's count of active columns (instead of one per layer)."""
        s_offsets, b_offsets = bank.kind_offsets("svda_s"), bank.kind_offsets("svda_b")
        s_rows = bank.storage["svda_s"][row_index]  # (B, Σk)
        b_rows = bank.storage["svda_b"][row_index]  # (B, Σd1)
        delta = s_rows - _bank_sigma(bank, s_offsets, s_rows.dtype)  # (B, Σk)
        active = ((delta != 0) & (row_index >= 0)[:, None]).any(dim=0)  # (Σk,)
        bounds = torch.tensor([start for start, _ in s_offsets] + [delta.shape[1]])
        seen = torch.cat([active.new_zeros(1, dtype=torch.long), active.long().cumsum(0)])
        counts = (seen[bounds[1:]] - seen[bounds[:-1]]).tolist()  # active columns per layer
        lead = (row_index.shape[0],) + (1,) * (ndim - 2)
        prepared = []
        layers = zip(bank.shared_modules, s_offsets, b_offsets, counts, strict=True)
        for shared, (ks, (k,)), (bs, (d,)), count in layers:
            # contiguous copies of this layer's columns (B × k, B × d1: small): elementwise
            # kernels on strided views of the flat rows run about twice as long
            entry = {"b": b_rows[:, bs : bs + d].contiguous().view(*lead, d), "delta": None}
            layer_delta = delta[:, ks : ks + k].contiguous()
            if count == k:
                entry.update(
                    delta=layer_delta.view(*lead, k), V_t=shared.V[:, :k].T, U=shared.U[:, :k]
                )
            elif count:
                cols = active[ks : ks + k].nonzero().flatten()
                entry.update(
                    delta=layer_delta[:, cols].view(*lead, count),
                    V_t=shared.V[:, cols].T.contiguous(),  # (|cols|, d2)
                    U=shared.U[:, cols].contiguous(),  # (d1, |cols|)
                )
            prepared.append(entry)
        return prepared

    @classmethod
    def add_prepared(cls, result, x, out0, prepared, shared, dropout=None):
        """``result + b ⊙ (W0 x + U (δ ⊙ Vᵀ x))`` per row. With δ = 0 the adapter costs one
        fused kernel on the base output; otherwise U, V are applied once for the whole batch."""
        inner = out0
        if prepared["delta"] is not None:
            projected = F.linear(x, prepared["V_t"])  # (B, ..., |cols|)
            inner = out0 + F.linear(projected * prepared["delta"], prepared["U"])
        return torch.addcmul(result, prepared["b"].to(result.dtype), inner.to(result.dtype))


def _bank_sigma(bank, s_offsets, dtype: torch.dtype) -> torch.Tensor:
    """σ of every layer of the bank, concatenated in storage order (made once per bank)."""
    k_sizes = [k for _, (k,) in s_offsets]
    return _sigma_concat(bank.shared_modules, k_sizes, dtype, bank.memo)


def _sigma_concat(shared, k_sizes, dtype: torch.dtype, memo: dict) -> torch.Tensor:
    """``σ[:k]`` of every layer concatenated (Σk,), kept in ``memo`` per dtype."""
    key = f"svda_sigma:{dtype}"
    if key not in memo:
        parts = [m.sigma[:k] for m, k in zip(shared, k_sizes, strict=True)]
        memo[key] = torch.cat(parts).to(dtype)
    return memo[key]


@dataclass(frozen=True)
class _PrunePlan:
    """Layer-table constants of :meth:`SvdaWeights.prune_packed` (the same for every adapter
    of a bank)."""

    sigma: torch.Tensor  # (Σk,) σ[:k] of every layer
    layer_of_k: torch.Tensor  # (Σk,) layer of each s entry
    layer_of_b: torch.Tensor  # (Σd1,) layer of each b entry
    k_lengths: torch.Tensor  # (L,) s entries of each layer
    b_lengths: torch.Tensor  # (L,) b entries of each layer
    starts: torch.Tensor  # (L,) first s entry of each layer
    padded_index: torch.Tensor  # (Σk,) position of each s entry in a flat (L, k_max) matrix
    k_max: int

    @property
    def n_layers(self) -> int:
        return self.starts.shape[0]


@dataclass(frozen=True)
class _FormPlaces:
    """Layer-table constants of :meth:`SvdaWeights.packed_serving_forms` for one dtype."""

    total_m: int
    k_to_m: torch.Tensor  # (Σk,) place of each s entry in the flat (Σm,) δ
    m_spans: list[tuple[int, int]]  # per layer (m, first place in δ)
    b_spans: list[tuple[int, int]]  # per layer (d1, first place in b)
    bases: list[tuple[torch.Tensor, torch.Tensor, str]]  # per layer (Vᵀ, U in the dtype, key)


def _form_places(shared, plan: _PrunePlan, dtype: torch.dtype, memo: dict) -> _FormPlaces:
    key = f"svda_form_places:{dtype}:{plan.sigma.device}"
    if key not in memo:
        ms = [module.sigma.shape[0] for module in shared]
        d1s = [module.U.shape[0] for module in shared]
        m_starts = torch.tensor([0, *ms[:-1]]).cumsum(0)
        k_starts = plan.starts.cpu()
        layer_of_k = plan.layer_of_k.cpu()
        k_to_m = m_starts[layer_of_k] + torch.arange(layer_of_k.numel()) - k_starts[layer_of_k]
        memo[key] = _FormPlaces(
            total_m=sum(ms),
            k_to_m=k_to_m.to(plan.sigma.device),
            m_spans=list(zip(ms, m_starts.tolist(), strict=True)),
            b_spans=list(zip(d1s, [0, *torch.tensor(d1s).cumsum(0).tolist()[:-1]], strict=True)),
            bases=[(m.V.T.to(dtype), m.U.to(dtype), getattr(m, "identity", "")) for m in shared],
        )
    return memo[key]


@dataclass(frozen=True)
class _NormBoundRows:
    """Layer constants of :meth:`SvdaWeights.packed_norm_bounds`, float64."""

    r: torch.Tensor  # (Σd1,) Σ_i σ̃_i² U_ji² of every layer's rows
    rho: torch.Tensor  # (Σd1,) Σ_i U_ji²
    kappa: torch.Tensor  # (L,) largest column sum of U∘U
    spectral: torch.Tensor  # (L,) √(κ · max ρ) ≥ ‖U∘U‖₂


def _norm_bound_rows(shared, plan: _PrunePlan, dtype: torch.dtype, memo: dict) -> _NormBoundRows:
    """One pass over every layer's U, kept in ``memo`` per dtype and device."""
    key = f"svda_norm_rows:{dtype}:{plan.sigma.device}"
    if key not in memo:
        r, rho, kappa, rho_max = [], [], [], []
        for module in shared:
            squares = module.U.double().square()  # (d1, m)
            sigma = module.sigma.to(dtype).double()
            r.append(squares @ sigma.square())
            rho.append(squares.sum(1))
            kappa.append(squares.sum(0).max())
            rho_max.append(rho[-1].max())
        kappa_t = torch.stack(kappa)
        memo[key] = _NormBoundRows(
            r=torch.cat(r).to(plan.sigma.device),
            rho=torch.cat(rho).to(plan.sigma.device),
            kappa=kappa_t.to(plan.sigma.device),
            spectral=(kappa_t * torch.stack(rho_max)).sqrt().to(plan.sigma.device),
        )
    return memo[key]


def _per_layer(values: torch.Tensor, lengths: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Sum or max of ``values`` (Σn, ...) over each layer's ``lengths`` consecutive entries
    (L, ...); a max of non-negative values (an empty layer: 0)."""
    return torch.segment_reduce(values, reduce, lengths=lengths, axis=0, initial=0)


def _smallest_within_budget(
    bound_sq: torch.Tensor, plan: _PrunePlan, layers: torch.Tensor, budget: torch.Tensor
) -> torch.Tensor:
    """Positions in ``bound_sq`` (Σk,) of each of ``layers``' smallest bounds whose squares sum
    to at most that layer's ``budget``: each layer's bounds in one row of a padded
    (|layers|, k_max) matrix (padding: ∞, never chosen), sorted row-wise."""
    padded = bound_sq.new_full((plan.n_layers, plan.k_max), math.inf)
    padded.view(-1)[plan.padded_index] = bound_sq
    ascending, order = padded[layers].sort(dim=1)
    within = ascending.cumsum(dim=1) <= budget[:, None]
    return (plan.starts[layers, None] + order)[within]


def _prune_plan(layers, shared, like: torch.Tensor, memo: dict) -> _PrunePlan:
    """The plan for tensors ``like`` s (dtype, device), from ``memo`` after the first call."""
    key = f"svda_prune_plan:{like.dtype}:{like.device}"
    if key in memo:
        return memo[key]
    k_sizes = [shape[0] for _, params in layers for kind, shape in params if kind == "svda_s"]
    d_sizes = [shape[0] for _, params in layers for kind, shape in params if kind == "svda_b"]
    layer_of_k = torch.repeat_interleave(torch.arange(len(k_sizes)), torch.tensor(k_sizes))
    starts = torch.tensor([0, *k_sizes[:-1]]).cumsum(0)  # (L,)
    column = torch.arange(int(sum(k_sizes))) - starts[layer_of_k]
    layer_of_b = torch.repeat_interleave(torch.arange(len(d_sizes)), torch.tensor(d_sizes))
    plan = memo[key] = _PrunePlan(
        sigma=_sigma_concat(shared, k_sizes, like.dtype, memo).to(like.device),
        layer_of_k=layer_of_k.to(like.device),
        layer_of_b=layer_of_b.to(like.device),
        k_lengths=torch.tensor(k_sizes, device=like.device),
        b_lengths=torch.tensor(d_sizes, device=like.device),
        starts=starts.to(like.device),
        padded_index=(layer_of_k * max(k_sizes) + column).to(like.device),
        k_max=max(k_sizes),
    )
    return plan


def _active_columns(
    delta_rows: torch.Tensor, row_index: torch.Tensor | None, k: int, needs_grad: bool
) -> slice | torch.Tensor | None:
    """Columns of U, V the batch needs: all k while training s, else those where the δ of some
    row that uses an adapter (row index ≠ -1) is non-zero (None if there are none)."""
    if needs_grad and torch.is_grad_enabled():
        return slice(0, k)
    used = delta_rows.reshape(-1, k)
    if row_index is not None:
        used = used[row_index >= 0]
    nonzero = used.ne(0).any(dim=0)
    count = int(nonzero.sum())
    if count == 0:
        return None
    if count == k:
        return slice(0, k)
    return nonzero.nonzero().flatten()
