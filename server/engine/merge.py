"""The merge policy: when to fold one adapter into the base weights, and when to take it out.

Serving an adapter merged costs exactly a base forward per step, while the unmerged path adds the
adapters' batched deltas; merging and unmerging cost one pass over the adapter's layers each
(ΔW computed and added in float64). The engine decides at every step boundary, before new rows
join, from all running *and* waiting requests (whose adapters are loaded):

* No request, or a request with ``MergeMode.UNMERGED``, or requests for the base or for two
  adapters: no merge (unmerge first if needed, so base rows and other adapters can join).
* All requests for one adapter ``A``:

  - ``"always-single"``: merge ``A``;
  - ``"auto"``: merge ``A`` if a request asks for ``MergeMode.MERGED``, or if at least
    ``merge_min_tokens`` tokens remain to be generated for it (amortises the merge);
  - ``"never"``: no merge (``MERGED`` requests are served unmerged and say so).

* An adapter whose method does not merge (serial/parallel adapters) is never merged.
* Already merged with ``A``: stay merged while all work is for ``A``, and also when the engine is
  idle (the next request for ``A`` then costs nothing extra); unmerge as soon as anything else
  must run. Eviction never detaches the merged adapter.

The merged path's logits equal the unmerged path's within float tolerance (tested), so rows that
switch paths mid-generation stay correct; ``Completion.merged`` is True only when every token of
the request came from the merged path. Merges are counted in ``svda_merges{reason}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..domain import MergeMode
from .sequence import Sequence


def merge_target(
    policy: str,
    min_tokens: int,
    current: str | None,
    work: Iterable[Sequence],
    can_merge: Callable[[str], bool] = lambda name: True,
) -> tuple[str | None, str]:
    """(adapter name that should be merged or None, reason) for the work in the engine.
    ``can_merge`` says whether an adapter's method merges at all (serial/parallel adapters
    do not: they are always served unmerged)."""
    work = [s for s in work if not s.done]
    if not work:
        return current, "idle"
    keys = {s.key for s in work}
    if len(keys) != 1 or None in keys or policy == "never":
        return None, "mixed"
    if any(s.request.mode == MergeMode.UNMERGED for s in work):
        return None, "unmerged-requested"
    name = _loaded_name(work)
    if name is None:
        return (current if current is not None else None), "loading"
    if not can_merge(name):
        return None, "not-mergeable"
    if name == current or policy == "always-single":
        return name, "single-adapter"
    if any(s.request.mode == MergeMode.MERGED for s in work):
        return name, "requested"
    if sum(max(s.remaining, 0) for s in work) >= min_tokens:
        return name, "single-adapter"
    return None, "too-short"


def _loaded_name(work: list[Sequence]) -> str | None:
    for seq in work:
        if seq.adapter_name is not None:
            return seq.adapter_name
        if seq.future is not None and seq.future.done() and seq.future.exception() is None:
            return seq.future.result()
    return None
