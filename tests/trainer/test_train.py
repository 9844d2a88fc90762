"""The training loop on a tiny random Llama: learning, outputs, reproducibility, resume."""

from __future__ import annotations

import pytest
import torch

from svda.adapters_store import load_adapter, read_adapter
from svda.runtime import AdapterModel, available_methods, get_method, load_base_model
from svda.trainer import TrainConfig, TrainConfigError, TrainerHook, train
from tests.trainer.helpers import assert_payload_close, payload, run


@pytest.mark.parametrize("method", ["svda", "vera", "lora"])
def test_loss_falls_and_adapter_changes_outputs(tmp_path, tiny_base, toy_data, method):
    result = run(tmp_path, tiny_base, toy_data, method, max_steps=30, lr=0.1, val_fraction=0.25)
    losses = [row["loss"] for row in result.log]
    # the tiny random base's logits are nearly flat (ln 259 ≈ 5.56): a 0.15 nat drop is learning
    assert sum(losses[-5:]) / 5 < losses[0] - 0.15, losses
    assert result.summary["best_val_loss"] < result.log[0]["loss"]
    # the exported adapter, attached to a fresh copy of the base, changes the logits
    fresh = load_base_model(tiny_base)
    ids = fresh.tokenizer(["word: red\n"], return_tensors="pt").input_ids
    before = fresh.model(ids).logits
    model = AdapterModel(fresh.model)
    load_adapter(result.adapter_bytes, model, "trained")
    model.set_adapter("trained")
    after = model(ids).logits
    assert (after - before).abs().max() > 1e-2
    assert (tmp_path / f"run-{method}" / "loss.png").stat().st_size > 1000


def test_same_seed_same_adapter_bytes(tmp_path, tiny_base, toy_data):
    a = run(tmp_path / "a", tiny_base, toy_data, "svda", val_fraction=0.2)
    b = run(tmp_path / "b", tiny_base, toy_data, "svda", val_fraction=0.2)
    c = run(tmp_path / "c", tiny_base, toy_data, "svda", val_fraction=0.2, seed=1)
    header_a, header_b = read_adapter(a.adapter_bytes).header, read_adapter(b.adapter_bytes).header
    assert header_a.payload_sha256 == header_b.payload_sha256
    assert header_a.model_dump(exclude={"created"}) == header_b.model_dump(exclude={"created"})
    assert read_adapter(c.adapter_bytes).header.payload_sha256 != header_a.payload_sha256


