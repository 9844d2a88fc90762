"""svda.adapters_store: the compact ``.svda`` format, the adapter store and ``svda-pack``."""

from .checkpoint import load_checkpoint, publish_adapter, read_stored_adapter, save_checkpoint
from .errors import (
    AdapterFormatError,
    AdapterMetadataError,
    BaseMismatch,
    LayerShapeMismatch,
    PayloadError,
    PayloadHashMismatch,
    RegenerationMismatch,
    UnreadableAdapterFile,
    UnsupportedFormatVersion,
)
from .format import AdapterFile, export_adapter, read_adapter, save_adapter_file
from .header import FORMAT_VERSION, AdapterHeader
from .loader import load_adapter, verify_adapter
from .peft_compat import export_peft, import_peft
from .store import AdapterStore

__all__ = [
    "FORMAT_VERSION",
    "AdapterFile",
    "AdapterFormatError",
    "AdapterHeader",
    "AdapterMetadataError",
    "AdapterStore",
    "BaseMismatch",
    "LayerShapeMismatch",
    "PayloadError",
    "PayloadHashMismatch",
    "RegenerationMismatch",
    "UnreadableAdapterFile",
    "UnsupportedFormatVersion",
    "export_adapter",
    "export_peft",
    "import_peft",
    "load_adapter",
    "load_checkpoint",
    "publish_adapter",
    "read_adapter",
    "read_stored_adapter",
    "save_adapter_file",
    "save_checkpoint",
    "verify_adapter",
]
