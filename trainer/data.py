"""Training data: read JSONL/CSV records, tokenize them with loss masks, batch them.

Record kinds (one per line of a ``.jsonl`` file, or one per row of a ``.csv`` file):

* ``{"prompt": ..., "completion": ...}``: loss on the completion tokens only (then EOS);
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: the base's chat template is applied and
  the loss covers the assistant turns only;
* ``{"text": ...}``: loss on every token.

Errors name the file and line; truncated sequences are counted and warned about once.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100  # label of a token that carries no loss
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Training data could not be read; the message names the file, the line and the fix."""


@dataclass
class Record:
    kind: str  # "prompt" | "messages" | "text"
    value: Any  # (prompt, completion) | list of messages | text
    where: str  # "file:line"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token carries no loss
    prompt: str | None  # the generation prompt, for greedy decoding at evaluation
    reference: str | None


# ----- reading -----------------------------------------------------------------------------
def read_records(path: str | Path, columns: dict[str, str | None] | None = None) -> list[Record]:
    """Every record of a ``.jsonl`` or ``.csv`` file (``columns``: prompt/completion/text)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    reader = _read_csv if path.suffix.lower() == ".csv" else _read_jsonl
    records = reader(path, columns or {})
    if not records:
        raise DataError(f"data file {path} holds no records")
    return records


def _read_jsonl(path: Path, columns: dict[str, str | None]) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            records.append(parse_record(obj, where))
    return records


def _read_csv(path: Path, columns: dict[str, str | None]) -> list[Record]:
    text_col = columns.get("text")
    prompt_col = columns.get("prompt") or "prompt"
    completion_col = columns.get("completion") or "completion"
    wanted = [text_col] if text_col else [prompt_col, completion_col]
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in wanted if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: no column(s) {missing}; columns are {reader.fieldnames}. "
                "Choose them with --prompt-column/--completion-column or --text-column"
            )
        records = []
        for lineno, row in enumerate(reader, 2):
            where = f"{path}:{lineno}"
            obj = {"text": row[text_col]} if text_col else {
                "prompt": row[prompt_col], "completion": row[completion_col]
            }  # fmt: skip
            records.append(parse_record(obj, where))
    return records


def parse_record(obj: Any, where: str) -> Record:
    """One record from a decoded JSON object; raises :class:`DataError` naming ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Record("messages", _check_messages(obj["messages"], where), where)
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DataError(f"{where}: 'prompt' and a non-empty 'completion' must be strings")
        return Record("prompt", (prompt, completion), where)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Record("text", obj["text"], where)
    raise DataError(
        f"{where}: a record needs 'prompt'+'completion', 'messages' or 'text'; got {sorted(obj)}"
    )


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} needs a 'role' in {ROLES}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} needs a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: 'messages' has no assistant turn to train on")
    return messages


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the records (seeded shuffle); returns (train, validation)."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(records)))
    if n_val >= len(records):
        raise DataError(f"val_fraction {fraction} leaves no training data ({len(records)} records)")
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


# ----- tokenizing ----------------------------------------------------------------------------
def tokenize_records(records: list[Record], tokenizer: Any, max_length: int) -> list[Example]:
    """Token ids and masked labels per record; truncates to ``max_length`` with one warning."""
    examples, truncated, empty = [], 0, 0
    for record in records:
        segments, prompt, reference = _segments(record, tokenizer)
        ids, labels = _encode(segments, tokenizer)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            empty += 1
            continue
        examples.append(Example(ids, labels, prompt, reference))
    if truncated:
        warnings.warn(
            f"{truncated} of {len(records)} sequences were longer than max_length={max_length} "
            "tokens and were truncated; raise --max-length to keep them whole",
            stacklevel=2,
        )
    if empty:
        warnings.warn(
            f"{empty} sequences had no trained token after truncation; skipped", stacklevel=2
        )
    if not examples:
        raise DataError("no trainable sequence left after tokenization (check --max-length)")
    return examples


def _segments(record: Record, tokenizer: Any) -> tuple[list[tuple[str, bool]], str | None, Any]:
    """``[(text, trained), ...]``, the generation prompt and the reference completion."""
    eos = tokenizer.eos_token or ""
    if record.kind == "text":
        return [(record.value + eos, True)], None, None
    if record.kind == "prompt":
        prompt, completion = record.value
        return [(prompt, False), (completion + eos, True)], prompt, completion
    return _chat_segments(record, tokenizer)


def _chat_segments(record: Record, tokenizer: Any) -> tuple[list[tuple[str, bool]], str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{record.where}: 'messages' records need a base with a chat template")
    messages, segments, done = record.value, [], ""
    prompt = reference = None
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not head.startswith(done) or not full.startswith(head):
            raise DataError(f"{record.where}: the chat template does not render turns as prefixes")
        segments += [(head[len(done) :], False), (full[len(head) :], True)]
        done, prompt, reference = full, head, m["content"]
    return segments, prompt, reference


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode(segments: list[tuple[str, bool]], tokenizer: Any) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        part = tokenizer(text, add_special_tokens=False).input_ids if text else []
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids, labels


# ----- batching ------------------------------------------------------------------------------
def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels``, each (batch, longest)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def label_tokens(examples: list[Example]) -> int:
    """Tokens that carry loss (after the causal shift: the first token never does)."""
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in examples)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of example indices for one epoch (same on every rank)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def step_examples(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based) when each takes ``per_step``.

    Epochs are walked in order; a step that crosses an epoch boundary continues into the next
    epoch's permutation, so the data position is a pure function of ``step`` (resume needs
    nothing else)."""
    start = step * per_step
    indices = []
    while len(indices) < per_step:
        epoch, offset = divmod(start + len(indices), n)
        order = epoch_order(n, seed, epoch)
        indices += order[offset : offset + per_step - len(indices)]
    return indices
