"""Trainer cooperation of the methods that need it (registered when ``svda.trainer`` loads).

* LoRA-GA (Wang et al., 2024): before step 0, the gradient of the loss with respect to each
  target's frozen W0 is averaged over ``gradient_batches`` batches (and over DDP ranks), and its
  SVD sets A0, B0 (``LoraGaWeights.initialise_from_gradient``).
* AdaLoRA (Zhang et al., 2023): after every backward, the orthogonality regulariser's gradient is
  added and the rank allocator updates importances and prunes on schedule (the kept triplets
  are logged); before export the adapter is compacted to its kept ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from svda.runtime.methods.adalora import (
    AdaLoraBudget,
    compact_adalora,
    orthogonal_regularization,
)
from svda.runtime.targets import is_conv1d

from .hooks import HookContext, TrainerHook, register_method_hooks


class LoraGaInit(TrainerHook):
    def before_training(self, ctx: HookContext) -> None:
        layers = ctx.model.layers_of(ctx.adapter)
        batches = ctx.model.configs[ctx.adapter].gradient_batches
        weights = [layer.base_layer.weight for layer in layers]
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        try:
            for batch in ctx.sample_batches(batches):
                (ctx.loss(batch) / batches).backward()
            grads = [_averaged(w.grad, ctx) for w in weights]
        finally:
            for w in weights:
                w.requires_grad_(False)
                w.grad = None
            for p in ctx.params.values():
                p.grad = None
        with torch.no_grad():
            for layer, grad in zip(layers, grads, strict=True):
                grad_oi = grad.T if is_conv1d(layer.base_layer) else grad
                layer.adapters[ctx.adapter].initialise_from_gradient(grad_oi)


def _averaged(grad: torch.Tensor, ctx: HookContext) -> torch.Tensor:
    if ctx.dist.enabled and dist.is_initialized():
        dist.all_reduce(grad)
        grad /= ctx.dist.world_size
    return grad


class AdaLoraHooks(TrainerHook):
    def before_training(self, ctx: HookContext) -> None:
        self.budget = AdaLoraBudget(ctx.model, ctx.adapter, ctx.total_steps)

    def after_backward(self, ctx: HookContext, step: int) -> dict[str, float]:
        if not hasattr(self, "budget"):  # resumed run: the importance EMAs start afresh
            self.before_training(ctx)
        regulariser = orthogonal_regularization(ctx.model, ctx.adapter)
        regulariser.backward()
        self.budget.update_importance()
        return {"adalora_orth": float(regulariser.detach())}

    def on_step_end(self, ctx: HookContext, step: int, row: dict) -> None:
        row["adalora_ranks"] = float(self.budget.prune(step))

    def before_export(self, ctx: HookContext) -> None:
        compact_adalora(ctx.model, ctx.adapter)


register_method_hooks("lora_ga", lambda config: [LoraGaInit()])
register_method_hooks("adalora", lambda config: [AdaLoraHooks()])
