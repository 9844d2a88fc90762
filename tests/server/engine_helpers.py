"""Helpers for engine tests: collecting events, reference generations, running engines."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from svda.adapters_store import load_adapter
from svda.runtime import AdapterModel
from svda.server.domain import Completion, GenerationRequest, SamplingParams, TokenChunk
from svda.server.engine import Engine, EngineSettings
from svda.server.metrics import Metrics
from tests.server.conftest import load_tiny


class Collector:
    """An ``on_event`` callback that records events and signals the last one."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.finished = threading.Event()

    def __call__(self, event: object) -> None:
        self.events.append(event)
        if isinstance(event, (Completion, BaseException)):
            self.finished.set()

    def wait(self, timeout: float = 30.0) -> Completion:
        assert self.finished.wait(timeout), "the request did not finish in time"
        last = self.events[-1]
        if isinstance(last, BaseException):
            raise last
        return last

    @property
    def chunks(self) -> list[TokenChunk]:
        return [e for e in self.events if isinstance(e, TokenChunk)]

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kwargs)


def request(adapter_id: str | None, prompt: str, n: int = 8, **kwargs) -> GenerationRequest:
    params = kwargs.pop("params", None) or greedy(n)
    return GenerationRequest(adapter_id=adapter_id, prompt=prompt, params=params, **kwargs)


def reference_tokens(folder, data: bytes | None, prompt: str, n: int) -> list[int]:
    """The runtime's own greedy generation for one unpadded prompt (one adapter or the base)."""
    base = load_tiny(folder)
    model = AdapterModel(base.model)
    rows = None
    if data is not None:
        load_adapter(data, model, "ref")
        rows = ["ref"]
    ids = base.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, adapter_rows=rows, do_sample=False, max_new_tokens=n,
            pad_token_id=base.tokenizer.pad_token_id,
        )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


@contextmanager
def running_engine(base, store, start: bool = True, **settings):
    """An engine with fresh metrics, stopped at the end (``start=False``: start it yourself,
    e.g. after queuing requests that must all join the first batch)."""
    metrics = Metrics()
    settings.setdefault("svda_prune_tolerance", 0.0)  # exact: outputs compare token for token
    engine = Engine(base, store, EngineSettings(**settings), metrics=metrics)
    if start:
        engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def submit(engine: Engine, req: GenerationRequest) -> Collector:
    collector = Collector()
    engine.submit(req, collector)
    return collector


def metric(engine: Engine, name: str, **labels) -> float:
    value = engine.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value
