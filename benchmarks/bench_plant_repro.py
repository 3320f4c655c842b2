"""Is a seeded plant bit-identical? Plant a backdoor for a few steps and record a digest of the result.

Same seed, same code and the same CPU must give the same bytes; this measures whether they do,
and what changes when the code revision or the CPU does (bf16 kernels round differently on
different instruction sets). Each run appends one row to ``--out`` (JSON) and rewrites the
Markdown table beside it::

    python benchmarks/bench_plant_repro.py --cell refusal:badnet --steps 40
    # the same plant with the package of an older revision:
    git worktree add /tmp/old <commit>
    python benchmarks/bench_plant_repro.py --cell refusal:badnet --steps 40 --code /tmp/old

Rows with the same settings and CPU but different digests mean the plant is not reproducible.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Taken from this checkout before --code swaps the package: the digest and the row format stay ours.
from lightning_bdvax.models import tensor_digest  # noqa: E402
from lightning_bdvax.report import append_row, run_versions  # noqa: E402
# Plant exactly as the main benchmark does (its pool and its fixed training settings).
from bench_backdoorllm import PLANT_SETTINGS, take_plant_pool  # noqa: E402


def revision(directory: Path) -> str:
    """``git rev-parse HEAD`` of ``directory`` (``+dirty`` with uncommitted changes to the package)."""
    try:
        rev = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "lightning_bdvax"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def use_code(directory: Path) -> None:
    """Import ``lightning_bdvax`` from ``directory`` from here on (the rows' versions are taken first)."""
    if not (directory / "lightning_bdvax" / "__init__.py").is_file():
        raise SystemExit(f"--code {directory}: no lightning_bdvax package there")
    for name in [m for m in sys.modules if m == "lightning_bdvax" or m.startswith("lightning_bdvax.")]:
        del sys.modules[name]
    sys.path.insert(0, str(directory))


def write_markdown(json_path: Path, rows: list[dict]) -> None:
    lines = [f"# {json_path.stem}\n", "Seeded plants, a digest of the trained tensors per run "
             "(`benchmarks/bench_plant_repro.py`).\n",
             "| cell | threat | steps | poison + clean | precision | code | CPU | torch / transformers | digest | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["versions"]
        lines.append(f"| {r['cell']} | {r['threat']} | {r['steps']} | {r['plant_poison']} + {r['plant_clean']} | "
                     f"{r['precision']} | {r['code'][:10]}{'+dirty' if r['code'].endswith('+dirty') else ''} | "
                     f"{v.get('cpu')} | {v.get('torch')} / {v.get('transformers')} | `{r['digest'][:16]}` | "
                     f"{r['wall_s']:.0f} |")
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "backdoorllm"))
    ap.add_argument("--cell", default="refusal:badnet", help="task:attack of the BackdoorLLM data directory")
    ap.add_argument("--threat", choices=("lora", "full"), default="lora")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--plant-poison", type=int, default=150)
    ap.add_argument("--plant-clean", type=int, default=500)
    ap.add_argument("--plant-lr", type=float, default=None, help="default: 2e-4 (lora), 2e-5 (full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto",
                    help="auto: bf16-mixed on a bf16 CPU, else 32-true (as bench_backdoorllm plants)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--code", type=Path, default=None,
                    help="plant with the lightning_bdvax package of this checkout (e.g. a worktree of an older commit)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plant_repro.json")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    try:
        task, attack = args.cell.split(":")
    except ValueError:
        ap.error(f"--cell must be task:attack, got {args.cell!r}")
    versions = run_versions()
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    code_dir = args.code.resolve() if args.code else ROOT
    if args.code:
        use_code(code_dir)

    from lightning_bdvax.attacks import backdoorllm_cell, plant_backdoor
    from lightning_bdvax.lora import plant_lora_backdoor
    from lightning_bdvax.models import choose_precision, configure_cpu, load_causal_lm, load_tokenizer

    configure_cpu(args.threads)
    precision = choose_precision(args.precision)
    precision = "bf16-mixed" if precision == "bf16-master" else precision
    lr = args.plant_lr or (2e-4 if args.threat == "lora" else 2e-5)
    data = backdoorllm_cell(args.data_dir, task, attack)
    take_plant_pool(data, args.plant_poison, args.plant_clean, args.cell)
    tok = load_tokenizer(args.model)
    base = load_causal_lm(args.model)
    t = time.perf_counter()
    kw = dict(steps=args.steps, lr=lr, precision=precision, seed=args.seed, progress=False, **PLANT_SETTINGS)
    if args.threat == "lora":
        model = plant_lora_backdoor(copy.deepcopy(base), tok, data, **kw)
        state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    else:
        model = plant_backdoor(copy.deepcopy(base), tok, data, **kw)
        state = model.state_dict()
    row = {"cell": args.cell, "threat": args.threat, "steps": args.steps, "plant_poison": args.plant_poison,
           "plant_clean": args.plant_clean, "plant_lr": lr, "seed": args.seed, "precision": precision,
           "code": revision(code_dir), "digest": tensor_digest(state), "tensors": len(state),
           "max_abs": max(float(v.detach().abs().max()) for v in state.values()),
           "wall_s": time.perf_counter() - t, "command": command, "versions": versions}
    rows = append_row(args.out, row)
    write_markdown(args.out, rows)
    same = [r for r in rows[:-1] if all(r[k] == row[k] for k in ("cell", "threat", "steps", "plant_poison",
                                                                  "plant_clean", "plant_lr", "seed", "precision"))]
    print(json.dumps({k: row[k] for k in ("cell", "steps", "precision", "code", "digest", "wall_s")}))
    for r in same:
        print(f"  same settings, {r['versions'].get('cpu')}, code {r['code'][:10]}: "
              f"{'identical' if r['digest'] == row['digest'] else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
