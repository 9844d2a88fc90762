"""Training settings: one dataclass with help text, loadable from YAML/JSON, overridden by flags.

    >>> cfg = TrainConfig(method="svda", data="train.jsonl", out="acme")
    >>> cfg = TrainConfig.from_file("run.yaml", overrides={"lr": 1e-3})

Method hyperparameters (rank, targets, ``s_init``...) are not fields here: they live in each
method's config dataclass (``svda.runtime.get_method(name).config_cls``) and are carried in
``TrainConfig.adapter`` as a plain mapping, validated by that class in :meth:`adapter_config`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from svda.runtime import AdapterConfig, get_method
from svda.runtime.errors import AdapterConfigError
from svda.runtime.names import MAX_NAME_CHARS, check_adapter_name

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class TrainConfigError(ValueError):
    """A training setting is missing or invalid; the message says which and what to use."""


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (shown by ``svda-train --help``)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """Everything ``train()`` needs; every field is also a ``svda-train`` flag."""

    # ----- what to train
    method: str = opt("svda", "Adapter method (any registered method: svda, vera, lora, ...).")
    adapter: dict = field(
        default_factory=dict,
        metadata={"help": "Method hyperparameters, e.g. {'targets': 'all-linear', 'r': 8}."},
    )
    base: str | None = opt(None, "Base model folder (default: the embedded SmolLM2-135M).")
    name: str | None = opt(
        None,
        "Adapter name written into the .svda header (default: the --out id, else the "
        "--out-file stem, else the method).",
    )
    # ----- data
    data: str | None = opt(
        None, "Training data: .jsonl (prompt/completion, messages, text) or .csv."
    )
    val_data: str | None = opt(None, "Validation data file (same formats).")
    val_fraction: float = opt(0.0, "Hold out this fraction of --data for validation (0: none).")
    prompt_column: str = opt("prompt", "CSV column holding the prompt.")
    completion_column: str = opt("completion", "CSV column holding the completion.")
    text_column: str | None = opt(None, "CSV column of plain text (loss on every token).")
    max_length: int = opt(512, "Longest sequence in tokens; longer ones are truncated (warned).")
    # ----- optimisation
    batch_size: int = opt(8, "Sequences per micro-batch per process.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int | None = opt(None, "Optimizer steps (default: --epochs over the data).")
    epochs: float = opt(1.0, "Passes over the training data when --max-steps is not given.")
    lr: float = opt(1e-3, "Peak learning rate of AdamW.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    betas: list = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas."})
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    schedule: str = opt("linear", f"Decay after warm-up: one of {SCHEDULES}.")
    clip_grad: float | None = opt(1.0, "Clip the gradient norm to this value (None: no clipping).")
    seed: int = opt(0, "Seed of data order, dropout and initialisation.")
    precision: str = opt("auto", f"{PRECISIONS}; auto: bf16 autocast on GPU, fp32 on CPU.")
    base_dtype: str = opt("float32", "Base weights dtype (bfloat16 saves memory on a GPU).")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto.")
    # ----- evaluation, checkpoints, outputs
    eval_every: int = opt(0, "Validation loss every N steps (0: only at the end).")
    eval_generate: int = opt(0, "Greedy-decode this many validation prompts at each evaluation.")
    max_new_tokens: int = opt(64, "Token limit of those generations.")
    checkpoint_every: int = opt(0, "Save a resumable checkpoint every N steps (0: never).")
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep.")
    resume: bool = opt(False, "Continue from the last checkpoint in --output-dir.")
    output_dir: str = opt("svda-train-run", "Run folder: logs, loss plot, checkpoints, summary.")
    out: str | None = opt(None, "Publish the adapter into the store under this id.")
    out_file: str | None = opt(None, "Write the adapter to this .svda file.")
    store: str | None = opt(None, "Store root (default $SVDA_STORE or $SVDA_HOME/store).")
    tenant: str | None = opt(None, "Publish as this tenant.")
    tags: list = field(default_factory=list, metadata={"help": "Tags stored with the adapter."})
    payload_dtype: str = opt("float32", "Adapter payload dtype: float32, bfloat16, float16.")
    progress: bool = opt(
        True, "Show a tqdm progress bar (status lines and the final summary print either way)."
    )

    def __post_init__(self) -> None:
        self.validate()

    # ----- checks
    def validate(self) -> None:
        positive = ("max_length", "batch_size", "grad_accum", "keep_checkpoints", "max_new_tokens")
        for key in positive:
            _require(getattr(self, key) >= 1, f"{key} must be ≥ 1, got {getattr(self, key)!r}")
        nonneg = ("warmup_steps", "eval_every", "eval_generate", "checkpoint_every")
        for key in nonneg:
            _require(getattr(self, key) >= 0, f"{key} must be ≥ 0, got {getattr(self, key)!r}")
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps must be ≥ 1")
        _require(self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        _require(0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)")
        _require(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}")
        _require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}")
        _require(len(self.betas) == 2, f"betas must be two numbers, got {self.betas!r}")
        _require(self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 or None")

    def adapter_name(self) -> str:
        """``name``, or a default that says what the adapter is: the store id it is published
        under, else the output file's stem (made a valid name), else the method."""
        if self.name is not None:
            return check_adapter_name(self.name, "--name")
        if self.out:
            return check_adapter_name(self.out, "--out id")
        stem = _as_name(Path(self.out_file).stem) if self.out_file else ""
        return stem or self.method

    def check_runnable(self) -> None:
        """Settings ``train()`` needs beyond the field checks (data, method hyperparameters)."""
        _require(self.data is not None, "no training data: pass --data FILE (.jsonl or .csv)")
        self.adapter_config()
        self.adapter_name()

    def adapter_config(self) -> AdapterConfig:
        """The method's config built from ``adapter`` (its own validation and error messages)."""
        try:
            return get_method(self.method).config_cls.from_dict(dict(self.adapter))
        except (AdapterConfigError, TypeError) as exc:
            raise TrainConfigError(f"adapter settings for method {self.method!r}: {exc}") from exc

    # ----- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _require(not unknown, f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Settings from a YAML or JSON file, then ``overrides`` (``adapter`` is merged)."""
        data = read_config_file(path)
        overrides = dict(overrides or {})
        adapter = {**data.get("adapter", {}), **overrides.pop("adapter", {})}
        return cls.from_dict({**data, **overrides, "adapter": adapter})

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TrainConfigError(f"config file {path} is not valid YAML/JSON: {exc}") from exc
    if data is None:
        return {}
    _require(isinstance(data, dict), f"config file {path} must hold a mapping of settings")
    _require(isinstance(data.get("adapter", {}), dict), f"{path}: 'adapter' must be a mapping")
    return data


def _as_name(text: str) -> str:
    """``text`` made a valid adapter name (runs of other characters become '-'), or ''."""
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", text))
    return name.strip("-._")[:MAX_NAME_CHARS].rstrip("-._")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TrainConfigError(message)
