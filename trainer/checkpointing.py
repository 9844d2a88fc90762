"""Resumable checkpoints: adapter tensors, optimizer, scheduler, RNG states and data position.

Layout under ``<output_dir>/checkpoints/step-000120/``:

* ``svda_checkpoint.json`` + ``adapter.safetensors``: the adapter (``svda-pack export`` reads it);
* ``trainer_state.pt``: optimizer, scheduler and grad-scaler states, RNG states, the step count
  (the data position is a pure function of it), tokens seen and the log so far.

A checkpoint is written into a temporary folder and renamed into place, so a crash mid-write
leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from svda.adapters_store import save_checkpoint
from svda.adapters_store.checkpoint import read_checkpoint
from svda.runtime import AdapterModel

STATE = "trainer_state.pt"
PREFIX = "step-"


class ResumeError(RuntimeError):
    """``--resume`` found no usable checkpoint, or one from a different run."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    root: Path, step: int, model: AdapterModel, name: str, state: dict[str, Any], keep: int
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the ``keep`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, name, tmp)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load_latest(root: Path, model: AdapterModel, name: str, fingerprint: str) -> dict[str, Any]:
    """Load the newest checkpoint's adapter tensors into ``name``; returns the trainer state."""
    found = list_checkpoints(root)
    if not found:
        raise ResumeError(
            f"--resume: no checkpoint under {root}; run without --resume, or with "
            "--checkpoint-every N so that a later run can resume"
        )
    folder = found[-1]
    manifest, tensors = read_checkpoint(folder)
    if manifest.get("base_fingerprint") != fingerprint:
        raise ResumeError(f"--resume: {folder} was trained on another base model")
    if manifest["config"].to_dict() != model.configs[name].to_dict():
        raise ResumeError(
            f"--resume: {folder} holds a {manifest['config'].to_dict()} adapter, this run "
            f"trains {model.configs[name].to_dict()}; use the same settings or a new --output-dir"
        )
    model.load_adapter_state_dict(name, tensors)
    return torch.load(folder / STATE, weights_only=False)
