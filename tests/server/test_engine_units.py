"""Engine parts on their own: the batched KV cache, prefill grouping, sampling filters, streaming
detokenisation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from svda.server.domain import SamplingParams
from svda.server.engine.detok import TextStream
from svda.server.engine.kv_cache import BatchKVCache
from svda.server.engine.sampling import RowSampler, choose_tokens, top_k_filter, top_p_filter
from svda.server.engine.scheduler import prefill_groups
from svda.server.engine.settings import EngineSettings
from tests.runtime.helpers import tiny_llama
from tests.tiny_base import byte_tokenizer


# ----- KV cache ---------------------------------------------------------------------------------
def _prefill(model, prompt, cache):
    pre = DynamicCache()
    logits = model(prompt, past_key_values=pre, use_cache=True).logits
    cache.join(pre, torch.tensor([prompt.shape[1]]))
    return int(logits[0, -1].argmax())


@torch.no_grad()
def test_kv_cache_join_and_leave_match_unpadded_generation():
    torch.manual_seed(0)
    model = tiny_llama().double()
    prompts = [torch.randint(0, 96, (1, n)) for n in (5, 9, 3, 7)]
    joins = {0: [0, 1], 2: [2], 4: [3]}  # step -> prompts joining then
    steps = 10
    want = [
        model.generate(p, do_sample=False, max_new_tokens=steps, pad_token_id=0)[0, p.shape[1] :]
        for p in prompts
    ]
    cache, rows, last = BatchKVCache(model.config.num_hidden_layers), [], []
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(20):
        for i in joins.get(step, []):
            token = _prefill(model, prompts[i], cache)
            out[i].append(token)
            rows.append(i)
            last.append(token)
        if not rows:
            break
        mask, positions = cache.decode_inputs()
        cache.reserve(1)
        logits = model(
            torch.tensor(last)[:, None], attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True,
        ).logits  # fmt: skip
        cache.advance()
        last = logits[:, -1].argmax(-1).tolist()
        keep = []
        for j, (i, token) in enumerate(zip(rows, last, strict=True)):
            out[i].append(token)
            if len(out[i]) < steps:
                keep.append(j)
        rows, last = [rows[j] for j in keep], [last[j] for j in keep]
        cache.select(keep)
        assert cache.width == (int(cache.lengths.max()) if rows else 0)  # padding trimmed
    for i in range(len(prompts)):
        assert out[i] == want[i].tolist()


def test_kv_cache_grows_without_copy_per_step():
    model = tiny_llama()
    cache = BatchKVCache(model.config.num_hidden_layers)
    _prefill(model, torch.randint(0, 96, (1, 4)), cache)
    buffer = cache.layers[0].buf_k
    cache.reserve(1)
    assert cache.layers[0].buf_k is buffer  # headroom: no reallocation for the next token
    cache.layers[0].length = cache.capacity()
    cache.reserve(1)
    assert cache.capacity() > cache.layers[0].length


# ----- sampling ---------------------------------------------------------------------------------
def test_top_k_and_top_p_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [True, False, False, True]
    probs = torch.softmax(logits, -1)  # [0.087, 0.644, 0.237, 0.032]
    kept = ~torch.isinf(top_p_filter(logits, 0.7))
    assert kept.tolist() == [False, True, True, False]
    assert probs[1] < 0.7 <= probs[1] + probs[2]
    assert (~torch.isinf(top_p_filter(logits, 0.01))).sum() == 1


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    alone = [choose_tokens(logits[1:2], [RowSampler(params, [1, 2])])[0] for _ in range(1)]
    draws_a, draws_b = [], []
    sampler_a, sampler_b = RowSampler(params, [1, 2]), RowSampler(params, [1, 2])
    other = RowSampler(SamplingParams(temperature=0.7, seed=5), [3])
    for _ in range(20):
        draws_a.append(choose_tokens(logits[1:2], [sampler_a])[0])
        draws_b.append(choose_tokens(logits, [other, sampler_b, other])[1])
    assert draws_a == draws_b and draws_a[0] == alone[0]
    assert len(set(draws_a)) > 1  # it samples


def test_repetition_penalty_follows_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits = torch.randn(1, 20)
    history = [3, 5, 5, 7]
    want = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([history]), logits.clone())
    sampler = RowSampler(SamplingParams(repetition_penalty=1.5), history)
    assert torch.allclose(sampler._penalise(logits[0]), want[0])
    assert choose_tokens(logits, [sampler]) == [int(want[0].argmax())]


# ----- detokenisation ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_stream_never_emits_half_a_character(tok):
    stream = TextStream(tok, _ids(tok, "hi "))
    pieces = [stream.push(t) for t in _ids(tok, "aé€")]
    assert pieces == ["a", "", "é", "", "", "€"]
    assert stream.finish() == "" and stream.final_text == "aé€"


def test_stream_holds_back_stop_prefixes_and_cuts_the_stop(tok):
    stream = TextStream(tok, _ids(tok, "x"), stop=("ab", "zzz"))
    pieces = [stream.push(t) for t in _ids(tok, "xaca")]
    assert pieces == ["x", "", "ac", ""]
    assert stream.push(_ids(tok, "b")[0]) == "" and stream.stopped
    assert stream.final_text == "xac" and stream.finish() == ""


def test_stream_releases_held_text_at_the_end(tok):
    stream = TextStream(tok, [], stop=("END",))
    emitted = "".join(stream.push(t) for t in _ids(tok, "the EN"))
    assert emitted == "the " and stream.finish() == "EN" and stream.final_text == "the EN"


def test_stream_finish_decodes_an_incomplete_character(tok):
    stream = TextStream(tok, [])
    assert stream.push(_ids(tok, "é")[0]) == ""
    assert stream.finish() == "\ufffd"


def test_settings_are_checked():
    EngineSettings().validate()
    with pytest.raises(ValueError, match="merge_policy"):
        EngineSettings(merge_policy="sometimes").validate()
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineSettings(max_batch_size=0).validate()


def test_prefill_groups_pad_similar_prompts_together_and_long_ones_alone():
    seqs = [SimpleNamespace(prompt_ids=[0] * n) for n in (30, 28, 33, 400, 31, 5)]
    groups = [[len(s.prompt_ids) for s in g] for g in prefill_groups(seqs)]
    assert groups == [[5, 28, 30, 31, 33], [400]]
    assert prefill_groups([]) == []
