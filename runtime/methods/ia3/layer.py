"""(IA)³ weights on one layer (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning"), as HF PEFT's IA3 on linear layers:

    attention-side layers:  y = l ⊙ (W0 x + b0)       l ∈ R^{d1}   (the bias is scaled too)
    feed-forward layers:    y = W0 (l ⊙ x) + b0        l ∈ R^{d2}

Stored: ``ia3_dl = l − 1`` (zeros are the identity, so the zero row of a table is the base), of
size d1 or d2 depending on the layer (``feedforward_modules``). Frozen: W0 and b0, by reference.
Serving form: ``OutputScale(dl)`` + ``BiasDelta(dl ⊙ b0)``, or ``InputScale(dl)``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ...serving_form.primitives import BiasDelta, InputScale, LayerForm, OutputScale
from ..base import AdapterWeights, TargetInfo
from ..boft.layer import BaseWeightShared
from .config import Ia3Config


class Ia3Shared(BaseWeightShared):
    """W0 and b0 by reference, whether the layer scales its input, and b0 as it was before a
    merge (the merged bias is ``l ⊙ b0``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, feedforward: bool):
        super().__init__(weight, identity="")
        self.base_bias, self.feedforward = bias, feedforward
        self.kept_bias: torch.Tensor | None = None

    def bias_before_merge(self) -> torch.Tensor | None:
        return self.kept_bias if self.kept_bias is not None else self.base_bias


class Ia3Weights(AdapterWeights):
    method = "ia3"

    def __init__(self, config: Ia3Config, target: TargetInfo, shared: nn.Module | None):
        super().__init__(config, target, shared)
        self.feedforward = shared.feedforward
        size = target.d_in if self.feedforward else target.d_out
        device, dtype = target.weight.device, target.dtype
        self.ia3_dl = nn.Parameter(torch.zeros(size, device=device, dtype=dtype))  # l − 1

    @classmethod
    def shared_key(cls, config: Ia3Config, targets) -> str:
        """Adapters that scale the same side of each layer share a group (a module key: no dots,
        so the patterns are hashed)."""
        digest = hashlib.sha256(str(config.feedforward_modules).encode()).hexdigest()[:16]
        return f"ia3-{digest}"

    @classmethod
    def build_shared(cls, config, target, targets, ctx) -> nn.Module:
        return Ia3Shared(target.weight, target.bias, config.is_feedforward(target.name))

    # ----- reference math and merge --------------------------------------------------------
    def get_delta_weight(self, shared: nn.Module | None) -> torch.Tensor:
        w0 = shared.weight_for(self.ia3_dl).to(self.ia3_dl.dtype)
        if self.feedforward:
            return w0 * self.ia3_dl[None, :]  # W0 diag(l) − W0
        return self.ia3_dl[:, None] * w0  # diag(l) W0 − W0

    def get_delta_bias(self, shared: nn.Module | None) -> torch.Tensor | None:
        bias = shared.bias_before_merge()
        if self.feedforward or bias is None:
            return None
        return self.ia3_dl * bias.to(self.ia3_dl.dtype)  # (l − 1) ⊙ b0

    def merge_into(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        """``W ← W + ΔW`` (float64), keeping W0 and b0: ΔW and Δb are read from them."""
        delta = self.get_delta_weight(shared).to(torch.float64)
        shared.kept[weight_oi.data_ptr()] = weight_oi.detach().clone()
        if shared.base_bias is not None:
            shared.kept_bias = shared.base_bias.detach().clone()
        weight_oi.copy_((weight_oi.to(torch.float64) + delta).to(weight_oi.dtype))

    def unmerge_from(self, weight_oi: torch.Tensor, shared: nn.Module | None) -> None:
        kept = shared.kept.pop(weight_oi.data_ptr(), None)
        shared.kept_bias = None
        if kept is None:
            raise RuntimeError("ia3: unmerge without merge_into; the original weight is unknown")
        weight_oi.copy_(kept)

    # ----- batched forward: through the serving form ---------------------------------------
    @classmethod
    def table_form(cls, tables, shared, zero_row) -> LayerForm:
        """``InputScale(dl)`` on feed-forward layers; else ``OutputScale(dl)`` and, with a base
        bias, ``BiasDelta(dl ⊙ b0)`` (PEFT scales the bias too)."""
        dl = tables["ia3_dl"]  # (n, d2) or (n, d1)
        d_out, d_in = shared.base_weight.shape
        if shared.feedforward:
            return LayerForm(d_in, d_out, len(dl), input_scale=InputScale(dl))
        b0 = shared.bias_before_merge()
        bias = None if b0 is None else BiasDelta(dl * b0.to(dl.dtype))
        return LayerForm(d_in, d_out, len(dl), output_scale=OutputScale(dl), bias=bias)
