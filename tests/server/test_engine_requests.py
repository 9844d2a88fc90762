"""Requests: stop strings, sampling, chat prompts, cancellation, deadlines, errors, logs."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from svda.adapters_store import AdapterStore, BaseMismatch, publish_adapter
from svda.adapters_store.store_types import AdapterNotFound
from svda.server.domain import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    SamplingParams,
)
from svda.server.engine import Engine, EngineSettings
from tests.server.conftest import make_adapter
from tests.server.engine_helpers import Collector, greedy, metric, request, running_engine, submit
from tests.tiny_base import tiny_base_folder


def test_stop_string_ends_the_request_and_is_not_emitted(tiny_base, store):
    with running_engine(tiny_base, store) as engine:
        full = submit(engine, request(None, "Tell me", 40)).wait()
        assert full.finish_reason == FinishReason.LENGTH
        found = re.search(r"[!-~]{2}", full.text[3:])  # printable text to stop on
        assert found, f"no printable pair in {full.text!r}"
        stop = found.group()
        params = greedy(40, stop=(stop, "\x00never"))
        collector = submit(engine, request(None, "Tell me", params=params))
        completion = collector.wait()
    assert completion.finish_reason == FinishReason.STOP
    assert completion.text == full.text[: full.text.find(stop)]
    assert collector.text == completion.text
    assert stop not in collector.text


def test_seeded_sampling_repeats_and_differs_from_greedy(tiny_base, store):
    params = SamplingParams(max_new_tokens=24, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    with running_engine(tiny_base, store) as engine:
        runs = [submit(engine, request("svda-b", "Sample", params=params)) for _ in range(2)]
        greedy_run = submit(engine, request("svda-b", "Sample", 24))
        tokens = [c.wait() and c.token_ids for c in [*runs, greedy_run]]
    assert tokens[0] == tokens[1]  # same seed, batched together or not
    assert tokens[0] != tokens[2]


def test_chat_messages_use_the_chat_template(tiny_base, store):
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    with running_engine(tiny_base, store) as engine:
        req = GenerationRequest(None, messages=messages, params=greedy(4))
        completion = submit(engine, req).wait()
        text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        text += "<|im_start|>assistant\n"
        assert completion.prompt_tokens == len(
            engine.tokenizer(text, add_special_tokens=False).input_ids
        )
        with pytest.raises(InvalidRequest, match="role"):
            engine.submit(
                GenerationRequest(None, messages=(ChatMessage("robot", "x"),)), Collector()
            )


def _slow(collector: Collector, delay: float = 0.005):
    def on_event(event):
        time.sleep(delay)  # runs on the scheduler thread: slows every step down
        collector(event)

    return on_event


def test_cancel_frees_the_row_within_a_step(tiny_base, store):
    with running_engine(tiny_base, store) as engine:
        collector = Collector()
        handle = engine.submit(request("lora-a", "go", 200), _slow(collector))
        other = submit(engine, request(None, "other", 200))
        while metric(engine, "svda_tokens_generated_total", path="unmerged") < 6:
            time.sleep(0.001)
        handle.cancel()
        completion = collector.wait(5)
        assert completion.finish_reason == FinishReason.CANCELLED
        assert completion.completion_tokens < 200
        assert other.wait().finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
        deadline = time.monotonic() + 5  # the gauge is set at the end of the step
        while metric(engine, "svda_running_requests") and time.monotonic() < deadline:
            time.sleep(0.001)
        assert metric(engine, "svda_running_requests") == 0
        assert engine.scheduler.cache.batch_size == 0


def test_deadline_in_queue_and_while_running(tiny_base, store):
    with running_engine(tiny_base, store) as engine:
        expired = submit(engine, request(None, "late", 10, deadline=time.monotonic() - 1))
        assert expired.wait().finish_reason == FinishReason.CANCELLED
        assert expired.wait().completion_tokens == 0
        collector = Collector()
        engine.submit(request(None, "slow", 200, deadline=time.monotonic() + 0.3), _slow(collector))
        completion = collector.wait(10)
    assert completion.finish_reason == FinishReason.CANCELLED
    assert 0 < completion.completion_tokens < 200


@pytest.mark.parametrize(
    ("req", "match"),
    [
        (request(None, "x", params=SamplingParams(temperature=-1)), "temperature"),
        (request(None, "x", params=SamplingParams(max_new_tokens=0)), "max_new_tokens"),
        (request(None, "x" * 250, 10), "context length 256"),
        (request(None, ""), "empty"),
        (GenerationRequest(None, prompt="a", messages=(ChatMessage("user", "b"),)), "exactly one"),
        (request("bad/id", "x"), "invalid"),
    ],
)
def test_bad_requests_are_refused_before_queuing(tiny_base, store, req, match):
    engine = Engine(tiny_base, store, EngineSettings(svda_prune_tolerance=0.0))
    with pytest.raises(InvalidRequest, match=match):
        engine.submit(req, Collector())
    assert not engine.scheduler.waiting


def test_unknown_adapter_base_mismatch_and_overload(tmp_path, tiny_base, store):
    other_base = tiny_base_folder(tmp_path / "other", seed=1)
    publish_adapter(store, make_adapter(other_base, "lora"), "foreign")
    engine = Engine(tiny_base, store, EngineSettings(max_waiting=1, svda_prune_tolerance=0.0))
    with pytest.raises(AdapterNotFound, match="nope"):
        engine.submit(request("nope", "x"), Collector())
    with pytest.raises(BaseMismatch, match="foreign"):
        engine.submit(request("foreign", "x"), Collector())
    engine.submit(request(None, "x"), Collector())  # not started: it waits
    with pytest.raises(Overloaded, match="waiting"):
        engine.submit(request(None, "y"), Collector())
    engine.stop()


def test_a_corrupt_adapter_fails_its_request_only(tmp_path, tiny_base, adapter_bytes):
    store = AdapterStore(tmp_path / "store")
    publish_adapter(store, adapter_bytes["lora-a"], "lora-a")
    entry = publish_adapter(store, adapter_bytes["svda-b"], "broken")
    path = store.root / "objects" / f"{entry.sha256}.svda"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with running_engine(tiny_base, store) as engine:
        good = submit(engine, request("lora-a", "fine", 20))
        bad = submit(engine, request("broken", "doomed", 20))
        with pytest.raises(Exception, match="corrupt"):
            bad.wait()
        assert good.wait().completion_tokens > 0
        assert submit(engine, request(None, "still fine", 5)).wait().completion_tokens > 0
        assert metric(engine, "svda_adapter_loads_total", result="error") == 1


def test_one_json_log_line_per_request(tiny_base, store, caplog):
    req = request("svda-b", "log me", 6, tenant=None, request_id="req-1")
    with (
        caplog.at_level(logging.INFO, logger="svda.server.requests"),
        running_engine(tiny_base, store) as engine,
    ):
        submit(engine, req).wait()
    records = [json.loads(r.message) for r in caplog.records if r.name == "svda.server.requests"]
    assert len(records) == 1
    record = records[0]
    assert record["request_id"] == "req-1" and record["adapter_id"] == "svda-b"
    assert record["prompt_tokens"] == 6 and record["completion_tokens"] <= 6
    assert {"tenant", "finish_reason", "merged", "latency_s", "ttft_s"} <= set(record)


def test_base_mismatch_found_at_load_time_is_reported(tmp_path, tiny_base, store):
    foreign = make_adapter(tiny_base_folder(tmp_path / "other", seed=1), "lora")
    engine = Engine(tiny_base, store, EngineSettings(svda_prune_tolerance=0.0))
    # an index row that claims this base (the file itself names the other one)
    store.publish(foreign, "lying", method="lora", base_fingerprint=engine.model.fingerprint.whole)
    engine.start()
    try:
        with pytest.raises(BaseMismatch, match="lying"):
            submit(engine, request("lying", "x", 4)).wait()
    finally:
        engine.stop()


def test_info_describes_the_engine(tiny_base, store):
    engine = Engine(
        tiny_base,
        store,
        EngineSettings(max_batch_size=4, max_new_tokens_limit=100, svda_prune_tolerance=0.0),
    )
    info = engine.info()
    assert info.base_fingerprint == engine.model.fingerprint.whole
    assert {"lora", "svda", "vera"} <= set(info.methods)
    assert (info.max_context_tokens, info.max_new_tokens, info.max_batch_size) == (256, 100, 4)
    assert info.max_upload_bytes == 0
    engine.stop()
