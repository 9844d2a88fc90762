"""The serving-form primitives: the few per-slot operations every linear-layer method compiles to.

This module is the contract between methods and engines (the native engine, the vLLM plugin).
A method compiles one adapter on one layer to a :class:`LayerForm`; an engine implements the
primitives below once (each applied per batch row or token, with a per-row *slot index*), not
every method. The pure-torch reference of each primitive is in :mod:`.reference`.

Conventions (every primitive):

* ``n`` is the number of slots the form holds (1 for one compiled adapter, more after
  :func:`.compile.stack_forms`). Per-slot tensors have ``n`` as their first dimension; *shared*
  tensors (VeRA's ``A, B``, SvdA's ``V, U``, permutations) have no slot dimension and are the
  same for every slot.
* ``slots``: a ``torch.long`` tensor ``(N,)`` with values in ``[-1, n)``, one per row of the
  layer input ``x (N, ..., d_in)`` (a vLLM engine flattens tokens: ``x (T, d_in)``, one slot per
  token; the native engine passes ``x (B, T, d_in)``, one slot per sequence). **-1 is the base
  model**: the output of such a row must equal ``W0 x + b0`` bit for bit. Engines typically
  append a zero row to every per-slot table and map -1 to it: every primitive below is written
  so that an all-zero slot is the identity *exactly* (it adds exact zeros).
* dtypes: per-slot and shared float tensors share one dtype, the adapter dtype (float32 on a
  float16/bfloat16 base); integer tensors (permutations) are ``torch.long``. An engine casts
  ``x`` to the form's dtype and the result back.
* Shapes follow ``nn.Linear``: ``W0`` is ``(d_out, d_in)``, vectors are the last dimension.

One layer's output for a row with slot ``k ≥ 0`` (x is the layer input, ``W0, b0`` the base)::

    x̃ = x + input_scale.delta[k] ⊙ x                                   (InputScale)
    x̃ = x̃ + mix[k] · (x̃ R_k − x̃)                                      (InputRotation)
    h  = W0 x + W0 (x̃ − x)        # = W0 x̃; an engine may reuse W0 x
    h  = h + (U_k − U_0) U_0ᴴ h                                        (OutputRotation)
    h  = h + output_scale.delta[k] ⊙ h                                 (OutputScale)
    y  = h + b0 + Σ_terms term_k(x) + bias.delta[k]                    (LowRank, SharedBasis…,
                                                                        BiasDelta)

Low-rank terms read the *original* input ``x`` and are not scaled by the output scale: a
method folds any scale into ``B`` when it compiles (DoRA's ``m/‖W‖``, LoRA's ``α/r``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class InputScale:
    """``x̃ = x + delta[k] ⊙ x`` before the base product (IA³ on feed-forward layers: ``l − 1``).

    delta: ``(n, d_in)``, the scale minus one (so zeros are the identity)."""

    delta: torch.Tensor


@dataclass(frozen=True)
class InputRotation:
    """``x̃ = x̃ + mix[k]·(x̃ R_k − x̃)`` before the base product: a butterfly rotation of the
    input side (BOFT: mix 1; the hybrid: mix 1 − λ). Row vectors, as PEFT (``x @ R``)::

        x R = ((x M_{m−1}) ⋯ ) M_0,   M_i = P_i · blockdiag(blocks[k, i, 0..D−1]) · P_iᵀ

    and ``y @ P_i = y[..., inverse[i]]``, ``y @ P_iᵀ = y[..., perms[i]]`` with
    ``inverse = perms.argsort(-1)`` (``m = 1``: no permutation).

    blocks: ``(n, m, D, b, b)`` orthogonal blocks per slot (Cayley already applied), ``D·b = d_in``;
    perms: ``(m, d_in)`` long, shared; mix: ``(n,)``."""

    blocks: torch.Tensor
    perms: torch.Tensor
    mix: torch.Tensor


@dataclass(frozen=True)
class OutputRotation:
    """``h = h + (U(θ_k, v_k) − U(0, v0)) · U(0, v0)ᴴ h`` on the base product (uRNN-unitary):
    ``h (…, d_out)`` is read as ``C^{d_out/2}`` (coordinates 2j, 2j+1 = Re, Im of entry j) and
    ``U = D3 R2 F⁻¹ D2 Π R1 F D1`` (see ``runtime.methods.urnn.unitary``).

    theta: ``(n, 3, d_out/2)`` phases; v: ``(n, 2, d_out/2, 2)`` the two reflection vectors
    (``v0 + dv``, complex entries as real pairs); v0: ``(2, d_out/2, 2)`` shared; perm:
    ``(d_out/2,)`` long, shared (``(Π z)[j] = z[perm[j]]``). A slot with θ = 0 and v = v0 adds
    exact zeros; rows at -1 must skip the primitive (or use such a slot)."""

    theta: torch.Tensor
    v: torch.Tensor
    v0: torch.Tensor
    perm: torch.Tensor


@dataclass(frozen=True)
class OutputScale:
    """``h = h + delta[k] ⊙ h`` on the base product only, not on ``b0`` nor on the low-rank terms
    (SvdA's ``b``, DoRA's ``m/‖W0 + s·BA‖ − 1``, IA³'s ``l − 1``, BOFT's ``ds``).

    delta: ``(n, d_out)``, the scale minus one."""

    delta: torch.Tensor


@dataclass(frozen=True)
class BiasDelta:
    """``y = y + delta[k]`` (BitFit's ``β``; IA³'s ``(l − 1) ⊙ b0``). delta: ``(n, d_out)``."""

    delta: torch.Tensor


@dataclass(frozen=True)
class LowRank:
    """``y = y + B[k] (A[k] x)`` with every scaling folded into ``B`` (LoRA ``α/r``, AdaLoRA
    ``P·diag(λ)``, PiSSA / LoRA-GA as rank ``2r``: ``[A; A0]``, ``[B, −B0]``, DoRA ``m/‖W‖``).

    A: ``(n, r, d_in)``, B: ``(n, d_out, r)``; slots of smaller rank are zero-padded to ``r``."""

    A: torch.Tensor
    B: torch.Tensor


@dataclass(frozen=True)
class SharedBasisLowRank:
    """``y = y + outer[k] ⊙ (B (inner[k] ⊙ (A x)))`` through a basis shared by every slot: the
    products with ``A`` and ``B`` run once for the whole batch, only the vectors are gathered
    (VeRA: ``A, B`` seeded, ``inner = d``, ``outer = b``; SvdA: ``A = Vᵀ``, ``B = U``,
    ``inner = δ = s − σ``, ``outer = b``).

    A: ``(r, d_in)`` shared, B: ``(d_out, r)`` shared, inner: ``(n, r)``, outer: ``(n, d_out)``.
    ``key``: identifies the shared basis (equal keys: the same ``A, B``), so that an engine can
    group the terms of several adapters."""

    A: torch.Tensor
    B: torch.Tensor
    inner: torch.Tensor
    outer: torch.Tensor
    key: str = ""


Term = LowRank | SharedBasisLowRank


@dataclass(frozen=True)
class LayerForm:
    """One layer's serving form: at most one of each input/output primitive, any number of
    additive terms, in the fixed order of the module docstring. ``n_slots`` is ``n``."""

    d_in: int
    d_out: int
    n_slots: int = 1
    input_scale: InputScale | None = None
    input_rotation: InputRotation | None = None
    output_rotation: OutputRotation | None = None
    output_scale: OutputScale | None = None
    terms: tuple[Term, ...] = ()
    bias: BiasDelta | None = None

    def primitives(self) -> list[object]:
        """The primitives present, in the order they apply."""
        ordered = [self.input_scale, self.input_rotation, self.output_rotation, self.output_scale]
        return (
            [p for p in ordered if p is not None]
            + list(self.terms)
            + [self.bias] * (self.bias is not None)
        )

    def map_primitives(self, fn: Callable[[Any], Any], **changes: Any) -> LayerForm:
        """The form with ``fn`` applied to every primitive present (absent ones stay ``None``);
        ``changes``: other fields to replace (``n_slots``)."""

        def one(p: Any) -> Any:
            return None if p is None else fn(p)

        return dataclasses.replace(
            self,
            input_scale=one(self.input_scale),
            input_rotation=one(self.input_rotation),
            output_rotation=one(self.output_rotation),
            output_scale=one(self.output_scale),
            terms=tuple(fn(t) for t in self.terms),
            bias=one(self.bias),
            **changes,
        )

    def kinds(self) -> list[str]:
        """Names of the primitives present, in order (e.g. ``['OutputScale', 'LowRank']``)."""
        return [type(p).__name__ for p in self.primitives()]

    @property
    def reads_base_input_changed(self) -> bool:
        """True when the base product is taken on a changed input (InputScale/InputRotation):
        the engine needs ``W0 (x̃ − x)`` beside ``W0 x``."""
        return self.input_scale is not None or self.input_rotation is not None
