"""Adapter methods, one folder each, registered in :mod:`.registry`."""

from .base import AdapterConfig, AdapterWeights, TargetInfo
from .lora import LoraConfig, LoraWeights
from .registry import (
    MethodSpec,
    available_methods,
    config_from_dict,
    get_method,
    register_method,
)
from .svda import SvdaConfig, SvdaWeights
from .vera import VeraConfig, VeraWeights

register_method(SvdaConfig, SvdaWeights, "SVD-based adaptation: ΔW = diag(b)·U·diag(s)·Vᵀ")
register_method(VeraConfig, VeraWeights, "Vector-based random matrices: ΔW = diag(b)·B·diag(d)·A")
register_method(LoraConfig, LoraWeights, "Low-rank adaptation: ΔW = (α/r)·B·A")

__all__ = [
    "AdapterConfig",
    "AdapterWeights",
    "LoraConfig",
    "LoraWeights",
    "MethodSpec",
    "SvdaConfig",
    "SvdaWeights",
    "TargetInfo",
    "VeraConfig",
    "VeraWeights",
    "available_methods",
    "config_from_dict",
    "get_method",
    "register_method",
]
