"""svda.runtime: adapter math, base models and regeneration (no gRPC, no store).

Public API: :func:`load_base_model`, :class:`AdapterModel`, the method configs
(:class:`SvdaConfig`, :class:`VeraConfig`, :class:`LoraConfig`), the registry
(:func:`get_method`, :func:`available_methods`), fingerprints and the SVD basis cache.
"""

from .base_model import BaseModel, load_base_model
from .errors import AdapterConfigError, AdapterStateError, BaseModelError, SvdaError
from .fingerprint import BaseFingerprint, base_fingerprint, layer_fingerprint
from .layer import AdapterLinear, AdapterState
from .methods import (
    AdapterConfig,
    LoraConfig,
    SvdaConfig,
    VeraConfig,
    available_methods,
    config_from_dict,
    get_method,
    register_method,
)
from .model import AdapterModel
from .regeneration.svd_basis import SvdBasis, SvdBasisCache, compute_svd_basis

__all__ = [
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterLinear",
    "AdapterModel",
    "AdapterState",
    "AdapterStateError",
    "BaseFingerprint",
    "BaseModel",
    "BaseModelError",
    "LoraConfig",
    "SvdBasis",
    "SvdBasisCache",
    "SvdaConfig",
    "SvdaError",
    "VeraConfig",
    "available_methods",
    "base_fingerprint",
    "compute_svd_basis",
    "config_from_dict",
    "get_method",
    "layer_fingerprint",
    "load_base_model",
    "register_method",
]
