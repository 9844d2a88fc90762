"""uRNN-unitary weights on one layer (Arjovsky et al., 2016; docs/methods.md).

    W' = R · W0,   R = U(θ, v0 + dv) · U(0, v0)ᴴ,   U = D3 R2 F⁻¹ D2 Π R1 F D1  on C^{d1/2}

R rotates the *output* side: the base output ``W0 x`` is a vector of ``R^{d1} ≅ C^{d1/2}``
(coordinates 2j, 2j+1 are Re, Im of entry j; d1 must be even), so the adapter needs no second
product with W0 and costs O(d1 log d1) per token. Any U is unitary, so R is exactly orthogonal
for any parameters; no re-projection step is needed during training (unlike the seed's dense
U with exponential-map updates).

Identity at init: U alone is never the identity (Π is fixed and a Householder reflection is
never I), so the adapter's rotation is U relative to its value at init, ``U(0, v0)``: R = I
exactly when θ = 0 and dv = 0. The fast path keeps this exact:

    R W0 x − W0 x = (U(θ, v) − U(0, v0)) · (U(0, v0)ᴴ W0 x)

which is bit-for-bit zero for an untouched adapter or the zero row of a table (rows at -1).

Trainable and stored: phases ``urnn_theta (3, d1/2)`` and the offsets of the two reflection
vectors from their seeded start, ``urnn_v (2, d1/2, 2)`` (complex entries as real pairs):
7·d1/2 numbers per layer. Regenerated from the seed: Π and v0 (per layer width).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...errors import AdapterConfigError
from ...regeneration.seeded import seeded_generator
from ...serving_form.primitives import LayerForm, OutputRotation
from ..base import AdapterWeights, TargetInfo
from ..boft.layer import BaseWeightShared
from .config import UrnnConfig
from .unitary import apply_unitary, apply_unitary_adjoint, reflection_vectors, to_complex, to_real

Factors = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]  # phases (None: θ = 0), v, gain


def half_width(target: TargetInfo) -> int:
    if target.d_out % 2:
        raise AdapterConfigError(
            f"urnn: layer {target.name} has {target.d_out} output features; the unitary acts on "
            "C^(d/2) ≅ R^d and needs an even size: leave this layer out of targets"
        )
    return target.d_out // 2


def seeded_structure(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Π as ``perm (n,)`` then ``v0 (2, n, 2)`` float32, drawn in this order on the CPU."""
    generator = seeded_generator(seed)
    perm = torch.randperm(n, generator=generator)
    v0 = torch.randn((2, n, 2), generator=generator, dtype=torch.float32)
    return perm, v0


class UrnnShared(BaseWeightShared):
    """Π, its inverse and v0 of one layer width; W0 by reference (for the reference formula)."""

    def __init__(self, weight: torch.Tensor, perm: torch.Tensor, v0: torch.Tensor, identity: str):
        super().__init__(weight, identity)
        self.register_buffer("perm", perm, persistent=False)  # (n,)
        self.register_buffer("inverse", perm.argsort(), persistent=False)  # (n,)
        self.register_buffer("v0", v0, persistent=False)  # (2, n, 2)

    def base_factors(self, dtype: torch.dtype) -> Factors:
        """The factors of ``U(0, v0)``: no phases (θ = 0) and the seeded reflections."""
        return (None, *reflection_vectors(self.v0.to(dtype)))


def factors(theta: torch.Tensor, dv: torch.Tensor, v0: torch.Tensor) -> Factors:
    """The factors of ``U(θ, v0 + dv)``; θ (..., 3, n), dv (..., 2, n, 2)."""
    phases = torch.polar(torch.ones_like(theta), theta)  # e^{iθ}, exactly 1 at θ = 0
    return (phases, *reflection_vectors(v0 + dv))


def relative_rotation(z: torch.Tensor, mine: Factors, base: Factors, shared: UrnnShared):
    """``(U(θ, v) − U(0, v0)) U(0, v0)ᴴ z`` = ``R z − z`` for ``z (..., n)``."""
    w = apply_unitary_adjoint(z, *base, shared.inverse)
    return apply_unitary(w, *mine, shared.perm) - apply_unitary(w, *base, shared.perm)


