"""AdaLoRA's training-time parts: importance-based budget pruning, the orthogonality regulariser,
and compaction to the kept ranks before export (Zhang et al., 2023, §3-4). Training only: they
live in the trainer, and the runtime (which serves AdaLoRA adapters) never imports them.

The trainer calls, for an AdaLoRA adapter ``name``:

    loss = loss + orthogonal_regularization(model, name)      # before backward
    budget.update_importance()                                 # after backward
    budget.prune(step)                                         # after the optimizer update
    compact_adalora(model, name)                               # once, before export

Importance of a triplet i on a layer: ``s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` with
``s(θ) = Ī(θ) · Ū(θ)``, the EMAs of the sensitivity ``|θ · ∂L/∂θ|`` and of its uncertainty.
The total budget (kept triplets over all layers) falls from ``r · L`` to ``target_r · L`` on a
cubic schedule between ``tinit`` and ``total_steps − tfinal``; pruned λ_i are set to 0.
"""

from __future__ import annotations

import dataclasses

import torch

from svda.runtime import AdapterModel
from svda.runtime.methods.adalora import AdaLoraConfig, AdaLoraWeights


def _weights(model: AdapterModel, name: str) -> dict[str, AdaLoraWeights]:
    layers = {layer.layer_name: layer.adapters[name] for layer in model.layers_of(name)}
    if not layers or not all(isinstance(w, AdaLoraWeights) for w in layers.values()):
        raise ValueError(f"adapter {name!r} is not a trainable AdaLoRA adapter")
    return layers


def orthogonal_regularization(model: AdapterModel, name: str) -> torch.Tensor:
    """``orth_reg_weight · mean over layers of (‖PᵀP − I‖_F + ‖QQᵀ − I‖_F) / 2``."""
    config: AdaLoraConfig = model.configs[name]
    terms = []
    for w in _weights(model, name).values():
        eye = torch.eye(w.r, device=w.adalora_P.device, dtype=w.adalora_P.dtype)
        terms.append(torch.linalg.norm(w.adalora_P.T @ w.adalora_P - eye))
        terms.append(torch.linalg.norm(w.adalora_Q @ w.adalora_Q.T - eye))
    return config.orth_reg_weight * torch.stack(terms).mean()


class AdaLoraBudget:
    """The rank allocator of one AdaLoRA adapter over ``total_steps`` optimizer steps."""

    def __init__(self, model: AdapterModel, name: str, total_steps: int):
        self.weights = _weights(model, name)
        self.config: AdaLoraConfig = model.configs[name]
        self.total_steps = total_steps
        self.ema_importance: dict[str, torch.Tensor] = {}
        self.ema_uncertainty: dict[str, torch.Tensor] = {}
        self.mask: dict[str, torch.Tensor] | None = None

    def budget(self, step: int) -> int:
        """Triplets kept over all layers after ``step``."""
        c, layers = self.config, len(self.weights)
        start, end = c.tinit, self.total_steps - c.tfinal
        if step <= start:
            return c.r * layers
        if step >= end:
            return c.target_r * layers
        progress = 1 - (step - start) / max(end - start, 1)
        return int((c.r - c.target_r) * layers * progress**3) + c.target_r * layers

    def step(self, step: int) -> int:
        """:meth:`update_importance` then :meth:`prune` (gradients must be present)."""
        self.update_importance()
        return self.prune(step)

    @torch.no_grad()
    def prune(self, step: int) -> int:
        """Prune on schedule and keep pruned λ at 0 (call after the optimizer update, as λ
        moves with it); returns the number of triplets kept."""
        c = self.config
        pruning = c.tinit < step < self.total_steps - c.tfinal and step % c.delta_t == 0
        if pruning or (step >= self.total_steps - c.tfinal and self.mask is None):
            self.mask = self._mask_to_budget(self.budget(step))
        if self.mask is not None:
            for layer, w in self.weights.items():
                w.adalora_lambda.masked_fill_(~self.mask[layer], 0.0)
        return sum(int(m.sum()) for m in self.mask.values()) if self.mask else self.budget(step)

    @torch.no_grad()
    def update_importance(self) -> None:
        """EMAs of the sensitivity |θ·∂L/∂θ| and its uncertainty, from the current gradients."""
        b1, b2 = self.config.beta1, self.config.beta2
        for layer, w in self.weights.items():
            for kind, p in w.named_parameters():
                if p.grad is None:
                    continue
                key = f"{layer}.{kind}"
                sensitivity = (p * p.grad).abs()
                ema = self.ema_importance.get(key, torch.zeros_like(p))
                unc = self.ema_uncertainty.get(key, torch.zeros_like(p))
                self.ema_importance[key] = b1 * ema + (1 - b1) * sensitivity
                self.ema_uncertainty[key] = b2 * unc + (1 - b2) * (sensitivity - ema).abs()

    def _score(self, layer: str, kind: str) -> torch.Tensor:
        key = f"{layer}.{kind}"
        if key not in self.ema_importance:
            return torch.zeros_like(getattr(self.weights[layer], kind))
        return self.ema_importance[key] * self.ema_uncertainty[key]

    def _mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        scores = {
            layer: self._score(layer, "adalora_lambda")
            + self._score(layer, "adalora_P").mean(dim=0)
            + self._score(layer, "adalora_Q").mean(dim=1)
            for layer in self.weights
        }
        flat = torch.cat(list(scores.values()))
        if budget >= flat.numel():
            return {layer: torch.ones_like(s, dtype=torch.bool) for layer, s in scores.items()}
        threshold = torch.kthvalue(flat, flat.numel() - budget).values
        return {layer: s > threshold for layer, s in scores.items()}


@torch.no_grad()
def compact_adalora(model: AdapterModel, name: str) -> dict[str, int]:
    """Drop pruned triplets (λ_i = 0) from every layer of adapter ``name`` and record the kept
    ranks in its config, so the file stores only them; returns ``layer -> rank``."""
    weights = _weights(model, name)
    config: AdaLoraConfig = model.configs[name]
    kept = {}
    for layer, w in weights.items():
        keep = w.adalora_lambda.ne(0).nonzero().flatten()
        if keep.numel() == 0:  # a layer keeps at least one triplet (with λ = 0 it adds nothing)
            keep = torch.zeros(1, dtype=torch.long, device=w.adalora_lambda.device)
        kept[layer] = keep
    ranks = {layer: int(k.numel()) for layer, k in kept.items()}
    new_config = dataclasses.replace(config, layer_ranks=ranks)
    for layer_name, keep in kept.items():
        layer, old = model.layers[layer_name], weights[layer_name]
        new = AdaLoraWeights(new_config, model.target_info(layer_name), None)
        new.adalora_P.copy_(old.adalora_P[:, keep])
        new.adalora_lambda.copy_(old.adalora_lambda[keep])
        new.adalora_Q.copy_(old.adalora_Q[keep])
        layer.adapters[name] = new.requires_grad_(old.adalora_P.requires_grad)
    model.configs[name] = new_config
    return ranks
