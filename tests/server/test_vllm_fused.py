"""The whole-layer decode plan of the vLLM plugin (server/engine_vllm/fused.py), without vLLM:
for a packed q,k,v layer it adds what the per-slice path adds (every method whose forms it
takes), leaves base rows bit for bit, and declines what it does not take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from svda.runtime import AdapterModel, SvdBasisCache
from svda.runtime.methods import linear_methods
from svda.runtime.serving_form import compile_adapter
from svda.server.engine_vllm.fused import LayerPlan, plan_layer
from svda.server.engine_vllm.slices import BatchLayout, stack_slice, stacked_delta
from tests.runtime.helpers import METHOD_CONFIGS, perturb, tiny_llama

TARGETS = "q_proj,v_proj"
PACKED = ("q_proj", "k_proj", "v_proj")  # vLLM's qkv_proj: k holds no form
SLOTS = torch.tensor([2, -1, 0, 2, 3, -1, 0])  # slot 1 holds no form; slot 3 another adapter
ROTATING = {"boft", "hybrid", "urnn"}  # input or output rotations: the per-slice path


@pytest.fixture
def svd_cache(tmp_path) -> SvdBasisCache:
    return SvdBasisCache(tmp_path / "svd")


def _packed_layer(methods: list[str | None], svd_cache, dtype=torch.float32, layer: int = 0):
    """Stacked slices ``(stacked, start, size)`` of layer ``layer``'s q, k, v for adapters of
    ``methods`` in slots 0.. (None: an empty slot), and the packed weight ``W0 (D, d_in)``."""
    model = AdapterModel(tiny_llama(), svd_cache=svd_cache)
    names = []
    for i, method in enumerate(methods):
        names.append(None if method is None else f"a{i}")
        if method is not None:
            model.add_adapter(f"a{i}", METHOD_CONFIGS[method](TARGETS))
            perturb(model, f"a{i}", seed=3 + i)
    forms = {n: compile_adapter(model, n) for n in names if n is not None}
    prefix = f"model.layers.{layer}.self_attn"
    slices, weights, start = [], [], 0
    for leaf in PACKED:
        name = f"{prefix}.{leaf}"
        per_slot = [None if n is None else forms[n].get(name) for n in names]
        weight = model.model.get_submodule(name).weight.detach()
        stacked = stack_slice(per_slot, dtype) if any(per_slot) else None
        slices.append((stacked, start, weight.shape[0]))
        weights.append(weight)
        start += weight.shape[0]
    return slices, torch.cat(weights)


def _layout(slots: torch.Tensor, n_slots: int) -> BatchLayout:
    used = frozenset(int(k) for k in slots if k >= 0)
    uniform = int(slots[0]) if len(set(slots.tolist())) == 1 and used else None  # as the plugin
    return BatchLayout(used, torch.where(slots < 0, n_slots, slots), uniform)


def _per_slice(slices, x, y, layout, weight, bias=None):
    """What the plugin's per-slice path adds (``layers._apply_lora_to_output``)."""
    y = y.clone()
    for stacked, start, size in slices:
        if stacked is None:
            continue
        part = y[:, start : start + size]
        out0 = part if bias is None else part - bias[start : start + size]
        w0 = weight[start : start + size]
        delta = stacked_delta(
            stacked, x, out0, layout.slots[: len(x)], lambda d, w=w0: w.to(d), layout
        )
        if delta is not None:
            part += delta
    return y


