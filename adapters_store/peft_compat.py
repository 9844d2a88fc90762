"""Converting between Hugging Face PEFT adapter folders and svda adapters (LoRA and VeRA).

A PEFT folder is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys such as
``base_model.model.<layer>.lora_A.weight`` (r, d_in), ``...lora_B.weight`` (d_out, r),
``...vera_lambda_d`` (r), ``...vera_lambda_b`` (d_out) and, for VeRA saved with
``save_projection=True``, the shared ``base_model.vera_A`` / ``base_model.vera_B``. svda keeps
only the trainable tensors: VeRA projections are checked against the ones regenerated from
``projection_prng_key`` (svda draws them exactly as PEFT does) and dropped, or refused if they differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from svda.runtime import AdapterModel, LoraConfig, VeraConfig
from svda.runtime.regeneration.seeded import vera_projections
from svda.runtime.targets import is_conv1d

from .errors import AdapterFormatError

PREFIX = "base_model.model."
LORA_KEYS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
VERA_KEYS = {"vera_lambda_d": "vera_d", "vera_lambda_b": "vera_b"}


class PeftConversionError(AdapterFormatError):
    check = "peft"


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
    return config, tensors


def import_peft(folder: str | Path, model: AdapterModel, name: str) -> None:
    """Attach the PEFT LoRA/VeRA adapter in ``folder`` to ``model`` as ``name``."""
    config, tensors = read_peft_folder(folder)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        _check_lora_supported(config)
        svda_config, keys = _lora_config(config, tensors), LORA_KEYS
    elif peft_type == "VERA":
        svda_config, keys = _vera_config(config, tensors), VERA_KEYS
    else:
        raise PeftConversionError(
            f"PEFT adapter type {peft_type or 'unknown'!r} cannot be imported; svda imports LORA and VERA"
        )
    layer_tensors = _layer_tensors(tensors, keys)
    model.add_adapter(name, svda_config)
    try:
        model.load_adapter_state_dict(name, layer_tensors)
        if peft_type == "VERA":
            _check_projections(config, tensors, model, name)
    except Exception as exc:
        model.delete_adapter(name)
        if isinstance(exc, AdapterFormatError):
            raise
        raise PeftConversionError(f"the PEFT adapter does not fit this base model: {exc}") from exc


def _check_lora_supported(config: dict[str, Any]) -> None:
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "bias": config.get("bias", "none") != "none",
    }
    used = sorted(k for k, on in unsupported.items() if on)
    if used:
        raise PeftConversionError(
            f"this PEFT LoRA uses {used}, which svda's LoRA does not represent"
        )


def _targets_from(tensors: dict[str, torch.Tensor], keys: dict[str, str]) -> str:
    layers = sorted({_layer_name(k, keys) for k in tensors if _layer_name(k, keys)})
    if not layers:
        raise PeftConversionError("the PEFT adapter holds no tensors of the expected kind")
    return "re:(" + "|".join(name.replace(".", r"\.") for name in layers) + ")"


def _layer_name(key: str, keys: dict[str, str]) -> str | None:
    for suffix in keys:
        if key.startswith(PREFIX) and key.endswith("." + suffix):
            return key[len(PREFIX) : -len(suffix) - 1]
    return None


def _layer_tensors(
    tensors: dict[str, torch.Tensor], keys: dict[str, str]
) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        layer = _layer_name(key, keys)
        if layer is not None:
            suffix = next(s for s in keys if key.endswith("." + s))
            out[f"{layer}.{keys[suffix]}"] = value.float()
    return out


def _lora_config(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoraConfig:
    return LoraConfig(
        targets=_targets_from(tensors, LORA_KEYS),
        r=int(config["r"]),
        alpha=float(config.get("lora_alpha", config["r"])),
        dropout=float(config.get("lora_dropout", 0.0)),
    )


def _vera_config(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> VeraConfig:
    return VeraConfig(
        targets=_targets_from(tensors, VERA_KEYS),
        r=int(config["r"]),
        d_init=float(config.get("d_initial", 0.1)),
        projection_seed=int(config.get("projection_prng_key", 0)),
        dropout=float(config.get("vera_dropout", 0.0)),
    )


def _check_projections(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], model: AdapterModel, name: str
) -> None:
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


def export_peft(
    model: AdapterModel, name: str, folder: str | Path, base_name: str | None = None
) -> Path:
    """Write adapter ``name`` (LoRA or VeRA) as a PEFT folder that ``PeftModel.from_pretrained`` loads."""
    config = model.configs[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = model.adapter_state_dict(name)
    layers = sorted({k.rsplit(".", 1)[0] for k in params})
    target_modules = layers  # full module names: PEFT matches a target as a name suffix
    if config.method == "lora":
        tensors = {
            f"{PREFIX}{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.weight": v
            for k, v in params.items()
        }
        peft_config = {
            "peft_type": "LORA",
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
        }
    elif config.method == "vera":
        inverse = {v: k for k, v in VERA_KEYS.items()}
        tensors = {
            f"{PREFIX}{k.rsplit('.', 1)[0]}.{inverse[k.rsplit('.', 1)[1]]}": v
            for k, v in params.items()
        }
        # PEFT stores the max-size pair once; regenerate it exactly as PEFT would
        d_out = max(model.layers[n].weight_out_in().shape[0] for n in layers)
        d_in = max(model.layers[n].weight_out_in().shape[1] for n in layers)
        a, b = vera_projections(config.projection_seed, config.r, d_out, d_in)
        tensors.update({"base_model.vera_A": a, "base_model.vera_B": b})
        peft_config = {
            "peft_type": "VERA",
            "r": config.r,
            "projection_prng_key": config.projection_seed,
            "save_projection": True,
            "d_initial": config.d_init,
            "vera_dropout": config.dropout,
        }
    else:
        raise PeftConversionError(
            f"method {config.method!r} has no PEFT equivalent svda writes (LoRA and VeRA only)"
        )
    conv1d = any(is_conv1d(model.layers[layer].base_layer) for layer in layers)
    peft_config.update(
        {
            "target_modules": target_modules,
            "base_model_name_or_path": base_name,
            "bias": "none",
            "fan_in_fan_out": conv1d,
            "inference_mode": True,
            "task_type": "CAUSAL_LM",
        }
    )
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors")
    )
    (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return folder
