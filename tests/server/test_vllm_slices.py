"""What the vLLM plugin's layers apply, without vLLM: per-slot forms stacked once per slot
composition (server/engine_vllm/slices.py) and adapter folders whose shared bases are written
once (server/engine_vllm/forms.py). Every stacked slice equals the per-slot reference row by
row; base rows and empty slots add exact zeros."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from svda.runtime import AdapterModel, SvdBasisCache
from svda.runtime.methods import linear_methods
from svda.runtime.serving_form import compile_adapter, reference_forward
from svda.runtime.serving_form.primitives import LowRank
from svda.server.engine_vllm import slices
from svda.server.engine_vllm.forms import SHARED_DIR, read_forms, write_vllm_adapter
from svda.server.engine_vllm.slices import (
    BatchLayout,
    kept_cuts,
    slice_delta,
    stack_slice,
    stacked_delta,
    used_components,
)
from tests.runtime.helpers import METHOD_CONFIGS, perturb, tiny_llama

TARGETS = "q_proj,v_proj,down_proj"
SLOTS = torch.tensor([2, -1, 0, 2, 1, -1, 0])  # slot 1 holds no form (a PEFT adapter, or none)


@pytest.fixture
def svd_cache(tmp_path) -> SvdBasisCache:
    return SvdBasisCache(tmp_path / "svd")


def _model(methods: list[str], svd_cache, seed: int = 1) -> AdapterModel:
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    for i, method in enumerate(methods):
        model.add_adapter(f"a{i}", METHOD_CONFIGS[method](TARGETS))
        perturb(model, f"a{i}", seed=seed + i)
    return model


def _slice_delta(stacked, x, out0, weight, layout=None):
    """What the vLLM layer computes for one slice (``layers._slice_delta``)."""

    def weight_for(dtype):
        return None if weight is None else weight.to(dtype)

    delta = stacked_delta(stacked, x, out0, SLOTS, weight_for, layout)
    return torch.zeros_like(out0) if delta is None else delta


def _batch_layout(slots: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, BatchLayout]:
    """What the plugin makes of a batch: the tokens' slots with the base as ``n_slots``."""
    used = frozenset(int(k) for k in slots if k >= 0)
    nonnegative = torch.where(slots < 0, n_slots, slots)
    return nonnegative, BatchLayout(used, nonnegative)


def _check_layers(model: AdapterModel, names: list[str | None], dense_limit: int = 1024):
    forms = {n: compile_adapter(model, n) for n in names if n is not None}
    generator = torch.Generator().manual_seed(0)
    for layer in model.layers_of(next(n for n in names if n)):
        per_slot = [None if n is None else forms[n][layer.layer_name] for n in names]
        stacked = stack_slice(per_slot, torch.float32, dense_limit=dense_limit)
        w0 = layer.weight_out_in()
        x = torch.randn(len(SLOTS), layer.shape[1], generator=generator)
        out0 = F.linear(x, w0)
        got = out0 + _slice_delta(stacked, x, out0, w0, layout=1)
        again = out0 + _slice_delta(stacked, x, out0, w0, layout=1)  # gathered rows reused
        assert torch.equal(got, again)
        slots, layout = _batch_layout(SLOTS, len(names))  # the plugin's host-side layout
        via_layout = stacked_delta(stacked, x, out0, slots, lambda d, w=w0: w.to(d), layout)
        assert torch.equal(got, out0 + via_layout)
        assert set().union(*(g.present for g in stacked.groups or (stacked,))) == {
            i for i, n in enumerate(names) if n is not None
        }
        assert torch.equal(got[SLOTS < 0], out0[SLOTS < 0]), "base rows moved"
        assert torch.equal(got[SLOTS == 1], out0[SLOTS == 1]), "the empty slot moved its rows"
        for row, k in enumerate(SLOTS.tolist()):
            if k >= 0 and per_slot[k] is not None:
                want = reference_forward(per_slot[k], x[row : row + 1], torch.tensor([0]), w0)[0]
                torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-5)
    return stacked