def _inputs(weight, dtype, bias=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(SLOTS), weight.shape[1], generator=generator).to(dtype)
    y = F.linear(x, weight.to(dtype), None if bias is None else bias)
    return x, y


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("method", linear_methods())
def test_the_layer_plan_adds_what_the_slices_add(method, with_bias, svd_cache):
    slices, weight = _packed_layer([method, None, method, method], svd_cache)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(1)) * 0.1
    bias = bias if with_bias else None
    layout = _layout(SLOTS, 4)
    x, y = _inputs(weight, torch.float32, bias)
    want = _per_slice(slices, x, y, layout, weight, bias)
    plan = plan_layer(slices, layout, len(x), torch.float32, bias)
    if method in ROTATING:
        assert plan is None
        return
    assert plan is not None
    got = y.clone()
    plan.apply(x, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    base = SLOTS < 0
    assert torch.equal(got[base], y[base]), "base rows moved"
    assert torch.equal(got[SLOTS == 1], y[SLOTS == 1]), "the empty slot moved its rows"
    assert torch.equal(got[:, 32:48], y[:, 32:48]), "k (no form) moved"


@pytest.mark.parametrize("method", ["svda", "vera", "lora", "dora"])
def test_bfloat16_plan_within_rounding_of_the_slices(method, svd_cache):
    slices, weight = _packed_layer([method, None, method, method], svd_cache, torch.bfloat16)
    layout = _layout(SLOTS, 4)
    x, y = _inputs(weight, torch.bfloat16)
    want = _per_slice(slices, x, y, layout, weight)
    plan = plan_layer(slices, layout, len(x), torch.bfloat16)
    got = y.clone()
    plan.apply(x, got)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(got[SLOTS < 0], y[SLOTS < 0])


def test_shared_bases_are_made_once_per_slot_composition(svd_cache):
    """A second layout over the same stacks reuses the stacked bases (a prepacked GEMM keyed
    by the weight object stays valid); the rows are gathered anew."""
    slices, _ = _packed_layer(["svda", None, "svda", "svda"], svd_cache)
    memo: dict = {}
    first = plan_layer(slices, _layout(SLOTS, 4), len(SLOTS), torch.float32, None, memo)
    other = torch.tensor([0, 0, 3, -1])
    second = plan_layer(slices, _layout(other, 4), len(other), torch.float32, None, memo)
    assert first.shared is second.shared and first.shared is not None
    assert second.inner.shape[0] == len(other)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(
    "methods",
    [
        ("lora", "svda"),
        ("vera", "dora"),
        ("svda", "vera", "lora", "dora"),
        ("dora", "ia3", "bitfit"),
    ],
    ids="+".join,
)
def test_slots_of_several_methods_in_a_slice_are_planned_together(methods, with_bias, svd_cache):
    """A slice whose slots hold several methods (one layout group each): the groups' rows add,
    each token's other groups reading their zero rows; what the per-slice path adds."""
    order = [methods[i % len(methods)] for i in range(4)]
    slices, weight = _packed_layer([order[0], None, *order[1:]], svd_cache)
    assert any(s is not None and len(s.groups) > 1 for s, *_ in slices)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(2)) * 0.1
    bias = bias if with_bias else None
    slots = torch.tensor([2, -1, 0, 3, 4, -1, 0, 4, 1])
    layout = _layout(slots, 5)
    x, y = _inputs(weight, torch.float32, bias)
    x = torch.cat([x, x[:2]])
    y = F.linear(x, weight, bias)
    plan = plan_layer(slices, layout, len(slots), torch.float32, bias)
    assert plan is not None
    got = y.clone()
    plan.apply(x, got)
    torch.testing.assert_close(got, _per_slice(slices, x, y, layout, weight, bias))
    assert torch.equal(got[slots < 0], y[slots < 0]), "base rows moved"
    assert torch.equal(got[slots == 1], y[slots == 1]), "the empty slot moved its rows"


def test_four_methods_in_a_slice_in_bfloat16_within_rounding(svd_cache):
    slices, weight = _packed_layer(
        ["svda", None, "vera", "lora", "dora"], svd_cache, torch.bfloat16
    )
    slots = torch.tensor([2, -1, 0, 3, 4, -1, 0])
    layout = _layout(slots, 5)
    x, y = _inputs(weight, torch.bfloat16)
    plan = plan_layer(slices, layout, len(slots), torch.bfloat16)
    got = y.clone()
    plan.apply(x, got)
    want = _per_slice(slices, x, y, layout, weight)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(got[slots < 0], y[slots < 0])


def test_a_rotating_group_in_the_batch_takes_the_per_slice_path(svd_cache):
    slices, _ = _packed_layer(["lora", None, "boft"], svd_cache)
    assert plan_layer(slices, _layout(torch.tensor([0, 2]), 3), 2, torch.float32) is None
    assert plan_layer(slices, _layout(torch.tensor([0, 0, -1]), 3), 3, torch.float32) is not None


