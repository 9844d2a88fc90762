"""The running batch's KV cache: one left-padded tensor per layer, grown in chunks.

Layout (per layer, keys and values alike)::

    buffer  (B, H, capacity, D)     row r's tokens sit in columns [T - len_r, T)
    T       columns in use (the longest row), capacity >= T

A decode step writes the new token of every row into column ``T`` and attends over ``[0, T]``
with a 2D attention mask that hides each row's left padding; row ``r``'s next position id is
``len_r``, so RoPE sees the same positions as an unpadded run. Newcomers are prefilled together,
left-padded to their longest prompt (masked, positions from 0 per row), and *joined*: their
caches are right-aligned into a new buffer with the running rows. Finished rows *leave* by an index-select on the batch dimension, which also drops the
leading columns no remaining row uses. Appending never copies the cache: the buffer has spare
capacity, doubled-ish when it runs out (amortised O(1) per token).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_HEADROOM = 32  # spare columns allocated on join / growth


class SlotLayer(DynamicLayer):
    """A :class:`DynamicLayer` backed by a preallocated buffer; ``update`` writes in place."""

    def __init__(self) -> None:
        super().__init__()
        self.buf_k: torch.Tensor | None = None  # (B, H, capacity, D)
        self.buf_v: torch.Tensor | None = None
        self.length = 0  # T

    def set_buffers(self, buf_k: torch.Tensor, buf_v: torch.Tensor, length: int) -> None:
        self.buf_k, self.buf_v, self.length = buf_k, buf_v, length
        self.dtype, self.device = buf_k.dtype, buf_k.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self.buf_k[:, :, : self.length]
        self.values = self.buf_v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[-2]
        end = self.length + q
        if self.buf_k is None or end > self.buf_k.shape[2]:
            raise RuntimeError(f"KV buffer too small: need {end} columns; call reserve() first")
        self.buf_k[:, :, self.length : end] = key_states
        self.buf_v[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("use BatchKVCache.select, which keeps every layer aligned")


class BatchKVCache(Cache):
    """The KV cache of the running batch plus each row's token count (``lengths``)."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[SlotLayer() for _ in range(num_layers)])
        self.lengths = torch.zeros(0, dtype=torch.long)  # (B,) tokens in the cache per row

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:  # T
        return self.layers[0].length if self.batch_size else 0

    def capacity(self) -> int:
        buf = self.layers[0].buf_k
        return 0 if buf is None or not self.batch_size else buf.shape[2]

    # ----- decode -------------------------------------------------------------------------------
    def reserve(self, extra: int = 1) -> None:
        """Make room for ``extra`` more columns, growing every layer's buffer if needed."""
        need = self.width + extra
        if need <= self.capacity():
            return
        new_cap = need + max(MIN_HEADROOM, need // 2)
        for layer in self.layers:
            k, v = layer.buf_k, layer.buf_v
            shape = (k.shape[0], k.shape[1], new_cap, k.shape[3])
            new_k, new_v = k.new_zeros(shape), v.new_zeros(shape)
            new_k[:, :, : layer.length] = k[:, :, : layer.length]
            new_v[:, :, : layer.length] = v[:, :, : layer.length]
            layer.set_buffers(new_k, new_v, layer.length)

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask (B, T+1) long, position_ids (B, 1)) for a one-token decode step."""
        width = self.width + 1
        lengths = self.lengths + 1  # including the token being decoded
        columns = torch.arange(width, device=lengths.device)
        mask = columns[None, :] >= (width - lengths)[:, None]
        return mask.long(), self.lengths[:, None].clone()

    def advance(self) -> None:
        """Count the token the last decode step appended to every row."""
        self.lengths += 1

    # ----- join / leave -------------------------------------------------------------------------
    def join(self, prefill: Cache, lengths: torch.Tensor) -> None:
        """Append the rows of ``prefill`` (a cache of ``n`` rows from a prefill forward, left-padded
        to its width ``L``; row ``i`` holds ``lengths[i]`` real tokens at the right) to the batch,
        right-aligned with the running rows."""
        new_len = prefill.layers[0].keys.shape[2]
        old_b, old_t = self.batch_size, self.width
        width = max(old_t, new_len)
        capacity = width + MIN_HEADROOM
        for layer, src in zip(self.layers, prefill.layers, strict=True):
            k_new, v_new = src.keys, src.values  # (n, H, L, D)
            n, heads, _, dim = k_new.shape
            shape = (old_b + n, heads, capacity, dim)
            buf_k, buf_v = k_new.new_zeros(shape), v_new.new_zeros(shape)
            if old_b:
                buf_k[:old_b, :, width - old_t : width] = layer.keys
                buf_v[:old_b, :, width - old_t : width] = layer.values
            buf_k[old_b:, :, width - new_len : width] = k_new
            buf_v[old_b:, :, width - new_len : width] = v_new
            layer.set_buffers(buf_k, buf_v, width)
        self.lengths = torch.cat([self.lengths.to(lengths.device), lengths.long()])

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order); drop columns no remaining row uses."""
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.lengths.device)
        lengths = self.lengths[index]
        lead = self.width - int(lengths.max())  # leading columns that are padding in every row
        for layer in self.layers:
            buf_k = layer.buf_k[index, :, lead:]
            buf_v = layer.buf_v[index, :, lead:]
            layer.set_buffers(buf_k, buf_v, layer.length - lead)
        self.lengths = lengths

    def clear(self) -> None:
        for layer in self.layers:
            layer.buf_k = layer.buf_v = layer.keys = layer.values = None
            layer.length = 0
            layer.is_initialized = False
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.lengths.device)

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            if layer.buf_k is not None:
                total += layer.buf_k.nbytes + layer.buf_v.nbytes
        return total
