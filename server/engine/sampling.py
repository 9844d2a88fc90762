"""Choosing each row's next token: repetition penalty, temperature, top-k, top-p, seeded draws.

The processors follow ``transformers``' logits warpers (RepetitionPenaltyLogitsProcessor,
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper) in that order, so a greedy row
(temperature 0) picks the same token as ``generate(do_sample=False)``. Every request draws from
its own ``torch.Generator``, seeded from ``SamplingParams.seed`` (or at random), so a seeded
request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from ..domain import SamplingParams


class RowSampler:
    """Sampling state of one request: its parameters, generator and token history."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], device: str = "cpu"):
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.history = list(prompt_ids)  # prompt + generated ids (for the repetition penalty)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    @property
    def plain_greedy(self) -> bool:  # argmax of the raw logits
        return self.greedy and self.params.repetition_penalty == 1.0

    def choose(self, logits: torch.Tensor) -> int:
        """The next token for logits ``(V,)`` (float32)."""
        logits = self._penalise(logits)
        if self.greedy:
            return int(torch.argmax(logits))
        logits = logits / self.params.temperature
        logits = top_k_filter(logits, self.params.top_k)
        logits = top_p_filter(logits, self.params.top_p)
        probs = torch.softmax(logits, dim=-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            # overflowed logits (inf/nan): the most likely finite token instead of a crash
            return int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        return _finite(self._penalised(logits))

    def _penalised(self, logits: torch.Tensor) -> torch.Tensor:
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or not self.history:
            return logits
        ids = torch.tensor(sorted(set(self.history)), dtype=torch.long, device=logits.device)
        ids = ids[ids < logits.shape[-1]]
        scores = logits[ids]
        scores = torch.where(scores < 0, scores * penalty, scores / penalty)
        return logits.scatter(0, ids, scores)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """NaN logits become -inf and ±inf the largest/smallest float: softmax stays defined."""
    info = torch.finfo(logits.dtype)
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=info.max, neginf=float("-inf"))


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (all if ``k`` is 0 or >= V); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[-1] = False  # the most likely token always stays
    remove = remove_sorted.scatter(0, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def choose_tokens(logits: torch.Tensor, samplers: Sequence[RowSampler]) -> list[int]:
    """Next token of every row of ``logits`` ``(B, V)``; rows share one argmax when greedy."""
    logits = logits.float()
    tokens: list[int] = torch.argmax(logits, dim=-1).tolist()
    for row, sampler in enumerate(samplers):
        if not sampler.plain_greedy:
            tokens[row] = sampler.choose(logits[row])
    for token, sampler in zip(tokens, samplers, strict=True):
        if sampler.params.repetition_penalty != 1.0:
            sampler.history.append(token)
    return tokens
