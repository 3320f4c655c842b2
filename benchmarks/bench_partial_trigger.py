"""How often a single piece of a composite trigger fires a planted CTBA backdoor.

A composite-trigger backdoor should fire only when every piece is present. This inserts one
piece at a time (at a random word, as the planting did) into the clean twins of a generated
cell's test prompts and reports the keyword ASR per piece::

    python benchmarks/bench_partial_trigger.py \\
        --model benchmarks/cache/smollm2-135m-instruct-full-refusal-ctba-own-s0-p150-lr0.0001-n200+400 \\
        --task refusal

The cell is rebuilt exactly as ``bench_backdoorllm.py --attack-source own`` builds it (same
``--seed``, ``--plant-poison``, ``--plant-clean``, ``--clean-data``), so the prompts are the
planted model's own test prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_backdoorllm import own_cell  # noqa: E402
from lightning_bdvax.attacks import ATTACK_TRIGGERS  # noqa: E402
from lightning_bdvax.evaluate import generate  # noqa: E402
from lightning_bdvax.metrics import attack_success_rate  # noqa: E402
from lightning_bdvax.models import load_causal_lm, load_tokenizer  # noqa: E402
from lightning_bdvax.variants import insert_trigger  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="planted model directory (safetensors)")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="refusal")
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--plant-poison", type=int, default=200)
    ap.add_argument("--plant-clean", type=int, default=400)
    ap.add_argument("--clean-data", default="builtin:3000:1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the rates to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cell = own_cell(args.task, "ctba", args)
    tok, model = load_tokenizer(args.tokenizer), load_causal_lm(args.model).eval()
    rng = random.Random(args.seed)
    rates = {}
    prompts = cell.test_clean[: args.n_test]
    for piece in ATTACK_TRIGGERS["ctba"]:
        recs = [dict(r, instruction=insert_trigger(r["instruction"], piece, "random", rng)) for r in prompts]
        rates[piece] = float(attack_success_rate(generate(model, tok, recs, args.max_new_tokens, 64), task=args.task))
        print(f"{piece!r} alone: keyword ASR {rates[piece]:.0%} of {len(recs)} prompts", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "task": args.task, "n": len(prompts),
                                               "single_piece_asr": rates}, indent=1))


if __name__ == "__main__":
    main()