def test_prefill_sized_batches_of_several_slots_take_the_per_slice_path(svd_cache):
    slices, _ = _packed_layer(["lora", "lora"], svd_cache)
    slots = torch.arange(65) % 2
    assert plan_layer(slices, _layout(slots, 2), 65, torch.float32) is None
    assert plan_layer(slices, _layout(slots, 2), 64, torch.float32) is not None


@pytest.mark.parametrize("method", ["svda", "vera", "lora", "dora", "bitfit", "ia3"])
def test_a_batch_of_one_slot_gathers_its_row_once_for_any_size(method, svd_cache):
    """Every token at one slot (a single request's prefill or decode): one row per table,
    broadcast over the tokens, whatever their number; what the per-slice path adds."""
    slices, weight = _packed_layer([method, None, method], svd_cache)
    generator = torch.Generator().manual_seed(5)
    for n in (1, 100):
        slots = torch.full((n,), 2)
        layout = _layout(slots, 3)
        assert layout.uniform == 2
        x = torch.randn(n, weight.shape[1], generator=generator)
        y = F.linear(x, weight)
        plan = plan_layer(slices, layout, n, torch.float32)
        assert plan is not None and plan.uniform
        assert all(t is None or t.shape[0] == 1 for t in (plan.scale, plan.a_tok, plan.inner))
        got = y.clone()
        plan.apply(x, got)
        torch.testing.assert_close(got, _per_slice(slices, x, y, layout, weight))


def test_a_layout_without_any_slot_of_the_layer_adds_nothing(svd_cache):
    slices, weight = _packed_layer(["lora", None, "lora"], svd_cache)
    slots = torch.tensor([1, -1, 1])  # slot 1 holds no form on this layer
    plan = plan_layer(slices, _layout(slots, 3), 3, torch.float32)
    assert plan == LayerPlan()
    x, y = _inputs(weight, torch.float32)
    got = y[:3].clone()
    plan.apply(x[:3], got)
    assert torch.equal(got, y[:3])


def test_a_model_dtype_other_than_the_stacks_takes_the_per_slice_path(svd_cache):
    slices, _ = _packed_layer(["lora", "lora"], svd_cache, torch.float32)
    assert plan_layer(slices, _layout(SLOTS[:3] % 2, 2), 3, torch.bfloat16) is None


def test_an_output_scale_beside_a_bias_delta_scales_the_base_product_only():
    """IA³ on a layer with a bias: ``y = (1 + s) ⊙ W0x + b0 + β``, in one slice and beside an
    empty one."""
    from svda.runtime.serving_form.primitives import BiasDelta, LayerForm, OutputScale

    generator = torch.Generator().manual_seed(4)

    def form():
        scale = OutputScale(torch.randn(1, 6, generator=generator))
        return LayerForm(4, 6, 1, output_scale=scale, bias=BiasDelta(torch.randn(1, 6)))

    slices = [(stack_slice([form(), form()], torch.float32), 0, 6), (None, 6, 2)]
    weight, bias = torch.randn(8, 4, generator=generator), torch.randn(8, generator=generator)
    slots = torch.tensor([1, -1, 0])
    layout = _layout(slots, 2)
    x = torch.randn(3, 4, generator=generator)
    y = F.linear(x, weight, bias)
    plan = plan_layer(slices, layout, 3, torch.float32, bias)
    got = y.clone()
    plan.apply(x, got)
    torch.testing.assert_close(got, _per_slice(slices, x, y, layout, weight, bias))
    assert torch.equal(got[1], y[1])


def test_a_slice_of_several_groups_is_planned_from_the_group_the_batch_uses(svd_cache):
    """Slots refilled with another method one by one leave a stack of two layout groups; a
    batch whose tokens all sit in one of them is planned (from that group)."""
    slices, weight = _packed_layer(["lora", None, "dora", "dora"], svd_cache)
    assert all(s is None or len(s.groups) == 2 for s, *_ in slices)
    slots = torch.tensor([2, -1, 3, 3, -1])
    layout = _layout(slots, 4)
    x, y = _inputs(weight, torch.float32)
    x, y = x[: len(slots)], y[: len(slots)]
    plan = plan_layer(slices, layout, len(slots), torch.float32)
    assert plan is not None and plan.scale is not None  # DoRA's magnitude
    got = y.clone()
    plan.apply(x, got)
    torch.testing.assert_close(got, _per_slice(slices, x, y, layout, weight))
    assert torch.equal(got[slots < 0], y[slots < 0])


