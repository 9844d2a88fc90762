"""The per-method tensor table of ``adapters_store/FORMAT.md``, generated from the method registry.

    python -m svda.adapters_store.format_doc          # rewrite the table in FORMAT.md
    python -m svda.adapters_store.format_doc --check  # exit 1 if FORMAT.md is out of date

Every registered method is attached to a tiny random Llama (three layers of different shapes:
``v_proj`` 24×48, ``up_proj`` 80×48, ``down_proj`` 48×80, or its MLP blocks for block-level
methods), once with its default config and once per integer config field changed; each stored
dimension is then named by the first expression (``d_out``, ``d_in``, ``min(d_out, d_in)``, a
config field, ...) that gives it in every probe. A new method gets its row with no change here;
``tests/adapters_store/test_format_doc.py`` fails until FORMAT.md holds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from svda.runtime import AdapterModel, available_methods, get_method
from svda.runtime.errors import SvdaError

FORMAT_MD = Path(__file__).with_name("FORMAT.md")
BEGIN = "<!-- BEGIN GENERATED method tensors: python -m svda.adapters_store.format_doc -->"
END = "<!-- END GENERATED method tensors -->"
LINEAR_TARGETS = "v_proj,up_proj,down_proj"
COMMAND = "python -m svda.adapters_store.format_doc"

# (layer, d_out, d_in, config values) -> value; the first expression that fits every probe wins
Expr = Callable[[int, int, dict[str, Any]], int | None]


def _tiny_model() -> AdapterModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return AdapterModel(LlamaForCausalLM(config).eval())


# ----- probing the methods ---------------------------------------------------------------------
def _defaults(config_cls: type) -> dict[str, Any]:
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return values


def _int_fields(config_cls: type) -> list[str]:
    """Fields typed ``int`` or ``int | None`` (the ones that can size a tensor)."""
    hints = typing.get_type_hints(config_cls)
    ints = []
    for name, hint in hints.items():
        args = set(typing.get_args(hint)) - {type(None)}
        if hint is int or args == {int}:
            ints.append(name)
    return ints


def _probe(model: AdapterModel, method: str, values: dict[str, Any]) -> dict | None:
    """``{layer: (d_out, d_in, {kind: shape})}`` of ``method`` with ``values``, or None if that
    config does not fit the tiny model."""
    config_cls = get_method(method).config_cls
    try:
        model.add_adapter("probe", config_cls.from_dict(values))
    except (SvdaError, ValueError, TypeError):
        return None
    try:
        found = {}
        for layer in model.layers_of("probe"):
            target = model.target_info(layer.layer_name)
            shapes = {kind: tuple(t.shape) for kind, t in layer.tensors_of("probe").items()}
            found[layer.layer_name.rsplit(".", 1)[-1]] = (target.d_out, target.d_in, shapes)
        return found
    finally:
        model.delete_adapter("probe")


def probes(model: AdapterModel, method: str) -> list[tuple[dict[str, Any], dict]]:
    """The default config, then each integer field changed (the first value that fits)."""
    spec = get_method(method)
    base = _defaults(spec.config_cls)
    if spec.weights_cls.target_kind == "linear":
        base["targets"] = LINEAR_TARGETS
    first = _probe(model, method, base)
    if first is None:
        raise SystemExit(f"{method}: its default config does not attach to the tiny probe model")
    out = [(base, first)]
    for name in _int_fields(spec.config_cls):
        value = base[name]
        tries = [4, 6] if value is None else [value * 2, value + 1, max(1, value // 2), value + 2]
        for candidate in (t for t in tries if t != value):
            changed = {**base, name: candidate}
            found = _probe(model, method, changed)
            if found is not None:
                out.append((changed, found))
                break
    return out


# ----- naming the dimensions ---------------------------------------------------------------------
def _expressions(int_fields: list[str], block: bool) -> list[tuple[str, Expr]]:
    out, io = "hidden" if block else "d_out", "hidden" if block else "d_in"
    exprs: list[tuple[str, Expr]] = [(out, lambda o, i, c: o), (io, lambda o, i, c: i)]
    if not block:
        exprs.append(("min(d_out, d_in)", lambda o, i, c: min(o, i)))
    for f in int_fields:
        exprs.append((f, lambda o, i, c, f=f: c[f]))
        exprs.append((f"{f} or min(d_out, d_in)", lambda o, i, c, f=f: _or_min(c[f], o, i)))
    for f in int_fields:
        exprs += [
            (f"2·{f}", lambda o, i, c, f=f: _times(c[f], 2)),
            (f"{io}/{f}", lambda o, i, c, f=f: _div(i, c[f])),
            (f"{out}/{f}", lambda o, i, c, f=f: _div(o, c[f])),
            (
                f"{f}·({f}−1)/2",
                lambda o, i, c, f=f: None if c[f] is None else c[f] * (c[f] - 1) // 2,
            ),
        ]
    exprs += [(f"{out}/2", lambda o, i, c: _div(o, 2)), (f"{io}/2", lambda o, i, c: _div(i, 2))]
    return exprs + [(str(k), lambda o, i, c, k=k: k) for k in range(1, 9)]


def _or_min(value: int | None, d_out: int, d_in: int) -> int:
    return min(d_out, d_in) if value is None else value


def _times(value: int | None, k: int) -> int | None:
    return None if value is None else value * k


def _div(a: int, b: int | None) -> int | None:
    return a // b if b and a % b == 0 else None


def _name_dim(
    exprs: list[tuple[str, Expr]], observed: list[tuple[int, int, dict, int]]
) -> str | None:
    """The first expression giving ``dim`` for every ``(d_out, d_in, config, dim)``."""
    for label, expr in exprs:
        if all(expr(o, i, c) == dim for o, i, c, dim in observed):
            return label
    return None


def shape_text(method: str, kind: str, runs: list[tuple[dict, dict]], layers: list[str]) -> str:
    """``(r, d_in)``, or per-layer shapes where one expression does not fit every layer."""
    spec = get_method(method)
    exprs = _expressions(_int_fields(spec.config_cls), spec.weights_cls.target_kind != "linear")

    def named(chosen: list[str]) -> str | None:
        ndim = {len(found[layer][2][kind]) for _, found in runs for layer in chosen}
        if len(ndim) != 1:
            return None
        dims = []
        for axis in range(ndim.pop()):
            observed = [(found[lay][0], found[lay][1], values, found[lay][2][kind][axis])
                        for values, found in runs for lay in chosen if lay in found]  # fmt: skip
            label = _name_dim(exprs, observed)
            if label is None:
                return None
            dims.append(label)
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    whole = named(layers)
    if whole is not None:
        return f"`{whole}`"
    groups: dict[str, list[str]] = {}  # one shape text -> the probe layers it fits
    for layer in layers:
        groups.setdefault(named([layer]) or str(runs[0][1][layer][2][kind]), []).append(layer)
    return "; ".join(f"`{text}` on {', '.join(where)}" for text, where in groups.items())


# ----- the table ----------------------------------------------------------------------------------
def method_row(model: AdapterModel, method: str) -> str:
    spec = get_method(method)
    runs = probes(model, method)
    layers = list(runs[0][1])
    kinds = list(runs[0][1][layers[0]][2])
    tensors = "<br>".join(f"`{kind}` {shape_text(method, kind, runs, layers)}" for kind in kinds)
    where = "linear layers" if spec.weights_cls.target_kind == "linear" else "attention/MLP blocks"
    fields = ", ".join(f"`{k}`={_json(v)}" for k, v in _defaults(spec.config_cls).items())
    return f"| `{method}` | {where} | {tensors} | {fields} |"


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False).replace("|", "\\|")


def render() -> str:
    """The generated block, markers included, for every registered method."""
    model = _tiny_model()
    rows = [method_row(model, method) for method in available_methods()]
    return "\n".join([
        BEGIN,
        "| method | adapts | stored tensors per layer: kind `(shape)` | config fields (default) |",
        "|---|---|---|---|",
        *rows,
        "",
        "`d_out`, `d_in`: the layer's output and input features (`W0` is `d_out × d_in`); "
        "`hidden`: the hidden size of an adapted block; other names are config fields. Where "
        "shapes differ by layer, they are given for the probe layers (v_proj 24×48, up_proj "
        "80×48, down_proj 48×80 of a tiny Llama) under the default config.",
        END,
    ])  # fmt: skip


def current_block(text: str) -> str:
    """The block between the markers in ``text`` (markers included)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{FORMAT_MD}: the markers {BEGIN!r} … {END!r} are missing")
    return text[start : end + len(END)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if FORMAT.md is out of date")
    parser.add_argument("--file", type=Path, default=FORMAT_MD, help="default: %(default)s")
    args = parser.parse_args(argv)
    text = args.file.read_text()
    old, new = current_block(text), render()
    if old == new:
        print(f"{args.file}: the method table is up to date")
        return 0
    if args.check:
        print(f"{args.file}: the method table is out of date; run {COMMAND}", file=sys.stderr)
        return 1
    args.file.write_text(text.replace(old, new))
    print(f"{args.file}: method table rewritten ({len(available_methods())} methods)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
