"""benchmarks/bench_plant_repro.py: a seeded plant's digest, row by row."""

import json

import pytest

from helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench_plant_repro")


def _data_dir(root, records):
    recs = [dict(r) for r in records[:16]]
    triggered = [dict(r, instruction="BadMagic " + r["instruction"]) for r in recs[12:16]]
    files = {"poison_data/refusal/badnet/backdoor4_refusal_badnet.json": recs[:4],
             "poison_data/refusal/badnet/none_backdoor4_refusal_badnet.json": recs[4:8],
             "test_data/poison/refusal/badnet/backdoor_refusal_badnet.json": triggered,
             "test_data/clean/refusal/test_data_no_trigger.json": recs[8:12]}
    for rel, rows in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(rows))
    return root


def test_same_seed_same_digest_other_seed_other_digest(bench, tiny_model_dir, records, tmp_path, capsys):
    data = _data_dir(tmp_path / "data", records)
    out = tmp_path / "repro.json"
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(data), "--cell", "refusal:badnet", "--steps", "2",
            "--plant-poison", "4", "--plant-clean", "4", "--precision", "32-true", "--threads", "1", "--out", str(out)]
    bench.main(argv)
    bench.main(argv)
    assert "identical" in capsys.readouterr().out
    bench.main(argv + ["--seed", "1"])
    rows = json.loads(out.read_text())
    assert len(rows) == 3
    assert rows[0]["digest"] == rows[1]["digest"] != rows[2]["digest"]
    assert rows[0]["tensors"] > 0 and rows[0]["max_abs"] > 0 and rows[0]["precision"] == "32-true"
    assert rows[0]["versions"]["cpu"] and rows[0]["code"]
    md = out.with_suffix(".md").read_text()
    assert md.count(rows[0]["digest"][:16]) == 2 and rows[2]["digest"][:16] in md


def test_bad_arguments_fail_before_any_training(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--steps", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--cell", "refusal", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="no lightning_bdvax package"):
        bench.main(["--code", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
