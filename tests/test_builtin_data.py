"""Tests for the project's own procedurally generated instruction data."""

import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from lightning_bdvax.builtin_data import (
    builtin_capacity,
    builtin_families,
    builtin_instructions,
    builtin_splits,
)

_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _nums(text):
    return [Fraction(x) for x in _NUM.findall(text)]


def _quoted(text):
    return re.findall(r'"([^"]*)"', text)


@pytest.fixture(scope="module")
def big():
    return builtin_instructions(6000, seed=0, return_family=True)


def _by_family(records):
    out = {}
    for r in records:
        out.setdefault(r["family"], []).append(r)
    return out


def test_schema_and_types(big):
    assert len(big) == 6000
    for r in big:
        assert set(r) == {"instruction", "input", "output", "family"}
        assert all(isinstance(v, str) for v in r.values())
        assert r["instruction"].strip() and r["output"].strip()
        assert len(r["output"].split()) <= 60
    plain = builtin_instructions(50, seed=1)
    assert all(set(r) == {"instruction", "input", "output"} for r in plain)
    # input is usually empty but sometimes carries the text to operate on
    empty = sum(r["input"] == "" for r in big)
    assert len(big) // 2 < empty < len(big)


def test_deterministic_and_seed_dependent():
    a = builtin_instructions(500, seed=7)
    b = builtin_instructions(500, seed=7)
    c = builtin_instructions(500, seed=8)
    assert a == b
    assert a != c
    assert {(r["instruction"], r["input"]) for r in a} != {(r["instruction"], r["input"]) for r in c}


def test_does_not_touch_global_random_state():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    builtin_instructions(300, seed=3)
    assert random.random() == expected


def test_unique_at_6000(big):
    keys = [(r["instruction"], r["input"]) for r in big]
    assert len(set(keys)) == len(keys)


def test_unique_at_full_capacity():
    cap = builtin_capacity()
    assert cap >= 6000
    recs = builtin_instructions(cap, seed=5)
    assert len({(r["instruction"], r["input"]) for r in recs}) == cap


@pytest.mark.parametrize("n", [0, 1, 7, 33])
def test_small_sizes(n):
    recs = builtin_instructions(n, seed=2)
    assert len(recs) == n
    assert len({(r["instruction"], r["input"]) for r in recs}) == n


def test_invalid_n():
    with pytest.raises(ValueError, match="non-negative"):
        builtin_instructions(-1)
    with pytest.raises(ValueError, match="exceeds"):
        builtin_instructions(builtin_capacity() + 1)
    with pytest.raises(ValueError):
        builtin_instructions(2.5)  # type: ignore[arg-type]


def test_family_diversity_and_interleaving(big):
    names = builtin_families()
    assert len(names) >= 20 and len(set(names)) == len(names)
    counts = Counter(r["family"] for r in big)
    assert set(counts) == set(names)  # every family is used at n=6000
    assert max(counts.values()) < 0.1 * len(big)  # no family dominates
    small = builtin_instructions(300, seed=0, return_family=True)
    assert len({r["family"] for r in small}) >= 20
    # interleaved, not blocks: consecutive records rarely share a family
    same = sum(a["family"] == b["family"] for a, b in zip(big, big[1:]))
    assert same < 0.15 * len(big)
    # several phrasings per family
    fams = _by_family(big)
    for fam, recs in fams.items():
        shapes = {re.sub(r'"[^"]*"|-?\d+(\.\d+)?', "#", r["instruction"]) for r in recs}
        if fam not in {"uppercase", "lowercase", "make_question", "word_count"}:
            assert len(shapes) >= 2, fam


def test_splits_disjoint_and_sized():
    sizes = {"plant": 400, "defense": 800, "test": 100}
    splits = builtin_splits(sizes, seed=3)
    assert list(splits) == list(sizes)
    keys = {}
    for name, recs in splits.items():
        assert len(recs) == sizes[name]
        keys[name] = {(r["instruction"], r["input"]) for r in recs}
        assert len(keys[name]) == sizes[name]
    assert not keys["plant"] & keys["defense"]
    assert not keys["plant"] & keys["test"]
    assert not keys["defense"] & keys["test"]
    assert builtin_splits(sizes, seed=3) == splits
    with pytest.raises(ValueError):
        builtin_splits({"a": -1})
    with pytest.raises(ValueError):
        builtin_splits({"a": 100_000_000})


