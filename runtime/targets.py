"""Finding the linear layers of a Hugging Face causal LM that adapters may target.

A target is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 style, weight stored as
``(in, out)``). The output head (``lm_head``) is never a target. Everywhere in svda a target's
weight is seen as ``W0 ∈ R^{d1×d2}`` (d1 = out features, d2 = in features), as in docs/methods.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import AdapterConfigError

try:  # transformers keeps Conv1D in pytorch_utils
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment,misc]

EXCLUDED_NAMES = ("lm_head",)
# sub-modules of a decoder layer that block-level adapters (serial/parallel) may target
BLOCK_NAMES = ("mlp", "self_attn", "attn")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(d1, d2) = (out, in)``; a view, never a copy."""
    return module.weight.T if is_conv1d(module) else module.weight


def unwrapped(module: nn.Module) -> nn.Module:
    """The original module behind an svda wrapper (a module with a ``base_layer``), else itself."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def iter_candidate_layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every linear-like layer of ``model`` except the output head, in module order. A module
    wrapped by svda (one with a ``base_layer``: a linear layer or a whole attention / MLP block)
    is reported under its own name as its original module, and the layers inside a wrapped block
    under their names in the original model; nothing else inside a wrapper (adapter tensors) is
    a candidate."""
    for child_name, child in model.named_children():
        name = f"{prefix}{child_name}"
        if child_name in EXCLUDED_NAMES:
            continue
        base = unwrapped(child)
        if is_linear_like(base):
            yield name, base
        else:
            yield from iter_candidate_layers(base, prefix=f"{name}.")


def iter_candidate_blocks(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every attention / MLP block (``mlp``, ``self_attn``, ``attn``) that contains linear layers,
    in module order; a block wrapped by svda is reported as its original module, and nothing
    inside a wrapper but its original module is searched."""
    for child_name, child in model.named_children():
        name = f"{prefix}{child_name}"
        base = unwrapped(child)
        if is_linear_like(base):
            continue
        if child_name in BLOCK_NAMES and any(True for _ in iter_candidate_layers(base)):
            yield name, base
        yield from iter_candidate_blocks(base, prefix=f"{name}.")


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` where the path may pass through svda wrappers: a component
    missing on a wrapper is looked up on the module it wraps (``...mlp.gate_proj`` while ``mlp``
    is wrapped). The module returned may itself be a wrapper."""
    module = model
    for part in name.split(".") if name else ():
        children = dict(module.named_children())
        if part not in children and part != "base_layer":
            children = dict(unwrapped(module).named_children())
        if part not in children:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (in {name})")
        module = children[part]
    return module


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """Normalise ``"q_proj,v_proj"`` / ``["q_proj"]`` / ``"all-linear"`` to a list of patterns."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    patterns = [t.strip() for t in items if t.strip()]
    if not patterns:
        raise AdapterConfigError(
            "targets is empty: name layers like 'q_proj,v_proj' or 'all-linear'"
        )
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise AdapterConfigError(
                    f"targets pattern {pattern!r} is not a valid regular expression ({error})"
                ) from None
    return patterns


def matches(name: str, pattern: str) -> bool:
    """A layer name matches a pattern if the pattern equals its last component, a dotted suffix
    of it, or (for patterns starting with ``re:``) the regular expression matches the whole name."""
    if pattern == "all-linear":
        return True
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def select_targets(
    model: nn.Module, targets: str | Sequence[str], kind: str = "linear"
) -> list[str]:
    """Names of the layers (``kind="linear"``) or attention/MLP blocks (``kind="block"``) of
    ``model`` selected by ``targets``; error if a pattern selects none."""
    patterns = parse_targets(targets)
    found = iter_candidate_blocks(model) if kind == "block" else iter_candidate_layers(model)
    candidates = [name for name, _ in found]
    selected = [n for n in candidates if any(matches(n, p) for p in patterns)]
    for p in patterns:
        if p == "all-linear" and kind == "block":
            raise AdapterConfigError("'all-linear' selects layers; name blocks like 'mlp'")
        if not any(matches(n, p) for n in candidates):
            examples = sorted({n.split(".")[-1] for n in candidates})[:12]
            what = "attention/MLP block" if kind == "block" else "linear layer"
            hint = "" if kind == "block" else " (or use 'all-linear')"
            raise AdapterConfigError(
                f"target pattern {p!r} matches no {what} of this model; "
                f"names end with one of {examples}{hint}"
            )
    return selected
