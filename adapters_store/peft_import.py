"""Importing Hugging Face PEFT adapter folders (LoRA, DoRA, VeRA, BOFT, IA³) as svda adapters.

What is accepted is decided first, from the folder alone (``check_peft_folder``, rules in
``peft_rules``); conversions are exact: rsLoRA and per-layer ``rank_pattern``/``alpha_pattern``
become one svda LoRA of the largest rank, A and B zero-padded to it and each layer's scale
folded into B relative to the stored alpha; BOFT's ``boft_R``/``boft_s`` become svda's upper
triangles and scale offsets; DoRA (a LoRA saved with ``use_dora=True``) is LoRA's conversion
plus ``...lora_magnitude_vector`` (d_out,); IA³'s ``...ia3_l`` is ``(d_out, 1)`` on layers that
scale their output and ``(1, d_in)`` on feed-forward layers (their input), stored as ``l − 1``.

svda keeps only the trainable tensors: VeRA projections saved with ``save_projection=True``
(``base_model.vera_A`` / ``base_model.vera_B``) are checked against the ones regenerated from
``projection_prng_key`` (svda draws them exactly as PEFT does) and dropped, or refused if they differ.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from svda.runtime import AdapterModel, LoraConfig, VeraConfig
from svda.runtime.errors import AdapterConfigError
from svda.runtime.methods import BoftConfig, DoraConfig, Ia3Config
from svda.runtime.methods.base import AdapterConfig
from svda.runtime.methods.boft.ops import peft_to_upper
from svda.runtime.regeneration.seeded import vera_projections

from .errors import AdapterFormatError
from .peft_rules import PeftConversionError, check_config, layer_tensors, pattern_key


def read_peft_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise PeftConversionError(
            f"{folder} is not a PEFT adapter folder: it needs adapter_config.json and "
            "adapter_model.safetensors (PEFT's save_pretrained with safe_serialization=True)"
        )
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise PeftConversionError(f"cannot read the PEFT adapter in {folder}: {exc}") from exc
    if not isinstance(config, dict):
        raise PeftConversionError(f"{config_path} is not a JSON object; re-save the adapter")
    return config, tensors


def check_peft_folder(folder: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The svda config and tensors for the PEFT adapter in ``folder``, without a base model:
    refuses (PeftConversionError) anything svda cannot represent exactly."""
    config, tensors = read_peft_folder(folder)
    peft_type = check_config(config)
    layers = layer_tensors(peft_type, tensors)
    if peft_type == "VERA":
        _check_projections(config, tensors)
    try:
        return CONVERTERS[peft_type](config, layers)
    except AdapterConfigError as exc:
        raise PeftConversionError(
            f"the PEFT {peft_type} config has no svda equivalent: {exc}"
        ) from exc


def import_peft(folder: str | Path, model: AdapterModel, name: str) -> None:
    """Attach the PEFT LoRA/DoRA/VeRA/BOFT/IA3 adapter in ``folder`` to ``model`` as ``name``."""
    svda_config, layer_params = check_peft_folder(folder)
    try:
        model.add_adapter(name, svda_config)
    except Exception as exc:
        raise PeftConversionError(f"the PEFT adapter does not fit this base model: {exc}") from exc
    try:
        model.load_adapter_state_dict(name, layer_params)
    except Exception as exc:
        model.delete_adapter(name)
        if isinstance(exc, AdapterFormatError):
            raise
        raise PeftConversionError(f"the PEFT adapter does not fit this base model: {exc}") from exc


def _targets(layers: Iterable[str]) -> str:
    return "re:(" + "|".join(re.escape(name) for name in sorted(layers)) + ")"


def _positive_int(config: dict[str, Any], field: str, default: int) -> int:
    value = config.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PeftConversionError(
            f"adapter_config.json: {field} must be an integer ≥ 0, got {value!r}"
        )
    return value


