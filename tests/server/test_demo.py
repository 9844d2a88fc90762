"""``make demo`` end to end on a tiny base: trains two adapters with svda-train, serves them over
gRPC and prints an answer for each adapter and the base (the real run uses SmolLM2)."""

from svda.server import demo


def test_demo_trains_serves_and_answers(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "TRAIN_FLAGS", [*demo.TRAIN_FLAGS[:5], "2", *demo.TRAIN_FLAGS[6:]])
    assert demo.main(["--workdir", str(tmp_path), "--base", str(tiny_folder)]) == 0
    out = capsys.readouterr().out
    for adapter_id in demo.ADAPTERS:
        assert (tmp_path / f"{adapter_id}.svda").exists()
        assert f"{adapter_id} v1: svda" in out
        assert f"  {adapter_id} " in out
    assert out.count("  base model ") == len(demo.ADAPTERS)
    assert "Next:" in out
    # a second run reuses the trained files
    assert demo.main(["--workdir", str(tmp_path), "--base", str(tiny_folder)]) == 0
    assert "reusing" in capsys.readouterr().out
