"""Engine settings: batch and queue limits, context length, adapter memory, merge policy."""

from __future__ import annotations

from dataclasses import dataclass

MERGE_POLICIES = ("auto", "never", "always-single")
MAX_DEFAULT_CONTEXT = 8192


@dataclass
class EngineSettings:
    """Limits and policies of one :class:`~svda.server.engine.Engine`.

    ``merge_policy`` (see :mod:`svda.server.engine.merge`):

    * ``"auto"``: merge when every running and waiting request is for one adapter and either one
      of them asks for ``MergeMode.MERGED`` or at least ``merge_min_tokens`` tokens remain to be
      generated for it; unmerge at the next step boundary when other work arrives.
    * ``"never"``: always the batched, unmerged path (``MERGED`` requests are served unmerged).
    * ``"always-single"``: merge as soon as all work is for one adapter.

    A request with ``MergeMode.UNMERGED`` is never served merged under any policy.
    """

    max_batch_size: int = 16  # rows in a decode step
    max_waiting: int = 256  # queued requests beyond this -> Overloaded
    max_context_tokens: int = 0  # 0: the model's max_position_embeddings (capped at 8192)
    max_new_tokens_limit: int = 1024
    adapter_memory_bytes: int = 256 << 20  # budget for resident adapters' tensors (LRU beyond)
    svda_prune_tolerance: float = 0.05  # ε of docs/methods.md: SvdA δ pruning bound (0 = exact)
    merge_policy: str = "auto"  # "auto" | "never" | "always-single"
    device: str = "cpu"
    merge_min_tokens: int = 32  # "auto": merge only if at least this many tokens remain
    loader_threads: int = 2  # threads that read and verify adapter files

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        checks = [
            (self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}"),
            (self.max_waiting >= 0, f"max_waiting must be >= 0, got {self.max_waiting}"),
            (self.max_context_tokens >= 0,
             f"max_context_tokens must be >= 0 (0: the model's), got {self.max_context_tokens}"),
            (self.max_new_tokens_limit >= 1,
             f"max_new_tokens_limit must be >= 1, got {self.max_new_tokens_limit}"),
            (self.adapter_memory_bytes >= 0,
             f"adapter_memory_bytes must be >= 0, got {self.adapter_memory_bytes}"),
            (0.0 <= self.svda_prune_tolerance < 1.0,
             f"svda_prune_tolerance must be in [0, 1), got {self.svda_prune_tolerance}"),
            (self.merge_policy in MERGE_POLICIES,
             f"merge_policy must be one of {MERGE_POLICIES}, got {self.merge_policy!r}"),
            (self.merge_min_tokens >= 0,
             f"merge_min_tokens must be >= 0, got {self.merge_min_tokens}"),
            (self.loader_threads >= 1, f"loader_threads must be >= 1, got {self.loader_threads}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"engine settings: {message}")


def context_limit(settings: EngineSettings, model_config) -> int:
    """The context length the engine enforces: the setting, else the model's (capped)."""
    model_max = getattr(model_config, "max_position_embeddings", None) or getattr(
        model_config, "n_positions", MAX_DEFAULT_CONTEXT
    )
    if settings.max_context_tokens:
        return min(settings.max_context_tokens, model_max)
    return min(model_max, MAX_DEFAULT_CONTEXT)
