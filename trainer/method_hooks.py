"""Trainer cooperation of the methods that need it (registered when ``svda.trainer`` loads).

* LoRA-GA (Wang et al., 2024): before step 0, the gradient of the loss with respect to each
  target's frozen W0 is averaged over ``gradient_batches`` batches (and over DDP ranks), and its
  SVD sets A0, B0 (``LoraGaWeights.initialise_from_gradient``).
* AdaLoRA (Zhang et al., 2023): after every backward, the orthogonality regulariser's gradient is
  added and the rank allocator updates importances and prunes on schedule (the kept triplets
  are logged); before export the adapter is compacted to its kept ranks.
* Hybrid LoRA-GA/BOFT: LoRA-GA's initialisation, then after every backward each
  layer's λ follows the branches' gradient norms (:class:`HybridLambda`); λ per layer is written
  to ``lambda.csv`` and plotted in ``lambda.png``; the adapter stores the last value.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from svda.runtime.targets import is_conv1d

from .adalora_budget import AdaLoraBudget, compact_adalora, orthogonal_regularization
from .hooks import HookContext, TrainerHook, register_method_hooks
from .report import append_lambda_rows, drop_lambda_rows_from, plot_lambdas


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


class HybridLambda(TrainerHook):
    """Sets each layer's λ from the gradient norms of its two branches, smoothed.

    The forward scales the low-rank branch by λ and the rotation branch by 1 − λ, so the raw
    gradient norms carry λ themselves (``‖∇_{A,B}‖ ∝ λ``) and the seed's ratio would drive λ to
    0 or 1 whichever branch starts ahead. The ratio here uses the norms each branch would have at
    unit weight, ``g_LoRA = ‖∇_{A,B}‖ / λ`` and ``g_BOFT = ‖∇_Q‖ / (1 − λ)``:

        λ ← clamp(β·λ + (1 − β)·g_LoRA / (g_LoRA + g_BOFT), λ_min, 1 − λ_min)

    λ lives in the adapter (``hybrid_lambda``), so checkpoints carry it and a resumed run goes on
    from it. Gradients are complete here (after accumulation and DDP averaging, before clipping);
    a uniform loss scale cancels in the ratio.
    """

    def __init__(self) -> None:
        self.log_trimmed = False  # a resumed run first drops rows written after its checkpoint

    def before_training(self, ctx: HookContext) -> None:
        if ctx.dist.is_main:
            (Path(ctx.config.output_dir) / LAMBDA_CSV).unlink(missing_ok=True)

    def after_backward(self, ctx: HookContext, step: int) -> dict[str, float]:
        config = ctx.model.configs[ctx.adapter]
        layers = ctx.model.layers_of(ctx.adapter)
        weights = [layer.adapters[ctx.adapter] for layer in layers]
        lam = torch.cat([w.hybrid_lambda.detach() for w in weights]).double()  # (L,)
        low_rank = torch.stack([_grad_norm(w.lora_A, w.lora_B) for w in weights]) / lam
        rotation = torch.stack([_grad_norm(w.boft_q) for w in weights]) / (1 - lam)
        total = low_rank + rotation
        measured = torch.where(total > 0, low_rank / total.clamp_min(1e-300), lam)
        beta, low = config.lambda_smoothing, config.lambda_min
        new = (beta * lam + (1 - beta) * measured).clamp(low, 1 - low)
        with torch.no_grad():
            for w, value in zip(weights, new.tolist(), strict=True):
                w.hybrid_lambda.fill_(value)
        if ctx.dist.is_main:
            path = Path(ctx.config.output_dir) / LAMBDA_CSV
            if not self.log_trimmed:
                drop_lambda_rows_from(path, step + 1)  # written after the resumed checkpoint
                self.log_trimmed = True
            names = [layer.layer_name for layer in layers]
            append_lambda_rows(path, step + 1, names, new)
        return {
            "hybrid_lambda_mean": float(new.mean()),
            "hybrid_lambda_min": float(new.min()),
            "hybrid_lambda_max": float(new.max()),
        }

    def before_export(self, ctx: HookContext) -> None:
        if ctx.dist.is_main:
            folder = Path(ctx.config.output_dir)
            plot_lambdas(folder / LAMBDA_CSV, folder / "lambda.png")


LAMBDA_CSV = "lambda.csv"


def _grad_norm(*params: torch.nn.Parameter) -> torch.Tensor:
    """‖(∇p1, ∇p2, …)‖ in float64 (zero where a parameter got no gradient)."""
    squares = [p.grad.double().pow(2).sum() for p in params if p.grad is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)


register_method_hooks("lora_ga", lambda config: [LoraGaInit()])
register_method_hooks("adalora", lambda config: [AdaLoraHooks()])
register_method_hooks("hybrid", lambda config: [LoraGaInit(), HybridLambda()])
