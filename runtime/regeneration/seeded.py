"""Random frozen matrices regenerated from a stored seed (docs/methods.md, regeneration).

Always drawn on the CPU in float32 from ``torch.Generator(device="cpu")`` seeded with the stored
seed, in a fixed order, then cast and moved: bit-identical across runs, thread counts, devices and
the dtype asked for afterwards. VeRA's pair follows HF PEFT's ``VeraModel`` exactly (A first, then
B, Kaiming-uniform with gain √2 on fan-in), so a PEFT ``projection_prng_key`` regenerates PEFT's
matrices.
"""

from __future__ import annotations

import math

import torch


def kaiming_uniform_bound(fan_in: int) -> float:
    """Bound of Kaiming-uniform with gain √2 (PEFT's VeRA, ``nn.init.kaiming_uniform_`` a=0)."""
    return math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """float32 CPU tensor, U(-b, b) with b = √(6 / fan_in), fan_in = shape[1]."""
    bound = kaiming_uniform_bound(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def vera_projections(
    seed: int, r: int, d_out_max: int, d_in_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared ``A ∈ R^{r×d_in_max}`` and ``B ∈ R^{d_out_max×r}`` for ``seed``."""
    generator = seeded_generator(seed)
    a = kaiming_uniform((r, d_in_max), generator)
    b = kaiming_uniform((d_out_max, r), generator)
    return a, b