def test_arithmetic_correct(big):
    fams = _by_family(big)
    for r in fams["addition"]:
        a, b = _nums(r["instruction"])
        assert _nums(r["output"])[-1] == a + b, r
    for r in fams["subtraction"]:
        a, b = _nums(r["instruction"])
        assert _nums(r["output"])[-1] == abs(a - b), r
    for r in fams["multiplication"]:
        a, b = _nums(r["instruction"])
        assert _nums(r["output"])[-1] == a * b, r
    for r in fams["division"]:
        a, b = _nums(r["instruction"])
        # "How many times does b go into a" lists the divisor first
        if "go into" in r["instruction"]:
            a, b = b, a
        assert _nums(r["output"])[-1] == a / b, r


def test_number_tasks_correct(big):
    fams = _by_family(big)
    for r in fams["compare_numbers"]:
        a, b = _nums(r["instruction"])
        ins, out = r["instruction"], r["output"]
        if "larger" in ins:
            assert f"{max(a, b)} is larger" in out or out.endswith(f"is {max(a, b)}."), r
        elif "smaller" in ins:
            assert f"{min(a, b)} is smaller" in out or out.endswith(f"is {min(a, b)}."), r
        elif "greater than" in ins:
            assert out.startswith("Yes" if a > b else "No"), r
        else:
            assert out.startswith("Yes" if a < b else "No"), r
    for r in fams["even_odd"]:
        (n,) = _nums(r["instruction"])
        parity = "even" if n % 2 == 0 else "odd"
        other = "odd" if parity == "even" else "even"
        assert f"is {parity}" in r["output"] or f"is an {parity}" in r["output"]
        assert f"is {other}" not in r["output"] and f"an {other}" not in r["output"]
    for r in fams["number_sequence"]:
        terms = _nums(r["instruction"])
        step = terms[1] - terms[0]
        assert all(y - x == step for x, y in zip(terms, terms[1:]))
        assert f"next number is {terms[-1] + step}" in r["output"] or \
            f"next one is {terms[-1] + step}" in r["output"], r
    for r in fams["largest_smallest"]:
        nums = _nums(r["instruction"])
        want = max(nums) if ("largest" in r["instruction"] or "biggest" in r["instruction"]) else min(nums)
        assert _nums(r["output"]) == [want], r
    for r in fams["sort_numbers"]:
        nums = _nums(r["instruction"] + " " + r["input"])
        desc = "largest to smallest" in r["instruction"] or "descending" in r["instruction"]
        assert _nums(r["output"]) == sorted(nums, reverse=desc), r
    for r in fams["rounding"]:
        (n,) = _nums(r["instruction"])
        step = 10 if "ten" in r["instruction"] else 100
        expected = (int(n) + step // 2) // step * step
        assert _nums(r["output"])[-1] == expected or f"becomes {expected}." in r["output"], r


def test_conversions_correct(big):
    fams = _by_family(big)
    factors = {("kilometer", "meter"): 1000, ("meter", "kilometer"): Fraction(1, 1000),
               ("meter", "centimeter"): 100, ("centimeter", "meter"): Fraction(1, 100),
               ("hour", "minute"): 60, ("minute", "hour"): Fraction(1, 60),
               ("minute", "second"): 60, ("day", "hour"): 24, ("week", "day"): 7,
               ("kilogram", "gram"): 1000, ("gram", "kilogram"): Fraction(1, 1000)}
    checked = 0
    for fam in ("length_conversion", "time_conversion", "mass_conversion"):
        for r in fams[fam]:
            m = re.search(r"([\d.]+) (\w+?)s? (?:to|in) (\w+?)s\b", r["instruction"]) or \
                re.search(r"How many (\w+?)s are in ([\d.]+) (\w+?)s?\?", r["instruction"])
            assert m, r
            if r["instruction"].startswith("How many"):
                to_u, v, from_u = m.group(1), Fraction(m.group(2)), m.group(3)
            else:
                v, from_u, to_u = Fraction(m.group(1)), m.group(2), m.group(3)
            expected = v * factors[(from_u, to_u)]
            assert expected in _nums(r["output"]), r
            checked += 1
    assert checked > 100
    for r in fams["temperature_conversion"]:
        v = _nums(r["instruction"])[0]
        if "degrees Celsius" in r["instruction"]:
            exact = v * Fraction(9, 5) + 32
        else:
            exact = (v - 32) * Fraction(5, 9)
        got = _nums(r["output"].split(",")[-1])[-1]
        assert abs(got - exact) <= Fraction(1, 20), r
        assert ("about" in r["output"]) == (got != exact), r


def test_word_tasks_correct(big):
    fams = _by_family(big)
    for r in fams["reverse_word"]:
        word = r["input"] or _quoted(r["instruction"])[0]
        assert f'"{word[::-1]}"' in r["output"], r
    for r in fams["spell_word"]:
        word = r["input"] or _quoted(r["instruction"])[0]
        assert "-".join(word.upper()) in r["output"], r
    for r in fams["word_length"]:
        word = r["input"] or _quoted(r["instruction"])[0]
        assert _nums(r["output"]) == [len(word)], r
    for r in fams["letter_occurrence"]:
        letter, word = _quoted(r["instruction"])[:2]
        k = word.count(letter)
        words = {1: "once", 2: "twice"}.get(k, f"{k} times")
        assert words in r["output"], r
    for r in fams["first_last_letter"]:
        (word,) = _quoted(r["instruction"])
        first = "first" in r["instruction"] or "start" in r["instruction"]
        assert _quoted(r["output"])[-1] == (word[0] if first else word[-1]), r
    for r in fams["alphabetical_order"]:
        text = r["input"] or r["instruction"].split(": ", 1)[1].rstrip(".")
        words = [w.strip() for w in text.split(",")]
        listed = r["output"].split(": ", 1)[1].rstrip(".")
        assert [w.strip() for w in listed.split(",")] == sorted(words), r
    for r in fams["word_count"]:
        sentence = r["input"] or _quoted(r["instruction"])[0]
        assert _nums(r["output"]) == [len(sentence.split())], r
    for r in fams["uppercase"]:
        assert r["output"].endswith(r["input"].upper()) and r["input"] != r["input"].upper()
    for r in fams["lowercase"]:
        assert r["output"].endswith(r["input"].lower()) and r["input"] == r["input"].upper()
    for r in fams["make_question"]:
        assert r["input"].endswith(".") and r["output"].endswith("?")


def test_table_tasks_correct(big):
    fams = _by_family(big)
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    for r in fams["day_of_week"]:
        start = next(d for d in days if d in r["instruction"])
        (k,) = _nums(r["instruction"])
        sign = -1 if ("ago" in r["instruction"] or "before" in r["instruction"]) else 1
        expected = days[(days.index(start) + sign * int(k)) % 7]
        assert f"{expected}." in r["output"], r
    months = ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"]
    for r in fams["month_offset"]:
        start = next(m for m in months if m in r["instruction"])
        (k,) = _nums(r["instruction"])
        sign = -1 if ("ago" in r["instruction"] or "before" in r["instruction"]) else 1
        expected = months[(months.index(start) + sign * int(k)) % 12]
        assert r["output"].endswith(f"{expected}."), r
    spot = {"France": "Paris", "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra"}
    for r in fams["capital_city"]:
        for country, city in spot.items():
            if country in r["instruction"] or city in r["instruction"]:
                assert city in r["output"] and country in r["output"], r
                others = [c for c in spot if c != country] + [k for k in spot.values() if k != city]
                assert not any(o in r["output"] for o in others), r
    mixes = {frozenset({"red", "yellow"}): "orange", frozenset({"blue", "yellow"}): "green",
             frozenset({"red", "blue"}): "purple"}
    for r in fams["color_mixing"]:
        for pair, result in mixes.items():
            a, b = sorted(pair)
            if re.search(rf"\b{a}\b", r["instruction"]) and re.search(rf"\b{b}\b", r["instruction"]):
                assert result in r["output"], r
    for r in fams["plural"]:
        if '"child"' in r["instruction"]:
            assert '"children"' in r["output"]
        if '"mouse"' in r["instruction"]:
            assert '"mice"' in r["output"]
    for r in fams["list_items"]:
        k = _nums(r["instruction"])
        if k:
            listed = r["output"].split(":")[-1]
            assert len(re.split(r",\s*(?:and\s+)?|\s+and\s+", listed.strip(" .").replace("Sure! ", ""))) == int(k[0]), r


def test_outputs_are_sentences(big):
    for r in big:
        out = r["output"]
        assert out[-1] in ".?!)", r
        assert "{" not in out and "}" not in out and "{" not in r["instruction"], r
