"""The svda vLLM plugin (entry point ``vllm.general_plugins``: ``svda = svda.server.engine_vllm.plugin:register``).

vLLM calls :func:`register` in every process it starts (engine core, workers). It patches
three internals of the pinned vLLM (checked by ``test_vllm_canary.py``):

* ``vllm.lora.utils._all_lora_classes`` (a tuple): svda's layer classes (:mod:`.layers`) go
  first, so every linear layer vLLM wraps for LoRA is an svda layer;
* ``WorkerLoRAManager._load_adapter``: the loaded ``LoRAModel`` remembers its folder;
* ``LoRAModelManager.activate_adapter``: when an adapter gets slot ``i``, the svda forms of its
  folder (:func:`.forms.read_forms`) go into slot ``i`` of every svda layer (none: the slot is
  cleared, e.g. a plain PEFT adapter, which then runs as zeros).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
_PATCHED = False


def register() -> None:
    """Install the svda layers and slot hooks into vLLM (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    import vllm.lora.utils as lora_utils
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    from .layers import SVDA_LAYER_CLASSES

    lora_utils._all_lora_classes = SVDA_LAYER_CLASSES + tuple(lora_utils._all_lora_classes)
    _patch_load(WorkerLoRAManager)
    _patch_activate(LoRAModelManager)
    _PATCHED = True
    log.debug("svda vLLM plugin registered")


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


def _fill_slot(manager, lora_id: int) -> None:
    from .forms import read_forms
    from .layers import SvdaSlotsMixin

    index = manager.lora_index_to_id.index(lora_id)
    path = getattr(manager._registered_adapters[lora_id], "svda_path", None)
    forms = read_forms(path) if path else None
    for module in manager.modules.values():
        if isinstance(module, SvdaSlotsMixin):
            module.svda_set(index, forms)
    log.debug("svda adapter %s (lora id %d) in slot %d", path, lora_id, index)
