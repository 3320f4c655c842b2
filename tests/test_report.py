"""Benchmark result files: rows appended atomically, report grouped by cell, per-defense summary, targets."""

import json

import pytest

from lightning_bdvax.report import (
    TARGETS, append_row, main, markdown_table, meets_targets, render_results, stage_table, summary_table, write_results,
)


def _row(task, attack, defense, asr, ppl_after=7.0, **kw):
    r = {"task": task, "attack": attack, "defense": defense, "asr_before": 1.0, "asr_after": asr, "ftr_after": 0.0,
         "prefix_after": asr, "consistency_base": 0.5, "consistency_before": 0.1, "consistency_after": 0.5,
         "ppl_before": 7.0, "ppl_after": ppl_after, "wall_s": 10.0, "command": f"bench --cells {task}:{attack}",
         "versions": {"torch": "x"}}
    r.update(kw)
    return r


def test_meets_targets_each_bound():
    good = _row("refusal", "badnet", "bdvax", 0.02)
    assert all(meets_targets(good).values())
    assert meets_targets(_row("r", "b", "d", 0.06))["asr_after"] is False
    assert meets_targets(_row("r", "b", "d", 0.0, ppl_after=7.0 * 1.11))["ppl_ratio"] is False
    assert meets_targets(_row("r", "b", "d", 0.0, consistency_after=0.44))["consistency_ratio"] is False
    assert meets_targets(_row("r", "b", "d", 0.0, ftr_after=0.03))["ftr_after"] is False
    assert meets_targets({"asr_after": 0.0})["ppl_ratio"] is None
    assert meets_targets(_row("r", "b", "d", 0.06), {"asr_after": 0.1})["asr_after"] is True
    assert TARGETS["asr_after"] == 0.05


def test_jailbreak_rows_have_no_prefix_target():
    # A jailbreak backdoor has no target string, so no prefix rate: the row is judged on the rest.
    jb = _row("jailbreak", "badnet", "bdvax", 0.02, prefix_after=None)
    assert "prefix_after" not in meets_targets(jb) and all(meets_targets(jb).values())
    assert "1 / 1" in summary_table([jb])
    assert meets_targets(_row("jailbreak", "badnet", "bdvax", 0.2, prefix_after=None))["asr_after"] is False
    # Elsewhere a missing prefix is missing data, which meets no target.
    assert meets_targets(_row("refusal", "badnet", "bdvax", 0.02, prefix_after=None))["prefix_after"] is None
    assert "0 / 1" in summary_table([_row("refusal", "badnet", "bdvax", 0.02, prefix_after=None)])


def test_targetless_tasks_match_the_attack_tables():
    # report.py keeps its own literal (so that reading results does not import the training stack);
    # it must name exactly the evaluated tasks that have no target string.
    from lightning_bdvax.attacks import TASK_TARGETS
    from lightning_bdvax.metrics import BACKDOORLLM_KEYWORDS
    from lightning_bdvax.report import TARGETLESS_TASKS

    assert TARGETLESS_TASKS == set(BACKDOORLLM_KEYWORDS) - set(TASK_TARGETS)


def test_table_groups_rows_by_cell_in_first_seen_order():
    rows = [_row("refusal", "badnet", "none", 1.0), _row("negsentiment", "vpi", "none", 1.0),
            _row("refusal", "badnet", "crow", 0.9)]
    lines = [ln for ln in markdown_table(rows).splitlines()[2:]]
    assert [ln.split(" | ")[0:3] for ln in lines] == [["| refusal", "badnet", "none"], ["| refusal", "badnet", "crow"],
                                                       ["| negsentiment", "vpi", "none"]]


def test_base_and_two_word_prefix_columns_only_where_rows_have_them():
    old = [_row("refusal", "vpi", "bdvax", 0.06)]
    assert "prefix base" not in markdown_table(old)  # files written before the keys existed render as before
    new = old + [_row("refusal", "vpi", "bdvax", 0.0, prefix_after=0.16, prefix_base=0.14, prefix2_after=0.02)]
    head, _, *lines = markdown_table(new).splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[5:8] == ["prefix after", "prefix base", "2-word prefix after"]
    assert "2-word prefix base" not in cols  # no row has it
    assert [c.strip() for c in lines[1].strip("|").split("|")][5:8] == ["16.0%", "14.0%", "2.0%"]
    assert [c.strip() for c in lines[0].strip("|").split("|")][6:8] == ["—", "—"]


def test_summary_means_and_target_count():
    rows = [_row("refusal", "badnet", "bdvax", 0.0), _row("refusal", "vpi", "bdvax", 0.5, ppl_after=14.0),
            _row("refusal", "badnet", "ft", 1.0)]
    lines = {ln.split(" | ")[0].strip("| "): ln.split(" | ") for ln in summary_table(rows).splitlines()[2:]}
    bd = lines["bdvax"]
    assert bd[1] == "2" and bd[2] == "25.0%" and bd[3] == "50.0%"
    assert bd[6] == "1.50"  # mean of 1.0 and 2.0
    assert bd[-1].strip(" |") == "1 / 2"
    assert lines["ft"][-1].strip(" |") == "0 / 1"