@pytest.mark.parametrize("few_tokens", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("dense_limit", [1024, 0], ids=["concatenated", "gathered"])
@pytest.mark.parametrize("method", linear_methods())
def test_stacked_slice_equals_the_reference_per_row(
    method, dense_limit, few_tokens, svd_cache, monkeypatch
):
    """Decode (few tokens: factors gathered per token, float32 products) and prefill (many:
    one-hot masked dense products) give the per-slot reference."""
    monkeypatch.setattr(slices, "GATHER_MAX_TOKENS", 64 if few_tokens else 0)
    model = _model([method, method], svd_cache)
    stacked = _check_layers(model, ["a0", None, "a1"], dense_limit)
    assert stacked.form is not None and stacked.table.tolist() == [0, 3, 2, 3]  # row per slot
    layer = list(compile_adapter(model, "a0").values())[-1]
    low_rank = sum(isinstance(t, LowRank) for t in layer.terms)
    assert len(stacked.dense) == (low_rank if dense_limit else 0)
    assert sum(isinstance(t, LowRank) for t in stacked.form.terms) == (
        0 if dense_limit else low_rank
    )


@pytest.mark.parametrize("pair", [("lora", "svda"), ("svda", "boft"), ("vera", "dora")])
def test_slots_of_different_methods_stack_one_group_per_layout(pair, svd_cache):
    model = _model(list(pair), svd_cache)
    stacked = _check_layers(model, ["a0", None, "a1"])
    assert stacked.form is None and len(stacked.groups) == 2
    assert [g.table.tolist() for g in stacked.groups] == [[0, 3, 3, 3], [3, 3, 2, 3]]


def test_groups_in_bf16_keep_each_layouts_dtype_and_update_in_place(svd_cache):
    """LoRA (bf16) beside BOFT (float32: a rotation) on one layer; a new LoRA adapter in the
    LoRA slot is written in place, one of another method asks for a restack."""
    from svda.server.engine_vllm.slot_update import update_slot

    model = _model(["lora", "boft", "lora", "svda"], svd_cache)
    forms = {n: compile_adapter(model, n) for n in ("a0", "a1", "a2", "a3")}
    generator = torch.Generator().manual_seed(4)
    for layer in model.layers_of("a0"):
        name, w0 = layer.layer_name, layer.weight_out_in()
        if name not in forms["a1"]:
            continue
        stacked = stack_slice([forms["a0"][name], None, forms["a1"][name]], torch.bfloat16)
        assert [g.dtype for g in stacked.groups] == [torch.bfloat16, torch.float32]
        assert update_slot(stacked, 0, forms["a2"][name])
        assert not update_slot(stacked, 2, forms["a3"][name])  # SvdA: no such group
        x = torch.randn(len(SLOTS), layer.shape[1], generator=generator)
        out0 = F.linear(x, w0)
        _check_rows(stacked, x, out0, w0, {0: forms["a2"][name], 2: forms["a1"][name]})
        assert update_slot(stacked, 2, forms["a0"][name])  # LoRA into the BOFT slot: moves
        assert stacked.groups[1].table.tolist() == [3, 3, 3, 3]
        _check_rows(stacked, x, out0, w0, {0: forms["a2"][name], 2: forms["a0"][name]})


def test_a_stack_no_token_uses_is_skipped(svd_cache):
    """A layout group whose slots all moved away (or that no token of the batch uses) adds
    nothing and is not computed."""
    from svda.server.engine_vllm.slot_update import update_slot

    model = _model(["lora", "svda", "lora"], svd_cache)
    forms = {n: compile_adapter(model, n) for n in ("a0", "a1", "a2")}
    layer = next(iter(model.layers_of("a0")))
    name, w0 = layer.layer_name, layer.weight_out_in()
    stacked = stack_slice([forms["a0"][name], None, forms["a1"][name]], torch.float32)
    assert update_slot(stacked, 2, forms["a2"][name])  # the SvdA group is left without a slot
    x = torch.randn(len(SLOTS), layer.shape[1], generator=torch.Generator().manual_seed(6))
    out0 = F.linear(x, w0)
    calls = []
    original = slices.slice_delta
    slices.slice_delta = lambda part, *a, **k: calls.append(part) or original(part, *a, **k)
    try:
        got = out0 + _slice_delta(stacked, x, out0, w0, layout=7)
    finally:
        slices.slice_delta = original
    assert calls == [stacked.groups[0]]
    assert [g.present for g in stacked.groups] == [{0, 2}, set()]
    calls.clear()
    slots, layout = _batch_layout(SLOTS, 3)
    slices.slice_delta = lambda part, *a, **k: calls.append(part) or original(part, *a, **k)
    try:
        via_layout = out0 + stacked_delta(stacked, x, out0, slots, None, layout)
    finally:
        slices.slice_delta = original
    assert calls == [stacked.groups[0]] and torch.equal(via_layout, got)  # idle: host-side
    fresh = stack_slice([forms["a0"][name], None, forms["a2"][name]], torch.float32)
    torch.testing.assert_close(got, out0 + _slice_delta(fresh, x, out0, w0))
    base_only = torch.full_like(SLOTS, -1)
    assert stacked_delta(stacked, x, out0, base_only, None, layout=8) is None
    slots, layout = _batch_layout(base_only, 3)
    assert stacked_delta(stacked, x, out0, slots, None, layout) is None


def _check_rows(stacked, x, out0, w0, held: dict):
    """bf16 slice rows against the reference of the form each slot holds (``held``)."""
    got = out0 + _slice_delta(stacked, x.bfloat16(), out0.bfloat16(), w0).float()
    for row, k in enumerate(SLOTS.tolist()):
        form = held.get(k)
        want = out0[row]
        if form is not None:
            want = reference_forward(form, x[row : row + 1], torch.tensor([0]), w0)[0]
        torch.testing.assert_close(got[row], want, rtol=3e-2, atol=3e-2)


def test_unused_svda_components_are_cut_exactly(svd_cache):
    model = _model(["svda", "svda"], svd_cache)
    for name in ("a0", "a1"):  # keep 3 components moved in a0, 2 (others) in a1: δ = 0 elsewhere
        for layer in model.layers_of(name):
            weights = layer.weights_of(name)
            keep = [0, 2, 5] if name == "a0" else [1, 2]
            s, sigma = weights.svda_s.data, layer.shared_of(name).sigma[: weights.k]
            mask = torch.zeros_like(s, dtype=torch.bool)
            mask[keep] = True
            s.copy_(torch.where(mask, s + 0.3, sigma))
    _check_layers(model, ["a0", None, "a1"])
    forms = [compile_adapter(model, n) for n in ("a0", "a1")]
    layer = next(iter(model.layers_of("a0"))).layer_name
    term = stack_slice([forms[0][layer], forms[1][layer]], torch.float32).form.terms[0]
    assert term.A.shape[0] == 4 and term.B.shape[1] == 4  # components 0, 1, 2, 5
    assert used_components(forms[0][layer])[0].terms[0].inner.shape[1] == 3


@pytest.mark.parametrize("method", ["lora", "svda", "boft", "urnn"])
def test_bfloat16_model_computes_in_bf16_except_rotations(method, svd_cache):
    model = _model([method], svd_cache)
    layer = next(iter(model.layers_of("a0"))).layer_name
    stacked = stack_slice([compile_adapter(model, "a0")[layer]], torch.bfloat16)
    rotates = method in ("boft", "urnn")
    assert stacked.dtype == (torch.float32 if rotates else torch.bfloat16)
    floats = [t for p in stacked.form.primitives() for t in vars(p).values()
              if isinstance(t, torch.Tensor) and t.is_floating_point()]  # fmt: skip
    floats += [t for term in stacked.dense for t in term]
    assert floats and all(t.dtype == stacked.dtype for t in floats)


def test_no_form_in_any_slot_is_none():
    assert stack_slice([None, None], torch.float32) is None


def test_adapter_folders_share_their_bases_on_disk_and_in_memory(tmp_path, svd_cache):
    model = _model(["svda", "svda", "vera"], svd_cache)
    config = tiny_llama().config
    folders = [write_vllm_adapter(model, n, tmp_path / n, config) for n in ("a0", "a1", "a2")]
    shared = sorted((tmp_path / SHARED_DIR).iterdir())
    n_layers = len(list(model.layers_of("a0")))
    # SvdA: Vᵀ and U once per layer for both adapters; VeRA: A, B per distinct slice
    assert n_layers * 2 < len(shared) <= n_layers * 4, [p.name for p in shared]
    sizes = [sum(p.stat().st_size for p in f.iterdir()) for f in folders[:2]]
    assert max(sizes) * 4 < sum(p.stat().st_size for p in shared)  # folders hold no basis
    read = [read_forms(f) for f in folders]
    for name, form in compile_adapter(model, "a1").items():
        term, got = form.terms[0], read[1][name].terms[0]
        assert got.A is read[0][name].terms[0].A and got.B is read[0][name].terms[0].B
        assert torch.equal(got.A, term.A) and torch.equal(got.inner, term.inner)
    assert read_forms(tmp_path) is None  # not an svda folder: a plain PEFT adapter


def test_vllm_lora_targets_are_the_linear_layers_not_the_head(svd_cache):
    """vLLM wraps only these for LoRA (embeddings and logits skip its LoRA work), wrapped by an
    attached adapter or not."""
    from svda.server.engine_vllm.vllm_setup import linear_layer_names
    from tests.runtime.helpers import tiny_gpt2

    llama = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    model = _model(["lora"], svd_cache)  # q_proj, v_proj, down_proj wrapped
    assert linear_layer_names(model.model) == llama
    assert linear_layer_names(tiny_gpt2()) == ["c_attn", "c_fc", "c_proj"]


@pytest.mark.parametrize("method", linear_methods())
def test_a_new_adapter_in_a_held_slot_is_written_in_place(method, svd_cache):
    """A hot swap writes the new adapter's rows in place: the slice then equals a fresh stack."""
    from svda.server.engine_vllm.slot_update import update_slot

    model = _model([method] * 3, svd_cache)
    forms = {n: compile_adapter(model, n) for n in ("a0", "a1", "a2")}
    generator = torch.Generator().manual_seed(5)
    for layer in model.layers_of("a0"):
        name, w0 = layer.layer_name, layer.weight_out_in()
        stacked = stack_slice([forms["a0"][name], None, forms["a1"][name]], torch.float32)
        assert update_slot(stacked, 2, forms["a2"][name])
        assert update_slot(stacked, 1, forms["a1"][name])  # a slot that held nothing
        assert update_slot(stacked, 0, None)  # a slot emptied (a plain PEFT adapter there)
        fresh = stack_slice([None, forms["a1"][name], forms["a2"][name]], torch.float32)
        x = torch.randn(len(SLOTS), layer.shape[1], generator=generator)
        out0 = F.linear(x, w0)
        torch.testing.assert_close(
            _slice_delta(stacked, x, out0, w0),
            _slice_delta(fresh, x, out0, w0),
            rtol=1e-5,
            atol=1e-6,
        )


def test_a_slot_update_that_does_not_fit_asks_for_a_restack(svd_cache):
    from svda.runtime import LoraConfig
    from svda.server.engine_vllm.slot_update import update_slot

    model = _model(["lora", "lora", "svda"], svd_cache)
    model.add_adapter("wide", LoraConfig(targets=TARGETS, r=16))
    forms = {n: compile_adapter(model, n) for n in ("a0", "a1", "a2", "wide")}
    name = next(iter(model.layers_of("a0"))).layer_name
    stacked = stack_slice([forms["a0"][name], forms["a1"][name]], torch.float32)
    assert not update_slot(stacked, 1, forms["a2"][name])  # another method
    assert not update_slot(stacked, 1, forms["wide"][name])  # a larger rank
    assert not update_slot(None, 0, forms["a1"][name])  # nothing stacked yet
    assert update_slot(stacked, 1, None) and stacked.table.tolist() == [0, 2, 2]  # emptied
    svda = _model(["svda", "svda"], svd_cache)
    for n, keep in (("a0", [0, 1]), ("a1", [2])):  # a1 moves a component a0's cut dropped
        for layer in svda.layers_of(n):
            w = layer.weights_of(n)
            sigma = layer.shared_of(n).sigma[: w.k]
            w.svda_s.data.copy_(sigma)
            w.svda_s.data[keep] += 0.3
    sv = {n: compile_adapter(svda, n) for n in ("a0", "a1")}
    name = next(iter(svda.layers_of("a0"))).layer_name
    stacked = stack_slice([sv["a0"][name], sv["a0"][name]], torch.float32)
    assert not update_slot(stacked, 1, sv["a1"][name])
    # the restack keeps the former cut: a0 can come back into either slot in place
    both = stack_slice([sv["a0"][name], sv["a1"][name]], torch.float32, keep=kept_cuts(stacked))
    again = stack_slice([sv["a1"][name], sv["a1"][name]], torch.float32, keep=kept_cuts(both))
    assert again.form.terms[0].inner.shape[1] == 3  # components 0, 1 (kept) and 2
    assert update_slot(again, 0, sv["a0"][name]) and update_slot(again, 1, sv["a0"][name])
    fresh = stack_slice([sv["a0"][name], sv["a0"][name]], torch.float32)
    layer = next(iter(svda.layers_of("a0")))
    x = torch.randn(len(SLOTS), layer.shape[1], generator=torch.Generator().manual_seed(2))
    out0 = F.linear(x, layer.weight_out_in())
    torch.testing.assert_close(
        _slice_delta(again, x, out0, None), _slice_delta(fresh, x, out0, None)
    )


@pytest.mark.parametrize("method", linear_methods())
def test_forms_survive_the_adapter_folder_for_every_method(method, tmp_path, svd_cache):
    """write_vllm_adapter / read_forms (safetensors and JSON, no pickle) give back every
    primitive, field for field."""
    from dataclasses import fields

    model = _model([method], svd_cache)
    folder = write_vllm_adapter(model, "a0", tmp_path / "a0", tiny_llama().config)
    assert not list(folder.glob("*.pt")), "a pickle in the adapter folder"
    got, want = read_forms(folder), compile_adapter(model, "a0")
    assert set(got) == set(want)
    for name, form in want.items():
        assert got[name].kinds() == form.kinds() and got[name].n_slots == form.n_slots
        for p, q in zip(got[name].primitives(), form.primitives(), strict=True):
            for f in fields(q):
                a, b = getattr(p, f.name), getattr(q, f.name)
                assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, f.name


def test_a_forms_file_with_an_unknown_primitive_is_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    from svda.server.engine_vllm.form_file import META_KEY, load_forms

    layout = {"l": {"d_in": 2, "d_out": 2, "n_slots": 1, "sides": {},
                    "terms": [{"type": "os.system", "tensors": [], "refs": {}, "values": {}}]}}  # fmt: skip
    save_file(
        {"x": torch.zeros(1)}, str(tmp_path / "f.safetensors"), {META_KEY: json.dumps(layout)}
    )
    with pytest.raises(ValueError, match="unknown serving-form primitive"):
        load_forms(tmp_path / "f.safetensors", lambda name: torch.zeros(1))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "g.safetensors"))
    with pytest.raises(ValueError, match="holds no svda serving forms"):
        load_forms(tmp_path / "g.safetensors", lambda name: torch.zeros(1))


