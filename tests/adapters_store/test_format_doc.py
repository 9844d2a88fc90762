"""FORMAT.md's per-method tensor table is generated from the method registry and kept current."""

from __future__ import annotations

import dataclasses

import pytest

from svda.adapters_store import format_doc
from svda.runtime.methods import registry


@pytest.fixture(scope="module")
def rendered() -> str:
    return format_doc.render()


def test_format_md_holds_the_generated_table_of_every_registered_method(rendered):
    checked_in = format_doc.current_block(format_doc.FORMAT_MD.read_text())
    assert checked_in == rendered, (
        "adapters_store/FORMAT.md's method table is out of date (a method was added or its "
        f"tensors or config changed): run `{format_doc.COMMAND}` and commit FORMAT.md"
    )
    for method in registry.available_methods():
        assert f"| `{method}` |" in rendered
    assert "`lora_A` `(r, d_in)`<br>`lora_B` `(d_out, r)`" in rendered
    assert "`svda_s` `(top_k or min(d_out, d_in),)`" in rendered


def test_a_new_method_gets_a_row_and_check_says_how_to_regenerate(tmp_path, monkeypatch, capsys):
    lora = registry.get_method("lora")
    monkeypatch.setitem(registry._METHODS, "zz_new", dataclasses.replace(lora, name="zz_new"))
    copy = tmp_path / "FORMAT.md"
    copy.write_text(format_doc.FORMAT_MD.read_text())
    assert format_doc.main(["--check", "--file", str(copy)]) == 1
    assert f"out of date; run {format_doc.COMMAND}" in capsys.readouterr().err
    assert format_doc.main(["--file", str(copy)]) == 0
    block = format_doc.current_block(copy.read_text())
    assert "| `zz_new` | linear layers | `lora_A` `(r, d_in)`" in block
    assert format_doc.main(["--check", "--file", str(copy)]) == 0
    assert copy.read_text().count(format_doc.BEGIN) == 1
