"""Streaming detokenisation with stop strings.

Text is decoded incrementally the way text-generation-inference does it: the new tokens are
decoded together with a few tokens before them (so tokenizers that drop or add a leading space
at a sequence start give the same text as one decode of everything), and nothing is emitted while
the decoded text ends in U+FFFD, the replacement character of an incomplete UTF-8 sequence.

Stop strings: the text emitted so far never contains a stop string or ends in a prefix of one;
such a suffix is held back until it either completes a stop string (the text is cut before it
and the request finishes with STOP) or stops being a prefix (then it is emitted).
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded with the first generated ones


class TextStream:
    """Turns generated token ids into text deltas; knows when a stop string appears."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        tail = list(prompt_ids[-CONTEXT_TOKENS:])
        if tail and self._decode(tail).endswith(REPLACEMENT):
            tail = []  # the prompt ends mid-character: decode the generation on its own
        self.ids: list[int] = tail
        self.prefix_offset = 0
        self.read_offset = len(tail)
        self.text = ""  # decoded text of the generation so far (stop string not cut yet)
        self.emitted = 0  # characters of ``text`` handed out
        self.stopped_at: int | None = None  # index of the stop string in ``text``

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that may be emitted now (maybe "")."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stopped_at is not None:
            return ""
        hit = self._find_stop()
        if hit is not None:
            self.stopped_at = hit
            return self._emit_to(hit)
        return self._emit_to(len(self.text) - self._held_back())

    def _find_stop(self) -> int | None:
        hits = [i for s in self.stop if (i := self.text.find(s, self.emitted)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest suffix of the unemitted text that begins some stop string."""
        pending = self.text[self.emitted :]
        for k in range(min(len(pending), max((len(s) for s in self.stop), default=0)), 0, -1):
            suffix = pending[-k:]
            if any(s.startswith(suffix) for s in self.stop):
                return k
        return 0

    def _emit_to(self, end: int) -> str:
        chunk = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return chunk

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def finish(self) -> str:
        """The rest of the text at the end of a request: held-back text, and the decoding of
        trailing tokens that never completed a character (with U+FFFD)."""
        if self.stopped_at is not None:
            return ""
        if len(self.ids) > self.read_offset:
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            self.text += full[len(prefix) :]
            self.read_offset = len(self.ids)
        chunk = self._release()
        return chunk if self.stopped_at is not None else chunk + self._emit_to(len(self.text))

    @property
    def final_text(self) -> str:
        return self.text[: self.stopped_at] if self.stopped_at is not None else self.text
