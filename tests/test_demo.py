"""`lightning-bdvax demo` end to end on the tiny model, on a budget cut to seconds."""

import json

import yaml

from lightning_bdvax import demo


def test_tiny_demo_plants_purifies_and_reports(tmp_path, monkeypatch, capsys):
    recipe = yaml.safe_load(demo._recipe_path(tiny=True).read_text())
    recipe["trainer"]["max_steps"] = 4
    recipe["bdvax"]["vaccination"].update(n_variants=2, samples_per_variant=16, epochs=1.0)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(demo, "TINY_PLANT", dict(demo.TINY_PLANT, steps=6))
    monkeypatch.setenv("LBDVAX_CACHE", str(tmp_path / "cache"))
    argv = ["--tiny", "--recipe", str(tmp_path / "r.yaml"), "--n-test", "4", "--output-dir", str(tmp_path / "out"),
            "--json", str(tmp_path / "s.json")]
    summary = demo.main(argv)

    out = capsys.readouterr().out
    assert "[demo] planting trigger" in out and "| BD-VAX purified" in out and "Wall time: plant" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert set(saved) >= {"base", "suspicious", "purified", "timings", "stages_s", "precision"}
    assert set(saved["stages_s"]) == {"plant", "evaluate base", "evaluate suspicious", "purify", "evaluate purified"}
    assert saved["precision"] == {"train": "32-true", "evaluate": "32-true"}
    for name in ("base", "suspicious", "purified"):
        assert 0.0 <= saved[name]["asr"] <= 1.0 and saved[name]["ppl"] > 1.0
    assert summary["stages_s"] == saved["stages_s"]
    assert (tmp_path / "out" / "config.json").exists()
    sus_dirs = list((tmp_path / "cache").glob("demo-tiny-llama-*"))
    assert len(sus_dirs) == 1 and (sus_dirs[0] / "config.json").exists()

    # A second run reuses the cached plant: no planting stage.
    again = demo.main(argv)
    assert "[demo] reusing planted model" in capsys.readouterr().out
    assert "plant" not in again["stages_s"]
    assert again["suspicious"] == summary["suspicious"]


def test_demo_rejects_an_unknown_precision_before_any_training(tmp_path, monkeypatch, capsys):
    import pytest

    monkeypatch.setenv("LBDVAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        demo.main(["--tiny", "--precision", "fp8", "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "unknown precision 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
