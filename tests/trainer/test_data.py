"""Reading, masking, splitting and batching training data."""

from __future__ import annotations

import json

import pytest

from svda.trainer.data import (
    IGNORE,
    DataError,
    collate,
    read_records,
    split_validation,
    step_examples,
    tokenize_records,
)
from tests.tiny_base import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_completion_masks_the_prompt(tmp_path, tok):
    path = write(tmp_path, "d.jsonl", [json.dumps({"prompt": "ab", "completion": "CD"})])
    (ex,) = tokenize_records(read_records(path), tok, 64)
    assert ex.input_ids == [*tok("abCD", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert ex.labels[:2] == [IGNORE, IGNORE]
    assert ex.labels[2:] == ex.input_ids[2:]  # completion + EOS carry the loss
    assert ex.prompt == "ab" and ex.reference == "CD"


def test_text_trains_every_token(tmp_path, tok):
    path = write(tmp_path, "d.jsonl", [json.dumps({"text": "hello"})])
    (ex,) = tokenize_records(read_records(path), tok, 64)
    assert ex.labels == ex.input_ids and ex.prompt is None


def test_messages_train_only_assistant_turns(tmp_path, tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "YO"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "OK"},
    ]
    path = write(tmp_path, "d.jsonl", [json.dumps({"messages": msgs})])
    (ex,) = tokenize_records(read_records(path), tok, 256)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    trained = tok.decode(
        [i for i, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    )
    assert trained == "YO<|im_end|>\nOK<|im_end|>\n"
    assert ex.prompt.endswith("<|im_start|>assistant\n") and ex.reference == "OK"


def test_csv_with_chosen_columns(tmp_path, tok):
    path = write(tmp_path, "d.csv", ["mr,ref,other", '"name[X], food[Thai]",X serves Thai.,z'])
    (rec,) = read_records(path, {"prompt": "mr", "completion": "ref"})
    assert rec.value == ("name[X], food[Thai]", "X serves Thai.") and rec.where.endswith(":2")
    with pytest.raises(DataError, match=r"no column\(s\) \['prompt'"):
        read_records(path)
    (rec,) = read_records(path, {"text": "other"})
    assert rec.kind == "text" and rec.value == "z"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "a"}', "non-empty 'completion'"),
        ('{"foo": 1}', "needs 'prompt'\\+'completion', 'messages' or 'text'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "needs a 'role'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"text": "fine"})
    path = write(tmp_path, "d.jsonl", [good, "", line])
    with pytest.raises(DataError, match=rf"d\.jsonl:3: .*{message}"):
        read_records(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        read_records(tmp_path / "empty.jsonl")


def test_truncation_warns_with_count(tmp_path, tok):
    lines = [json.dumps({"prompt": "p", "completion": "x" * n}) for n in (3, 50, 60)]
    records = read_records(write(tmp_path, "d.jsonl", lines))
    with pytest.warns(UserWarning, match="2 of 3 sequences were longer than max_length=20"):
        examples = tokenize_records(records, tok, 20)
    assert [len(e.input_ids) for e in examples] == [5, 20, 20]


def test_split_is_seeded_and_disjoint(tmp_path):
    lines = [json.dumps({"text": f"t{i}"}) for i in range(20)]
    records = read_records(write(tmp_path, "d.jsonl", lines))
    train, val = split_validation(records, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert {r.value for r in train}.isdisjoint({r.value for r in val})
    assert [r.value for r in split_validation(records, 0.25, seed=3)[1]] == [r.value for r in val]


def test_collate_pads_right_and_masks(tok):
    from svda.trainer.data import Example

    batch = collate(
        [Example([1, 2, 3], [IGNORE, 2, 3], None, None), Example([4], [4], None, None)], 0
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_step_examples_walk_epochs_as_permutations():
    seen = [i for step in range(5) for i in step_examples(10, seed=1, step=step, per_step=4)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert step_examples(10, 1, 3, 4) == seen[12:16]
