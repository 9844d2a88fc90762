"""``svda serve --print-settings``: the values the server will use, defaults resolved."""

from __future__ import annotations

import json
from pathlib import Path

from svda.runtime.base_model import DEFAULT_NAME, default_gguf_path, gguf_key
from svda.server import cli


def test_print_settings_resolves_the_default_model_and_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SVDA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SVDA_STORE", raising=False)
    assert cli.main(["serve", "--print-settings"]) == 0
    printed = json.loads(capsys.readouterr().out)
    home = (tmp_path / "home").resolve()
    assert printed["store"] == str(home / "store")
    model = Path(printed["model"])
    assert model == home / "models" / f"{DEFAULT_NAME}-{gguf_key(default_gguf_path())}"
    assert not model.exists()  # printed, not converted
    monkeypatch.setenv("SVDA_STORE", str(tmp_path / "env-store"))
    assert cli.main(["serve", "--print-settings", "--model", str(tmp_path / "m")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["store"] == str((tmp_path / "env-store").resolve())
    assert printed["model"] == str(tmp_path / "m")
