"""Turning settings into what the loop runs on: tokenized data splits and the precision."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, TrainConfigError
from .data import Example, read_records, split_validation, tokenize_records


@dataclass
class TrainData:
    train: list[Example]
    val: list[Example]
    pad_id: int
    sha256: str  # of the training data file(s), stored as provenance in the adapter


def load_data(config: TrainConfig, tokenizer: Any) -> TrainData:
    """Read, split and tokenize the training (and validation) data."""
    if tokenizer is None:
        raise TrainConfigError(f"base model {config.base or '(embedded)'} has no tokenizer")
    columns = {
        "prompt": config.prompt_column,
        "completion": config.completion_column,
        "text": config.text_column,
    }
    records = read_records(config.data, columns)
    if config.val_data:
        val_records = read_records(config.val_data, columns)
    else:
        records, val_records = split_validation(records, config.val_fraction, config.seed)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return TrainData(
        train=tokenize_records(records, tokenizer, config.max_length),
        val=tokenize_records(val_records, tokenizer, config.max_length) if val_records else [],
        pad_id=pad_id,
        sha256=_files_sha256([config.data, config.val_data]),
    )


def _files_sha256(paths: list[str | None]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path:
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for float32, whether a gradient scaler is needed)."""
    if precision == "auto":
        if device.type == "cuda":
            return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), (
                not torch.cuda.is_bf16_supported()
            )
        return None, False
    if precision == "fp32":
        return None, False
    if device.type != "cuda":
        raise TrainConfigError(
            f"precision {precision} needs a GPU; on the CPU the trainer runs in float32 "
            "(use --precision fp32 or auto)"
        )
    return (torch.bfloat16, False) if precision == "bf16" else (torch.float16, True)
