"""Validation loss and greedy generation (used by the loop and by the E2E benchmark)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE, Example, collate
from .distributed import DistInfo, all_reduce_sum


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled tokens. logits (B, T, V), labels (B, T)."""
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
        reduction="sum",
    )  # fmt: skip


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    info: DistInfo,
) -> float:
    """Mean token loss over ``examples`` (sharded over ranks, summed with all-reduce)."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    mine = examples[info.rank :: info.world_size]
    for start in range(0, len(mine), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(mine[start : start + batch_size], pad_id).items()
        }
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += float(token_loss_sum(logits, batch["labels"]))
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    total, count = all_reduce_sum(total, info, device), all_reduce_sum(count, info, device)
    return total / max(count, 1.0)


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches; stops at EOS)."""
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            tokenizer(p, add_special_tokens=False).input_ids
            for p in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(encoded):  # left padding: generation continues on the right
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        new = out[:, width:]
        outputs += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    model.train(was_training)
    return outputs