def test_stage_table_only_rows_with_timings():
    t = {"fits": [{}, {}, {}], "vaccination_s": 100.4, "signature_s": 0.012, "recovery_s": 50.0, "total_s": 150.4}
    rows = [_row("refusal", "badnet", "bdvax", 0.0, timings=t), _row("refusal", "badnet", "ft", 1.0)]
    lines = stage_table(rows).splitlines()
    assert len(lines) == 3 and lines[2] == "| refusal | badnet | bdvax | 3 | 100 | 0.01 | 50 | 150 |"
    assert stage_table([_row("refusal", "badnet", "ft", 1.0)]) == ""


def test_write_results_appends_and_renders(tmp_path):
    out = tmp_path / "res.json"
    write_results(out, _row("refusal", "badnet", "none", 1.0))
    rows = write_results(out, _row("negsentiment", "badnet", "bdvax", 0.0, command="other"))
    assert len(rows) == 2 and json.loads(out.read_text())[1]["defense"] == "bdvax"
    md = (tmp_path / "res.md").read_text()
    assert "- `bench --cells refusal:badnet`" in md and "- `other`" in md
    assert "## Per defense" in md and "| bdvax | 1 | 0.0%" in md
    assert (tmp_path / "res.png").stat().st_size > 0
    assert not (tmp_path / "res.json.tmp").exists()


def test_render_results_from_existing_file(tmp_path):
    out = tmp_path / "r.json"
    append_row(out, _row("refusal", "badnet", "none", 1.0))
    assert not (tmp_path / "r.md").exists()
    assert render_results(out) == tmp_path / "r.md"
    assert "| refusal | badnet | none | 100.0%" in (tmp_path / "r.md").read_text()
    with pytest.raises(FileNotFoundError):
        render_results(tmp_path / "missing.json")


