"""Attaching a ``.svda`` adapter to a model, with every load check; and a check-by-check report."""

from __future__ import annotations

import os
from dataclasses import dataclass

from svda.runtime import AdapterModel
from svda.runtime.errors import AdapterConfigError

from .errors import (
    AdapterFormatError,
    AdapterMetadataError,
    LayerShapeMismatch,
    RegenerationMismatch,
)
from .format import (
    AdapterFile,
    adapter_config,
    check_base,
    check_shapes,
    frozen_sha256,
    read_adapter,
    split_payload,
)
from .header import AdapterHeader
from .probe import layer_sketches

CHECKS = (
    "readable",
    "metadata",
    "format-version",
    "payload",
    "payload-hash",
    "shapes",
    "base-fingerprint",
    "regeneration-probe",
)


def load_adapter(
    source: bytes | str | os.PathLike | AdapterFile,
    model: AdapterModel,
    name: str | None = None,
    *,
    verify: bool = True,
    probe: str = "auto",
    trainable: bool = False,
    prune_tolerance: float = 0.0,
) -> AdapterHeader:
    """Check and attach an adapter file as ``name`` (default: the name in the file). On any
    failure nothing stays attached. ``probe="auto"`` skips the regeneration probe when this
    model's frozen tensors are bit-identical to the exporter's (then ΔW is identical by
    construction); ``"always"`` runs it anyway; ``verify=False`` skips it.

    By default the adapter is attached frozen, into the model's slot bank for its layout (one
    copy per tensor kind: the serving path); ``trainable=True`` attaches it as modules with
    parameters, to train further. ``prune_tolerance`` ε > 0 lets a frozen adapter serve with
    ΔW within ε·‖ΔW‖_F of the exact one per layer, where its method can make that cheaper
    (SvdA: components of δ dropped; applied after the checks)."""
    adapter_file = source if isinstance(source, AdapterFile) else read_adapter(source)
    check_shapes(adapter_file, model)
    check_base(adapter_file, model)
    try:
        config = adapter_config(adapter_file)
    except (AdapterConfigError, TypeError, ValueError) as exc:
        raise AdapterMetadataError(f"adapter config is invalid: {exc}") from exc
    name = name or adapter_file.header.name
    model.check_new_name(name)
    _attach(adapter_file, model, name, config, trainable)
    try:
        norms = None
        if verify and not (probe == "auto" and frozen_identical(adapter_file, model, name)):
            norms = check_probe(adapter_file, model, name)
        if prune_tolerance and not trainable and model.can_prune(name):
            # the probe's exact norms, else the model's (bounds where tight); never the file's
            model.prune_adapter(name, prune_tolerance, norms)
    except BaseException:
        model.delete_adapter(name)
        raise
    return adapter_file.header


def _attach(
    adapter_file: AdapterFile, model: AdapterModel, name: str, config, trainable: bool
) -> None:
    layers = [(entry.name, entry.params) for entry in adapter_file.header.layers]
    try:
        if not trainable:
            packed = adapter_file.header.encoded_layer_table
            key = None if packed is None else f"svda.layers:{packed}"
            model.add_packed_adapter(name, config, adapter_file.tensors, layers, key)
            return
        model.add_adapter(name, config)
        try:
            model.load_adapter_state_dict(name, split_payload(adapter_file))
        except BaseException:
            model.delete_adapter(name)
            raise
    except AdapterConfigError as exc:
        raise LayerShapeMismatch(f"the adapter's tensors do not fit this base: {exc}") from exc


def frozen_identical(adapter_file: AdapterFile, model: AdapterModel, name: str) -> bool:
    """Whether the probe may be skipped: the header is covered by a matching content hash
    (format ≥ 2; a format-1 file always runs the probe) and this model's frozen tensors are
    bit-identical to the exporter's."""
    expected = adapter_file.header.frozen_sha256
    if not (adapter_file.header.content_hashed and expected):
        return False
    return frozen_sha256(model, name) == expected


def check_probe(adapter_file: AdapterFile, model: AdapterModel, name: str) -> list[float]:
    """Regenerated ΔW must reproduce the exporter's sketches and ``‖ΔW‖_F`` within the stored
    tolerance, relative to ‖ΔW‖_F as recomputed here (the file's norm is checked, never trusted:
    a huge one would switch the probe off). Returns the recomputed norms."""
    spec = adapter_file.header.probe
    entries = adapter_file.header.layers
    norms = []
    for index, entry in enumerate(entries):
        layer = model.layers[entry.name]
        sketches, norm = layer_sketches(layer, name, spec.seed, index, spec.count, exact_norm=True)
        allowed = spec.tolerance * norm + 1e-30
        worst = max(abs(a - b) for a, b in zip(sketches, entry.probe, strict=True))
        if worst > allowed or abs(norm - entry.delta_norm) > allowed:
            raise RegenerationMismatch(
                f"layer {entry.name}: regenerated ΔW differs from the exporter's by "
                f"{max(worst, abs(norm - entry.delta_norm)) / max(norm, 1e-30):.2e} of ‖ΔW‖ "
                f"(tolerance {spec.tolerance:.0e}); the frozen tensors could not be reproduced "
                "on this machine, or the file's probe values were edited"
            )
        norms.append(norm)
    return norms


@dataclass
class CheckResult:
    check: str
    ok: bool
    message: str


def verify_adapter(
    source: bytes | str | os.PathLike, model: AdapterModel | None
) -> list[CheckResult]:
    """Run every load check and report each: passed ones 'ok', the first failure with its
    message, the ones after it 'skipped'. Without a model only the file checks run."""
    passed = 0
    try:
        adapter_file = read_adapter(source)  # readable .. payload-hash
        passed = CHECKS.index("payload-hash") + 1
        if model is None:
            return [CheckResult(c, True, "ok") for c in CHECKS[:passed]]
        for check in (check_shapes, check_base, _attach_and_detach):
            check(adapter_file, model)
            passed += 1
    except AdapterFormatError as exc:
        failed = CHECKS.index(exc.check) if exc.check in CHECKS else passed
        return (
            [CheckResult(c, True, "ok") for c in CHECKS[:failed]]
            + [CheckResult(CHECKS[failed], False, str(exc))]
            + [CheckResult(c, False, "skipped") for c in CHECKS[failed + 1 :]]
        )
    return [CheckResult(c, True, "ok") for c in CHECKS]


def _attach_and_detach(adapter_file: AdapterFile, model: AdapterModel) -> None:
    name = "svda-verify"
    load_adapter(adapter_file, model, name, probe="always")
    model.delete_adapter(name)
