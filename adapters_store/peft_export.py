"""Exporting svda adapters (LoRA, DoRA, VeRA, BOFT, IA³) as Hugging Face PEFT adapter folders.

``export_peft`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT's
``save_pretrained`` does, so that ``PeftModel.from_pretrained`` loads it: keys such as
``base_model.model.<layer>.lora_A.weight`` (r, d_in) and ``...lora_B.weight`` (d_out, r);
DoRA adds ``...lora_magnitude_vector``; IA³ writes ``l = 1 + dl`` as ``...ia3_l``; BOFT writes
``boft_R``/``boft_s`` from svda's upper triangles and scale offsets; VeRA writes
``...vera_lambda_d``/``...vera_lambda_b`` and the shared ``base_model.vera_A``/``vera_B``,
regenerated from the seed exactly as PEFT would (``save_projection=True``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from svda.runtime import AdapterModel
from svda.runtime.methods.boft.ops import upper_to_peft
from svda.runtime.regeneration.seeded import vera_projections
from svda.runtime.targets import is_conv1d

from .peft_rules import PREFIX, PeftConversionError


def export_peft(
    model: AdapterModel, name: str, folder: str | Path, base_name: str | None = None
) -> Path:
    """Write adapter ``name`` (LoRA, DoRA, VeRA, BOFT or IA³) as a folder ``PeftModel.from_pretrained``
    loads. ``base_name`` becomes ``base_model_name_or_path`` (what AutoPeftModel loads): give
    the base's local folder so it loads offline."""
    config = model.configs[name]
    params = model.adapter_state_dict(name)
    layers = sorted({k.rsplit(".", 1)[0] for k in params})
    writers = {
        "lora": _export_lora,
        "dora": _export_dora,
        "vera": _export_vera,
        "boft": _export_boft,
        "ia3": _export_ia3,
    }
    if config.method not in writers:
        raise PeftConversionError(
            f"method {config.method!r} has no PEFT equivalent svda writes (LoRA, DoRA, VeRA, "
            "BOFT and IA3)"
        )
    tensors, peft_config = writers[config.method](model, config, params, layers)
    conv1d = any(is_conv1d(model.layers[layer].base_layer) for layer in layers)
    peft_config.update(
        {
            "target_modules": target_modules(model, layers),
            "base_model_name_or_path": base_name,
            "bias": "none",
            "fan_in_fan_out": conv1d,
            "inference_mode": True,
            "task_type": "CAUSAL_LM",
        }
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors")
    )
    (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return folder


def target_modules(model: AdapterModel, layers: list[str]) -> list[str] | str:
    """Module-name suffixes (``["q_proj", "v_proj"]``) when they select exactly ``layers`` in
    the base model, else a regex PEFT full-matches against module names."""
    suffixes = sorted({layer.rsplit(".", 1)[-1] for layer in layers})
    chosen = set(layers)
    matched = {
        n
        for n, _ in model.model.named_modules()
        if n.rsplit(".", 1)[-1] in suffixes and not n.endswith(".base_layer")
    }
    if matched == chosen:
        return suffixes
    return "(" + "|".join(re.escape(layer) for layer in layers) + ")"


def _key(layer: str, suffix: str) -> str:
    return f"{PREFIX}{layer}.{suffix}"


def _export_lora(model, config, params, layers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {
        _key(layer, f"{part}.weight"): params[f"{layer}.{part}"]
        for layer in layers
        for part in ("lora_A", "lora_B")
    }
    return tensors, {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
    }


def _export_dora(model, config, params, layers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, peft_config = _export_lora(model, config, params, layers)
    for layer in layers:
        tensors[_key(layer, "lora_magnitude_vector")] = params[f"{layer}.dora_m"]
    return tensors, {**peft_config, "use_dora": True}


def _export_ia3(model, config, params, layers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``l = 1 + dl`` as ``(d_out, 1)``, or ``(1, d_in)`` on feed-forward layers."""
    tensors, feedforward = {}, []
    for layer in layers:
        scale = 1.0 + params[f"{layer}.ia3_dl"]
        if config.is_feedforward(layer):
            feedforward.append(layer)
            tensors[_key(layer, "ia3_l")] = scale.reshape(1, -1)
        else:
            tensors[_key(layer, "ia3_l")] = scale.reshape(-1, 1)
    ff = target_modules(model, feedforward) if feedforward else []
    return tensors, {"peft_type": "IA3", "feedforward_modules": ff}


def _export_vera(model, config, params, layers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {}
    for layer in layers:
        tensors[_key(layer, "vera_lambda_d")] = params[f"{layer}.vera_d"]
        tensors[_key(layer, "vera_lambda_b")] = params[f"{layer}.vera_b"]
    # PEFT stores the max-size pair once; regenerate it exactly as PEFT would
    d_out = max(model.layers[n].weight_out_in().shape[0] for n in layers)
    d_in = max(model.layers[n].weight_out_in().shape[1] for n in layers)
    a, b = vera_projections(config.projection_seed, config.r, d_out, d_in)
    tensors.update({"base_model.vera_A": a, "base_model.vera_B": b})
    return tensors, {
        "peft_type": "VERA",
        "r": config.r,
        "projection_prng_key": config.projection_seed,
        "save_projection": True,
        "d_initial": config.d_init,
        "vera_dropout": config.dropout,
    }


def _export_boft(model, config, params, layers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT without its CUDA extension (any CPU) serves one butterfly factor only, so a folder
    with ``n_butterfly_factor > 1`` loads in PEFT only where that extension builds."""
    tensors = {}
    for layer in layers:
        q = params[f"{layer}.boft_q"]
        block = _block_size_of(q.shape[-1])
        tensors[_key(layer, "boft_R")] = upper_to_peft(q, block)
        ds = params.get(f"{layer}.boft_ds")
        d_out = model.layers[layer].weight_out_in().shape[0]
        s = torch.ones(d_out, dtype=q.dtype) if ds is None else 1.0 + ds
        tensors[_key(layer, "boft_s")] = s.reshape(-1, 1)
    return tensors, {
        "peft_type": "BOFT",
        "boft_block_size": config.block_size,
        "boft_block_num": config.block_num,
        "boft_n_butterfly_factor": config.n_butterfly_factor,
        "boft_dropout": config.dropout,
    }


def _block_size_of(triangle: int) -> int:
    """b from b(b-1)/2."""
    return round((1 + math.sqrt(1 + 8 * triangle)) / 2)
