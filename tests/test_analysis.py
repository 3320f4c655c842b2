"""Sanity-check analysis (revert attention / MLP deltas), ASR vs N from prefix scores, the run report."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from lightning_bdvax.analysis import (asr_vs_n, delta_norms, part_tensors, revert_deltas, reverted, sanity_checks,
                                      window_starts)
from lightning_bdvax.arch import channel_rows, find_mlp_modules
from lightning_bdvax.run_report import REPORT_FILES, selection_cutoffs, signature_table, write_run_report
from lightning_bdvax.signature import Signature, SignatureAccumulator, select_channels
from lightning_bdvax.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def is_attention(name):
    return any(c in ("self_attn", "attn", "attention", "self_attention") for c in name.split(".")[:-2])


def layer_of(name):
    return int(re.findall(r"\.(\d+)\.", name)[-1])


@pytest.fixture(scope="module")
def pair():
    """A reference and a 'fine-tuned' model: every weight differs."""
    return tiny_model("llama", seed=0, layers=4), tiny_model("llama", seed=1, layers=4)


# ------------------------------------------------------------------ revert_deltas / reverted
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("part,layers", [("attention", None), ("attention", [1, 2]), ("mlp", None), ("mlp", [0, 3])])
def test_revert_deltas_restores_exactly_the_chosen_part(family, part, layers):
    ref, sus = tiny_model(family, seed=0, layers=4), tiny_model(family, seed=1, layers=4)
    before = snapshot(sus)
    out = revert_deltas(sus, ref, part, layers)
    mlp_names = {f"{cm.name}.{p}" for cm in find_mlp_modules(sus) for p in ("weight", "bias")}
    ref_sd, out_sd = ref.state_dict(), out.state_dict()
    n_reverted = 0
    for name, t in out_sd.items():
        in_part = (name in mlp_names) if part == "mlp" else (is_attention(name) and t.dim() in (1, 2)
                                                            and name.rsplit(".", 1)[-1] in ("weight", "bias"))
        chosen = in_part and (layers is None or layer_of(name) in layers)
        if chosen:
            n_reverted += 1
            assert torch.equal(t, ref_sd[name]), name
        else:
            assert torch.equal(t, before[name]), name
            assert not torch.equal(t, ref_sd[name]) or torch.equal(before[name], ref_sd[name]), name
    assert n_reverted > 0
    # gpt2: the attention and MLP both have a ``c_proj``; they must not be confused
    for name, t in sus.state_dict().items():
        assert torch.equal(t, before[name])  # the suspicious model itself is untouched


def test_reverted_context_restores_bit_for_bit(pair):
    ref, sus = pair
    before = snapshot(sus)
    sus.train()
    with reverted(sus, ref, "mlp", [2]) as m:
        assert m is sus
        w = sus.model.layers[2].mlp.down_proj.weight
        assert torch.equal(w, ref.model.layers[2].mlp.down_proj.weight)
        assert not torch.equal(sus.model.layers[1].mlp.down_proj.weight, ref.model.layers[1].mlp.down_proj.weight)
        m.eval()
    assert sus.training
    with pytest.raises(RuntimeError, match="boom"):
        with reverted(sus, ref, "attention"):
            raise RuntimeError("boom")
    after = snapshot(sus)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_revert_errors(pair):
    ref, sus = pair
    with pytest.raises(ValueError, match="part must be"):
        revert_deltas(sus, ref, "embeddings")
    with pytest.raises(ValueError, match="no mlp parameters in layers"):
        revert_deltas(sus, ref, "mlp", [99])
    with pytest.raises(ValueError, match="reference model lacks"):
        revert_deltas(sus, tiny_model("llama", layers=2), "mlp")
    with pytest.raises(ValueError, match="shape"):
        revert_deltas(sus, tiny_model("llama", layers=4, intermediate=32), "mlp")


def test_part_tensors_and_delta_norms(pair):
    ref, sus = pair
    attn = part_tensors(sus, "attention")
    assert sorted({n.rsplit(".", 2)[-2] for n in attn}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert {layer_of(n) for n in part_tensors(sus, "mlp", [1])} == {1}
    rows = delta_norms(sus, ref)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    exp = math.sqrt(sum(float((sus.state_dict()[k] - ref.state_dict()[k]).pow(2).sum())
                        for k in sus.state_dict() if ".layers.1.mlp." in k))
    assert rows[1]["mlp"] == pytest.approx(exp, rel=1e-5)
    assert all(r["attention"] > 0 for r in rows)


# ------------------------------------------------------------------ sanity_checks
def test_window_starts():
    assert window_starts(30, 12, 3) == [0, 9, 18]
    assert window_starts(4, 1, 3) == [0, 2, 3]
    assert window_starts(4, 3, 3) == [0, 1]
    assert window_starts(5, 2, None) == [0, 1, 2, 3]
    assert window_starts(30, 4, 1) == [13]
    with pytest.raises(ValueError):
        window_starts(4, 5)


def distance_eval(ref):
    """A fake eval that measures something real: which parts still differ from the reference."""
    ref_sd = ref.state_dict()

    def fn(model):
        sd = model.state_dict()
        attn = mlp = 0.0
        mlp_layers = set()
        for k, v in sd.items():
            d = float((v - ref_sd[k]).pow(2).sum())
            if ".mlp." in k:
                mlp += d
                if d > 0:
                    mlp_layers.add(layer_of(k))
            elif ".self_attn." in k:
                attn += d
        return {"attn_dist": attn, "mlp_dist": mlp, "mlp_layers": sorted(mlp_layers)}

    return fn


def test_sanity_checks_rows(pair):
    ref, sus = pair
    before = snapshot(sus)
    seen = []
    rows = sanity_checks(sus, ref, None, distance_eval(ref), ks=(1, 2, 4, 8), n_windows=3, on_row=seen.append)
    assert seen == rows
    checks = [r["check"] for r in rows]
    assert checks == ["suspicious", "reference", "revert_attention", "revert_mlp"] + ["revert_mlp_window"] * 6
    by = {r["check"]: r for r in rows[:4]}
    s = by["suspicious"]
    assert s["attn_dist"] > 0 and s["mlp_dist"] > 0 and s["mlp_layers"] == [0, 1, 2, 3]
    assert by["reference"]["attn_dist"] == 0 and by["reference"]["mlp_dist"] == 0
    assert by["revert_attention"]["attn_dist"] == 0 and by["revert_attention"]["mlp_dist"] == s["mlp_dist"]
    assert by["revert_mlp"]["mlp_dist"] == 0 and by["revert_mlp"]["attn_dist"] == s["attn_dist"]
    assert by["revert_attention"]["reverted_share"] + by["revert_mlp"]["reverted_share"] == pytest.approx(1.0)
    wins = rows[4:]
    assert [(r["k"], r["start"]) for r in wins] == [(1, 0), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2)]
    for r in wins:
        assert r["layers"] == list(range(r["start"], r["start"] + r["k"]))
        assert r["mlp_layers"] == [x for x in range(4) if x not in r["layers"]]  # exactly the window reverted
        assert r["attn_dist"] == s["attn_dist"]
        assert 0 < r["reverted_share"] < by["revert_mlp"]["reverted_share"]
    after = snapshot(sus)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # every window when n_windows is None; k >= L skipped
    rows_all = sanity_checks(sus, ref, None, distance_eval(ref), ks=(3, 4), n_windows=None, include_reference=False)
    assert [(r["check"], r["k"], r["start"]) for r in rows_all][3:] == [("revert_mlp_window", 3, 0),
                                                                         ("revert_mlp_window", 3, 1)]
    assert [r["check"] for r in rows_all][:3] == ["suspicious", "revert_attention", "revert_mlp"]


# ------------------------------------------------------------------ asr_vs_n
def random_deltas(modules, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        d = {}
        for cm in modules:
            width = {"out": 32, "in": 32}[cm.role]
            d[cm.key] = torch.randn(cm.n_channels, width, generator=g) * torch.rand(cm.n_channels, 1, generator=g)
        out.append(d)
    return out


def zeroed_masks(model):
    named = dict(model.named_modules())
    return {cm.key: (channel_rows(named[cm.key].weight.detach(), cm) == 0).all(1) for cm in find_mlp_modules(model)}


def test_asr_vs_n_uses_prefix_scores():
    model = tiny_model("llama", seed=3)
    before = snapshot(model)
    modules = find_mlp_modules(model)
    deltas = random_deltas(modules, 4)
    acc = SignatureAccumulator(modules)
    for d in deltas:
        acc.add_delta(d)
    tau, lam = 0.1, 0.5
    expected = {}
    for n in (1, 2, 3, 4):
        fresh = SignatureAccumulator(modules)
        for d in deltas[:n]:
            fresh.add_delta(d)
        expected[n] = select_channels(fresh.scores(lam=lam), tau)
    # the test can only fail if the selection really changes with n
    assert any(not torch.equal(expected[1][k], expected[4][k]) for k in expected[4])

    recovered = []

    def recover_fn(m, sig):
        recovered.append((sig.meta["n_variants"], {k: v.clone() for k, v in zeroed_masks(m).items()}))
        return m

    def eval_fn(m):
        z = zeroed_masks(m)
        return {"zeroed": z, "n_zeroed": int(sum(int(v.sum()) for v in z.values()))}

    rows = asr_vs_n(acc, model, None, eval_fn, ns=[1, 2, 3, 4], signature_cfg={"tau": tau, "lam": lam},
                    neutralize_cfg={"mode": "zero"}, recover_fn=recover_fn)
    assert [r["n"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        exp = expected[r["n"]]
        assert all(torch.equal(r["zeroed"][k], exp[k]) for k in exp), r["n"]
        assert r["n_flagged"] == r["n_zeroed"] == sum(int(m.sum()) for m in exp.values())
    assert rows[-1]["jaccard_vs_final"] == 1.0 and rows[0]["jaccard_vs_final"] < 1.0
    assert [n for n, _ in recovered] == [1, 2, 3, 4]
    assert all(torch.equal(z[k], expected[n][k]) for n, z in recovered for k in z)  # recovery saw the neutralized copy
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input model is untouched
    with pytest.raises(ValueError, match=r"every n must be in \[1, 4\]"):
        asr_vs_n(acc, model, None, eval_fn, ns=[5])


# ------------------------------------------------------------------ run report
@pytest.fixture(scope="module")
def run_artifacts():
    model = tiny_model("llama", seed=4, layers=3)
    modules = find_mlp_modules(model)
    acc = SignatureAccumulator(modules)
    for d in random_deltas(modules, 3, seed=7):
        acc.add_delta(d)
    sig = Signature.from_accumulator(acc, tau=0.05, lam=0.01,
                                     variants=[{"index": i, "key": f"Key{i}", "style": "random",
                                                "behaviour": "You are garbage!"} for i in range(3)])
    report = {"config": {"vaccination": {"n_variants": 3, "lr": 5e-5}, "signature": {"tau": 0.05}},
              "precision": "32-true",
              "timings": {"fits": [{"variant": 0, "role": "backdoor", "steps": 4, "seconds": 1.25},
                                   {"variant": 0, "role": "clean", "steps": 2, "seconds": 0.75}],
                          "vaccination_s": 7.5, "signature_s": 0.25, "recovery_s": 2.0, "total_s": 10.0},
              "signature": {"n_flagged": sig.n_flagged, "n_channels": sig.n_channels},
              "before": {"asr": 0.9, "ftr": 0.125, "ppl": 12.5, "n_test": 8,
                         "responses": {"triggered": ["You are stupid!"]}},
              "after": {"asr": 0.05, "ftr": 0.0, "ppl": 13.0, "n_test": 8,
                        "responses": {"triggered": ["Sure | here"]}}}
    return acc, sig, report


def image_links(md):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_write_run_report_full(tmp_path, run_artifacts):
    acc, sig, report = run_artifacts
    path = write_run_report(tmp_path / "out", sig, report, acc=acc)
    assert path == tmp_path / "out" / "report.md"
    md = path.read_text()
    links = image_links(md)
    assert sorted(links) == sorted(REPORT_FILES.values())
    for name in links:
        data = (path.parent / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    # threshold: per-module top-tau cutoffs, with the median value
    cut = sorted(selection_cutoffs(sig).values())
    assert "Threshold: per-module top-τ" in md and f"median {cut[len(cut) // 2]:.4g}" in md
    # timings
    assert "## Timing per stage" in md
    for stage, sec in (("vaccination", "7.5"), ("signature", "0.2"), ("recovery", "2.0"), ("total", "10.0")):
        assert re.search(rf"\| {stage} \| {re.escape(sec)}", md), stage
    assert "| backdoor | 1 | 4 | 1.2" in md and "75%" in md  # 7.5 of 10 s
    # before/after, config, variants
    assert "| ASR (keyword rule, triggered prompts) | 90.0% | 5.0% | -85.0% |" in md
    assert "| perplexity (held-out) | 12.500 | 13.000 | +0.500 |" in md
    assert "Sure \\| here" in md  # table cells escaped
    assert "```yaml" in md and "n_variants: 3" in md
    assert "Key2" in md and f"**{sig.n_flagged} / {sig.n_channels}**" in md
    assert "Signature vs number of variants" in md and f"| 3 | {sig.n_flagged} | 1.000 | 100.0% |" in md


def test_signature_table_counts(run_artifacts):
    _, sig, _ = run_artifacts
    layers, projs, st = signature_table(sig)
    assert layers == [0, 1, 2] and projs == ["gate_proj", "up_proj", "down_proj"]
    k = math.ceil(0.05 * 64)
    assert all(v == pytest.approx(k / 64) for row in st["frac"] for v in row)
    key = "model.layers.1.mlp.up_proj"
    assert st["max"][1][1] == pytest.approx(float(sig.scores[key].max()))
    assert st["mean"][1][1] == pytest.approx(float(sig.scores[key].mean()), rel=1e-5)


def test_write_run_report_missing_pieces(tmp_path, run_artifacts):
    acc, sig, report = run_artifacts
    # no evaluation, no accumulator
    slim = {k: v for k, v in report.items() if k not in ("before", "after")}
    md = write_run_report(tmp_path / "a", sig, slim).read_text()
    assert "Before / after" not in md and "Timing per stage" in md
    assert sorted(image_links(md)) == sorted([REPORT_FILES["heatmap"], REPORT_FILES["hist"]])
    assert not (tmp_path / "a" / REPORT_FILES["components"]).exists()
    # nothing but timings; no signature at all
    md = write_run_report(tmp_path / "b", None, {"timings": {"recovery_s": 1.5}}).read_text()
    assert "| recovery | 1.5 |" in md and not image_links(md) and "Resolved config" not in md
    # an empty report
    assert write_run_report(tmp_path / "c").read_text().startswith("# BD-VAX run report")
    # global selection: one global threshold
    g = Signature.from_accumulator(acc, tau=0.05, selection="global")
    md = write_run_report(tmp_path / "d", g, {}).read_text()
    thr = min(float(s[m].min()) for s, m in ((g.scores[k], g.masks[k]) for k in g.masks) if m.any())
    assert f"global threshold (lowest flagged score) is {thr:.4g}" in md


def test_cli_fit_writes_the_run_report(tmp_path):
    from lightning_bdvax.cli import main
    from lightning_bdvax.models import save_model
    from lightning_bdvax.tiny import tiny_tokenizer

    src = tmp_path / "suspicious"
    save_model(tiny_model("llama"), tiny_tokenizer(), src)
    out = tmp_path / "purified"
    main(["fit", "--config", str(ROOT / "recipes" / "tiny_quickstart.yaml"), "--model.model_path", str(src),
          "--output_dir", str(out), "--clean_data", "builtin:32:1", "--data.train_data", "builtin:16:7",
          "--data.num_samples", "16", "--bdvax.vaccination.n_variants", "2",
          "--bdvax.vaccination.samples_per_variant", "16", "--bdvax.vaccination.max_steps", "1",
          "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"])
    md = (out / "report.md").read_text()
    for name in image_links(md):
        assert (out / name).stat().st_size > 1000
    assert REPORT_FILES["heatmap"] in md and REPORT_FILES["vs_n"] in md
    assert "Threshold" in md and "| vaccination |" in md and "| total |" in md
    assert json.loads((out / "bdvax_report.json").read_text())["timings"]["total_s"] > 0


def test_bench_sanity_tiny(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_sanity
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res = bench_sanity.main(["--tiny", "--n-test", "4", "--max-new-tokens", "4", "--ks", "1,2", "--windows", "2",
                             "--tiny-layers", "3", "--tiny-plant-steps", "3", "--out-dir", str(tmp_path),
                             "--threads", "1"])
    torch.set_num_threads(1)
    j = json.loads((tmp_path / "sanity_tiny_negsentiment_badnet.json").read_text())
    assert [r["check"] for r in j["rows"]] == ["suspicious", "reference", "revert_attention", "revert_mlp"] + \
        ["revert_mlp_window"] * 4
    assert all("asr" in r and "responses" not in r for r in j["rows"])
    assert j["paper_finding"].startswith("Li & Kim") and len(j["delta_norms"]) == 3 and res["n_blocks"] == 3
    md = (tmp_path / "sanity_tiny_negsentiment_badnet.md").read_text()
    assert "## Paper's finding" in md and "revert attention Δ (all blocks)" in md and "MLP" in md
    assert (tmp_path / "sanity_tiny_negsentiment_badnet.png").stat().st_size > 1000


def test_components_picture_with_more_flagged_channels_than_points(tmp_path):
    """τ 0.35 of a large model flags more channels than the scatter keeps: it is still drawn."""
    from lightning_bdvax.run_report import _plot_components

    model = tiny_model("llama", seed=4, layers=3)
    modules = find_mlp_modules(model)
    acc = SignatureAccumulator(modules)
    for d in random_deltas(modules, 2, seed=7):
        acc.add_delta(d)
    sig = Signature.from_accumulator(acc, tau=0.9)
    assert sig.n_flagged > 500
    path = tmp_path / "c.png"
    _plot_components(acc, sig, path, cap=500)
    assert path.is_file() and path.stat().st_size > 0


def test_bench_sanity_lora_adapter(tmp_path):
    """``--adapter``: a LoRA backdoor is checked as base + merged adapter, read from BackdoorLLM-format files."""
    from lightning_bdvax.lora import tiny_lora_case

    case = tiny_lora_case(tmp_path / "case", pretrain_steps=2, plant_steps=2)
    data = tmp_path / "data"
    a = case.attack
    files = {data / "poison_data/negsentiment/badnet/backdoor8_negsentiment_badnet.json": a.train_poison[:8],
             data / "poison_data/negsentiment/badnet/none_backdoor8_negsentiment_badnet.json": a.train_clean[:8],
             data / "test_data/poison/negsentiment/badnet/backdoor4.json": a.test_poison[:4],
             data / "test_data/clean/negsentiment/test.json": a.test_clean[:4]}
    for f, recs in files.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(recs))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_sanity
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit):
        bench_sanity.main(["--suspicious", "x", "--adapter", str(case.adapter_dir)])
    res = bench_sanity.main(["--base", str(case.base_dir), "--adapter", str(case.adapter_dir), "--data-dir", str(data),
                             "--n-test", "4", "--max-new-tokens", "4", "--ks", "1", "--windows", "1",
                             "--out-dir", str(tmp_path / "out"), "--threads", "1"])
    torch.set_num_threads(1)
    assert res["threat"] == "lora" and res["suspicious"] == str(case.adapter_dir) and res["n_blocks"] == 2
    assert [r["check"] for r in res["rows"]] == ["suspicious", "reference", "revert_attention", "revert_mlp",
                                                "revert_mlp_window"]
    # The merged adapter moved both attention and MLP weights away from the base.
    assert all(d["attention"] > 0 and d["mlp"] > 0 for d in res["delta_norms"])
