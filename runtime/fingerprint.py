"""Base-model fingerprints (docs/methods.md, regeneration): a stable hash of the weights that adapters target.

A layer fingerprint is the SHA-256 of the layer's weight as ``(out, in)`` little-endian float32
bytes, prefixed by its shape, so the same numbers give the same fingerprint whether the model was
loaded from GGUF, from safetensors, or in another dtype that holds the same float32 values. The
whole-model fingerprint hashes the sorted ``(layer name, layer fingerprint)`` pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .targets import iter_candidate_layers, weight_out_in

FINGERPRINT_ALGORITHM = "sha256/float32-le/out-in/v1"


def layer_fingerprint(weight_oi: torch.Tensor) -> str:
    """Fingerprint of one weight given as ``(d1, d2)``."""
    w = weight_oi.detach().to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(w.shape)}".encode())
    h.update(w.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def combine_fingerprints(layers: dict[str, str]) -> str:
    h = hashlib.sha256(FINGERPRINT_ALGORITHM.encode())
    for name in sorted(layers):
        h.update(f"{name}={layers[name]};".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class BaseFingerprint:
    """Fingerprint of a base model: one per candidate target layer and one for the whole."""

    whole: str
    layers: dict[str, str]

    @property
    def short(self) -> str:
        return self.whole[:16]


def base_fingerprint(model: nn.Module) -> BaseFingerprint:
    """Fingerprint every linear layer adapters may target (all but the output head)."""
    layers = {name: layer_fingerprint(weight_out_in(m)) for name, m in iter_candidate_layers(model)}
    return BaseFingerprint(whole=combine_fingerprints(layers), layers=layers)


def block_fingerprint(layers: dict[str, str], block: str) -> str:
    """Fingerprint of an attention/MLP block: its linear layers' fingerprints, combined."""
    inside = {name: fp for name, fp in layers.items() if name.startswith(block + ".")}
    return combine_fingerprints(inside)
