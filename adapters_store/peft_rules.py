"""What ``svda-pack import-peft`` accepts in a PEFT adapter folder, checked before any base model
is loaded: a whitelist of ``adapter_config.json`` fields per PEFT type, and of tensor keys.

Each known field is either *understood* (converted exactly), *inert* (metadata, module selection
or initialisation only: the saved tensors already say which layers are adapted and with what), or
must keep PEFT's default. A field svda does not know is accepted only when unset (null, false or
empty); anything else is refused with the field named, since svda cannot represent it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from .errors import AdapterFormatError

PREFIX = "base_model.model."
VERA_PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")
LAYER_KEYS = {
    "LORA": ("lora_A.weight", "lora_B.weight"),
    "VERA": ("vera_lambda_d", "vera_lambda_b"),
    "BOFT": ("boft_R", "boft_s"),
    "DORA": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),  # LORA + use_dora
    "IA3": ("ia3_l",),
}

Rule = Callable[[Any], bool]


class PeftConversionError(AdapterFormatError):
    check = "peft"


def anything(value: Any) -> bool:
    return True


def unset(value: Any) -> bool:
    return value is None or value is False or value in ([], {}, "")


def one_of(*accepted: Any) -> Rule:
    return lambda value: any(value == a and type(value) is type(a) for a in accepted)


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mapping(value: Any) -> bool:
    return value is None or isinstance(value, dict)


COMMON: dict[str, Rule] = {
    # metadata and module selection: the saved tensors name the adapted layers
    **dict.fromkeys(
        (
            "peft_type",
            "task_type",
            "auto_mapping",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "fan_in_fan_out",  # PEFT derives it from the layer type (Conv1D), as svda does
        ),
        anything,
    ),
    # trained base biases are saved as extra tensors, which are refused one by one
    "bias": one_of("none", "all", "lora_only"),
    "modules_to_save": unset,
}
RULES: dict[str, dict[str, Rule]] = {
    "LORA": {
        **COMMON,
        "r": number,
        "lora_alpha": number,
        "lora_dropout": number,
        "use_rslora": one_of(True, False),
        "rank_pattern": mapping,
        "alpha_pattern": mapping,
        # gaussian/default inits leave the base untouched (PiSSA, OLoRA, LoftQ, EVA... do not)
        "init_lora_weights": one_of(True, False, "gaussian"),
        "use_dora": one_of(True, False),  # True: a DoRA adapter (magnitude vectors)
        # only meaningful together with refused fields
        **dict.fromkeys(
            ("qalora_group_size", "megatron_core", "runtime_config", "ensure_weight_tying"),
            anything,
        ),
    },
    "VERA": {
        **COMMON,
        "r": number,
        "projection_prng_key": number,
        "save_projection": one_of(True, False),
        "vera_dropout": number,
        "d_initial": number,  # initialisation only
        "init_weights": one_of(True, False),
    },
    "BOFT": {
        **COMMON,
        "boft_block_size": number,
        "boft_block_num": number,
        "boft_n_butterfly_factor": number,
        "boft_dropout": number,
        "init_weights": one_of(True, False),
    },
    "IA3": {
        **COMMON,
        "feedforward_modules": anything,  # the tensors' shapes say which side each layer scales
        "init_ia3_weights": one_of(True, False),
    },
}
HINTS = {
    "lora_bias": "the LoRA B bias tensors",
    "trainable_token_indices": "trainable token embeddings",
    "modules_to_save": "fully trained copies of whole modules",
    "alora_invocation_tokens": "activated LoRA (it applies only after the invocation tokens)",
    "init_lora_weights": "an initialisation that rewrites the base weights (PiSSA, OLoRA, LoftQ...)",
    "layer_replication": "replicated base layers",
}


def pattern_key(patterns: dict[str, Any], layer: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``layer`` at a
    module boundary (``layer`` itself if none does)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", layer):
            return key
    return layer


def peft_type_of(config: dict[str, Any]) -> str:
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type not in RULES:
        raise PeftConversionError(
            f"PEFT adapter type {peft_type or 'unknown'!r} cannot be imported; svda imports "
            f"{', '.join(sorted(RULES))} (convert the adapter to one of them first)"
        )
    return peft_type


def check_config(config: dict[str, Any]) -> str:
    """The PEFT type, after refusing any field svda cannot represent ("DORA" for a LoRA saved
    with ``use_dora=True``)."""
    peft_type = peft_type_of(config)
    rules = RULES[peft_type]
    for field, value in config.items():
        rule = rules.get(field, unset)
        if not rule(value):
            raise PeftConversionError(_field_message(peft_type, field, value))
    return "DORA" if peft_type == "LORA" and config.get("use_dora") is True else peft_type


def _field_message(peft_type: str, field: str, value: Any) -> str:
    what = f" ({HINTS[field]})" if field in HINTS else ""
    return (
        f"adapter_config.json sets {field}={value!r}{what}, which svda cannot represent in a "
        f"{peft_type} adapter; retrain or re-save without it (leave {field} at PEFT's default), "
        "or serve this adapter with PEFT itself"
    )


def layer_tensors(
    peft_type: str, tensors: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {suffix: tensor}}``, after refusing unknown keys and incomplete layers."""
    suffixes = LAYER_KEYS[peft_type]
    layers: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        if peft_type == "VERA" and key in VERA_PROJECTIONS:
            continue
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None or not key.startswith(PREFIX):
            unknown.append(key)
            continue
        layers.setdefault(key[len(PREFIX) : -len(suffix) - 1], {})[suffix] = value
    if unknown:
        raise PeftConversionError(
            f"the PEFT {peft_type} adapter holds tensors svda cannot represent: "
            f"{sorted(unknown)[:3]}{' …' if len(unknown) > 3 else ''} (e.g. trained biases, "
            "embedding or token adapters, saved modules); svda imports only "
            f"{', '.join(suffixes)} per layer: retrain without them or serve it with PEFT"
        )
    if not layers:
        raise PeftConversionError(f"the PEFT {peft_type} adapter holds no {suffixes} tensors")
    for layer, found in layers.items():
        missing = [s for s in suffixes if s not in found]
        if missing:
            raise PeftConversionError(
                f"the PEFT adapter's layer {layer} lacks {missing}; the folder is incomplete"
            )
    return layers
