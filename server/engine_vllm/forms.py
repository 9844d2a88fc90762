"""Adapters as vLLM sees them: a PEFT-shaped folder of zeros plus the svda serving form.

vLLM's worker loads only PEFT folders into its LoRA slots. The engine process compiles an svda
adapter (already checked and attached on the native model) to its serving form and writes a
folder with a rank-1 all-zero LoRA on one layer (so the worker gives it a slot and its own
LoRA path adds nothing) and ``svda_forms.pt``: HF layer name -> one-slot
:class:`~svda.runtime.serving_form.LayerForm`. The plugin (:mod:`.plugin`) reads that file when
vLLM activates the adapter in a slot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from svda.runtime.serving_form import LayerForm, compile_adapter

FORMS_FILE = "svda_forms.pt"
DUMMY_RANK = 1


def write_vllm_adapter(model: Any, name: str, folder: Path, hf_config: Any) -> Path:
    """Write adapter ``name`` of ``model`` (an ``AdapterModel``) as a vLLM adapter folder."""
    forms = compile_adapter(model, name)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: _cpu_form(v) for k, v in forms.items()}, folder / FORMS_FILE)
    _write_zero_lora(folder, hf_config)
    return folder


def read_forms(folder: str | Path) -> dict[str, LayerForm] | None:
    """The forms of a folder written by :func:`write_vllm_adapter`; None for other folders."""
    path = Path(folder) / FORMS_FILE
    if not path.is_file():
        return None
    # the file is written by this svda process into its own private folder (dataclasses)
    return torch.load(path, map_location="cpu", weights_only=False)


def _write_zero_lora(folder: Path, hf_config: Any) -> None:
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    key = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file(
        {
            f"{key}.lora_A.weight": torch.zeros(DUMMY_RANK, heads * head_dim),
            f"{key}.lora_B.weight": torch.zeros(hidden, DUMMY_RANK),
        },
        str(folder / "adapter_model.safetensors"),
    )
    config = {
        "peft_type": "LORA",
        "r": DUMMY_RANK,
        "lora_alpha": DUMMY_RANK,
        "target_modules": ["o_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _cpu_form(form: LayerForm) -> LayerForm:
    import dataclasses

    def move(p: Any) -> Any:
        values = {}
        for f in dataclasses.fields(p):
            v = getattr(p, f.name)
            values[f.name] = v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v
        return type(p)(**values)

    return form.map_primitives(move)