# ----- LoRA (rsLoRA, rank_pattern, alpha_pattern) ------------------------------------------------
def _lora_scale(config: dict[str, Any], layer: str, rank: int) -> float:
    """PEFT's scaling of one layer: alpha / r, or alpha / √r with rsLoRA (per-layer patterns)."""
    alpha = config.get("lora_alpha", 8)
    pattern = config.get("alpha_pattern") or {}
    alpha = float(pattern.get(pattern_key(pattern, layer), alpha))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _unpatterned_scale(config: dict[str, Any]) -> float:
    """The scale of layers that no pattern names (the stored alpha keeps their B unchanged)."""
    rank = float(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank) if rank > 0 else 0.0


def _lora_rank(config: dict[str, Any], layer: str, found: dict[str, torch.Tensor]) -> int:
    a, b = found["lora_A.weight"], found["lora_B.weight"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise PeftConversionError(
            f"layer {layer}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a LoRA "
            "pair of linear layers (svda imports LoRA on Linear/Conv1D layers only)"
        )
    pattern = config.get("rank_pattern") or {}
    expected = int(pattern.get(pattern_key(pattern, layer), config.get("r", 8)))
    if a.shape[0] != expected:
        raise PeftConversionError(
            f"layer {layer}: lora_A has rank {a.shape[0]} but the config (r, rank_pattern) says "
            f"{expected}; the folder is inconsistent, re-save it with PEFT"
        )
    return expected


def _lora(
    config: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]]
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """One svda LoRA of rank max(r_l): A and B zero-padded to it, and each layer's scale folded
    into B relative to the stored alpha, so that every ΔW = B A · scale_l is exact."""
    ranks = {layer: _lora_rank(config, layer, found) for layer, found in layers.items()}
    scales = {layer: _lora_scale(config, layer, ranks[layer]) for layer in layers}
    r = max(ranks.values())
    reference = _unpatterned_scale(config)
    if not reference > 0:  # lora_alpha ≤ 0 with positive alpha_pattern entries: store one of those
        reference = max(scales.values())
    if not reference > 0:
        raise PeftConversionError(
            f"lora_alpha={config.get('lora_alpha')!r} gives a scale ≤ 0, which svda's LoRA (alpha "
            "> 0) cannot store; re-save the adapter with a positive lora_alpha"
        )
    out = {}
    for layer, found in layers.items():
        a, b = found["lora_A.weight"].float(), found["lora_B.weight"].float()
        factor = scales[layer] / reference
        out[f"{layer}.lora_A"] = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        b = b if factor == 1.0 else b * factor
        out[f"{layer}.lora_B"] = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
    svda = LoraConfig(
        targets=_targets(layers),
        r=r,
        alpha=reference * r,
        dropout=float(config.get("lora_dropout", 0.0)),
    )
    return svda, out


# ----- VeRA ----------------------------------------------------------------------------------
def _vera(
    config: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]]
) -> tuple[VeraConfig, dict[str, torch.Tensor]]:
    svda = VeraConfig(
        targets=_targets(layers),
        r=_positive_int(config, "r", 256),
        d_init=float(config.get("d_initial", 0.1)),
        projection_seed=_positive_int(config, "projection_prng_key", 0),
        dropout=float(config.get("vera_dropout", 0.0)),
    )
    out = {}
    for layer, found in layers.items():
        out[f"{layer}.vera_d"] = found["vera_lambda_d"].float()
        out[f"{layer}.vera_b"] = found["vera_lambda_b"].float()
    return svda, out