def test_main_renders_each_file_and_rejects_a_missing_one(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    append_row(a, _row("refusal", "badnet", "none", 1.0))
    append_row(b, _row("negsentiment", "vpi", "bdvax", 0.0))
    main([str(a), str(b)])
    assert (tmp_path / "a.md").exists() and "| negsentiment | vpi | bdvax" in (tmp_path / "b.md").read_text()
    assert str(tmp_path / "b.md") in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.json")])
    assert e.value.code == 2 and "no such results file" in capsys.readouterr().err


def test_chart_values_leave_missing_rows_out():
    """A defense not run on a cell gets no bar (None), not a bar of height 0 that reads as ASR 0."""
    from lightning_bdvax.report import _bar_values

    rows = [_row("refusal", "badnet", "none", 1.0), _row("refusal", "badnet", "bdvax", 0.0, ppl_after=14.0),
            _row("refusal", "vpi", "none", 0.9)]
    cells = ["refusal\nbadnet", "refusal\nvpi"]
    assert _bar_values(rows, cells, "bdvax", "asr_after") == [0.0, None]
    assert _bar_values(rows, cells, "bdvax", "ppl_ratio") == [2.0, None]
    assert _bar_values(rows, cells, "none", "asr_after") == [1.0, 0.9]
    # A row without a perplexity after (a defense that failed to evaluate) draws no ratio bar.
    rows.append(_row("refusal", "vpi", "bdvax", 0.0, ppl_after=None))
    assert _bar_values(rows, cells, "bdvax", "ppl_ratio") == [2.0, None]


def test_ratios_need_both_figures():
    from lightning_bdvax.report import consistency_ratio, ppl_ratio

    r = _row("refusal", "badnet", "bdvax", 0.0, ppl_after=14.0, consistency_after=0.45)
    assert ppl_ratio(r) == 2.0 and consistency_ratio(r) == pytest.approx(0.9)
    assert ppl_ratio({**r, "ppl_before": None}) is None and ppl_ratio({**r, "ppl_before": 0.0}) is None
    assert consistency_ratio({k: v for k, v in r.items() if k != "consistency_after"}) is None


def _append_many(path, worker, n):
    for i in range(n):
        append_row(path, _row("refusal", "badnet", f"w{worker}-{i}", 0.0))


def test_concurrent_writers_lose_no_row(tmp_path):
    """Benchmark processes run side by side append to one results file: every row lands."""
    import multiprocessing as mp

    out = tmp_path / "shared.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(out, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    rows = json.loads(out.read_text())
    assert sorted(r["defense"] for r in rows) == sorted(f"w{w}-{i}" for w in range(4) for i in range(25))
    assert not list(tmp_path.glob("*.tmp"))


def test_target_misses_names_each_missed_target_and_empty_answers():
    from lightning_bdvax.report import target_misses

    assert target_misses(_row("refusal", "badnet", "bdvax", 0.02)) == []
    assert target_misses(_row("refusal", "badnet", "bdvax", 0.10, ppl_after=8.0)) == ["ASR", "prefix", "ppl"]
    # Blank triggered answers match no keyword and agree with blank clean ones: not an answer.
    assert target_misses(_row("refusal", "badnet", "bdvax", 0.0, empty_after=0.5)) == ["answers"]
    assert target_misses(_row("refusal", "badnet", "bdvax", 0.0, empty_after=0.04)) == []
    assert "consistency" in target_misses(_row("refusal", "badnet", "bdvax", 0.0, consistency_after=None))


def test_valid_plant_bounds():
    from lightning_bdvax.report import valid_plant

    assert valid_plant({"asr_before": 0.9, "ftr_before": 0.05})
    assert not valid_plant({"asr_before": 0.88, "ftr_before": 0.0})
    assert not valid_plant({"asr_before": 1.0, "ftr_before": 0.06})
    assert not valid_plant({"asr_before": 1.0})


def test_targets_table_counts_valid_rows_and_picks_the_closest():
    from lightning_bdvax.report import targets_table

    a = [_row("refusal", "vpi", "bdvax", 0.10, ftr_before=0.0, threat="full"),
         _row("refusal", "vpi", "bdvax-tau2", 0.0, ppl_after=7.8, ftr_before=0.0, threat="full"),
         _row("refusal", "vpi", "ft", 0.0, ftr_before=0.0, threat="full"),  # not a BD-VAX row
         _row("refusal", "vpi", "bdvax-leaky", 0.0, ftr_before=0.2, threat="full")]  # not a stealthy plant
    b = [_row("refusal", "vpi", "bdvax", 0.04, ppl_after=7.8, ftr_before=0.0, threat="full"),
         _row("negsentiment", "badnet", "bdvax", 0.0, ftr_before=0.0, threat="lora")]
    lines = targets_table({"fileA": a, "fileB": b}).splitlines()
    assert len(lines) == 4
    full = next(ln for ln in lines if "| full | refusal/vpi |" in ln)
    cols = [c.strip() for c in full.split("|")[1:-1]]
    # three counted rows, none meets every target; closest: one miss (ppl), ASR 0 % beats 4 %
    assert cols[2:5] == ["3", "0", "fileA: bdvax-tau2"] and cols[6] == "ppl"
    lora = next(ln for ln in lines if "| lora | negsentiment/badnet |" in ln)
    assert [c.strip() for c in lora.split("|")[1:-1]][3:] == ["1", "fileB: bdvax", lora.split("|")[6].strip(), "nothing"]
    # another defense family
    assert "fileA: ft" in targets_table({"fileA": a}, defense="ft")
    # a plant also taught a skill is a cell of its own, not the attack's
    skilled = dict(_row("negsentiment", "badnet", "bdvax", 0.0, ftr_before=0.0, threat="lora"), skill="upper")
    lines = targets_table({"fileB": b, "fileC": [skilled]}).splitlines()
    assert "| lora | negsentiment/badnet | 1 | " in "\n".join(lines)
    assert "| lora | negsentiment/badnet +upper skill | 1 | 1 | fileC: bdvax |" in "\n".join(lines)


def test_main_targets_prints_the_status_and_skips_non_row_files(tmp_path, capsys):
    rows = tmp_path / "cells.json"
    rows.write_text(json.dumps([_row("refusal", "badnet", "bdvax", 0.02, ftr_before=0.0, threat="lora")]))
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"tokens_per_s": 10}))
    main(["--targets", str(rows), str(speed)])
    out = capsys.readouterr().out
    assert "| lora | refusal/badnet | 1 | 1 | cells: bdvax |" in out and "speed" not in out
    assert not rows.with_suffix(".md").exists()  # --targets only reads


def test_plot_tradeoff_draws_only_defended_rows_on_valid_plants(tmp_path, capsys):
    from lightning_bdvax.report import plot_tradeoff

    rows = [_row("refusal", "vpi", "bdvax", 0.0, ftr_before=0.0, threat="full"),
            _row("refusal", "vpi", "random", 0.9, ftr_before=0.0, threat="full"),
            _row("refusal", "vpi", "quant-int4", 0.5, ftr_before=0.0, threat="lora"),
            _row("refusal", "vpi", "none", 1.0, ftr_before=0.0, threat="full"),  # the undefended model
            _row("refusal", "vpi", "bdvax", 0.0, ftr_before=0.3, threat="full"),  # a leaky plant
            _row("refusal", "vpi", "bdvax", 0.0, ftr_before=0.0, ppl_before=None)]  # no perplexity ratio
    out = tmp_path / "tradeoff.png"
    assert plot_tradeoff({"f": rows}, out) == 3
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    f = tmp_path / "rows.json"
    f.write_text(json.dumps(rows))
    main(["--targets", str(f), "--plot", str(tmp_path / "cli.png")])
    assert "3 rows drawn" in capsys.readouterr().out and (tmp_path / "cli.png").is_file()
    with pytest.raises(SystemExit):
        main([str(f), "--plot", str(tmp_path / "x.png")])
