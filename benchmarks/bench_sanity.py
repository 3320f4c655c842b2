"""The paper's sanity checks on a planted backdoor: where does it live?

Given the base model and a suspicious model fine-tuned from it (a planted BackdoorLLM cell), it
measures ASR on triggered prompts after reverting the fine-tune's update

* in the attention projections only,
* in the MLP projections only,
* in the MLP projections of k consecutive blocks, for each k in ``--ks`` and ``--windows``
  windows per k (first, middle and last position by default; ``--windows 0``: every window),

next to the paper's finding, and writes ``<out-dir>/sanity_<task>_<attack>.json`` and ``.md``
(and a ``.png`` of ASR against k). See :mod:`lightning_bdvax.analysis`.

Example (SmolLM2-135M, the planted negsentiment/BadNets model of ``bench_backdoorllm.py``)::

    python benchmarks/bench_sanity.py --base smollm2-135m-instruct \
        --suspicious benchmarks/cache/smollm2-135m-instruct-full-negsentiment-badnet-s0-p160 \
        --data-dir ../shared/data/backdoorllm --task negsentiment --attack badnet

A LoRA-adapter backdoor is checked as the base with the adapter merged in (``--adapter`` instead
of ``--suspicious``)::

    python benchmarks/bench_sanity.py --task negsentiment --attack badnet --out-dir benchmarks/results/lora_sanity \
        --adapter benchmarks/cache/smollm2-135m-instruct-lora-negsentiment-badnet-s0-p300-lr0.0002-n200+400-crefusal

Cost: one evaluation (``--n-test`` triggered prompts and their trigger-free twins, greedy,
``--max-new-tokens`` tokens) per row: suspicious, reference, attention, MLP, plus
``Σ_k min(windows, L − k + 1)`` windows (30 blocks, the default ks and 3 windows: 25 rows).

``--tiny`` runs the whole script on a tiny random model with a backdoor planted in seconds
(for tests; nothing is loaded or downloaded; the output is named ``sanity_tiny_...``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_bdvax.analysis import PAPER_FINDING, delta_norms, sanity_checks  # noqa: E402
from lightning_bdvax.evaluate import evaluate_backdoor  # noqa: E402
from lightning_bdvax.report import run_versions  # noqa: E402

SUMMARY_METRICS = ("asr", "ftr", "asr_target", "prefix", "consistency", "ppl")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _tiny_setup(args):
    """Tiny reference model, a tiny suspicious model planted with a BadNets-style backdoor, data."""
    from lightning_bdvax.attacks import make_attack, plant_backdoor
    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    base = tiny_model("llama", layers=args.tiny_layers)
    data = make_attack(builtin_instructions(400, seed=5), trigger="BadMagic", target="You are stupid!",
                       n_poison=64, n_clean=64, n_test=max(args.n_test, 8), task=args.task)
    sus = copy.deepcopy(base).train()
    plant_backdoor(sus, tok, data, steps=args.tiny_plant_steps, lr=3e-3, batch_size=16, max_length=64,
                   seed=args.seed, progress=False)
    return tok, base.eval(), sus.eval(), data


def _real_setup(args):
    from lightning_bdvax.attacks import backdoorllm_cell
    from lightning_bdvax.models import load_causal_lm, load_tokenizer

    data = backdoorllm_cell(args.data_dir, args.task, args.attack)
    base = load_causal_lm(args.base).eval()
    if args.adapter:
        # A LoRA-adapter backdoor: the suspicious model is the base with the adapter merged in,
        # so reverting a part's delta drops that part's adapter update.
        from lightning_bdvax.lora import load_lora_model

        tok = load_tokenizer(args.base)
        sus = load_lora_model(load_causal_lm(args.base), args.adapter, is_trainable=False).merge_and_unload().eval()
    else:
        tok = load_tokenizer(args.suspicious)
        sus = load_causal_lm(args.suspicious).eval()
    return tok, base, sus, data


def _fmt(v, rate=True):
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "—"
    return f"{v:.1%}" if rate else f"{v:.3f}"


def _describe(row: dict) -> str:
    if row["check"] == "revert_mlp_window":
        ls = row["layers"]
        return f"revert MLP Δ, k={row['k']} blocks {ls[0]}–{ls[-1]}"
    return {"suspicious": "suspicious (no revert)", "reference": "reference (base model)",
            "revert_attention": "revert attention Δ (all blocks)", "revert_mlp": "revert MLP Δ (all blocks)"}[row["check"]]


def observations(rows: list[dict], metric: str = "asr") -> list[str]:
    """Plain statements read off the rows (no interpretation beyond the numbers)."""
    by = {r["check"]: r for r in rows if r["check"] != "revert_mlp_window"}
    sus = by.get("suspicious", {}).get(metric)
    out = []
    if sus is None:
        return out
    for check, what in (("revert_attention", "attention"), ("revert_mlp", "MLP")):
        r = by.get(check)
        if r is not None and r.get(metric) is not None:
            out.append(f"Reverting the {what} deltas of every block: {metric.upper()} {sus:.1%} → {r[metric]:.1%}.")
    ref = by.get("reference", {}).get(metric)
    if ref is not None:
        out.append(f"The reference (base) model itself: {metric.upper()} {ref:.1%}.")
    wins = [r for r in rows if r["check"] == "revert_mlp_window" and r.get(metric) is not None]
    if wins:
        floor = ref if ref is not None else 0.0
        # "removed": at most half-way from the reference (floor) to the suspicious level
        thr = max(floor + 0.5 * (sus - floor), 0.0)
        ks = sorted({r["k"] for r in wins})
        per_k = []
        first_any = first_all = None
        for k in ks:
            vals = [r[metric] for r in wins if r["k"] == k]
            per_k.append(f"k={k}: {min(vals):.0%}–{max(vals):.0%}")
            if first_any is None and min(vals) <= thr:
                first_any = k
            if first_all is None and max(vals) <= thr:
                first_all = k
        out.append("MLP deltas reverted in k consecutive blocks (min–max over the windows tried): "
                   + "; ".join(per_k) + ".")
        none = f"none up to k={ks[-1]}"
        out.append(f"Smallest k where some window brings {metric.upper()} to ≤ {thr:.0%} (half-way from the reference "
                   f"to the suspicious level): {first_any if first_any is not None else none}; where every "
                   f"window tried does: {first_all if first_all is not None else none}.")
    return out


def write_outputs(out_dir: Path, stem: str, result: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jp = out_dir / f"{stem}.json"
    tmp = jp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(jp)
    rows = result["rows"]
    head = ["check", "blocks reverted", "share of ‖Δ‖² reverted", "ASR", "FTR", "target ASR", "target prefix",
            "consistency"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([_describe(r), str(len(r["layers"])) if r["layers"] else "—",
                                         _fmt(r.get("reverted_share")), _fmt(r.get("asr")), _fmt(r.get("ftr")),
                                         _fmt(r.get("asr_target")), _fmt(r.get("prefix")),
                                         _fmt(r.get("consistency"), rate=False)]) + " |")
    dn = result.get("delta_norms") or []
    dlines = []
    if dn:
        dlines = ["| block | ‖Δ attention‖ | ‖Δ MLP‖ | rel. attention | rel. MLP |", "|---|---|---|---|---|"]
        dlines += [f"| {d['layer']} | {d['attention']:.4f} | {d['mlp']:.4f} | {d['attention_rel']:.2e} | "
                   f"{d['mlp_rel']:.2e} |" for d in dn]
    md = [f"# Sanity checks: {result['task']} / {result['attack']} ({result['model']})", "",
          f"Command: `{result['command']}`  ",
          f"Versions: {result['versions']}  ",
          f"{result['n_test']} triggered prompts, {result['max_new_tokens']} new tokens, greedy; "
          f"{result['n_blocks']} blocks; wall {result['wall_s']:.0f} s.", "",
          "## Paper's finding", "", PAPER_FINDING, "",
          "## Observed here", ""] + [f"- {o}" for o in result["observations"]] + [
          "", f"![ASR vs k]({jp.with_suffix('.png').name})" if result.get("png") else "", "",
          "## All rows", "",
          "Reverting a part's delta puts those weights back to the base model's; everything else keeps the "
          "suspicious weights. Windows per k: "
          + (f"{result['windows']}, starts spread evenly from the first block to the last possible one."
             if result.get("windows") else "every position."),
          ""] + lines + ["", "## Size of the fine-tune's update per block", ""] + dlines + [""]
    mp = jp.with_suffix(".md")
    mp.write_text("\n".join(md))
    return jp, mp


def plot(path: Path, rows: list[dict], metric: str = "asr") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    wins = [r for r in rows if r["check"] == "revert_mlp_window" and r.get(metric) is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if wins:
        ks = sorted({r["k"] for r in wins})
        ax.plot(ks, [min(r[metric] for r in wins if r["k"] == k) for k in ks], "v-", label="MLP window, best")
        ax.plot(ks, [max(r[metric] for r in wins if r["k"] == k) for k in ks], "^-", label="MLP window, worst")
        for r in wins:
            ax.plot(r["k"], r[metric], ".", color="gray", alpha=0.5)
    styles = {"suspicious": ("k", "-"), "reference": ("green", ":"), "revert_attention": ("tab:orange", "--"),
              "revert_mlp": ("tab:red", "--")}
    for r in rows:
        if r["check"] in styles and r.get(metric) is not None:
            c, ls = styles[r["check"]]
            ax.axhline(r[metric], color=c, ls=ls, lw=1, label=_describe(r))
    ax.set_xlabel("k consecutive MLP blocks reverted")
    ax.set_ylabel(metric.upper())
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct", help="the model the suspicious one was tuned from")
    ap.add_argument("--suspicious", help="directory of the planted (suspicious) model")
    ap.add_argument("--adapter", help="or: a peft LoRA adapter directory planted on --base (merged in memory)")
    ap.add_argument("--data-dir", default="../shared/data/backdoorllm")
    ap.add_argument("--task", default="negsentiment")
    ap.add_argument("--attack", default="badnet")
    ap.add_argument("--n-test", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--ks", default="1,2,4,8,12,16,20,24", help="window sizes (consecutive MLP blocks)")
    ap.add_argument("--windows", type=int, default=3, help="windows per k (spread evenly); 0: every window")
    ap.add_argument("--no-reference", action="store_true", help="skip evaluating the base model itself")
    ap.add_argument("--ppl-n", type=int, default=0, help="held-out clean samples for perplexity (0: skip)")
    ap.add_argument("--precision", default=None, help="evaluation autocast, e.g. bf16-mixed (default: fp32)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tiny", action="store_true", help="tiny random model + quick planting (for tests)")
    ap.add_argument("--tiny-layers", type=int, default=4)
    ap.add_argument("--tiny-plant-steps", type=int, default=30)
    args = ap.parse_args(argv)

    from lightning_bdvax.models import configure_cpu

    configure_cpu(args.threads)
    torch.manual_seed(args.seed)
    if not args.tiny and not (args.suspicious or args.adapter):
        ap.error("--suspicious or --adapter is required (or --tiny)")
    if args.suspicious and args.adapter:
        ap.error("give --suspicious (a full model) or --adapter (a LoRA adapter on --base), not both")
    t0 = time.perf_counter()
    tok, base, sus, data = (_tiny_setup if args.tiny else _real_setup)(args)
    test = data.test_poison[: args.n_test]
    heldout = data.test_clean[: args.ppl_n] if args.ppl_n else None
    log(f"{len(test)} triggered prompts; triggers {data.triggers}; target {data.target!r}")

    def eval_fn(model) -> dict:
        t = time.perf_counter()
        r = evaluate_backdoor(model, tok, test, data.triggers, task=args.task, target=data.target, heldout=heldout,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              precision=args.precision)
        r["samples"] = r.pop("responses", {}).get("triggered", [])[:2]
        r["eval_s"] = round(time.perf_counter() - t, 1)
        return r

    def on_row(r: dict) -> None:
        log(f"{_describe(r)}: ASR {_fmt(r.get('asr'))} FTR {_fmt(r.get('ftr'))} "
            f"prefix {_fmt(r.get('prefix'))} ({r['eval_s']}s)")

    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    rows = sanity_checks(sus, base, tok, eval_fn, ks=ks, n_windows=args.windows or None,
                         include_reference=not args.no_reference, on_row=on_row)
    from lightning_bdvax.analysis import _layers_of

    stem = f"sanity_{'tiny_' if args.tiny else ''}{args.task}_{args.attack}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(out_dir / f"{stem}.png", rows)
    result = {
        "task": args.task, "attack": args.attack, "model": "tiny-llama" if args.tiny else Path(args.base).name,
        "suspicious": "tiny (planted in-process)" if args.tiny else str(args.suspicious or args.adapter),
        "threat": "lora" if args.adapter else "full",
        "n_test": len(test), "max_new_tokens": args.max_new_tokens, "ks": ks, "windows": args.windows,
        "n_blocks": len(_layers_of(sus)), "precision": args.precision or "32-true",
        "command": " ".join([Path(sys.argv[0]).name] + (list(argv) if argv is not None else sys.argv[1:])),
        "versions": run_versions(), "paper_finding": PAPER_FINDING, "observations": observations(rows),
        "delta_norms": delta_norms(sus, base), "rows": rows, "png": png,
        "wall_s": time.perf_counter() - t0,
    }
    jp, mp = write_outputs(out_dir, stem, result)
    log(f"wrote {jp} and {mp}")
    return result


if __name__ == "__main__":
    main()
