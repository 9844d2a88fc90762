"""Converting between Hugging Face PEFT adapter folders and svda adapters (LoRA, DoRA, VeRA,
BOFT, IA³): the public entry points, re-exported.

A PEFT folder is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys such as
``base_model.model.<layer>.lora_A.weight``. Import (``check_peft_folder``, ``import_peft``) is in
``peft_import``, with the acceptance rules in ``peft_rules``; export (``export_peft``) is in
``peft_export``.
"""

from __future__ import annotations

from .peft_export import export_peft, target_modules
from .peft_import import CONVERTERS, check_peft_folder, import_peft, read_peft_folder
from .peft_rules import PeftConversionError

__all__ = [
    "CONVERTERS",
    "PeftConversionError",
    "check_peft_folder",
    "export_peft",
    "import_peft",
    "read_peft_folder",
    "target_modules",
]
