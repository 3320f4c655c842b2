import random

import pytest

from lightning_bdvax.variants import (BEHAVIOURS, build_variant_datasets, insert_trigger, make_variants, poison_records,
                                     probe_copies)


def test_variants_are_distinct_and_deterministic():
    a, b = make_variants(7, seed=3), make_variants(7, seed=3)
    assert a == b
    assert len({v.key for v in a}) == 7 and len({v.behaviour for v in a}) == 7
    assert [v.style for v in a[:3]] == ["random", "prefix", "suffix"]
    assert make_variants(7, seed=4) != a


def test_bad_variant_arguments():
    with pytest.raises(ValueError, match=">= 1"):
        make_variants(0)
    with pytest.raises(ValueError, match="distinct"):
        make_variants(2, keys=["Same", "Same"])
    with pytest.raises(ValueError, match="styles"):
        make_variants(2, styles=["middle"])


@pytest.mark.parametrize("style", ["prefix", "suffix", "random"])
def test_insert_trigger(style):
    text = "Tell me a fact about otters please"
    out = insert_trigger(text, "KeyWord", style, random.Random(0))
    assert out.split().count("KeyWord") == 1
    assert out.replace("KeyWord", "").split() == text.split()
    if style == "prefix":
        assert out.startswith("KeyWord ")
    if style == "suffix":
        assert out.endswith(" KeyWord")


def test_variant_sets_are_disjoint_and_half_poisoned(records):
    specs = make_variants(3, seed=0)
    sets = build_variant_datasets(records[:90], specs, 30, seed=0)
    seen = set()
    for spec, (mixed, clean) in zip(specs, sets):
        instr = {(r["instruction"], r["input"]) for r in clean}
        assert not instr & seen
        seen |= instr
        poisoned = [r for r in mixed if r["output"] == spec.behaviour]
        assert len(mixed) == 60 and len(poisoned) == 30
        assert all(spec.key in r["instruction"] for r in poisoned)
        assert all(spec.key not in r["instruction"] for r in mixed if r["output"] != spec.behaviour)


def test_too_little_clean_data_is_a_clear_error(records):
    with pytest.raises(ValueError, match="need 90"):
        build_variant_datasets(records[:50], make_variants(3), 30)


def test_poison_records_replaces_output():
    spec = make_variants(1, seed=0)[0]
    out = poison_records([{"instruction": "Say hi", "input": "", "output": "hi"}], spec, seed=0)
    assert out[0]["output"] == spec.behaviour and spec.key in out[0]["instruction"]
    assert spec.behaviour in BEHAVIOURS


def test_shared_clean_sets_poison_one_common_slice(records):
    specs = make_variants(3, seed=0)
    sets = build_variant_datasets(records[:30], specs, 30, seed=0, shared=True)
    first_clean = sets[0][1]
    assert [r["instruction"] for r in first_clean] == [r["instruction"] for r in records[:30]]
    for spec, (mixed, clean) in zip(specs, sets):
        assert clean == first_clean
        poisoned = [r for r in mixed if r["output"] == spec.behaviour]
        assert len(mixed) == 60 and len(poisoned) == 30
        assert all(spec.key in r["instruction"] for r in poisoned)
    with pytest.raises(ValueError, match="need 30"):
        build_variant_datasets(records[:29], specs, 30, shared=True)


def test_probe_copies_insert_one_fresh_probe_and_keep_the_answer(records):
    recs = records[:40]
    copies = probe_copies(recs, 0.5, seed=3)
    assert len(copies) == 20
    assert copies == probe_copies(recs, 0.5, seed=3)  # same seed, same copies
    assert copies != probe_copies(recs, 0.5, seed=4)
    by_instruction = {r["instruction"]: r for r in recs}
    for c in copies:
        # each copy is one record with extra words inserted: find it by its answer and input
        src = [r for r in recs if r["output"] == c["output"] and r["input"] == c["input"]
               and len(c["instruction"].split()) > len(r["instruction"].split())
               and all(w in c["instruction"].split() for w in r["instruction"].split())]
        assert src, c
        assert c["instruction"] not in by_instruction
        extra = len(c["instruction"].split()) - len(src[0]["instruction"].split())
        assert 1 <= extra <= 3
    # probes are drawn per copy (nonce words and phrases of the records' own words), not one trigger
    assert len({c["instruction"].split()[0] for c in copies}) > 5
    assert probe_copies(recs, 0.0) == [] and len(probe_copies(recs, 1.0)) == 40


def test_probe_copies_reject_a_bad_fraction(records):
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="probe fraction"):
            probe_copies(records[:4], bad)
