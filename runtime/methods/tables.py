"""Adapter tables: several adapters' tensors stacked row by row for one batched forward.

A table is ``(n + 1, *shape)``: one row per adapter of a batch and a last row of zeros, which a
row index of -1 (the base model alone) selects. ``AdapterWeights.member_tables`` builds them from
attached modules; a slot bank (``runtime.bank``) preallocates them for serving. These helpers
stack members (padding ranks that differ), build per-member constant tables and gather each batch
row's entry, shaped to broadcast over the activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import AdapterWeights


def stack_with_zero_row(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-member vectors (n, k) and append a zero row, so that index -1 selects zeros."""
    stacked = torch.stack(list(vectors))
    return torch.cat([stacked, stacked.new_zeros(1, *stacked.shape[1:])])


def stack_padded_ranks(
    members: Sequence[AdapterWeights], rank_dims: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Tables of low-rank factors whose members may differ in rank (``member.r``): each kind in
    ``rank_dims`` (kind -> the dimension of the member's tensor that holds the rank) zero-padded
    to the largest rank, stacked, with the zero row appended."""
    r_max = max(m.r for m in members)
    tables = {}
    for kind, dim in rank_dims.items():
        padded = []
        for member in members:
            tensor = getattr(member, kind)
            widths = [0, 0] * tensor.dim()  # F.pad lists the last dimension first
            widths[2 * (tensor.dim() - 1 - dim) + 1] = r_max - member.r
            padded.append(torch.nn.functional.pad(tensor, widths))
        tables[kind] = stack_with_zero_row(padded)
    return tables


def constant_table(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A per-member constant (LoRA's α/r, ...) as a table ``(n + 1,)``; the zero row gets 0."""
    return torch.tensor([*values, 0.0], dtype=like.dtype, device=like.device)


def gather_rows(table: torch.Tensor, row_index: torch.Tensor, ndim: int) -> torch.Tensor:
    """``table[row_index]`` (index -1 gives the zero row), shaped to broadcast over an activation
    of ``ndim`` dimensions: (B, 1, ..., 1, k)."""
    picked = table[row_index]
    return picked.view(picked.shape[0], *([1] * (ndim - 2)), picked.shape[-1])


def table_rows(table: torch.Tensor, row_index: torch.Tensor | None, ndim: int) -> torch.Tensor:
    """Each batch row's entry of a vector table ``(n, k)``, broadcastable over an activation of
    ``ndim`` dimensions: ``(B, 1, ..., 1, k)``; with ``row_index`` None, ``table[0]`` as it is."""
    if row_index is None:
        return table[0]
    return gather_rows(table, row_index, ndim)
