"""Adapters as vLLM sees them: a PEFT-shaped folder of zeros plus the svda serving form.

vLLM's worker loads only PEFT folders into its LoRA slots. The engine process compiles an svda
adapter (already checked and attached on the native model) to its serving form and writes a
folder with a rank-1 all-zero LoRA on one layer (so the worker gives it a slot and its own
LoRA path adds nothing) and ``svda_forms.safetensors`` (:mod:`.form_file`, no pickle): HF
layer name -> one-slot :class:`~svda.runtime.serving_form.LayerForm`. The plugin (:mod:`.plugin`) reads that file when
vLLM activates the adapter in a slot.

Shared bases (SvdA's ``Vᵀ, U``: as large as the base weights; VeRA's seeded ``A, B``) are not
written per adapter: each is written once, named by its bit-level identity (the form's
``key``), into ``svda_shared/`` beside the adapter folders, and the reader keeps one copy per
process, so every slot holds the same tensor (stacking checks shared tensors by identity).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from svda.runtime.serving_form import LayerForm, compile_adapter
from svda.runtime.serving_form.primitives import SharedBasisLowRank

from .form_file import FormsFile, save_forms, save_packed_rows

FORMS_FILE = "svda_forms.safetensors"
SHARED_DIR = "svda_shared"
DUMMY_RANK = 1
_SHARED_CACHE: dict[str, torch.Tensor] = {}  # file name -> tensor, per process
_SHARED_LOCK = threading.Lock()
_REFS: dict[tuple, str] = {}  # (folder, key, field, shape, dtype) -> a written basis's name


def write_vllm_adapter(model: Any, name: str, folder: Path, hf_config: Any) -> Path:
    """Write adapter ``name`` of ``model`` (an ``AdapterModel``) as a vLLM adapter folder; its
    shared bases go to ``folder.parent / svda_shared`` (once per basis)."""
    folder.mkdir(parents=True, exist_ok=True)
    shared = folder.parent / SHARED_DIR
    key = getattr(model, "packed_forms_key", lambda _: None)(name)
    key = None if key is None else (key, shared)  # shared bases' names depend on the folder
    rows = None if key is None else model.packed_form_rows(name)
    if rows is None or not save_packed_rows(folder / FORMS_FILE, key, rows):
        forms = compile_adapter(model, name)
        save_forms(forms, folder / FORMS_FILE, lambda p, f: _shared_ref(shared, p, f), key)
    _write_zero_lora(folder, hf_config)
    return folder


def read_forms(folder: str | Path) -> dict[str, LayerForm] | None:
    """The forms of a folder written by :func:`write_vllm_adapter`; None for other folders."""
    file = read_forms_file(folder)
    return None if file is None else {layer: file.form(layer) for layer in file.layout}


def read_forms_file(folder: str | Path) -> FormsFile | None:
    """The forms file of such a folder, its layers decoded on demand; None for other folders."""
    path = Path(folder) / FORMS_FILE
    if not path.is_file():
        return None
    shared = Path(folder).parent / SHARED_DIR
    return FormsFile(path, lambda name: _shared_tensor(shared, name))


def _shared_name(key: str, field: str, tensor: torch.Tensor) -> str:
    recipe = f"{key}:{field}:{tuple(tensor.shape)}:{tensor.dtype}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:32]


def _shared_ref(shared: Path, primitive: Any, field: str) -> str | None:
    """The file name of a shared-basis ``A`` or ``B`` with a known identity (None for any other
    field), its file written unless this process wrote or saw it."""
    if not (isinstance(primitive, SharedBasisLowRank) and primitive.key and field in ("A", "B")):
        return None
    tensor = getattr(primitive, field)
    ident = (shared, primitive.key, field, tuple(tensor.shape), tensor.dtype)
    name = _REFS.get(ident)
    if name is None:
        name = _shared_name(primitive.key, field, tensor)
        _write_shared(shared / f"{name}.safetensors", tensor)
        with _SHARED_LOCK:
            _REFS[ident] = name
    return name


def _write_shared(path: Path, tensor: torch.Tensor) -> None:
    """Write a shared basis unless its file exists (atomic rename); :data:`_REFS` remembers
    the bases this process has written or seen, so this runs once per basis."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        save_file({"t": tensor.detach().cpu().contiguous()}, str(tmp))
        tmp.replace(path)


def _shared_tensor(shared: Path, name: str) -> torch.Tensor:
    """The shared basis ``name``, loaded once per process (every slot gets the same tensor)."""
    if not name.isalnum():
        raise ValueError(f"bad shared tensor name {name[:40]!r}")
    with _SHARED_LOCK:
        if name not in _SHARED_CACHE:
            _SHARED_CACHE[name] = load_file(str(shared / f"{name}.safetensors"))["t"]
        return _SHARED_CACHE[name]


def _write_zero_lora(folder: Path, hf_config: Any) -> None:
    """The all-zero rank-1 PEFT files, written once beside the adapter folders and linked."""
    template = folder.parent / SHARED_DIR / f"zero-lora-{_zero_lora_id(hf_config)}"
    if not (template / "adapter_config.json").is_file():
        tmp = template.with_name(f"{template.name}.{uuid.uuid4().hex}.tmp")
        tmp.mkdir(parents=True)
        _zero_lora_files(tmp, hf_config)
        try:
            tmp.replace(template)
        except OSError:  # another thread or process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        try:
            os.link(template / name, folder / name)
        except OSError:  # a file system without hard links
            shutil.copyfile(template / name, folder / name)


def _zero_lora_id(hf_config: Any) -> str:
    return "-".join(map(str, _o_proj_shape(hf_config)))


def _o_proj_shape(hf_config: Any) -> tuple[int, int]:
    """(d_out, d_in) of the attention output projection: (hidden, heads · head_dim)."""
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    return hidden, heads * head_dim


def _zero_lora_files(folder: Path, hf_config: Any) -> None:
    hidden, width = _o_proj_shape(hf_config)
    key = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file(
        {
            f"{key}.lora_A.weight": torch.zeros(DUMMY_RANK, width),
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
