"""Continuous batching: mixed adapters in one batch, rows joining mid-way, streaming."""

from __future__ import annotations

import time

from svda.server.domain import FinishReason
from tests.server.engine_helpers import (
    metric,
    reference_tokens,
    request,
    running_engine,
    submit,
)

PROMPTS = ["Hello there", "The quick brown fox", "a", "Adapters, many of them!"]


def test_mixed_adapters_in_one_batch_equal_single_generation(tiny_folder, tiny_base, store,
                                                              adapter_bytes):  # fmt: skip
    cases = [
        (aid, prompt) for aid in ("lora-a", "svda-b", None) for prompt in PROMPTS[:2] + PROMPTS[3:]
    ]
    expected = [
        reference_tokens(tiny_folder, adapter_bytes[a] if a else None, p, 12) for a, p in cases
    ]
    # the adapters really change the output, so equality below is not vacuous
    assert expected[0] != expected[6] and expected[3] != expected[6]
    with running_engine(tiny_base, store, start=False, merge_policy="never") as engine:
        engine.load_adapter("lora-a")
        engine.load_adapter("svda-b")
        collectors = [submit(engine, request(a, p, 12)) for a, p in cases]
        engine.start()  # all nine requests are waiting: they join the first batch together
        completions = [c.wait() for c in collectors]
    for collector, completion, want in zip(collectors, completions, expected, strict=True):
        assert collector.token_ids == want
        assert completion.completion_tokens == len(want)
        assert completion.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
        assert not completion.merged
    # the first decode step served all nine rows at once
    assert metric(engine, "svda_batch_size_bucket", le="8.0") < metric(
        engine, "svda_batch_size_count"
    )


def test_requests_join_a_running_batch(tiny_folder, tiny_base, store, adapter_bytes):
    first_expected = reference_tokens(tiny_folder, adapter_bytes["svda-b"], PROMPTS[1], 60)
    later = [("lora-a", PROMPTS[0]), (None, PROMPTS[3]), ("svda-b", PROMPTS[2])]
    later_expected = [
        reference_tokens(tiny_folder, adapter_bytes[a] if a else None, p, 10) for a, p in later
    ]
    with running_engine(tiny_base, store, merge_policy="never") as engine:
        engine.load_adapter("lora-a")
        first = submit(engine, request("svda-b", PROMPTS[1], 60))
        deadline = time.monotonic() + 30
        while len(first.token_ids) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not first.finished.is_set()
        collectors = [submit(engine, request(a, p, 10)) for a, p in later]
        for collector in collectors:
            collector.wait()
        joined_while_running = not first.finished.is_set()
        first.wait()
    assert joined_while_running
    assert first.token_ids == first_expected
    for collector, want in zip(collectors, later_expected, strict=True):
        assert collector.token_ids == want


def test_stream_chunks_concatenate_to_the_completion(tiny_base, store):
    with running_engine(tiny_base, store) as engine:
        collector = submit(engine, request("lora-a", "Stream me", 30))
        completion = collector.wait()
    assert collector.chunks, "no chunks were streamed"
    assert collector.text == completion.text
    assert len(collector.token_ids) == completion.completion_tokens
    assert completion.prompt_tokens == len("Stream me")  # byte tokenizer: one token per byte
    assert completion.time_to_first_token_s <= completion.latency_s
    assert (
        metric(engine, "svda_tokens_generated_total", path="unmerged")
        + metric(engine, "svda_tokens_generated_total", path="merged")
        == completion.completion_tokens
    )