def test_plan_keys_one_plan_per_slot_or_per_layout_content():
    """A layer keeps one plan per slot for one-slot batches (prefill and decode share it), one
    per layout content and size otherwise, and none for large batches of several slots."""
    from svda.server.engine_vllm.fused import plan_key

    one = BatchLayout(frozenset({2}), torch.full((3,), 2), 2, ("ids", 3))
    assert plan_key(one, 3) == plan_key(one, 500) == ("one", 2)
    mixed = BatchLayout(frozenset({0, 2}), torch.tensor([0, 2]), None, ("ids", 2))
    assert plan_key(mixed, 2) == (("ids", 2), 2)
    assert plan_key(mixed, 65) is None
    assert plan_key(object(), 2) is None  # no host-side layout: the per-slice path


@pytest.mark.parametrize("slots", [[1, -1, 0, 1], [1, 1, 1]], ids=["per-token", "one-slot"])
def test_several_dense_terms_per_slice_feed_that_slice_only(slots):
    """Two low-rank terms in one slice, one in another, a slice between without any: each
    slice's block adds its own terms' products (rows of ``h`` in term order), what the
    per-slice path adds, and nothing lands in the slice between."""
    from svda.runtime.serving_form.primitives import LayerForm, LowRank

    generator = torch.Generator().manual_seed(7)

    def low_rank(d_out: int, r: int) -> LowRank:
        return LowRank(torch.randn(1, r, 5, generator=generator), torch.randn(1, d_out, r))

    def form(d_out: int, ranks: tuple[int, ...]) -> LayerForm:
        return LayerForm(5, d_out, 1, terms=tuple(low_rank(d_out, r) for r in ranks))

    first = stack_slice([form(6, (2, 3)), form(6, (2, 3))], torch.float32)
    last = stack_slice([form(4, (2,)), form(4, (2,))], torch.float32)
    slices = [(first, 0, 6), (None, 6, 3), (last, 9, 4)]
    weight = torch.randn(13, 5, generator=generator)
    slots = torch.tensor(slots)
    layout = _layout(slots, 2)
    x = torch.randn(len(slots), 5, generator=generator)
    y = F.linear(x, weight)
    plan = plan_layer(slices, layout, len(slots), torch.float32)
    assert [(b.start, b.rows) for b in plan.b_blocks] == [(0, slice(0, 5)), (9, slice(5, 7))]
    got = y.clone()
    plan.apply(x, got)
    torch.testing.assert_close(got, _per_slice(slices, x, y, layout, weight))
    assert torch.equal(got[:, 6:9], y[:, 6:9])
    assert torch.equal(got[slots < 0], y[slots < 0])


def test_dense_terms_of_groups_of_different_ranks_add_zero_padded():
    """Two layout groups of one slice with low-rank terms of ranks 2 and 3 (one of them beside
    an output scale): one per-token factor pair of rank 3, what the per-slice path adds."""
    from svda.runtime.serving_form.primitives import LayerForm, LowRank, OutputScale

    generator = torch.Generator().manual_seed(9)

    def form(r: int, scaled: bool) -> LayerForm:
        term = LowRank(torch.randn(1, r, 5, generator=generator), torch.randn(1, 6, r))
        scale = OutputScale(torch.randn(1, 6, generator=generator)) if scaled else None
        return LayerForm(5, 6, 1, terms=(term,), output_scale=scale)

    stacked = stack_slice([form(2, False), form(3, True), form(2, False)], torch.float32)
    assert len(stacked.groups) == 2
    slices = [(stacked, 0, 6), (None, 6, 2)]
    weight = torch.randn(8, 5, generator=generator)
    slots = torch.tensor([1, 0, -1, 2, 1])
    layout = _layout(slots, 3)
    x = torch.randn(len(slots), 5, generator=generator)
    y = F.linear(x, weight)
    plan = plan_layer(slices, layout, len(slots), torch.float32)
    assert plan.a_tok.shape[1] == 3 and [b.rows for b in plan.b_blocks] == [slice(0, 3)]
    got = y.clone()
    plan.apply(x, got)
    torch.testing.assert_close(got, _per_slice(slices, x, y, layout, weight))
    assert torch.equal(got[slots < 0], y[slots < 0])
