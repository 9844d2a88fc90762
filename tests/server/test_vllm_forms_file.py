"""The forms file of adapters attached packed (as the engines load them): per-slot tensors that
view one flat tensor are stored as places in it, and a slot bank's layout is encoded once."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from svda.runtime import AdapterModel, SvdaConfig, SvdBasisCache
from svda.runtime.methods import linear_methods
from svda.runtime.serving_form import LayerForm, compile_adapter
from svda.runtime.serving_form.primitives import OutputScale
from svda.server.engine_vllm.form_file import load_forms, save_forms
from svda.server.engine_vllm.forms import FORMS_FILE, read_forms, write_vllm_adapter
from tests.runtime.helpers import METHOD_CONFIGS, packed, perturb, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def svd_cache(tmp_path) -> SvdBasisCache:
    return SvdBasisCache(tmp_path / "svd")


def packed_model(config_of, n: int, svd_cache) -> AdapterModel:
    """Adapters p0..p{n-1} attached packed (a slot bank), each trained differently."""
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    for i in range(n):
        model.add_adapter(f"a{i}", config_of())
        with torch.no_grad():
            perturb(model, f"a{i}", seed=i)
        model.add_packed_adapter(f"p{i}", model.configs[f"a{i}"], *packed(model, f"a{i}"))
    return model


def assert_same_forms(got: dict[str, LayerForm], want: dict[str, LayerForm]) -> None:
    from dataclasses import fields

    assert set(got) == set(want)
    for name, form in want.items():
        assert got[name].kinds() == form.kinds()
        for p, q in zip(got[name].primitives(), form.primitives(), strict=True):
            for f in fields(q):
                a, b = getattr(p, f.name), getattr(q, f.name)
                assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, f.name


def file_tensors(folder) -> dict[str, tuple]:
    with safe_open(str(folder / FORMS_FILE), framework="pt") as f:
        return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118


def test_svda_adapters_of_one_bank_write_one_flat_tensor_each(tmp_path, svd_cache, monkeypatch):
    """The first adapter's forms are compiled and their layout kept; the next ones of the bank
    write their flat tensor alone (no forms compiled)."""
    from svda.server.engine_vllm import forms as forms_module

    model = packed_model(lambda: SvdaConfig(targets=TARGETS, top_k=5), 3, svd_cache)
    config = tiny_llama().config
    compiled_names = []
    compile_forms = forms_module.compile_adapter
    monkeypatch.setattr(
        forms_module,
        "compile_adapter",
        lambda model, name: compiled_names.append(name) or compile_forms(model, name),
    )
    folders = [write_vllm_adapter(model, f"p{i}", tmp_path / f"p{i}", config) for i in range(3)]
    assert compiled_names == ["p0"]
    layers = model.layers_of("p0")
    rows = sum(la.shared_of("p0").sigma.numel() + la.weight_out_in().shape[0] for la in layers)
    compiled = [compile_adapter(model, f"p{i}") for i in range(3)]
    for i, folder in enumerate(folders):
        assert file_tensors(folder) == {"flat.float32": (rows,)}  # δ (Σm) and b (Σd1), once
        assert_same_forms(read_forms(folder), compiled[i])
    bank = model._banked["p0"]
    with torch.no_grad():  # forms and files copy the slot: reusing it changes neither
        for table in bank.storage.values():
            table[bank.slots["p0"]].add_(1.0)
    assert_same_forms(read_forms(folders[0]), compiled[0])
    assert not torch.equal(
        compile_adapter(model, "p0")[layers[0].layer_name].terms[0].outer,
        compiled[0][layers[0].layer_name].terms[0].outer,
    )


@pytest.mark.parametrize("method", linear_methods())
def test_packed_adapters_of_every_method_read_back_as_compiled(method, tmp_path, svd_cache):
    """Methods without the all-layers shortcut compile per layer; either way each of two
    adapters of one bank reads back as its own forms (no layout of another adapter reused)."""
    model = packed_model(lambda: METHOD_CONFIGS[method](TARGETS), 2, svd_cache)
    config = tiny_llama().config
    for name in ("p0", "p1"):
        folder = write_vllm_adapter(model, name, tmp_path / name, config)
        assert_same_forms(read_forms(folder), compile_adapter(model, name))


def test_a_view_of_a_table_row_stores_the_row_and_views_of_a_vector_it_once(tmp_path):
    table = torch.randn(50, 8)  # like a slot bank: never stored whole
    vector = torch.randn(16)
    forms = {
        "row": LayerForm(8, 8, output_scale=OutputScale(table[3].view(1, 8))),
        "left": LayerForm(8, 8, output_scale=OutputScale(vector[:8].view(1, 8))),
        "right": LayerForm(8, 8, output_scale=OutputScale(vector[8:].view(1, 8))),
    }
    save_forms(forms, tmp_path / "f.safetensors", lambda p, f: None)
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        assert f.get_tensor("flat.float32").numel() == 8 + 16
    assert_same_forms(load_forms(tmp_path / "f.safetensors", lambda n: None), forms)


def test_a_place_outside_the_flat_tensor_is_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    from svda.server.engine_vllm.form_file import META_KEY

    delta = {"type": "OutputScale", "tensors": {"delta": ["float32", 6, [1, 4]]}, "refs": {},
             "values": {}}  # fmt: skip
    layout = {"l": {"d_in": 4, "d_out": 4, "n_slots": 1, "sides": {"output_scale": delta},
                    "terms": []}}  # fmt: skip
    save_file({"flat.float32": torch.zeros(8)}, str(tmp_path / "f.safetensors"),
              {META_KEY: json.dumps(layout)})  # fmt: skip
    with pytest.raises(ValueError, match="outside the file's float32 data"):
        load_forms(tmp_path / "f.safetensors", lambda n: None)
    layout["l"]["sides"]["output_scale"]["tensors"]["delta"][1] = -2
    save_file({"flat.float32": torch.zeros(8)}, str(tmp_path / "g.safetensors"),
              {META_KEY: json.dumps(layout)})  # fmt: skip
    with pytest.raises(ValueError, match="bad place"):
        load_forms(tmp_path / "g.safetensors", lambda n: None)


def _delta(stacked, x, slots, w0):
    """What the vLLM layer adds for tokens ``x`` at ``slots`` (float32 stacks)."""
    from svda.server.engine_vllm.slices import stacked_delta

    out0 = x @ w0.T
    delta = stacked_delta(stacked, x, out0, slots, lambda dtype: w0.to(dtype))
    return torch.zeros_like(out0) if delta is None else delta


@pytest.mark.parametrize("method", linear_methods())
def test_a_form_read_from_a_file_is_written_in_place_as_decoded(method, tmp_path, svd_cache):
    """Slot updates from forms files (not decoded: write plans from the file's flat tensor for
    scales, bias deltas and shared-basis terms; decoded for the rest) equal a fresh stack, and
    a plan made for one adapter serves the next ones of the layout without decoding them."""
    from svda.server.engine_vllm.form_file import FormsFile
    from svda.server.engine_vllm.forms import read_forms_file
    from svda.server.engine_vllm.slices import stack_slice
    from svda.server.engine_vllm.slot_update import update_slot

    model = packed_model(lambda: METHOD_CONFIGS[method](TARGETS), 4, svd_cache)
    config = tiny_llama().config
    files = [
        read_forms_file(write_vllm_adapter(model, f"p{i}", tmp_path / f"p{i}", config))
        for i in range(4)
    ]
    lazy = [f.lazy() for f in files]
    decoded = []
    original = FormsFile.form
    slots = torch.tensor([0, 1, -1, 0, 1, 1])
    try:

        def counting(self, layer):  # decodes, not calls (a decoded layer is kept)
            if layer not in self._forms:
                decoded.append(layer)
            return original(self, layer)

        FormsFile.form = counting
        for layer in lazy[0]:
            stacked = stack_slice([lazy[0][layer], lazy[1][layer]], torch.float32)
            w0 = model.layers[layer].weight_out_in()
            x = torch.randn(len(slots), w0.shape[1])
            for i in (2, 3):  # p2 makes the plan (decoded once), p3 reuses it
                decoded.clear()
                assert update_slot(stacked, 0, lazy[i][layer])
                planned = method in ("svda", "vera", "ia3", "bitfit")
                assert decoded == ([] if planned and i == 3 else [layer])
                fresh = stack_slice([files[i].form(layer), files[1].form(layer)], torch.float32)
                torch.testing.assert_close(
                    _delta(stacked, x, slots, w0), _delta(fresh, x, slots, w0)
                )
    finally:
        FormsFile.form = original


def test_a_planned_write_refuses_a_component_outside_the_cut(tmp_path, svd_cache):
    from svda.server.engine_vllm.forms import read_forms_file
    from svda.server.engine_vllm.slices import stack_slice
    from svda.server.engine_vllm.slot_update import update_slot

    model = packed_model(lambda: SvdaConfig(targets=TARGETS), 3, svd_cache)
    with torch.no_grad():
        for name in ("p0", "p1"):
            model.prune_adapter(name, 10.0)  # every component dropped: the stacks cut them all
    config = tiny_llama().config
    files = [
        read_forms_file(write_vllm_adapter(model, f"p{i}", tmp_path / f"p{i}", config))
        for i in range(3)
    ]
    for layer in files[0].layout:
        stacked = stack_slice([files[0].lazy()[layer], files[1].lazy()[layer]], torch.float32)
        assert stacked.bases[0].kept is not None
        assert update_slot(stacked, 0, files[1].lazy()[layer])  # fits: makes the plan
        assert not update_slot(stacked, 0, files[2].lazy()[layer])  # δ where the cut has none
