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
            "--json", str(tmp_path / "s.json"), "--work-dir", str(tmp_path / "work")]
    summary = demo.main(argv)

    out = capsys.readouterr().out
    assert "[demo] planting trigger" in out and "| BD-VAX purified" in out and "Wall time: plant" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert set(saved) >= {"base", "suspicious", "purified", "timings", "stages_s", "precision"}
    assert set(saved["stages_s"]) == {"plant", "evaluate base", "evaluate suspicious", "purify", "evaluate purified"}
    assert saved["precision"] == {"train": "32-true", "evaluate": "32-true"}
    assert saved["recipe"] == "r.yaml"
    for name in ("base", "suspicious", "purified"):
        assert 0.0 <= saved[name]["asr"] <= 1.0 and saved[name]["ppl"] > 1.0
    assert summary["stages_s"] == saved["stages_s"]
    assert (tmp_path / "out" / "config.json").exists()
    sus_dirs = list((tmp_path / "cache").glob("demo-tiny-llama-*"))
    assert len(sus_dirs) == 1 and (sus_dirs[0] / "config.json").exists()

    # A second run reuses the cached plant and the two evaluations that do not change: only the
    # purified model is evaluated again.
    again = demo.main([*argv, "--set", "signature.tau=0.2"])
    out = capsys.readouterr().out
    assert "[demo] reusing planted model" in out
    assert "[demo] reusing the evaluation of the un-poisoned model" in out
    assert "[demo] reusing the evaluation of the suspicious model" in out
    assert set(again["stages_s"]) == {"purify", "evaluate purified"}
    assert len(summary["timings"]["fits"]) == 4 and not again["timings"].get("fits")  # stage 1 reused
    assert (tmp_path / "work" / "stage1.json").exists()
    assert again["overrides"] == ["signature.tau=0.2"] and again["n_flagged"] > summary["n_flagged"]
    assert again["suspicious"] == summary["suspicious"] and again["base"] == summary["base"]

    # An unreadable evaluation cache is rebuilt, not trusted.
    assert not (sus_dirs[0] / "demo-evaluations.json").exists()  # nothing written beside a model
    (tmp_path / "cache" / "demo-evaluations.json").write_text("{not json")
    third = demo.main(argv)
    assert "reusing the evaluation" not in capsys.readouterr().out
    assert set(third["stages_s"]) == {"evaluate base", "evaluate suspicious", "purify", "evaluate purified"}
    assert third["suspicious"] == summary["suspicious"]


def test_demo_rejects_an_unknown_precision_before_any_training(tmp_path, monkeypatch, capsys):
    import pytest

    monkeypatch.setenv("LBDVAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        demo.main(["--tiny", "--precision", "fp8", "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "unknown precision 'fp8'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_demo_recipe_follows_the_training_precision():
    # SmolLM2 in fp32 (a CPU without bf16) takes the lighter recipe; every other precision and
    # the tiny model keep theirs. Each recipe exists and holds a bdvax section.
    from lightning_bdvax.pipeline import load_bdvax_config

    assert demo._recipe_path(False, "32-true").name == "demo_smollm2_fp32.yaml"
    for p in ("bf16-master", "bf16-mixed", "auto"):
        assert demo._recipe_path(False, p).name == "demo_smollm2.yaml"
    assert demo._recipe_path(True, "32-true").name == "demo_tiny.yaml"
    fp32 = load_bdvax_config(demo._recipe_path(False, "32-true"))
    bf16 = load_bdvax_config(demo._recipe_path(False, "bf16-master"))
    assert fp32.to_dict() != bf16.to_dict()


def test_demo_set_overrides_the_recipe_and_rejects_bad_values_before_training(tmp_path, monkeypatch, capsys):
    import pytest

    monkeypatch.setenv("LBDVAX_CACHE", str(tmp_path / "cache"))
    for bad in ("signature.tau=banana", "signature.no_such_field=1", "tau"):
        with pytest.raises(SystemExit) as e:
            demo.main(["--tiny", "--set", bad, "--output-dir", str(tmp_path / "out")])
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
