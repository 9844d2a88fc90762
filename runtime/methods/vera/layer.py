"""VeRA weights on one layer: ΔW = diag(b) · B · diag(d) · A (Kopiczko et al., 2024).

Frozen: A (r, d2), B (d1, r), sliced from one max-size pair regenerated from the seed and shared
by all layers and all adapters with the same seed. Trainable: d (r), b (d1). In a mixed batch the
shared projections are applied once to the whole batch; only d and b are gathered per row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...errors import AdapterConfigError
from ...regeneration.seeded import vera_projections
from ...serving_form.primitives import LayerForm, SharedBasisLowRank
from ..base import AdapterWeights, TargetInfo
from .config import VeraConfig

MAX_PROJECTION_VALUES = 1 << 24  # 64 MiB of float32 for A and B together


class VeraProjections(nn.Module):
    """This layer's slices of the shared pair: A[:, :d2] and B[:d1, :] (frozen buffers)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, identity: str = ""):
        super().__init__()
        self.identity = identity  # bit-level identity: the seed recipe, slice and dtype
        self.register_buffer("A", a, persistent=False)  # (r, d2)
        self.register_buffer("B", b, persistent=False)  # (d1, r)


def _max_dims(targets: Sequence[TargetInfo]) -> tuple[int, int]:
    return max(t.d_out for t in targets), max(t.d_in for t in targets)


class VeraWeights(AdapterWeights):
    method = "vera"

    def __init__(self, config: VeraConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        device, dtype = target.weight.device, target.dtype
        self.vera_d = nn.Parameter(
            torch.full((config.r,), float(config.d_init), device=device, dtype=dtype)
        )
        self.vera_b = nn.Parameter(torch.zeros(target.d_out, device=device, dtype=dtype))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @classmethod
    def check_targets(cls, config: VeraConfig, targets: Sequence[TargetInfo]) -> None:
        """The shared projections hold r·(d_in_max + d_out_max) values: bounded, so that a file's
        r cannot make the server allocate gigabytes (r may exceed the layers' rank, as in PEFT)."""
        d_out, d_in = _max_dims(targets)
        if config.r * (d_in + d_out) > MAX_PROJECTION_VALUES:
            raise AdapterConfigError(
                f"vera r={config.r} needs shared projections of {config.r * (d_in + d_out):,} "
                f"values for layers up to {d_out}x{d_in}; the limit is {MAX_PROJECTION_VALUES:,} "
                f"(r ≤ {MAX_PROJECTION_VALUES // (d_in + d_out)}): lower r"
            )

    @classmethod
    def shared_key(cls, config: VeraConfig, targets: Sequence[TargetInfo]) -> str:
        d_out, d_in = _max_dims(targets)
        return f"vera:{config.projection_seed}:{config.r}:{d_out}x{d_in}"

    @classmethod
    def regeneration_recipe(
        cls, config: VeraConfig, targets: Sequence[TargetInfo]
    ) -> list[dict[str, Any]]:
        d_out, d_in = _max_dims(targets)
        detail = {
            "generator": "torch.Generator(device='cpu').manual_seed(seed), float32 on the CPU",
            "draws": "A (r, d_in_max) then B (d_out_max, r), U(-b, b), b = sqrt(6 / fan_in)",
            "seed": config.projection_seed,
            "r": config.r,
            "d_out_max": d_out,
            "d_in_max": d_in,
            "slicing": "A[:, :d_in], B[:d_out, :] per layer",
        }
        return [{"tensor": "vera_A,vera_B", "source": "seed", "detail": detail}]

    @classmethod
    def build_shared(
        cls, config: VeraConfig, target: TargetInfo, targets: Sequence[TargetInfo], ctx: Any
    ) -> nn.Module:
        key = cls.shared_key(config, targets)
        pair = ctx.memo.get(key)
        if pair is None:
            pair = ctx.memo[key] = vera_projections(
                config.projection_seed, config.r, *_max_dims(targets)
            )
        a, b = pair
        dtype, device = target.dtype, target.weight.device
        # seeded generation is bit-identical everywhere (docs/methods.md, regeneration): the recipe is the identity
        recipe = f"{key}:A[:, :{target.d_in}]:B[:{target.d_out}]:{dtype}"
        return VeraProjections(
            a[:, : target.d_in].to(device=device, dtype=dtype),
            b[: target.d_out, :].to(device=device, dtype=dtype),
            identity=hashlib.sha256(recipe.encode()).hexdigest(),
        )

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        a, b = shared.A.to(self.vera_d.dtype), shared.B.to(self.vera_d.dtype)
        return self.vera_b[:, None] * (b * self.vera_d[None, :]) @ a  # (d1, d2)

    @classmethod
    def table_form(cls, tables, shared, zero_row) -> LayerForm:
        """``SharedBasisLowRank(A, B, inner=d, outer=b)``: A, B shared by every slot, applied
        once per batch; only d and b are gathered per row."""
        d, b = tables["vera_d"], tables["vera_b"]  # (n, r), (n, d1)
        a_shared, b_shared = shared.A.to(d.dtype), shared.B.to(d.dtype)
        term = SharedBasisLowRank(a_shared, b_shared, d, b, key=getattr(shared, "identity", ""))
        return LayerForm(a_shared.shape[1], b.shape[1], len(d), terms=(term,))
