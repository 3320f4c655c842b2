"""benchmarks/bench_backdoorllm.py: the ``--base-only`` table of the un-poisoned base's rates."""

import json
from types import SimpleNamespace

import pytest

from helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench_backdoorllm")


def _row(bench, attack, prefix, *, heldout=None, command="bench --base-only x.json", source="backdoorllm",
         pool=(200, 400)):
    ev = {"asr": 0.02, "asr_target": 0.0, "prefix": prefix, "prefix2": 0.0, "prefix_clean": 0.01, "ftr": 0.0,
          "consistency": 0.4, "empty": 0.0, "ppl": 7.25, "responses": {"triggered": ["not kept"]}}
    args = SimpleNamespace(model="smollm2-135m-instruct", attack_source=source, heldout_task=heldout, seed=0)
    return bench.base_rate_row(ev, "negsentiment", attack, args, n_test=50, command=command,
                               pool=pool if source == "own" else None)


def test_base_rate_row_keeps_the_rates_not_the_answers(bench):
    row = _row(bench, "badnet", 0.06)
    assert row["prefix"] == 0.06 and row["ppl"] == 7.25 and row["heldout_task"] == "negsentiment"
    assert "responses" not in row


def test_base_rates_merge_by_cell_and_render(bench, tmp_path):
    out = tmp_path / "base_rates" / "base.json"
    bench.write_base_rates(str(out), [_row(bench, "badnet", 0.0), _row(bench, "vpi", 0.1)])
    # the same cell measured again replaces its row; another perplexity set is another row
    bench.write_base_rates(str(out), [_row(bench, "badnet", 0.04, command="second"),
                                      _row(bench, "badnet", 0.0, heldout="refusal", command="second")])
    rows = json.loads(out.read_text())
    assert [(r["attack"], r["heldout_task"], r["prefix"]) for r in rows] == [
        ("vpi", "negsentiment", 0.1), ("badnet", "negsentiment", 0.04), ("badnet", "refusal", 0.0)]
    md = out.with_suffix(".md").read_text()
    assert md.count("| negsentiment |") == 3
    assert "| negsentiment | badnet | backdoorllm | 50 | 2.0% | 0.0% | 4.0% | 0.0% | 1.0% | 0.0% | 0.400 | 0.0% | 7.25 |" in md
    assert "`second`" in md and "`bench --base-only x.json`" in md


def test_generated_cells_are_told_apart_by_their_pool(bench, tmp_path):
    """A generated cell's test prompts follow its planting records: another pool, another row."""
    out = tmp_path / "base.json"
    bench.write_base_rates(str(out), [_row(bench, "mtba", 0.0, source="own"),
                                      _row(bench, "mtba", 0.06, source="own", pool=(150, 500))])
    rows = json.loads(out.read_text())
    assert [(r["plant_poison"], r["plant_clean"], r["prefix"]) for r in rows] == [(200, 400, 0.0), (150, 500, 0.06)]
    md = out.with_suffix(".md").read_text()
    assert "| mtba | own (200+400) |" in md and "| mtba | own (150+500) |" in md
    assert _row(bench, "badnet", 0.0)["plant_poison"] is None  # a BackdoorLLM cell's test file is fixed


@pytest.mark.parametrize("argv, message", [
    (["--defenses", "none,fine-prune"], "unknown defense 'fine-prune'"),
    (["--trigger", "Thanks in advance!"], "need --attack-source own"),  # an attack of one's own is generated
    (["--recovery-skill"], "needs --clean-skill"),
    (["--clean-skill", "french"], "invalid choice: 'french'"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--rounds", "2", "--defenses", "none,ft"], "it needs bdvax in --defenses"),
])
def test_bad_arguments_are_refused_before_anything_loads(bench, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_attacks_of_ones_own_never_share_a_cached_plant(bench):
    def tag(trigger, style="random", target=None):
        return bench.custom_attack_tag(SimpleNamespace(trigger=trigger, trigger_style=style, target=target))

    assert tag([]) == ""  # BackdoorLLM's attacks keep their cache keys
    keys = {tag(["Thanks in advance!"]), tag(["Thanks in advance!"], "suffix"), tag(["zq"], "suffix"),
            tag(["zq"], "suffix", "Sorry, no."), tag([], target="Sorry, no.")}
    assert len(keys) == 5 and all(k.startswith("-x") for k in keys)
    assert tag(["zq"], "suffix") == tag(["zq"], "suffix")


def test_own_attack_style_counts_only_with_triggers(bench):
    def own(trigger, style="random", target=None):
        return bench.own_attack(SimpleNamespace(trigger=trigger, trigger_style=style, target=target))

    assert own([]) is None  # BackdoorLLM's attack
    assert own(["zq"], "suffix") == {"triggers": ["zq"], "style": "suffix", "target": None}
    # --target alone keeps BackdoorLLM's triggers and their insertion: no style of one's own
    assert own([], "suffix", "Sorry, no.") == {"triggers": None, "style": None, "target": "Sorry, no."}


def test_the_upper_skill_rewrites_answers_and_is_counted_by_its_letters(bench):
    recs = [{"instruction": "Name a colour.", "input": "", "output": "Blue, like the sky."}]
    skilled = bench.with_skill(recs, "upper")
    assert skilled[0]["output"] == "BLUE, LIKE THE SKY." and skilled[0]["instruction"] == "Name a colour."
    assert recs[0]["output"] == "Blue, like the sky."  # the planting records are not edited in place
    answers = ["BLUE, LIKE THE SKY.", "Blue, like the sky.", "OK", "THE SKY IS BLUe", "THE DOG SAYS Woof", ""]
    # capitals on at least 90 % of at least 5 letters: the 4th has 11/12, the 5th 11/15, "OK" too few
    assert bench.skill_rate(answers, "upper") == pytest.approx(2 / 6)
    assert bench.skill_rate([], "upper") == 0.0
    with pytest.raises(ValueError, match="unknown skill"):
        bench.skill_rate(answers, "french")


def test_skill_columns_show_only_when_rows_have_them():
    from lightning_bdvax.report import markdown_table

    row = {"task": "negsentiment", "attack": "badnet", "defense": "bdvax", "asr_before": 1.0, "asr_after": 0.0}
    assert "skill" not in markdown_table([row])
    md = markdown_table([dict(row, skill_base=0.0, skill_before=0.96, skill_after=0.5, ppl_skill_before=3.0,
                              ppl_skill_after=4.25)])
    assert md.splitlines()[0].endswith("| skill base | skill before | skill after | skill ppl before | skill ppl after |")
    assert md.splitlines()[2].endswith("| 0.0% | 96.0% | 50.0% | 3.00 | 4.25 |")
