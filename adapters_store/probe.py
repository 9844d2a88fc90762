"""Regeneration probes: a few sketches ``q_jᵀ ΔW p_j`` per layer, with fixed random p_j, q_j.

For Gaussian ``p, q`` the sketch of an error ``E`` has standard deviation ``‖E‖_F``, so comparing
the loader's sketches with the exporter's, relative to the stored ``‖ΔW‖_F``, checks the regeneration contract's
contract (ΔW reproduced within relative Frobenius error 1e-5) with a handful of floats per layer
and no ``d1 × d2`` matrix: ``ΔW p`` goes through the method's own fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from svda.runtime import AdapterLinear


def probe_vectors(
    seed: int, index: int, count: int, d_out: int, d_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P (count, d_in)`` and ``Q (count, d_out)``, float32 from a CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + index)
    p = torch.randn(count, d_in, generator=generator)
    q = torch.randn(count, d_out, generator=generator)
    return p, q


@torch.no_grad()
def layer_sketches(
    layer: AdapterLinear, adapter: str, seed: int, index: int, count: int, exact_norm: bool = False
) -> tuple[list[float], float]:
    """Sketches of ``adapter``'s ΔW on ``layer`` and, if asked, ``‖ΔW‖_F`` (else 0)."""
    weights = layer.weights_of(adapter)
    shared = layer.shared_of(adapter)
    if not weights.mergeable:  # non-linear (block) adapters: no ΔW to sketch, nothing frozen
        return [0.0] * count, 0.0
    w0 = layer.weight_out_in()
    p, q = probe_vectors(seed, index, count, *w0.shape)
    dtype = next(weights.parameters()).dtype
    p = p.to(device=w0.device, dtype=dtype)
    out0 = F.linear(p, w0.to(dtype))
    delta_p = type(weights).batched_delta(p, out0, [weights], None, shared)  # (count, d_out)
    sketches = (q.double() * delta_p.double().cpu()).sum(dim=1)
    norm = weights.delta_norm(shared) if exact_norm else 0.0
    return [float(s) for s in sketches], norm
