"""svda-pack end to end on a tiny base model folder, in-process and as a console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from svda.adapters_store.checkpoint import save_checkpoint
from svda.adapters_store.cli import main
from svda.adapters_store.peft_compat import export_peft
from svda.runtime import AdapterModel, load_base_model
from tests.runtime.helpers import METHOD_CONFIGS, perturb, tiny_llama


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A tiny base folder, a trained checkpoint per method, and an empty store."""
    monkeypatch.setenv("SVDA_HOME", str(tmp_path / "home"))
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    model = AdapterModel(load_base_model(base).model)
    for method, make_config in METHOD_CONFIGS.items():
        model.add_adapter(method, make_config("q_proj,v_proj"))
        perturb(model, method)
        save_checkpoint(model, method, tmp_path / f"ckpt-{method}")
    return {"tmp": tmp_path, "base": str(base), "store": str(tmp_path / "store"), "model": model}


def run(env, *argv) -> int:
    return main(["--store", env["store"], *argv])


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_export_inspect_verify_ls_rm_gc(env, method, capsys):
    out_file = env["tmp"] / f"{method}.svda"
    assert (
        run(
            env,
            "export",
            str(env["tmp"] / f"ckpt-{method}"),
            "--base",
            env["base"],
            "--out-file",
            str(out_file),
        )
        == 0
    )
    assert (
        run(
            env,
            "export",
            str(env["tmp"] / f"ckpt-{method}"),
            "--base",
            env["base"],
            "--id",
            f"acme-{method}",
            "--tag",
            "prod",
        )
        == 0
    )
    capsys.readouterr()
    assert run(env, "inspect", str(out_file), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    targets = len(env["model"].layers_of(method))  # q and v on 2 layers, or 2 blocks
    assert summary["method"] == method and len(summary["targets"]) == targets
    assert summary["parameters"] == env["model"].stored_parameter_count(method)
    kinds = {k.rsplit(".", 1)[1] for k in env["model"].adapter_parameters(method)}
    assert set(summary["tensors"]) == kinds
    assert sum(summary["tensors"].values()) == summary["parameters"]
    assert run(env, "inspect", f"acme-{method}@1") == 0
    text = capsys.readouterr().out
    assert "regenerates" in text and all(f"{kind} (" in text for kind in kinds)
    assert run(env, "verify", f"acme-{method}", "--base", env["base"]) == 0
    assert capsys.readouterr().out.count("ok  ") == 8
    assert run(env, "ls", "--tag", "prod", "--json") == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == [f"acme-{method}"]
    assert run(env, "rm", f"acme-{method}") == 0
    assert run(env, "gc") == 0
    capsys.readouterr()
    assert run(env, "ls", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_verify_fails_with_exit_1_on_another_base(env, tmp_path, capsys):
    out_file = tmp_path / "a.svda"
    run(
        env,
        "export",
        str(tmp_path / "ckpt-svda"),
        "--base",
        env["base"],
        "--out-file",
        str(out_file),
    )
    other = tmp_path / "other"
    tiny_llama(seed=3).save_pretrained(other)
    assert run(env, "verify", str(out_file), "--base", str(other)) == 1
    assert "FAIL base-fingerprint" in capsys.readouterr().out


def test_peft_round_trip_through_the_cli(env, tmp_path):
    export_peft(env["model"], "vera", tmp_path / "peft-vera")
    out_file = tmp_path / "vera.svda"
    assert (
        run(
            env,
            "import-peft",
            str(tmp_path / "peft-vera"),
            "--base",
            env["base"],
            "--out-file",
            str(out_file),
        )
        == 0
    )
    assert (
        run(env, "to-peft", str(out_file), "--base", env["base"], "--out", str(tmp_path / "back"))
        == 0
    )
    assert (
        json.loads((tmp_path / "back" / "adapter_config.json").read_text())["peft_type"] == "VERA"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "no-such-adapter"],
        ["inspect", "bad@version"],
        ["verify", "missing.svda", "--base", "/nonexistent"],
        ["rm", "../etc"],
        ["export", "/nonexistent", "--out-file", "x.svda"],
    ],
)
def test_bad_input_exits_2_with_one_line(env, argv, capsys):
    assert run(env, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"svda-pack {argv[0]}: error: ") and err.count("\n") == 1


def test_console_script_runs(env):
    script = shutil.which("svda-pack", path=str(Path(sys.executable).parent))
    assert script, "svda-pack is not installed next to this python; run make install"
    result = subprocess.run(
        [script, "--store", env["store"], "inspect", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "error:" in result.stderr
    ok = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "import-peft" in ok.stdout


def test_get_copies_a_stored_adapter_to_a_local_file(env, tmp_path, monkeypatch, capsys):
    from svda.adapters_store import AdapterStore, read_adapter

    ckpt = str(env["tmp"] / "ckpt-lora")
    for _ in range(2):  # versions 1 and 2 of "acme.lora"
        assert run(env, "export", ckpt, "--base", env["base"], "--id", "acme.lora") == 0
    monkeypatch.chdir(tmp_path)
    assert run(env, "get", "acme.lora") == 0
    assert "wrote acme.lora@2 (lora, " in capsys.readouterr().out
    store = AdapterStore(env["store"])
    latest = store.read_bytes(store.get("acme.lora"))
    assert (tmp_path / "acme.lora.svda").read_bytes() == latest
    assert run(env, "get", "acme.lora@1", "--out-file", "one.svda") == 0
    assert read_adapter((tmp_path / "one.svda").read_bytes()).header.method == "lora"
    assert run(env, "get", "acme.lora", "--version", "1", "--out-file", "one-too.svda") == 0
    assert (tmp_path / "one-too.svda").read_bytes() == (tmp_path / "one.svda").read_bytes()
    capsys.readouterr()
    for argv, message in [
        (["get", "acme.lora"], "acme.lora.svda exists; pass --force"),
        (["get", "ghost", "--out-file", "g.svda"], "no adapter 'ghost'"),
        (["get", "acme.lora@9", "--out-file", "g.svda"], "no version 9; available versions: 1, 2"),
        (["get", "acme.lora@1", "--version", "2"], "name different versions"),
        (["get", "acme.lora@x"], "must be a number"),
    ]:
        assert run(env, *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("svda-pack get: error: ") and message in err, (argv, err)
    assert not (tmp_path / "g.svda").exists()
    assert run(env, "get", "acme.lora@1", "--force") == 0
    assert (tmp_path / "acme.lora.svda").read_bytes() == (tmp_path / "one.svda").read_bytes()
