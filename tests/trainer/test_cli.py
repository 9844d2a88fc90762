"""``svda-train``: flags generated from method configs, config files, errors, store output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

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
    assert header.name == "acme"  # the name defaults to the store id
    captured = capsys.readouterr()
    status = [line for line in captured.err.splitlines() if line.startswith("svda-train: ")]
    steps = ["starting", "loading the base model", "reading and tokenizing", "attaching svda",
             "training steps 1-3"]  # fmt: skip
    found = [next(i for i, line in enumerate(status) if step in line) for step in steps]
    assert found == sorted(found) and found[0] == 0, status  # in this order, "starting" first
    # --no-progress hides the bar, not the summary
    assert "final loss" in captured.out and "store id 'acme' v1" in captured.out
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


def test_help_shows_every_default():
    parser = build_parser()
    helps = {flag: action.help for action in parser._actions for flag in action.option_strings}
    for flag, default in [("--batch-size", "8"), ("--lr", "0.001"), ("--progress", "on"),
                          ("--lora-r", "8"), ("--vera-r", "256"), ("--svda-s-init", "singular"),
                          ("--tags", "none")]:  # fmt: skip
        assert helps[flag].endswith(f"(default: {default})"), (flag, helps[flag])
    assert "(default: the --out id, else the --out-file stem" in helps["--name"]
    assert "(default: " in parser.format_help()  # argparse formats every help text


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"out": "acme.v2", "out_file": "x.svda"}, "acme.v2"),
        ({"out_file": "runs/French words..v2.svda"}, "French-words.v2"),
        ({"out_file": "runs/###.svda", "method": "lora"}, "lora"),
        ({"name": "mine", "out": "acme"}, "mine"),
        ({}, "svda"),
    ],
)
def test_the_adapter_name_defaults_to_what_the_adapter_is(settings, name):
    from svda.trainer import TrainConfig

    assert TrainConfig(**settings).adapter_name() == name


def test_an_invalid_name_is_refused_before_training(tmp_path, capsys):
    code = main(["--name", "a b", "--data", str(tmp_path / "x.jsonl")])
    assert code == 2
    assert "--name 'a b' is invalid: use 1-128 characters" in capsys.readouterr().err


def test_the_cli_module_says_what_it_does_before_importing_torch():
    code = "import sys, svda.trainer.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interruption_says_whether_there_is_a_checkpoint(tmp_path, capsys, signum, code):
    from svda.trainer import TrainConfig
    from svda.trainer.cli import Interrupted, _interrupted

    config = TrainConfig(output_dir=str(tmp_path / "run"))
    exc = Interrupted(signum) if signum == signal.SIGTERM else KeyboardInterrupt()
    assert _interrupted(exc, config) == code
    err = capsys.readouterr().err
    assert f"interrupted by {signum.name}; no checkpoint was saved" in err
    assert "--checkpoint-every N" in err


def test_sigterm_stops_training_and_names_the_checkpoint_to_resume(tmp_path, tiny_base, toy_data):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "svda.trainer.cli", "--method", "lora", "--rank", "2",
               "--targets", "q_proj", "--data", toy_data, "--base", tiny_base, "--batch-size", "2",
               "--max-steps", "100000", "--checkpoint-every", "1", "--no-progress",
               "--output-dir", str(run), "--out-file", str(tmp_path / "a.svda")]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((run / "checkpoints").glob("step-*/trainer_state.pt")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert "svda-train: interrupted by SIGTERM; the last checkpoint is " in err
    assert "plus --resume" in err and "Traceback" not in err
    assert not (tmp_path / "a.svda").exists()
