"""Tiny random base models (Llama- and GPT-2-shaped) and adapter helpers for runtime tests."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from svda.runtime import AdapterModel, LoraConfig, SvdaConfig, VeraConfig
from svda.runtime.methods import (
    AdaLoraConfig,
    BitFitConfig,
    BoftConfig,
    DoraConfig,
    HybridConfig,
    Ia3Config,
    LoraGaConfig,
    ParallelAdapterConfig,
    PissaConfig,
    SerialAdapterConfig,
    UrnnConfig,
)

VOCAB = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


# One config per method under test, and the targets each uses on a Llama-shaped model.
METHOD_CONFIGS = {
    "lora": lambda targets: LoraConfig(targets=targets, r=4, alpha=8.0),
    "vera": lambda targets: VeraConfig(targets=targets, r=16, projection_seed=7),
    "svda": lambda targets: SvdaConfig(targets=targets),
    "pissa": lambda targets: PissaConfig(targets=targets, r=3),
    "lora_ga": lambda targets: LoraGaConfig(targets=targets, r=2, alpha=4.0),
    "bitfit": lambda targets: BitFitConfig(targets=targets),
    "adalora": lambda targets: AdaLoraConfig(targets=targets, r=4, target_r=2),
    "boft": lambda targets: BoftConfig(targets=targets, block_size=4, n_butterfly_factor=2),
    "hybrid": lambda targets: HybridConfig(
        targets=targets, r=2, alpha=4.0, block_size=4, n_butterfly_factor=2, lambda_init=0.3
    ),
    "urnn": lambda targets: UrnnConfig(targets=targets, permutation_seed=5),
    "dora": lambda targets: DoraConfig(targets=targets, r=4, alpha=8.0),
    # down_proj (Llama) and c_fc (GPT-2) scale their input, the others their output (and bias)
    "ia3": lambda targets: Ia3Config(targets=targets, feedforward_modules="down_proj,c_fc"),
    # block-level methods adapt whole modules: after the MLP, beside the attention
    "serial_adapter": lambda targets: SerialAdapterConfig(targets="mlp", bottleneck=4),
    "parallel_adapter": lambda targets: ParallelAdapterConfig(
        targets=r"re:.*\.(self_attn|attn)", bottleneck=4, activation="gelu"
    ),
}


@torch.no_grad()
def perturb(model: AdapterModel, name: str, scale: float = 0.1, seed: int = 0) -> None:
    """Move every trainable tensor of adapter ``name`` as training would (deterministically)."""
    generator = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.adapter_parameters(name).items()):
        p.add_(torch.randn(p.shape, generator=generator) * scale)


def packed(model: AdapterModel, name: str):
    """The adapter's tensors as a ``.svda`` payload holds them: one flat tensor per kind."""
    layers, kinds = [], {}
    for layer in model.layers_of(name):
        tensors = layer.tensors_of(name)
        layers.append((layer.layer_name, {k: list(t.shape) for k, t in tensors.items()}))
        for kind, t in tensors.items():
            kinds.setdefault(kind, []).append(t.detach().flatten())
    return {k: torch.cat(v) for k, v in kinds.items()}, layers
