"""The structured unitary of Arjovsky et al. (2016), "Unitary Evolution Recurrent Neural
Networks", on ``C^n ≅ R^{2n}``, applied in O(n log n) without forming the matrix:

    U = D3 · R2 · F⁻¹ · D2 · Π · R1 · F · D1

``D_k = diag(e^{iθ_k})`` phases, ``F`` the unitary DFT (``torch.fft.fft(norm="ortho")``),
``R_k = I − 2 v_k v_kᴴ / ‖v_k‖²`` Householder reflections, ``(Π z)[j] = z[perm[j]]``.

Real vectors of even length d are paired as complex entries: coordinate ``2j`` is the real part
and ``2j + 1`` the imaginary part of entry ``j``. Every factor is complex-linear and unitary, so
U acts on ``R^d`` as a real orthogonal matrix whose transpose is ``Uᴴ``.

Parameters broadcast against ``z (..., n)``: ``phases (..., 3, n)`` (the values ``e^{iθ}``; None
for θ = 0), ``v (..., 2, n)`` complex and ``gain (..., 2, 1) = 2 / ‖v‖²``.
"""

from __future__ import annotations

import torch


def to_complex(y: torch.Tensor) -> torch.Tensor:
    """``(..., 2n)`` real → ``(..., n)`` complex: pairs (2j, 2j+1) are (Re, Im)."""
    return torch.complex(y[..., 0::2], y[..., 1::2])


def to_real(z: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` complex → ``(..., 2n)`` real, the inverse of :func:`to_complex`."""
    return torch.view_as_real(z).flatten(-2)


def reflection_vectors(v_pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex ``v (..., 2, n)`` from real pairs ``(..., 2, n, 2)``, and ``gain = 2/‖v‖²``."""
    v = torch.complex(v_pairs[..., 0], v_pairs[..., 1])
    gain = 2.0 / (v_pairs * v_pairs).sum(dim=(-2, -1))[..., None]  # (..., 2, 1)
    return v, gain


def reflect(z: torch.Tensor, v: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``(I − 2 v vᴴ/‖v‖²) z`` for ``z (..., n)``."""
    return z - v * ((v.conj() * z).sum(dim=-1, keepdim=True) * gain)


def _phase(z: torch.Tensor, phases: torch.Tensor | None, k: int, conj: bool = False):
    """``z · e^{±iθ_k}``; ``phases`` None means θ = 0 (skipped: multiplying by 1 is exact)."""
    if phases is None:
        return z
    return z * (phases[..., k, :].conj() if conj else phases[..., k, :])


def apply_unitary(
    z: torch.Tensor,
    phases: torch.Tensor | None,
    v: torch.Tensor,
    gain: torch.Tensor,
    perm: torch.Tensor,
) -> torch.Tensor:
    """``U z`` (``phases`` None: all θ = 0)."""
    z = torch.fft.fft(_phase(z, phases, 0), norm="ortho")
    z = reflect(z, v[..., 0, :], gain[..., 0, :]).index_select(-1, perm)
    z = torch.fft.ifft(_phase(z, phases, 1), norm="ortho")
    return _phase(reflect(z, v[..., 1, :], gain[..., 1, :]), phases, 2)


def apply_unitary_adjoint(
    z: torch.Tensor,
    phases: torch.Tensor | None,
    v: torch.Tensor,
    gain: torch.Tensor,
    inverse: torch.Tensor,
) -> torch.Tensor:
    """``Uᴴ z = D1ᴴ F⁻¹ R1 Πᵀ D2ᴴ F R2 D3ᴴ z`` (reflections are their own inverse)."""
    z = reflect(_phase(z, phases, 2, conj=True), v[..., 1, :], gain[..., 1, :])
    z = _phase(torch.fft.fft(z, norm="ortho"), phases, 1, conj=True).index_select(-1, inverse)
    z = torch.fft.ifft(reflect(z, v[..., 0, :], gain[..., 0, :]), norm="ortho")
    return _phase(z, phases, 0, conj=True)