# ----- BOFT ----------------------------------------------------------------------------------
def _boft(
    config: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]]
) -> tuple[BoftConfig, dict[str, torch.Tensor]]:
    """``boft_R (m, D, b, b)`` to svda's upper triangles, ``boft_s (d_out, 1)`` to ``ds = s − 1``.
    The factor count comes from the tensors: PEFT without its CUDA extension trains (and serves)
    one factor whatever boft_n_butterfly_factor says."""
    factors = {found["boft_R"].shape[0] for found in layers.values() if found["boft_R"].dim() == 4}
    if len(factors) != 1 or any(f["boft_R"].dim() != 4 for f in layers.values()):
        raise PeftConversionError(
            "the PEFT BOFT adapter's boft_R tensors are not (factors, blocks, b, b) with one "
            "factor count for every layer; re-save it with PEFT"
        )
    out = {}
    for layer, found in layers.items():
        out[f"{layer}.boft_q"] = peft_to_upper(found["boft_R"].float())
        out[f"{layer}.boft_ds"] = found["boft_s"].float().reshape(-1) - 1.0
    svda = BoftConfig(
        targets=_targets(layers),
        block_size=_positive_int(config, "boft_block_size", 4),
        block_num=_positive_int(config, "boft_block_num", 0),
        n_butterfly_factor=factors.pop(),
        dropout=float(config.get("boft_dropout", 0.0)),
    )
    return svda, out


# ----- DoRA and IA³ ----------------------------------------------------------------------------
def _dora(
    config: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]]
) -> tuple[DoraConfig, dict[str, torch.Tensor]]:
    """LoRA's exact conversion (scales folded into B, so s·B·A and the norm are unchanged) and
    the magnitude vectors as they are."""
    lora, out = _lora(config, layers)
    for layer, found in layers.items():
        m, d_out = found["lora_magnitude_vector"], found["lora_B.weight"].shape[0]
        if m.dim() != 1 or m.shape[0] != d_out:
            raise PeftConversionError(
                f"layer {layer}: lora_magnitude_vector {tuple(m.shape)} is not ({d_out},), one "
                "magnitude per output; svda imports DoRA on Linear/Conv1D layers only"
            )
        out[f"{layer}.dora_m"] = m.float()
    fields = {f: getattr(lora, f) for f in ("targets", "r", "alpha", "dropout")}
    return DoraConfig(**fields), out


def _ia3(
    config: dict[str, Any], layers: dict[str, dict[str, torch.Tensor]]
) -> tuple[Ia3Config, dict[str, torch.Tensor]]:
    """``ia3_l (d_out, 1)``: an output scale; ``(1, d_in)``: a feed-forward (input) scale."""
    out, feedforward = {}, []
    for layer, found in layers.items():
        scale = found["ia3_l"]
        if scale.dim() != 2 or 1 not in scale.shape:
            raise PeftConversionError(
                f"layer {layer}: ia3_l {tuple(scale.shape)} is neither (d_out, 1) nor (1, d_in); "
                "svda imports IA3 on Linear/Conv1D layers only"
            )
        if scale.shape[0] == 1 and scale.shape[1] != 1:
            feedforward.append(layer)
        out[f"{layer}.ia3_dl"] = scale.float().reshape(-1) - 1.0
    ff = _targets(feedforward) if feedforward else None
    return Ia3Config(targets=_targets(layers), feedforward_modules=ff), out


CONVERTERS: dict[str, Callable[..., tuple[AdapterConfig, dict[str, torch.Tensor]]]] = {
    "LORA": _lora,
    "DORA": _dora,
    "VERA": _vera,
    "BOFT": _boft,
    "IA3": _ia3,
}


def _check_projections(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    stored_a, stored_b = tensors.get("base_model.vera_A"), tensors.get("base_model.vera_B")
    if stored_a is None and stored_b is None:
        return  # saved with save_projection=False: PEFT itself regenerates them from the key
    if stored_a is None or stored_b is None:
        raise PeftConversionError("the PEFT VeRA adapter stores only one of vera_A and vera_B")
    a, b = vera_projections(
        int(config.get("projection_prng_key", 0)),
        int(config["r"]),
        stored_b.shape[0],
        stored_a.shape[1],
    )
    if not (torch.equal(a, stored_a.float()) and torch.equal(b, stored_b.float())):
        raise PeftConversionError(
            "the stored VeRA projections differ from those regenerated from projection_prng_key="
            f"{config.get('projection_prng_key', 0)}; svda cannot drop them, so this adapter cannot be imported"
        )
