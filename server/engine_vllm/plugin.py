"""The svda vLLM plugin (entry point ``vllm.general_plugins``: ``svda = svda.server.engine_vllm.plugin:register``).

vLLM calls :func:`register` in every process it starts (engine core, workers). It does nothing
unless ``SVDA_VLLM_PLUGIN=1`` is set (the svda engine sets it before vLLM starts), so a plain
vLLM in the same environment keeps its own LoRA layers. Enabled, it patches four internals of
the pinned vLLM (checked by ``test_vllm_canary.py``):

* ``vllm.lora.utils._all_lora_classes`` (a tuple): svda's layer classes (:mod:`.layers`) go
  first, so every linear layer vLLM wraps for LoRA is an svda layer;
* ``WorkerLoRAManager._load_adapter``: the loaded ``LoRAModel`` remembers its folder;
* ``LoRAModelManager.activate_adapter``: when an adapter gets slot ``i``, the svda forms of its
  folder (:func:`.forms.read_forms_file`) go into slot ``i`` of every svda layer (none: a plain PEFT
  adapter, which then runs on vLLM's own LoRA path in that slot);
* ``LoRAModelManager._set_adapter_mapping``: once per batch layout, the punica wrapper learns
  whether any token has an adapter (``svda_active``; when none has, the svda layers return
  the base output untouched: no per-layer check, no device sync) and a new ``svda_layout``
  (the layers gather their slots' rows once per layout, not once per step).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
ENABLE_ENV = "SVDA_VLLM_PLUGIN"
_PATCHED = False


def enabled() -> bool:
    """True when this process should run svda's layers (``SVDA_VLLM_PLUGIN=1``)."""
    return os.environ.get(ENABLE_ENV, "") == "1"


def register(force: bool = False) -> bool:
    """Install the svda layers and slot hooks into vLLM (idempotent). Without ``force`` only
    when :func:`enabled`; returns whether the plugin is installed in this process."""
    global _PATCHED
    if _PATCHED or not (force or enabled()):
        return _PATCHED
    import vllm.lora.utils as lora_utils
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    from .layers import SVDA_LAYER_CLASSES

    lora_utils._all_lora_classes = SVDA_LAYER_CLASSES + tuple(lora_utils._all_lora_classes)
    _patch_load(WorkerLoRAManager)
    _patch_activate(LoRAModelManager)
    _patch_mapping(LoRAModelManager)
    _PATCHED = True
    log.debug("svda vLLM plugin registered")
    return True


def _patch_load(cls: type) -> None:
    original = cls._load_adapter

    def _load_adapter(self, lora_request):
        lora = original(self, lora_request)
        lora.svda_path = lora_request.lora_path
        return lora

    cls._load_adapter = _load_adapter


def _patch_activate(cls: type) -> None:
    original = cls.activate_adapter

    def activate_adapter(self, lora_id: int) -> bool:
        activated = original(self, lora_id)
        if activated:
            _fill_slot(self, lora_id)
        return activated

    cls.activate_adapter = activate_adapter


def _patch_mapping(cls: type) -> None:
    original = cls._set_adapter_mapping

    def _set_adapter_mapping(self, mapping) -> None:
        original(self, mapping)
        _mark_layout(self, mapping)

    cls._set_adapter_mapping = _set_adapter_mapping


def _mark_layout(manager, mapping) -> None:
    """Tell the layers about a new batch layout: whether any token has an adapter
    (``svda_active``) and a :class:`.slices.BatchLayout` (``svda_layout``: the layers' gathered
    rows are stale) made host-side from ``index_mapping`` (one lora id per token, 0 for the
    base) and the tokens' slots with the base as the tables' last entry (and the slot every
    token has, when they all have one); its content (the lora ids per token and the slots'
    ids) lets a layer reuse what it made for an earlier mapping with the same tokens' slots."""
    import torch

    from .slices import BatchLayout

    wrappers = manager.punica_wrapper_mapping.values()
    if len(wrappers) != 1:  # multimodal models: several wrappers, always active, generic path
        for wrapper in wrappers:
            wrapper.svda_active, wrapper.svda_layout = True, object()
        return
    (wrapper,) = wrappers
    distinct = set(mapping.index_mapping)
    ids = {i for i in distinct if i > 0}
    used = frozenset(manager.lora_index_to_id.index(i) for i in ids)
    uniform = next(iter(used)) if len(distinct) == 1 and used else None  # one slot, no base
    tokens = wrapper.token_lora_indices
    slots = torch.where(tokens < 0, manager.lora_slots, tokens)
    content = (tuple(mapping.index_mapping), tuple(manager.lora_index_to_id))  # host-side
    wrapper.svda_active = bool(ids)
    wrapper.svda_layout = BatchLayout(used, slots, uniform, content)


def _fill_slot(manager, lora_id: int) -> None:
    from .forms import read_forms_file
    from .layers import SvdaSlotsMixin

    index = manager.lora_index_to_id.index(lora_id)
    path = getattr(manager._registered_adapters[lora_id], "svda_path", None)
    file = read_forms_file(path) if path else None
    forms = None if file is None else file.lazy()  # decoded only where a write needs it
    for module in manager.modules.values():
        if isinstance(module, SvdaSlotsMixin):
            module.svda_set(index, forms)
    log.debug("svda adapter %s (lora id %d) in slot %d", path, lora_id, index)
