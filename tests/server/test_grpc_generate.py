"""End to end over a real localhost socket: generation, streaming, concurrency, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from svda.client import AsyncClient, Client, Completion, DeadlineExceeded, TokenChunk
from tests.server.engine_helpers import reference_tokens
from tests.server.grpc_fixtures import grpc_server, metric, target, wait_until

PROMPTS = {None: "hello there", "lora-a": "the cat sat", "svda-b": "adapters!"}
N = 8


@pytest.fixture
def server(tiny_base, store):
    with grpc_server(tiny_base, store) as server:
        yield server


async def _stream_tokens(client: AsyncClient, adapter: str | None) -> tuple[list[int], Completion]:
    ids, done = [], None
    async for event in client.stream(PROMPTS[adapter], adapter=adapter, max_new_tokens=N):
        if isinstance(event, TokenChunk):
            ids.extend(event.token_ids)
        else:
            done = event
    return ids, done


def test_base_and_two_adapters_concurrently_match_the_runtime(server, tiny_folder, adapter_bytes):
    async def run():
        async with AsyncClient(target(server)) as client:
            # each adapter twice, all at once: they share batches on the server
            jobs = [_stream_tokens(client, a) for a in PROMPTS for _ in range(2)]
            unary = [client.generate(PROMPTS[a], adapter=a, max_new_tokens=N) for a in PROMPTS]
            return await asyncio.gather(*jobs), await asyncio.gather(*unary)

    streamed, unary = asyncio.run(run())
    for i, adapter in enumerate(a for a in PROMPTS for _ in range(2)):
        expected = reference_tokens(tiny_folder, adapter_bytes.get(adapter), PROMPTS[adapter], N)
        ids, done = streamed[i]
        assert ids == expected, adapter
        assert done.completion_tokens == N and done.finish_reason == "length"
        assert done.adapter_id == adapter
    for (_, done), completion in zip(streamed[::2], unary, strict=True):
        assert completion.text == done.text  # unary and streamed agree
    assert metric(server, "svda_requests_total", rpc="GenerateStream", status="OK") == 6


def test_stream_chunks_then_one_completion(server):
    with Client(target(server)) as client:
        events = list(client.stream(messages=[("user", "hi")], max_new_tokens=6))
        plain = client.generate(messages=[{"role": "user", "content": "hi"}], max_new_tokens=6)
    chunks, done = events[:-1], events[-1]
    assert isinstance(done, Completion) and all(isinstance(c, TokenChunk) for c in chunks)
    assert sum(len(c.token_ids) for c in chunks) == done.completion_tokens == 6
    assert "".join(c.text for c in chunks) == done.text == plain.text
    assert done.prompt_tokens > 6  # the chat template was applied on the server
    assert done.request_id and done.time_to_first_token_s <= done.latency_s


def test_cancelled_stream_frees_its_slot(server):
    with Client(target(server)) as client:
        stream = client.stream("a long story", max_new_tokens=200)
        first = next(stream)
        assert isinstance(first, TokenChunk)
        stream.close()  # the client goes away mid-stream
        wait_until(
            lambda: (
                metric(server, "svda_requests_total", rpc="GenerateStream", status="CANCELLED") == 1
            ),
            what="the server to see the cancellation",
        )
        wait_until(lambda: metric(server, "svda_running_requests") == 0, what="the slot")
        # a deadline frees the slot too
        with pytest.raises(DeadlineExceeded):
            client.generate("story", max_new_tokens=240, timeout=0.1)
        wait_until(lambda: metric(server, "svda_running_requests") == 0, what="the slot")
        assert client.generate("still serving", max_new_tokens=2).completion_tokens == 2