class UrnnWeights(AdapterWeights):
    method = "urnn"

    def __init__(self, config: UrnnConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        n = half_width(target)
        device, dtype = target.weight.device, target.dtype
        self.urnn_theta = nn.Parameter(torch.zeros(3, n, device=device, dtype=dtype))
        self.urnn_v = nn.Parameter(torch.zeros(2, n, 2, device=device, dtype=dtype))

    @classmethod
    def check_targets(cls, config: UrnnConfig, targets: Sequence[TargetInfo]) -> None:
        for target in targets:
            half_width(target)

    @classmethod
    def shared_key(cls, config: UrnnConfig, targets: Sequence[TargetInfo]) -> str:
        """Also checks every target first (the model asks for the key before attaching
        anything), so an odd width fails before any layer is touched."""
        for target in targets:
            half_width(target)
        return f"urnn:{config.permutation_seed}"

    @classmethod
    def regeneration_recipe(
        cls, config: UrnnConfig, targets: Sequence[TargetInfo]
    ) -> list[dict[str, Any]]:
        detail = {
            "generator": "torch.Generator(device='cpu').manual_seed(seed), one per layer width",
            "draws": "perm = randperm(d_out/2), then v0 = randn(2, d_out/2, 2) float32",
            "seed": config.permutation_seed,
            "widths": sorted({t.d_out for t in targets}),
        }
        return [{"tensor": "urnn_perm,urnn_v0", "source": "seed", "detail": detail}]

    @classmethod
    def build_shared(
        cls, config: UrnnConfig, target: TargetInfo, targets: Sequence[TargetInfo], ctx: Any
    ) -> nn.Module:
        n = half_width(target)
        perm, v0 = seeded_structure(config.permutation_seed, n)
        device = target.weight.device
        recipe = f"urnn:{config.permutation_seed}:{n}:{target.dtype}"
        return UrnnShared(
            target.weight,
            perm.to(device),
            v0.to(device=device, dtype=target.dtype),
            hashlib.sha256(recipe.encode()).hexdigest(),
        )

    # ----- reference math and merge --------------------------------------------------------
    def factors(self, shared: UrnnShared, dtype: torch.dtype) -> tuple[Factors, Factors]:
        theta, dv = self.urnn_theta.to(dtype), self.urnn_v.to(dtype)
        return factors(theta, dv, shared.v0.to(dtype)), shared.base_factors(dtype)

    def rotation(self, shared: UrnnShared, dtype: torch.dtype | None = None) -> torch.Tensor:
        """R (d1, d1) as a dense real matrix (for tests and inspection)."""
        dtype = dtype or self.urnn_theta.dtype
        eye = torch.eye(self.d_out, dtype=dtype, device=self.urnn_theta.device)
        mine, base = self.factors(shared, dtype)
        images = to_complex(eye) + relative_rotation(to_complex(eye), mine, base, shared)
        return to_real(images).T  # row k of ``images`` is R e_k

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        dtype = self.urnn_theta.dtype
        columns = to_complex(shared.weight_for(self.urnn_theta).to(dtype).T)  # (d2, n)
        mine, base = self.factors(shared, dtype)
        return to_real(relative_rotation(columns, mine, base, shared)).T  # (d1, d2)

    def merge_into(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """``W ← R W = U(θ, v) U(0, v0)ᴴ W`` (complex128)."""
        mine, base = self.factors(shared, torch.float64)
        _replace_columns(weight_oi, base, mine, shared)

    def unmerge_from(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """``W ← Rᵀ W = U(0, v0) U(θ, v)ᴴ W`` (complex128)."""
        mine, base = self.factors(shared, torch.float64)
        _replace_columns(weight_oi, mine, base, shared)

    # ----- batched forward: through the serving form ---------------------------------------
    @classmethod
    def table_form(cls, tables, shared, zero_row) -> LayerForm:
        """``OutputRotation(θ, v0 + dv)``: ``h + (U(θ, v) − U(0, v0)) U(0, v0)ᴴ h`` on the base
        output only (the zero row, θ = 0 and v = v0, adds exact zeros)."""
        theta, dv = tables["urnn_theta"], tables["urnn_v"]  # (n, 3, d1/2), (n, 2, d1/2, 2)
        v0 = shared.v0.to(theta.dtype)
        rotation = OutputRotation(theta, v0 + dv, v0, shared.perm)
        d_out = 2 * theta.shape[-1]
        return LayerForm(shared.base_weight.shape[1], d_out, len(theta), output_rotation=rotation)


def _replace_columns(weight_oi: torch.Tensor, undo: tuple, then: tuple, shared) -> None:
    """``W ← U(then) U(undo)ᴴ W`` in place, on W's columns read as complex vectors (complex128);
    ``undo``, ``then``: the ``(θ, v)`` factors of two unitaries."""
    columns = to_complex(weight_oi.to(torch.float64).T)
    rotated = apply_unitary(
        apply_unitary_adjoint(columns, *undo, shared.inverse), *then, shared.perm
    )
    weight_oi.copy_(to_real(rotated).T.to(weight_oi.dtype))
