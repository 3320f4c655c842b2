"""ASR against the number of variants N, from one finished stage 1 (no extra fine-tune).

The signature at each n ≤ N_max uses the first n variants' statistics (the accumulator keeps
per-variant prefix sums), so the sweep costs one neutralization (+ optional recovery) and one
evaluation per n. Reuses a cell planted and vaccinated by ``bench_backdoorllm.py`` (its
``benchmarks/cache/<cell>-work-*/stage1.safetensors``) and writes
``<out-dir>/asr_vs_n_<task>_<attack>.json`` and ``.md``.

Example::

    python benchmarks/bench_asr_vs_n.py \\
        --cell-dir benchmarks/cache/smollm2-135m-instruct-full-negsentiment-badnet-s0-p150-lr0.0001-n200+400-crefusal \\
        --task negsentiment --attack badnet --recover-steps 0
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_bdvax.analysis import asr_vs_n, make_recover_fn  # noqa: E402
from lightning_bdvax.arch import find_mlp_modules  # noqa: E402
from lightning_bdvax.attacks import backdoorllm_cell  # noqa: E402
from lightning_bdvax.data import load_instructions  # noqa: E402
from lightning_bdvax.evaluate import evaluate_backdoor  # noqa: E402
from lightning_bdvax.models import configure_cpu, load_causal_lm, load_tokenizer  # noqa: E402
from lightning_bdvax.pipeline import RecoveryConfig, load_bdvax_config  # noqa: E402
from lightning_bdvax.signature import SignatureAccumulator  # noqa: E402


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell-dir", required=True, help="the planted (suspicious) model directory in the cache")
    ap.add_argument("--work-dir", default=None, help="its stage-1 work dir (default: <cell-dir>-work-*)")
    ap.add_argument("--data-dir", default="../shared/data/backdoorllm")
    ap.add_argument("--task", required=True)
    ap.add_argument("--attack", required=True)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_full.yaml"))
    ap.add_argument("--ns", default=None, help="comma-separated n values (default: 1..N_max)")
    ap.add_argument("--n-test", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--recover-steps", type=int, default=0, help="LM recovery steps per n on consistency_data (0: none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    configure_cpu(args.threads)
    cfg = load_bdvax_config(args.recipe)
    tok = load_tokenizer("smollm2-135m-instruct")
    sus = load_causal_lm(args.cell_dir)
    work = args.work_dir or sorted(glob.glob(args.cell_dir + "-work-*"))[0]
    acc = SignatureAccumulator(find_mlp_modules(sus))
    acc.load(Path(work) / "stage1.safetensors")
    cell = backdoorllm_cell(args.data_dir, args.task, args.attack)
    test, heldout = cell.test_poison[: args.n_test], cell.test_clean[:50]

    def eval_fn(m) -> dict:
        r = evaluate_backdoor(m, tok, test, cell.triggers, task=args.task, target=cell.target, heldout=heldout,
                              max_new_tokens=args.max_new_tokens, batch_size=64)
        return {k: r[k] for k in ("asr", "ftr", "prefix", "consistency", "ppl")}

    recover_fn = None
    if args.recover_steps:
        rec = load_instructions(f"{args.data_dir}/consistency_data/consistency_data.json")
        rc = RecoveryConfig(num_samples=100, steps=args.recover_steps, lr=2e-5)
        recover_fn = make_recover_fn(tok, rec, rc, precision="bf16-mixed")
    ns = [int(x) for x in args.ns.split(",")] if args.ns else list(range(1, acc.n + 1))
    out = Path(args.out_dir)
    stem = f"asr_vs_n_{args.task}_{args.attack}"
    t0 = time.perf_counter()
    rows: list[dict] = []
    before = eval_fn(sus)

    def on_row(r: dict) -> None:
        rows.append(r)
        print(f"n={r['n']}: ASR {r['asr']:.2f} prefix {r['prefix']:.2f} ppl {r['ppl']:.2f} "
              f"jaccard {r['jaccard_vs_final']:.3f}", flush=True)
        write(out, stem, args, before, rows, time.perf_counter() - t0)

    asr_vs_n(acc, sus, eval_fn=eval_fn, ns=ns, signature_cfg=cfg.signature,
             neutralize_cfg=cfg.neutralize, recover_fn=recover_fn, on_row=on_row)
    return rows


def write(out: Path, stem: str, args, before: dict, rows: list[dict], wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["bench_asr_vs_n.py"] + sys.argv[1:])
    (out / f"{stem}.json").write_text(json.dumps({"command": cmd, "suspicious": before, "rows": rows,
                                                  "wall_s": round(wall, 1)}, indent=1))
    rec = f"{args.recover_steps} LM recovery steps" if args.recover_steps else "no recovery"
    lines = [f"# ASR vs number of variants: {args.task} / {args.attack}", "",
             f"Command: `{cmd}`  ", f"{args.n_test} triggered prompts; {rec}; wall {wall:.0f} s.", "",
             f"Suspicious model: ASR {before['asr']:.1%}, prefix {before['prefix']:.1%}, ppl {before['ppl']:.2f}.", "",
             "| n | flagged | Jaccard with N_max | ASR | prefix | FTR | consistency | ppl |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['n_flagged']} | {r['jaccard_vs_final']:.3f} | {r['asr']:.1%} | {r['prefix']:.1%} | "
              f"{r['ftr']:.1%} | {r['consistency']:.3f} | {r['ppl']:.2f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
