"""The merged path: same logits and tokens as the unmerged path; the policy; switching back."""

from __future__ import annotations

import time

import pytest
import torch

from svda.adapters_store import AdapterStore, publish_adapter
from svda.runtime import load_base_model
from svda.server.domain import MergeMode
from svda.server.engine.adapters import Key
from tests.server.conftest import make_adapter
from tests.server.engine_helpers import (
    Collector,
    metric,
    reference_tokens,
    request,
    running_engine,
    submit,
)


@torch.no_grad()
def test_merged_logits_equal_unmerged_logits(tiny_folder, store):
    base = load_base_model(tiny_folder)  # float32, as served
    with running_engine(base, store, merge_policy="never") as engine:
        ids = base.tokenizer(["merge me, please"], return_tensors="pt").input_ids
        for adapter_id in ("lora-a", "svda-b"):
            engine.load_adapter(adapter_id)
            name = engine.adapters.name_of(Key("", adapter_id, 1))
            unmerged = engine.model(ids, adapter_rows=[name]).logits
            base_logits = engine.model(ids, adapter_rows=[None]).logits
            engine.model.merge(name)
            merged = engine.model.model(ids).logits
            engine.model.unmerge()
            engine.model.set_adapter(None)
            assert (unmerged - base_logits).abs().max() > 1e-2  # the adapter matters
            assert torch.allclose(merged, unmerged, atol=1e-4, rtol=0)
            assert torch.allclose(engine.model.model(ids).logits, base_logits, atol=1e-5, rtol=0)


def test_single_adapter_work_is_served_merged(tiny_folder, tiny_base, store, adapter_bytes):
    want = reference_tokens(tiny_folder, adapter_bytes["svda-b"], "merged path", 12)
    with running_engine(tiny_base, store, merge_policy="always-single") as engine:
        collectors = [submit(engine, request("svda-b", "merged path", 12)) for _ in range(3)]
        completions = [c.wait() for c in collectors]
        assert engine.model.state.merged == engine.adapters.name_of(Key("", "svda-b", 1))
    for collector, completion in zip(collectors, completions, strict=True):
        assert completion.merged
        assert collector.token_ids == want
    assert metric(engine, "svda_merges_total", reason="single-adapter") == 1
    assert metric(engine, "svda_merged_steps_total") > 0
    assert metric(engine, "svda_tokens_generated_total", path="unmerged") == 0


def test_auto_policy(tiny_base, store):
    with running_engine(tiny_base, store, merge_policy="auto", merge_min_tokens=32) as engine:
        assert not submit(engine, request("svda-b", "short", 8)).wait().merged
        assert submit(engine, request("svda-b", "long", 40)).wait().merged
        assert metric(engine, "svda_merges_total", reason="single-adapter") == 1
        assert not submit(engine, request(None, "base", 4)).wait().merged
        assert engine.model.state.merged is None  # base work unmerged it
        asked = request("lora-a", "asked", 4, mode=MergeMode.MERGED)
        assert submit(engine, asked).wait().merged
        assert metric(engine, "svda_merges_total", reason="requested") == 1


def test_never_policy_and_unmerged_requests(tiny_base, store):
    asked = request("lora-a", "asked", 40, mode=MergeMode.MERGED)
    with running_engine(tiny_base, store, merge_policy="never") as engine:
        assert not submit(engine, asked).wait().merged
    refused = request("lora-a", "no merge", 40, mode=MergeMode.UNMERGED)
    with running_engine(tiny_base, store, merge_policy="always-single") as engine:
        assert not submit(engine, refused).wait().merged
    assert metric(engine, "svda_merges_total", reason="single-adapter") == 0


def test_other_work_unmerges_at_a_step_boundary(tiny_folder, tiny_base, store, adapter_bytes):
    long_want = reference_tokens(tiny_folder, adapter_bytes["svda-b"], "long one", 60)
    base_want = reference_tokens(tiny_folder, None, "base row", 10)
    lora_want = reference_tokens(tiny_folder, adapter_bytes["lora-a"], "lora row", 10)
    with running_engine(tiny_base, store, merge_policy="always-single") as engine:
        engine.load_adapter("lora-a")
        long_run = Collector()

        def slow(event):
            time.sleep(0.002)
            long_run(event)

        engine.submit(request("svda-b", "long one", 60), slow)
        while metric(engine, "svda_merged_steps_total") < 3:
            time.sleep(0.001)
        base_run = submit(engine, request(None, "base row", 10))
        lora_run = submit(engine, request("lora-a", "lora row", 10))
        base_done, lora_done = base_run.wait(), lora_run.wait()
        assert not long_run.finished.is_set()  # they ran beside it, unmerged
        long_done = long_run.wait()
    assert base_run.token_ids == base_want and lora_run.token_ids == lora_want
    assert long_run.token_ids == long_want
    assert not (base_done.merged or lora_done.merged or long_done.merged)


def test_loading_an_adapter_while_merged_uses_the_original_weights(tiny_folder, tiny_base, store):
    second = make_adapter(tiny_folder, "svda", seed=5)
    publish_adapter(store, second, "svda-c")
    want = reference_tokens(tiny_folder, second, "second", 8)
    with running_engine(tiny_base, store, merge_policy="always-single") as engine:
        assert submit(engine, request("svda-b", "first", 8)).wait().merged
        assert engine.model.state.merged is not None  # idle, still merged
        engine.load_adapter("svda-c")  # SVD bases must come from W0, not W0 + ΔW
        collector = submit(engine, request("svda-c", "second", 8))
        assert collector.wait().merged
    assert collector.token_ids == want


@pytest.mark.parametrize("method", ["pissa", "boft", "hybrid", "serial_adapter"])
def test_other_methods_are_served_and_only_mergeable_ones_merge(
    tiny_folder, tiny_base, method, tmp_path
):
    data = make_adapter(tiny_folder, method, seed=4)
    want = reference_tokens(tiny_folder, data, "other methods", 10)
    store = AdapterStore(tmp_path / "store")
    publish_adapter(store, data, method)
    with running_engine(tiny_base, store, merge_policy="always-single") as engine:
        collectors = [submit(engine, request(method, "other methods", 10)) for _ in range(2)]
        completions = [c.wait() for c in collectors]
    for collector, completion in zip(collectors, completions, strict=True):
        assert collector.token_ids == want
        assert completion.merged == (method != "serial_adapter")
