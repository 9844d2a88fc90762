"""Bottleneck adapters on one attention/MLP block (Houlsby et al., 2019; docs/methods.md), serial here, parallel
in ``parallel_adapter``:

    serial:    H ← H + s · g(H),          parallel:  H_out ← H_out + s · g(H_in)
    g(z) = f(z W_downᵀ + b_down) W_upᵀ + b_up,   W_down (k, d), W_up (d, k), k = bottleneck

Non-linear: no ΔW, no merge. In a mixed batch each row's W_down, W_up are gathered and applied
with batched matrix products (like LoRA's bgmv); rows at -1 read the zero row, and g = 0 there
because f(0) = 0 for every allowed f. W_up and b_up start at 0, so an untouched adapter changes
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import AdapterStateError
from ...regeneration.seeded import kaiming_uniform, seeded_generator
from ..base import AdapterWeights, TargetInfo, require_dim_bound, table_rows
from .config import BottleneckConfig

ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Activation(nn.Module):
    """The shared (frozen, tensor-free) part of bottleneck adapters on a block: which f. Adapters
    with different f are in different groups (the shared key names f)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = ACTIVATION_FNS[name]


class BottleneckWeights(AdapterWeights):
    row_constant_fields = ("scale",)
    target_kind = "block"
    mergeable = False
    reads_input: ClassVar[bool] = False  # parallel adapters read the block input

    def __init__(self, config: BottleneckConfig, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        k, d = config.bottleneck, target.d_in
        device, dtype = target.weight.device, target.dtype
        down = kaiming_uniform((k, d), seeded_generator(config.init_seed))
        self.adapter_down = nn.Parameter(down.to(device=device, dtype=dtype))  # (k, d)
        self.adapter_down_bias = nn.Parameter(torch.zeros(k, device=device, dtype=dtype))
        self.adapter_up = nn.Parameter(torch.zeros(d, k, device=device, dtype=dtype))  # (d, k)
        self.adapter_up_bias = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.activation, self.scale = config.activation, config.scale

    @classmethod
    def check_targets(cls, config: BottleneckConfig, targets: Sequence[TargetInfo]) -> None:
        for t in targets:
            what = f"bottleneck ≤ hidden size {t.d_out}"
            require_dim_bound(config, "bottleneck", config.bottleneck, t.d_out, what, t.name)

    @classmethod
    def shared_key(cls, config: BottleneckConfig, targets) -> str:
        return f"{cls.method}:{config.activation}"

    @classmethod
    def build_shared(cls, config: BottleneckConfig, target, targets, ctx) -> nn.Module:
        return Activation(config.activation)

    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        raise AdapterStateError(f"{self.method} is non-linear: it has no ΔW (serve it unmerged)")

    def delta_norm(self, shared: nn.Module | None) -> float:
        return 0.0  # no ΔW; the file's regeneration probe does not apply (no frozen tensors)

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """The plain g(z) of this adapter (the reference)."""
        act = ACTIVATION_FNS[self.activation]
        hidden = act(F.linear(z, self.adapter_down, self.adapter_down_bias))
        return F.linear(hidden, self.adapter_up, self.adapter_up_bias) * self.scale

    @classmethod
    def reference_delta(cls, x, out0, members, row_index, shared) -> torch.Tensor:
        z = x if cls.reads_input else out0
        if row_index is None:
            return members[0].bottleneck(z)
        out = torch.zeros_like(out0)
        for position, member in enumerate(members):
            rows = row_index == position
            out[rows] = member.bottleneck(z[rows])
        return out

    @classmethod
    def prepare(cls, tables, row_index, shared, ndim) -> dict[str, Any]:
        if row_index is None:
            rows = {k: t[0] for k, t in tables.items()}
        else:
            rows = {k: t[row_index] for k, t in tables.items() if t.dim() == 3}
            for kind in ("adapter_down_bias", "adapter_up_bias", "scale"):
                table = tables[kind] if kind != "scale" else tables[kind][:, None]
                rows[kind] = table_rows(table, row_index, 3)  # (B, 1, n)
        return rows

    @classmethod
    def add_prepared(cls, result, x, out0, prepared, shared, dropout=None):
        z = x if cls.reads_input else out0
        act = shared.fn
        down, up = prepared["adapter_down"], prepared["adapter_up"]
        if down.dim() == 2:  # every row uses one adapter
            hidden = act(F.linear(z, down, prepared["adapter_down_bias"]))
            out = F.linear(hidden, up, prepared["adapter_up_bias"]) * prepared["scale"]
            return result + out.to(result.dtype)
        z3 = z.reshape(z.shape[0], -1, z.shape[-1])  # (B, T, d)
        hidden = act(torch.bmm(z3, down.transpose(1, 2)) + prepared["adapter_down_bias"])
        out = torch.bmm(hidden, up.transpose(1, 2)) + prepared["adapter_up_bias"]  # (B, T, d)
        return result + (out * prepared["scale"]).reshape(out0.shape).to(result.dtype)


class SerialAdapterWeights(BottleneckWeights):
    method = "serial_adapter"
