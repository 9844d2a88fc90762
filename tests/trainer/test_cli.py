"""``svda-train``: flags generated from method configs, config files, errors, store output."""

from __future__ import annotations

import json

import pytest

from svda.adapters_store import AdapterStore, read_adapter
from svda.trainer.cli import build_parser, config_from_args, main


def parse(argv: list[str]):
    return config_from_args(vars(build_parser().parse_args(argv)))


def test_method_flags_come_from_config_dataclasses():
    cfg = parse(["--method", "svda", "--targets", "all-linear", "--svda-s-init", "constant",
                 "--top-k", "16", "--data", "x.jsonl"])  # fmt: skip
    assert cfg.adapter == {"targets": "all-linear", "s_init": "constant", "top_k": 16}
    assert parse(["--method", "svda", "--top-k", "none"]).adapter == {"top_k": None}
    cfg = parse(["--method", "lora", "--rank", "4", "--lora-alpha", "8", "--dropout", "0.1"])
    assert cfg.adapter == {"r": 4, "alpha": 8.0, "dropout": 0.1}
    assert parse(["--method", "vera", "--rank", "64"]).adapter_config().r == 64
    help_text = build_parser().format_help()
    assert "--svda-s-init" in help_text and "--vera-projection-seed" in help_text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "vera", "--lora-alpha", "8"], "--lora-alpha is a lora setting"),
        (["--method", "vera", "--alpha", "8"], "--alpha is not a hyperparameter of vera"),
        (["--method", "lora", "--rank", "x"], "cannot read 'x' as int"),
        (["--method", "nope"], "unknown adapter method"),
    ],
)
def test_bad_flags_say_what_is_wrong(argv, message):
    from svda.trainer import TrainConfigError

    with pytest.raises(TrainConfigError, match=message):
        parse(argv)


def test_config_file_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: lora\nlr: 0.001\nbatch_size: 4\nadapter:\n  r: 2\n  alpha: 4\n")
    cfg = parse(["--config", str(path), "--lr", "0.01", "--rank", "8"])
    assert (cfg.method, cfg.lr, cfg.batch_size) == ("lora", 0.01, 4)
    assert cfg.adapter == {"r": 8, "alpha": 4}
    (tmp_path / "run.json").write_text(json.dumps({"method": "svda", "bogus": 1}))
    from svda.trainer import TrainConfigError

    with pytest.raises(TrainConfigError, match="unknown training settings \\['bogus'\\]"):
        parse(["--config", str(tmp_path / "run.json")])


def test_cli_trains_and_publishes_into_the_store(tmp_path, tiny_base, toy_data, store_root, capsys):
    code = main([
        "--method", "svda", "--targets", "q_proj,v_proj", "--data", toy_data, "--base", tiny_base,
        "--max-steps", "3", "--out", "acme", "--tags", "demo,toy", "--no-progress",
        "--output-dir", str(tmp_path / "run"), "--val-fraction", "0.2",
    ])  # fmt: skip
    assert code == 0
    store = AdapterStore(store_root)
    entry = store.get("acme")
    header = read_adapter(store.read_bytes(entry)).header
    assert header.method == "svda" and header.tags == ["demo", "toy"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["adapter_id"] == "acme" and summary["steps"] == 3
    for name in ("steps.csv", "steps.jsonl", "loss.png"):
        assert (tmp_path / "run" / name).exists()


def test_cli_reports_data_errors_with_exit_2(tmp_path, tiny_base, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    code = main(["--method", "lora", "--data", str(bad), "--base", tiny_base, "--no-progress",
                 "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
