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
) -> AdapterHeader:
    """Check and attach an adapter file as ``name`` (default: the name in the file). On any
    failure nothing stays attached. ``probe="auto"`` skips the regeneration probe when this
    model's frozen tensors are bit-identical to the exporter's (then ΔW is identical by
    construction); ``"always"`` runs it anyway; ``verify=False`` skips it."""
    adapter_file = source if isinstance(source, AdapterFile) else read_adapter(source)
    check_shapes(adapter_file, model)
    check_base(adapter_file, model)
    try:
        config = adapter_config(adapter_file)
    except AdapterConfigError as exc:
        raise AdapterMetadataError(f"adapter config is invalid: {exc}") from exc
    name = name or adapter_file.header.name
    model.add_adapter(name, config)
    try:
        _load_tensors(adapter_file, model, name)
        if verify and not (probe == "auto" and frozen_identical(adapter_file, model, name)):
            check_probe(adapter_file, model, name)
    except BaseException:
        model.delete_adapter(name)
        raise
    return adapter_file.header


def _load_tensors(adapter_file: AdapterFile, model: AdapterModel, name: str) -> None:
    try:
        model.load_adapter_state_dict(name, split_payload(adapter_file))
    except AdapterConfigError as exc:
        raise LayerShapeMismatch(f"the adapter's tensors do not fit this base: {exc}") from exc


def frozen_identical(adapter_file: AdapterFile, model: AdapterModel, name: str) -> bool:
    expected = adapter_file.header.frozen_sha256
    return bool(expected) and frozen_sha256(model, name) == expected


def check_probe(adapter_file: AdapterFile, model: AdapterModel, name: str) -> None:
    """Regenerated ΔW must reproduce the exporter's sketches within the stored tolerance."""
    spec = adapter_file.header.probe
    layers = [model.layers[entry.name] for entry in adapter_file.header.layers]
    for index, (entry, layer) in enumerate(zip(adapter_file.header.layers, layers, strict=True)):
        sketches, _ = layer_sketches(layer, name, spec.seed, index, spec.count)
        worst = max(abs(a - b) for a, b in zip(sketches, entry.probe, strict=True))
        if worst > spec.tolerance * entry.delta_norm + 1e-30:
            raise RegenerationMismatch(
                f"layer {entry.name}: regenerated ΔW differs from the exporter's by "
                f"{worst / max(entry.delta_norm, 1e-30):.2e} of ‖ΔW‖ (tolerance {spec.tolerance:.0e}); "
                "the frozen tensors could not be reproduced on this machine"
            )


@dataclass
class CheckResult:
    check: str
    ok: bool
    message: str


def verify_adapter(
    source: bytes | str | os.PathLike, model: AdapterModel | None
) -> list[CheckResult]:
    """Run every load check and report each (checks after the first failure are 'skipped')."""
    results: list[CheckResult] = []

    def record(check: str, fn) -> bool:
        try:
            fn()
        except AdapterFormatError as exc:
            results.append(
                CheckResult(exc.check if exc.check in CHECKS else check, False, str(exc))
            )
            return False
        results.append(CheckResult(check, True, "ok"))
        return True

    holder: dict[str, AdapterFile] = {}
    if not record("payload-hash", lambda: holder.setdefault("file", read_adapter(source))):
        return _with_skipped(results)
    results[-1:] = [CheckResult(c, True, "ok") for c in CHECKS[:5]]
    if model is None:
        return results
    adapter_file = holder["file"]
    if record("shapes", lambda: check_shapes(adapter_file, model)) and record(
        "base-fingerprint", lambda: check_base(adapter_file, model)
    ):
        record("regeneration-probe", lambda: _attach_and_detach(adapter_file, model))
    return _with_skipped(results)


def _attach_and_detach(adapter_file: AdapterFile, model: AdapterModel) -> None:
    name = "svda-verify"
    load_adapter(adapter_file, model, name, probe="always")
    model.delete_adapter(name)


def _with_skipped(results: list[CheckResult]) -> list[CheckResult]:
    done = {r.check for r in results}
    failed_at = next((CHECKS.index(r.check) for r in results if not r.ok), len(CHECKS))
    skipped = [
        CheckResult(c, False, "skipped")
        for c in CHECKS
        if c not in done and CHECKS.index(c) > failed_at
    ]
    return results + skipped