@pytest.mark.parametrize("moved", [True, False])
def test_bf16_shared_bases_through_the_packed_gemm(moved, svd_cache):
    """The vLLM layers multiply the shared bases with cpu_gemm.packed_linear (oneDNN when vLLM
    is installed): the same delta as F.linear in bfloat16, also for a basis cut to no component
    (SvdA that moved only b)."""
    from svda.server.engine_vllm.cpu_gemm import packed_linear

    model = _model(["svda", "vera"], svd_cache)
    if not moved:
        for layer in model.layers_of("a0"):
            w = layer.weights_of("a0")
            w.svda_s.data.copy_(layer.shared_of("a0").sigma[: w.k])
    generator = torch.Generator().manual_seed(3)
    for name in ("a0", "a1"):
        forms = compile_adapter(model, name)
        for layer in model.layers_of(name):
            stacked = stack_slice([forms[layer.layer_name]] * 3, torch.bfloat16)
            x = torch.randn(len(SLOTS), layer.shape[1], generator=generator).bfloat16()
            out0 = F.linear(x, layer.weight_out_in().bfloat16())
            want = slice_delta(stacked, x, out0, SLOTS, None, None, F.linear)
            got = slice_delta(stacked, x, out0, SLOTS, None, None, packed_linear)
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", linear_methods())
def test_the_planned_gather_equals_gather_slots(method, svd_cache):
    """A stack's :class:`FormGather` (planned once) gives what ``gather_slots`` gives, field for
    field, and keeps a tensor two fields share shared."""
    from dataclasses import fields

    from svda.runtime.serving_form import gather_slots

    model = _model([method, method], svd_cache)
    forms = {n: compile_adapter(model, n) for n in ("a0", "a1")}
    rows = torch.tensor([1, 0, 2, 2, 1])  # row 2: the zero row
    for name in forms["a0"]:
        stacked = stack_slice([forms["a0"][name], forms["a1"][name]], torch.float32, dense_limit=0)
        got, want = stacked.gather(rows), gather_slots(stacked.form, rows)
        assert got.kinds() == want.kinds() and got.n_slots == want.n_slots == len(rows)
        for p, q in zip(got.primitives(), want.primitives(), strict=True):
            for f in fields(q):
                a, b = getattr(p, f.name), getattr(q, f.name)
                assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, f.name
        if method == "svda":
            assert got.output_scale.delta is got.terms[0].outer


@pytest.mark.parametrize("method", linear_methods())
def test_a_batch_of_one_slot_uses_that_row_alone(method, svd_cache):
    """Every token at one slot (a layout with ``uniform``): the slot's row as views and plain
    products for dense low-rank terms give what the per-token gather gives."""
    model = _model([method, method], svd_cache)
    forms = {n: compile_adapter(model, n) for n in ("a0", "a1")}
    generator = torch.Generator().manual_seed(9)
    for layer in model.layers_of("a0"):
        name, w0 = layer.layer_name, layer.weight_out_in()
        for dense_limit in (1024, 0):
            stacked = stack_slice(
                [forms["a0"][name], None, forms["a1"][name]], torch.float32, dense_limit=dense_limit
            )
            x = torch.randn(5, layer.shape[1], generator=generator)
            out0 = F.linear(x, w0)
            slots = torch.full((5,), 2)
            general = BatchLayout(frozenset({2}), slots)
            one = BatchLayout(frozenset({2}), slots, uniform=2)
            want = stacked_delta(stacked, x, out0, slots, lambda d, w=w0: w.to(d), general)
            got = stacked_delta(stacked, x, out0, slots, lambda d, w=w0: w.to(d), one)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert "one" in stacked.cache
