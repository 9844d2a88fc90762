"""``svda serve --engine vllm --dtype bfloat16`` end to end: the gRPC API on the vLLM backend
(base loaded by the server in bfloat16), rows against the native engine in bfloat16.

bf16 greedy decoding of two engines may part at a near-tie (different matmul kernels and
summation orders), so base rows must agree on their first tokens (``AGREE``), not on all."""

from __future__ import annotations

import pytest
import torch

from svda.adapters_store import AdapterStore, export_adapter, publish_adapter
from svda.client import Client
from svda.client.types import TokenChunk
from svda.runtime import AdapterModel, load_base_model
from svda.server.app import BackgroundServer
from svda.server.settings import ServerSettings
from tests.runtime.helpers import perturb
from tests.server.conftest import METHOD_CONFIGS
from tests.server.engine_helpers import Collector, request, running_engine

N, AGREE = 10, 4
ROWS = ((None, "Hello there"), ("lora", "Hello there"), ("svda", "The capital of"))


def _grpc_tokens(port: int) -> list[list[int]]:
    client = Client(f"127.0.0.1:{port}")
    rows = []
    for adapter, prompt in ROWS:
        events = client.stream(prompt, adapter=adapter, max_new_tokens=N, temperature=0.0)
        rows.append([t for e in events if isinstance(e, TokenChunk) for t in e.token_ids])
    return rows


@pytest.fixture(scope="module")
def bf16_store(vllm_folder, tmp_path_factory):
    """LoRA and SvdA adapters made on the bfloat16 base (a base's fingerprint is per dtype)."""
    store = AdapterStore(tmp_path_factory.mktemp("vllm-bf16-store"))
    for i, method in enumerate(("lora", "svda")):
        model = AdapterModel(load_base_model(vllm_folder, dtype=torch.bfloat16).model)
        model.add_adapter("a", METHOD_CONFIGS[method]())
        perturb(model, "a", scale=0.5, seed=20 + i)
        publish_adapter(store, export_adapter(model, "a", name=method), method)
    return store


@pytest.mark.slow
def test_grpc_on_vllm_bf16_agrees_with_native_bf16(vllm_folder, bf16_store):
    vllm_store = bf16_store
    settings = ServerSettings(
        host="127.0.0.1", port=0, metrics_port=None, model=str(vllm_folder),
        store=vllm_store.root, engine="vllm", dtype="bfloat16", vllm_max_loras=2,
        vllm_max_compiled=3, svda_prune_tolerance=0.0,
    )  # fmt: skip
    server = BackgroundServer(settings, store=vllm_store).start(timeout=600)
    try:
        assert server.server.engine.native.base.model.dtype == torch.bfloat16
        assert server.server.engine.options.max_compiled == 3
        got = _grpc_tokens(server.port)
    finally:
        server.stop()
    base = load_base_model(vllm_folder, dtype=torch.bfloat16)
    with running_engine(base, vllm_store) as native:
        want = []
        for adapter, prompt in ROWS:
            collector = Collector()
            native.submit(request(adapter, prompt, n=N), collector)
            collector.wait(120)
            want.append(collector.token_ids)
    # adapter rows: the native bf16 layers add a float32 delta (their output is float32 from
    # the first adapted layer on), vLLM computes it in bf16: within bf16 tolerance, so the
    # first tokens agree, as for the base rows
    for (adapter, _), g, w in zip(ROWS, got, want, strict=True):
        assert g[:AGREE] == w[:AGREE], f"{adapter or 'base'}: vllm {g} vs native {w}"
    assert got[1] != got[0]