class StopAt(TrainerHook):
    """Simulates Ctrl-C after optimizer step ``n``."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, ctx, step, row):
        if step == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["svda", "lora", "hybrid"])
def test_resume_after_interrupt_matches_uninterrupted(tmp_path, tiny_base, toy_data, method):
    kw = dict(max_steps=9, checkpoint_every=3, warmup_steps=2, schedule="cosine", val_fraction=0.2)
    full = run(tmp_path / "full", tiny_base, toy_data, method, **kw)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", tiny_base, toy_data, method, hooks=[StopAt(5)], **kw)
    resumed = run(tmp_path / "cut", tiny_base, toy_data, method, resume=True, **kw)
    assert [r["step"] for r in resumed.log] == list(range(1, 10))
    assert_payload_close(full.adapter_bytes, resumed.adapter_bytes)
    assert resumed.log[-1]["loss"] == pytest.approx(full.log[-1]["loss"], rel=1e-5)
    if method == "hybrid":  # λ per layer: the resumed run's log continues, without repeats
        full_csv, cut_csv = (tmp_path / n / "run-hybrid" / "lambda.csv" for n in ("full", "cut"))
        assert full_csv.read_text() == cut_csv.read_text()


def test_resume_without_checkpoint_says_what_to_do(tmp_path, tiny_base, toy_data):
    from svda.trainer.checkpointing import ResumeError

    with pytest.raises(ResumeError, match="--checkpoint-every"):
        run(tmp_path, tiny_base, toy_data, "lora", resume=True)


def test_grad_accumulation_equals_one_big_batch(tmp_path, tiny_base, toy_data):
    big = run(tmp_path / "big", tiny_base, toy_data, "lora", batch_size=8, grad_accum=1)
    acc = run(tmp_path / "acc", tiny_base, toy_data, "lora", batch_size=2, grad_accum=4)
    assert_payload_close(big.adapter_bytes, acc.adapter_bytes, rel=1e-3)


class Recorder(TrainerHook):
    def __init__(self):
        self.calls = []

    def before_training(self, ctx):
        batch = next(ctx.sample_batches(1))
        self.calls.append(("before", float(ctx.loss(batch).detach())))

    def after_backward(self, ctx, step):
        grads = [p.grad for p in ctx.params.values()]
        assert all(g is not None for g in grads)  # gradients are complete here
        return {"grad_sq": float(sum(g.pow(2).sum() for g in grads))}


def test_hooks_run_and_log(tmp_path, tiny_base, toy_data):
    hook = Recorder()
    result = run(tmp_path, tiny_base, toy_data, "lora", hooks=[hook], max_steps=3)
    assert hook.calls[0][0] == "before" and hook.calls[0][1] > 0
    assert all("grad_sq" in row and row["grad_sq"] > 0 for row in result.log)
    header = (tmp_path / "run-lora" / "steps.csv").read_text().splitlines()[0]
    assert "grad_sq" in header


def test_only_adapter_parameters_train(tmp_path, tiny_base, toy_data):
    result = run(tmp_path, tiny_base, toy_data, "svda", max_steps=2)
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n in trainable), trainable[:3]
    assert len(payload(result.adapter_bytes)) > 0


def test_bad_settings_fail_clearly(tmp_path, tiny_base, toy_data):
    with pytest.raises(TrainConfigError, match="no training data"):
        train(TrainConfig(method="lora", base=tiny_base, output_dir=str(tmp_path)))
    with pytest.raises(TrainConfigError, match="lora r=0 is out of range"):
        TrainConfig(method="lora", adapter={"r": 0}, data=toy_data).check_runnable()
    with pytest.raises(TrainConfigError, match="unknown adapter method"):
        TrainConfig(method="nope", data=toy_data).check_runnable()
    with pytest.raises(TrainConfigError, match="precision bf16 needs a GPU"):
        run(tmp_path, tiny_base, toy_data, "lora", precision="bf16", device="cpu")
    with pytest.raises(TrainConfigError, match="batch_size must be"):
        TrainConfig(batch_size=0)


def test_text_data_and_torch_state_untouched(tmp_path, tiny_base):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(f'{{"text": "abc abc abc {i}"}}\n' for i in range(8)))
    result = run(tmp_path, tiny_base, str(data), "vera", max_steps=2)
    assert result.summary["tokens"] > 0 and torch.is_grad_enabled()


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_and_exports(tmp_path, tiny_base, toy_data, method):
    adapter = {"targets": "mlp"} if get_method(method).weights_cls.target_kind == "block" else {}
    if method == "adalora":
        adapter = {"r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "delta_t": 1}
    result = run(tmp_path, tiny_base, toy_data, method, max_steps=4, lr=0.05, adapter=adapter)
    header = read_adapter(result.adapter_bytes).header
    assert header.method == method and len(result.log) == 4
    fresh = AdapterModel(load_base_model(tiny_base).model)
    load_adapter(result.adapter_bytes, fresh, "trained", probe="always")
    if method == "adalora":  # compacted to the final budget (a layer keeps at least one rank)
        ranks = header.config["layer_ranks"]
        assert all(r >= 1 for r in ranks.values())
        assert sum(ranks.values()) <= 2 * len(ranks) + sum(r == 1 for r in ranks.values())
    if method == "lora_ga":  # A0 comes from the gradient's SVD: rows of equal norm
        a0 = result.model.adapter_parameters(result.adapter)
        rows = next(v for k, v in a0.items() if k.endswith("lora_A0")).norm(dim=1)
        torch.testing.assert_close(rows, torch.full_like(rows, float(rows[0])), rtol=1e-4, atol=0)
