"""The continuous-batching loop: one thread that prefills newcomers and decodes the batch.

Every iteration is one *step boundary*:

1. drop waiting and running requests that were cancelled or passed their deadline (their rows
   leave the KV cache now), and fail waiting requests whose adapter failed to load;
2. apply the merge policy (:mod:`.merge`): unmerge before other work joins, or merge one adapter;
3. admit waiting requests whose adapter is resident, up to ``max_batch_size`` rows: prefill them
   (prompts of similar length left-padded into one forward, :func:`prefill_groups`), sample their
   first token and join their KV rows to the batch (:class:`.kv_cache.BatchKVCache`);
4. run one decode forward for every row, each with its own adapter (``adapter_rows``; None is the
   base model), sample one token per row, stream text, and drop finished rows.

A forward that fails fails the rows of that batch only; the loop keeps serving new requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch
from transformers.cache_utils import DynamicCache

from svda.runtime import AdapterModel, get_method

from ..domain import FinishReason, Overloaded
from ..metrics import Metrics
from .adapters import AdapterManager
from .kv_cache import BatchKVCache
from .merge import merge_target
from .sampling import choose_tokens
from .sequence import Sequence
from .settings import EngineSettings

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        model: AdapterModel,
        adapters: AdapterManager,
        settings: EngineSettings,
        model_lock: threading.RLock,
        eos_ids: frozenset[int],
        metrics: Metrics | None = None,
    ):
        self.model, self.adapters, self.settings = model, adapters, settings
        self.model_lock, self.eos_ids, self.metrics = model_lock, eos_ids, metrics
        self.device = next(model.model.parameters()).device
        self.cond = threading.Condition()
        self.waiting: deque[Sequence] = deque()  # guarded by cond
        self.running: list[Sequence] = []  # scheduler thread only
        self.last_tokens: list[int] = []  # per running row
        self.cache = BatchKVCache(model.model.config.num_hidden_layers)
        self._rows_set: tuple = ((), -1)  # (adapter per row, model.state.version) last set
        self.stopping = False
        self.thread: threading.Thread | None = None

    # ----- the loop --------------------------------------------------------------------------
    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def enqueue(self, seq: Sequence) -> None:
        with self.cond:
            if self.stopping:
                raise Overloaded("the engine is shutting down; retry on another server")
            if len(self.waiting) >= self.settings.max_waiting:
                raise Overloaded(
                    f"{len(self.waiting)} requests are waiting (max_waiting); retry later"
                )
            self.waiting.append(seq)
            self._gauges()
            self.cond.notify_all()
        if seq.future is not None:
            seq.future.add_done_callback(lambda _: self.wake())

    def run(self) -> None:
        while True:
            with self.cond:
                if self.stopping:
                    break
                if not self.running and not any(s.ready for s in self.waiting):
                    self.cond.wait(0.05)  # woken by enqueue, cancel, a finished load
                if self.stopping:
                    break
            try:
                self.step()
            except Exception as exc:  # keep serving: fail this batch only
                log.exception("engine step failed; failing the %d running rows", len(self.running))
                self._fail_running(exc)
        self._drain()

    def step(self) -> None:
        now = time.monotonic()
        self._reap_waiting(now)
        self._reap_running(now)
        self._plan_merge()
        self._admit()
        if self.running:
            self._decode()
        self._gauges()

    # ----- dropping requests -------------------------------------------------------------------
    def _reap_waiting(self, now: float) -> None:
        with self.cond:
            dropped = [s for s in self.waiting if s.should_drop(now) or self._load_failed(s)]
            for seq in dropped:
                self.waiting.remove(seq)
        for seq in dropped:
            if self._load_failed(seq) and not seq.should_drop(now):
                seq.fail(seq.future.exception())
            else:
                seq.complete(FinishReason.CANCELLED)
            self._release(seq)

    @staticmethod
    def _load_failed(seq: Sequence) -> bool:
        return seq.future is not None and seq.future.done() and seq.future.exception() is not None

    def _reap_running(self, now: float) -> None:
        if any(s.should_drop(now) for s in self.running):
            keep = []
            for row, seq in enumerate(self.running):
                if seq.should_drop(now):
                    self._finish(seq, FinishReason.CANCELLED)
                else:
                    keep.append(row)
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        self.last_tokens = [self.last_tokens[i] for i in keep]
        self.cache.select(keep)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        completion = seq.complete(reason)
        self._release(seq)
        if self.metrics is not None and reason != FinishReason.CANCELLED:
            self.metrics.time_to_first_token.observe(completion.time_to_first_token_s)

    def _release(self, seq: Sequence) -> None:
        if seq.key is not None:
            self.adapters.release(seq.key)

    def _fail_running(self, error: BaseException) -> None:
        for seq in self.running:
            if not seq.done:
                seq.fail(error)
                self._release(seq)
        self.running, self.last_tokens = [], []
        self.cache.clear()

    def _drain(self) -> None:
        """On stop: every running and waiting request ends CANCELLED."""
        for seq in self.running:
            self._finish(seq, FinishReason.CANCELLED)
        self.running, self.last_tokens = [], []
        self.cache.clear()
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for seq in waiting:
            seq.complete(FinishReason.CANCELLED)
            self._release(seq)
        self._gauges()

    # ----- merge policy --------------------------------------------------------------------------
    def _mergeable(self, name: str) -> bool:
        config = self.model.configs.get(name)
        return config is not None and get_method(config.method).weights_cls.mergeable

    def _plan_merge(self) -> None:
        with self.cond:
            work = [*self.running, *self.waiting]
        current = self.model.state.merged
        target, reason = merge_target(
            self.settings.merge_policy, self.settings.merge_min_tokens, current, work,
            can_merge=self._mergeable,
        )  # fmt: skip
        if target == current:
            return
        with self.model_lock:
            if current is not None:
                self.model.unmerge()
                self.model.set_adapter(None)
            if target is not None:
                self.model.merge(target)
        if target is not None and self.metrics is not None:
            self.metrics.merges.labels(reason=reason).inc()
        log.debug("merge state %s -> %s (%s)", current, target, reason)

    # ----- admission and prefill -----------------------------------------------------------------
    def _admit(self) -> None:
        merged = self.model.state.merged
        with self.cond:
            free = self.settings.max_batch_size - len(self.running)
            chosen = []
            for seq in self.waiting:
                if len(chosen) >= free:
                    break
                loaded = seq.future is None or (seq.ready and seq.future.exception() is None)
                if loaded and (merged is None or self._name(seq) == merged):
                    chosen.append(seq)
            for seq in chosen:
                self.waiting.remove(seq)
        admitted = []
        for seq in chosen:
            seq.adapter_name = self._name(seq)
            if seq.adapter_name is not None and seq.adapter_name not in self.model.configs:
                seq.fail(Overloaded("the adapter was evicted before the request could run; retry"))
                self._release(seq)
            else:
                admitted.append(seq)
        for group in prefill_groups(admitted):
            self._prefill(group)

    @staticmethod
    def _name(seq: Sequence) -> str | None:
        return None if seq.future is None else seq.future.result()

    @torch.no_grad()
    def _prefill(self, group: list[Sequence]) -> None:
        """One forward for the group's prompts, left-padded to the longest: the prefill cache
        is then right-aligned like the running batch's, and the padding stays masked."""
        lengths = torch.tensor([len(s.prompt_ids) for s in group], device=self.device)  # (n,)
        width = int(lengths.max())
        input_ids = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for row, seq in enumerate(group):
            input_ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
        columns = torch.arange(width, device=self.device)
        attention_mask = (columns[None, :] >= (width - lengths)[:, None]).long()  # (n, L)
        position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)  # 0.. per row, pads at 0
        prefill_cache = DynamicCache()
        try:
            with self.model_lock:
                merged = self.model.state.merged is not None
                logits = self._forward(
                    input_ids, group, past_key_values=prefill_cache, use_cache=True,
                    logits_to_keep=1, attention_mask=attention_mask, position_ids=position_ids,
                )  # fmt: skip
        except Exception as exc:
            log.exception("prefill failed for %d requests", len(group))
            for seq in group:
                seq.fail(exc)
                self._release(seq)
            return
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(int(lengths.sum()))
        self.cache.join(prefill_cache, lengths)
        self.running.extend(group)
        tokens = choose_tokens(logits[:, -1], [s.sampler for s in group])
        self.last_tokens.extend(tokens)
        self._accept(len(self.running) - len(group), tokens, merged)

    def _forward(self, input_ids: torch.Tensor, rows: list[Sequence], **kwargs) -> torch.Tensor:
        """Logits (B, q, V) with each row's adapter, or the merged weights for every row."""
        if self.model.state.merged is not None:
            if any(s.adapter_name != self.model.state.merged for s in rows):
                raise RuntimeError("a row for another adapter reached the merged path")
            return self.model.model(input_ids, **kwargs).logits
        rows_key = tuple(s.adapter_name for s in rows)
        # set the per-row adapters only when the rows (or the model's adapter state) changed:
        # each set makes every adapted layer rebuild its row groups
        if self._rows_set != (rows_key, self.model.state.version):
            self.model.set_adapter_rows(rows_key)
            self._rows_set = (rows_key, self.model.state.version)
        return self.model.model(input_ids, **kwargs).logits

    # ----- decode ------------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self) -> None:
        attention_mask, position_ids = self.cache.decode_inputs()
        self.cache.reserve(1)
        input_ids = torch.tensor(self.last_tokens, device=self.device)[:, None]  # (B, 1)
        with self.model_lock:
            merged = self.model.state.merged is not None
            logits = self._forward(
                input_ids, self.running, attention_mask=attention_mask.to(self.device),
                position_ids=position_ids.to(self.device), past_key_values=self.cache,
                use_cache=True,
            )  # fmt: skip
        self.cache.advance()
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(self.running))
            if merged:
                self.metrics.merged_steps.inc()
        tokens = choose_tokens(logits[:, -1], [s.sampler for s in self.running])
        self.last_tokens = tokens
        self._accept(0, tokens, merged)

    def _accept(self, first_row: int, tokens: list[int], merged: bool) -> None:
        """Give rows ``first_row...`` their new tokens; finished rows leave the batch."""
        if self.metrics is not None:
            self.metrics.tokens_generated.labels(path="merged" if merged else "unmerged").inc(
                len(tokens)
            )
        keep = list(range(first_row))
        for offset, token in enumerate(tokens):
            row = first_row + offset
            seq = self.running[row]
            reason = seq.accept(token, self.eos_ids, merged)
            if reason is not None:
                self._finish(seq, reason)
            else:
                keep.append(row)
        self._keep_rows(keep)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))


def prefill_groups(seqs: list[Sequence], slack: float = 0.25, free_pad: int = 16) -> list[list]:
    """Split newcomers into prefill forwards: by prompt length, a sequence joins the current
    group while the padded size ``n · L_max`` stays within ``(1 + slack)`` times the real tokens
    plus ``free_pad`` per row (similar chat prompts: one forward; a long prompt: its own)."""
    groups: list[list[Sequence]] = []
    real = 0
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        length = len(seq.prompt_ids)  # sorted: the longest of its group so far
        if groups:
            size = len(groups[-1]) + 1
            if size * length <= (1 + slack) * (real + length) + free_pad * size:
                groups[-1].append(seq)
                real += length
                continue
        groups.append([seq])
        real = length
    return groups
