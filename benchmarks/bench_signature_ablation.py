"""Signature and recovery ablations on one planted cell, reusing its cached stage-1 statistics.

Run after ``benchmarks/run_full_smollm2.sh`` has planted and vaccinated the cell (the stage-1
state in ``benchmarks/cache/<cell>-work-*/stage1.safetensors`` is reused: no variant is refitted).

    python benchmarks/bench_signature_ablation.py --part scoring    # neutralize only: scoring rule x tau
    python benchmarks/bench_signature_ablation.py --part recovery   # tau x recovery objective
    python benchmarks/bench_signature_ablation.py --part neuron     # per-module vs per-neuron selection
    python benchmarks/bench_signature_ablation.py --part scope      # which weights the recovery trains
    python benchmarks/bench_signature_ablation.py --part proj       # zero one projection type at a time
    python benchmarks/bench_signature_ablation.py --part snr        # score ÷ the channel's clean-update norm
    python benchmarks/bench_signature_ablation.py --part protect    # spare the neurons clean inputs rely on most
    python benchmarks/bench_signature_ablation.py --part stability  # overlap of the signatures of every cached stage 1
    python benchmarks/bench_signature_ablation.py --part pooled     # pool every cached stage 1 (N = 6 x seeds), then
                                                                    # the recipe's neutralize + recovery, benchmark eval
    python benchmarks/bench_signature_ablation.py --part mean       # zero vs mean-ablate the flagged neurons
    python benchmarks/bench_signature_ablation.py --part massive    # spare the massive-activation neurons
    python benchmarks/bench_signature_ablation.py --part oracle     # where the planted backdoor lives: revert or
                                                                    # zero the channels the planting moved most
                                                                    # (needs the un-poisoned model: not a defense)
    python benchmarks/bench_signature_ablation.py --part attribution  # zero the neurons whose removal most raises the
                                                                    # planted loss (needs the poisoned training data:
                                                                    # not a defense)
    python benchmarks/bench_signature_ablation.py --part sweep --work-dir DIR  # neutralize only, tau 0.3 / 1 / 3 %
                                                                    # with the stage 1 in DIR (--random: the control too)

Prints one line per setting (24 triggered prompts, 30 held-out answers for perplexity).
"""

from __future__ import annotations

import argparse
import copy
import glob
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_bdvax.arch import channel_rows, find_mlp_modules  # noqa: E402
from lightning_bdvax.attacks import backdoorllm_cell  # noqa: E402
from lightning_bdvax.data import load_instructions  # noqa: E402
from lightning_bdvax.evaluate import generate, perplexity  # noqa: E402
from lightning_bdvax.metrics import attack_success_rate, remove_trigger, target_prefix_rate, trigger_consistency  # noqa: E402
from lightning_bdvax.models import configure_cpu, load_causal_lm, load_tokenizer  # noqa: E402
from lightning_bdvax.neutralize import neutralize_  # noqa: E402
from lightning_bdvax.pipeline import RecoveryConfig, recover  # noqa: E402
from lightning_bdvax.signature import Signature, SignatureAccumulator, select_channels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["scoring", "recovery", "neuron", "scope", "proj", "snr", "protect", "stability", "pooled", "sweep", "mean", "massive", "oracle", "attribution"], default="scoring")
    ap.add_argument("--cell-dir", default=str(ROOT / "benchmarks/cache/smollm2-135m-instruct-full-refusal-badnet-s0-p150-lr0.0001-n200+400"))
    ap.add_argument("--data-dir", default="../shared/data/backdoorllm")
    ap.add_argument("--task", default="refusal")
    ap.add_argument("--attack", default="badnet")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50, help="recovery steps (--part scope)")
    ap.add_argument("--work-dir", default=None, help="the stage-1 state to use (default: the first <cell-dir>-work-*)")
    ap.add_argument("--taus", default="0.003,0.01,0.03", help="--part sweep: the per-module tau values")
    ap.add_argument("--random", action="store_true", help="--part sweep: also random channels of the same count")
    ap.add_argument("--spare-ratios", default="1000,50,20",
                    help="--part massive: spare neurons whose clean peak is >= R x their block's median peak")
    ap.add_argument("--spare-massive", type=float, default=0.0,
                    help="--part scope / attribution: spare the massive-activation neurons (clean peak >= R x "
                         "block median) first")
    ap.add_argument("--adapter", default=None,
                    help="--part oracle / attribution: a LoRA adapter directory planted on SmolLM2-135M-Instruct "
                         "(merged in memory) instead of --cell-dir")
    ap.add_argument("--oracle-blocks", default="",
                    help="--part oracle: also revert the MLP of these block ranges, e.g. 0-15,15-30")
    args = ap.parse_args()
    args.oracle_blocks = [tuple(int(x) for x in r.split("-")) for r in args.oracle_blocks.split(",") if r]
    warnings.filterwarnings("ignore")
    for n in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(n).setLevel(logging.ERROR)
    configure_cpu(args.threads)
    tok = load_tokenizer("smollm2-135m-instruct")
    if args.adapter:
        # A LoRA-adapter backdoor (--part oracle / attribution): the suspicious model is the base
        # with the adapter merged in; the planting update is then the adapter's own.
        from lightning_bdvax.lora import load_lora_model

        sus = load_lora_model(load_causal_lm("smollm2-135m-instruct"), args.adapter,
                              is_trainable=False).merge_and_unload().eval()
        args.cell_dir = args.adapter
    else:
        sus = load_causal_lm(args.cell_dir)
    if args.part == "stability":
        # Stage 1 of the same cell under different seeds (or settings): how much do the selections agree?
        mods = find_mlp_modules(sus)
        dirs, accs = cached_stage1s(args.cell_dir, mods)
        if len(dirs) < 2:
            raise SystemExit(f"need two or more cached stage-1 states ({args.cell_dir}-work-*), found {len(dirs)}")
        downs = [cm.key for cm in mods if cm.role == "in"]
        sel = {d: {tau: select_channels(a.scores(0.01), tau) for tau in (0.01, 0.03, 0.1)} for d, a in zip(dirs, accs)}
        for i, d1 in enumerate(dirs):
            for d2 in dirs[i + 1:]:
                for tau in (0.01, 0.03, 0.1):
                    a, b = sel[d1][tau], sel[d2][tau]
                    j, jd = jaccard(a, b), jaccard(a, b, downs)
                    print(f"{Path(d1).name[-10:]} vs {Path(d2).name[-10:]} tau {tau:.0%}: Jaccard {j:.3f} "
                          f"(down_proj {jd:.3f}; random selections: about {tau / (2 - tau):.3f})", flush=True)
        return
    if args.part == "pooled":
        pooled_part(args, sus, tok)
        return
    cell = backdoorllm_cell(args.data_dir, args.task, args.attack)
    held, trig = cell.test_clean[:30], cell.test_poison[:24]
    stripped = [dict(r, instruction=remove_trigger(r["instruction"], cell.triggers[0])) for r in trig]
    mods = find_mlp_modules(sus)
    acc = SignatureAccumulator(mods)
    work = args.work_dir or next(iter(sorted(glob.glob(args.cell_dir + "-work-*"))), None)
    if work is None or args.adapter:  # the oracles need no stage 1 (an adapter's is on other module names)
        if args.part not in ("oracle", "attribution"):
            raise SystemExit(f"no stage-1 state for {args.cell_dir} (give --work-dir)")
        acc = None
    else:
        acc.load(work + "/stage1.safetensors")
        mag, ali = acc.magnitude(), acc.alignment()

    def ev(w):
        out = generate(w, tok, trig, max_new_tokens=24, batch_size=24)
        ref = generate(w, tok, stripped, max_new_tokens=24, batch_size=24)
        return {"ppl": round(perplexity(w, tok, held), 2), "prefix": round(float(target_prefix_rate(out, cell.target, 2)), 3),
                "asr": round(float(attack_success_rate(out, task=args.task)), 3),
                "consistency": round(float(trigger_consistency(out, ref)), 3)}

    groups = {cm.key: cm.block for cm in mods}

    def neuron_masks(scores, tau):
        return select_channels(scores, tau, "per_neuron", groups=groups)

    def dead_neurons(masks):
        blocks: dict = {}
        for cm in mods:
            blocks[cm.block] = blocks.get(cm.block, torch.zeros_like(masks[cm.key])) | masks[cm.key]
        return sum(int(v.sum()) for v in blocks.values())

    def zeroed(masks, scores):
        w = copy.deepcopy(sus)
        neutralize_(w, Signature(masks, scores, {}), mode="zero")
        return w

    def neutralized(scores, tau):
        return zeroed(select_channels(scores, tau), scores)

    print("suspicious", ev(sus), flush=True)
    if args.part == "sweep":
        # The same neutralize-only curve for any stage 1 (e.g. one clean-counterpart schedule or seed).
        sc = acc.scores(0.01)
        g = torch.Generator().manual_seed(0)
        rnd = {k: torch.rand(v.numel(), generator=g) for k, v in sc.items()}
        for tau in (float(t) for t in args.taus.split(",")):
            masks = select_channels(sc, tau)
            print(f"zero per-module tau {tau:.1%}: {dead_neurons(masks)} neurons", ev(zeroed(masks, sc)), flush=True)
            if args.random:
                masks = select_channels(rnd, tau)
                print(f"zero random per-module tau {tau:.1%} (control): {dead_neurons(masks)} neurons",
                      ev(zeroed(masks, sc)), flush=True)
    elif args.part == "mean":
        # Zero-ablating a neuron removes its mean output too, a constant shift of the residual
        # stream that clean inputs rely on. Mean-ablation keeps that constant (as a down_proj
        # bias: W_down[:, j] * mean_j over clean tokens) and removes only the input-dependent part.
        means = clean_down_input_means(sus, tok, load_instructions("builtin:3000:1")[:64])
        sc = acc.scores(0.01)
        g = torch.Generator().manual_seed(0)
        rnd = {k: torch.rand(v.numel(), generator=g) for k, v in sc.items()}
        for tau in (float(t) for t in args.taus.split(",")):
            for name, scores in (("signature", sc), ("random (control)", rnd)):
                if name != "signature" and not args.random:
                    continue
                masks = select_channels(scores, tau)
                w = zeroed(masks, sc)
                print(f"zero {name} per-module tau {tau:.1%}: {dead_neurons(masks)} neurons", ev(w), flush=True)
                add_mean_bias_(w, sus, mods, masks, means)
                print(f"mean-ablate {name} per-module tau {tau:.1%}", ev(w), flush=True)
    elif args.part == "massive":
        # A few neurons carry activations hundreds to thousands of times a typical neuron's peak
        # ("massive activations", mostly at the first token). Every fine-tune moves them far, so
        # the signature flags them, and zeroing them breaks the model. Spare the neurons whose
        # clean peak |activation| is >= R x their block's median peak, zero the rest.
        from lightning_bdvax.pipeline import clean_neuron_peaks
        from lightning_bdvax.signature import spare_massive_neurons

        peaks = clean_neuron_peaks(sus, tok, load_instructions("builtin:3000:1")[:64], max_length=96)
        sc = acc.scores(0.01)
        for tau in (float(t) for t in args.taus.split(",")):
            full = select_channels(sc, tau)
            for r in [None] + [float(x) for x in args.spare_ratios.split(",")]:
                if r is None:
                    masks, spared = full, 0
                else:
                    masks = spare_massive_neurons(Signature(full, sc, {}), mods, peaks, r).masks
                    spared = dead_neurons(full) - dead_neurons(masks)
                label = "nothing spared" if r is None else f"sparing peak >= {r:g}x block median"
                print(f"zero per-module tau {tau:.1%}, {label}: {dead_neurons(masks)} neurons ({spared} spared)",
                      ev(zeroed(masks, sc)), flush=True)
            if args.random:
                g = torch.Generator().manual_seed(0)
                rnd = select_channels({k: torch.rand(v.numel(), generator=g) for k, v in sc.items()}, tau)
                r = max(float(x) for x in args.spare_ratios.split(","))
                masks = spare_massive_neurons(Signature(rnd, sc, {}), mods, peaks, r).masks
                print(f"zero random per-module tau {tau:.1%} (control), sparing peak >= {r:g}x block median: "
                      f"{dead_neurons(masks)} neurons", ev(zeroed(masks, sc)), flush=True)
    elif args.part == "oracle":
        oracle_part(args, sus, tok, acc, mods, ev, zeroed, dead_neurons)
    elif args.part == "attribution":
        attribution_part(args, sus, tok, mods, ev, zeroed, dead_neurons)
    elif args.part == "neuron":
        sc = acc.scores(0.01)
        g = torch.Generator().manual_seed(0)
        rnd = {k: torch.rand(v.numel(), generator=g) for k, v in sc.items()}
        settings = [("per-module tau 1 % (published)", select_channels(sc, 0.01)),
                    ("per-neuron tau 1 %", neuron_masks(sc, 0.01)),
                    ("per-neuron tau 2 %", neuron_masks(sc, 0.02)),
                    ("per-neuron tau 3 %", neuron_masks(sc, 0.03)),
                    ("random neurons 3 % (control)", neuron_masks(rnd, 0.03))]
        for name, masks in settings:
            print(f"zero {name}: {dead_neurons(masks)} neurons dead", ev(zeroed(masks, sc)), flush=True)
    elif args.part == "snr":
        # Every fine-tune moves frequently active neurons most (the gradient of a channel scales
        # with its activations), backdoor or not. Divide each channel's score by how far one
        # clean fine-tune of the same length moves it.
        from lightning_bdvax.data import make_loader, tokenize_records
        from lightning_bdvax.modules import VariantModule
        from lightning_bdvax.pipeline import make_trainer

        named = dict(sus.named_modules())
        w0 = {cm.key: channel_rows(named[cm.key].weight.detach(), cm).clone() for cm in mods}
        work = copy.deepcopy(sus).train()
        ex = tokenize_records(tok, load_instructions("builtin:3000:1")[:64], 96)
        torch.manual_seed(0)
        make_trainer(8, precision="bf16-mixed", progress=False).fit(
            VariantModule(work, lr=5e-5), train_dataloaders=make_loader(ex, tok.pad_token_id, 8, True, 0))
        wn = dict(work.named_modules())
        upd = {cm.key: (channel_rows(wn[cm.key].weight.detach(), cm) - w0[cm.key]).norm(dim=1) for cm in mods}
        del work
        sc = acc.scores(0.01)
        snr = {k: sc[k] / (upd[k] + 0.1 * upd[k].mean()) for k in sc}
        for name, scores, tau in (("published score", sc, 0.01), ("score / clean update", snr, 0.01),
                                  ("score / clean update", snr, 0.03)):
            masks = select_channels(scores, tau)
            print(f"zero per-module tau {tau:g} by {name}: {dead_neurons(masks)} neurons", ev(zeroed(masks, sc)),
                  flush=True)
        snr_masks = select_channels(snr, 0.01)
        for proj in ("down_proj",):
            masks = {cm.key: snr_masks[cm.key] if cm.proj == proj else torch.zeros(cm.n_channels, dtype=torch.bool)
                     for cm in mods}
            print(f"zero {proj} only, tau 0.01 by score / clean update", ev(zeroed(masks, sc)), flush=True)
    elif args.part == "protect":
        # Wanda-style clean importance of neuron j of a block: ||X_j||_2 of down_proj's input j
        # over the non-padding tokens of 64 clean samples (the same norms the prune-wanda
        # baseline uses) x the norm of down_proj column j. Flagged neurons in the top q of a
        # block by that importance are spared in every projection.
        from lightning_bdvax.pipeline import clean_neuron_importance

        downs = [cm for cm in mods if cm.role == "in"]
        imp = clean_neuron_importance(sus, tok, load_instructions("builtin:3000:1")[:64], max_length=96)
        sc = acc.scores(0.01)
        full = select_channels(sc, 0.01)
        print("flagged down_proj neurons among each block's top 1 % / 5 % by clean importance:",
              sum(int((full[cm.key] & (imp[cm.block] >= imp[cm.block].quantile(0.99))).sum()) for cm in downs),
              sum(int((full[cm.key] & (imp[cm.block] >= imp[cm.block].quantile(0.95))).sum()) for cm in downs), flush=True)
        # A larger tau with the important neurons spared asks whether the rest of a wider
        # selection holds any trigger-specific part of the backdoor.
        for tau, q in ((0.01, 0.01), (0.01, 0.05), (0.01, 0.2), (0.03, 0.05), (0.1, 0.05)):
            keep = {b: v >= v.quantile(1 - q) for b, v in imp.items()}
            sel = full if tau == 0.01 else select_channels(sc, tau)
            masks = {cm.key: sel[cm.key] & ~keep[cm.block] for cm in mods}
            print(f"zero per-module tau {tau:.0%} sparing the top {q:.0%} by clean importance: "
                  f"{dead_neurons(masks)} neurons", ev(zeroed(masks, sc)), flush=True)
        # Control: the same rule on random scores (same count per module, same neurons spared).
        g = torch.Generator().manual_seed(0)
        rnd = {k: torch.rand(v.numel(), generator=g) for k, v in sc.items()}
        for tau, q in ((0.03, 0.05), (0.1, 0.05)):
            keep = {b: v >= v.quantile(1 - q) for b, v in imp.items()}
            sel = select_channels(rnd, tau)
            masks = {cm.key: sel[cm.key] & ~keep[cm.block] for cm in mods}
            print(f"zero random per-module tau {tau:.0%} sparing the top {q:.0%} by clean importance (control): "
                  f"{dead_neurons(masks)} neurons", ev(zeroed(masks, sc)), flush=True)
    elif args.part == "proj":
        sc = acc.scores(0.01)
        full = select_channels(sc, 0.01)
        for proj in sorted({cm.proj for cm in mods}):
            masks = {cm.key: full[cm.key] if cm.proj == proj else torch.zeros_like(full[cm.key]) for cm in mods}
            print(f"zero per-module tau 1 %, {proj} only: {dead_neurons(masks)} neurons", ev(zeroed(masks, sc)),
                  flush=True)
    elif args.part == "scope":
        from lightning_bdvax.neutralize import recovery_grad_masks

        rec = load_instructions(f"{args.data_dir}/consistency_data/consistency_data.json")
        sc = acc.scores(0.01)
        base_sig = Signature(select_channels(sc, 0.01), sc, {})
        settings = (("flagged", 1e-4), ("unflagged", 2e-5), ("flagged", 3e-4))
        if args.spare_massive:
            from lightning_bdvax.pipeline import clean_neuron_peaks
            from lightning_bdvax.signature import spare_massive_neurons

            peaks = clean_neuron_peaks(sus, tok, load_instructions("builtin:3000:1")[:64], max_length=96)
            base_sig = spare_massive_neurons(base_sig, mods, peaks, args.spare_massive)
            print(f"sparing {base_sig.meta['spare_massive']['spared']} channels (peak >= {args.spare_massive:g}x)",
                  flush=True)
            settings = (("all", 2e-5), ("flagged", 2e-5), ("flagged", 1e-4), ("unflagged", 2e-5))
        for scope, lr in settings:
            t = time.perf_counter()
            sig = base_sig
            w = copy.deepcopy(sus)
            neutralize_(w, sig, mode="zero")
            masks = recovery_grad_masks(w, sig, scope)
            recover(w, tok, rec, RecoveryConfig(num_samples=100, steps=args.steps, lr=lr), precision="bf16-mixed",
                    progress=False, grad_masks=masks)
            print(f"zero tau=0.01 + LM recovery of {scope} weights only, {args.steps} steps lr {lr}", ev(w),
                  f"{time.perf_counter() - t:.0f}s", flush=True)
    elif args.part == "scoring":
        named = dict(sus.named_modules())
        wn = {cm.key: channel_rows(named[cm.key].weight.detach(), cm).norm(dim=1).clamp_min(1e-8) for cm in mods}
        rules = {"published (norm + 0.01 align)": {k: mag[k] + 0.01 * ali[k] for k in mag},
                 "relative norm": {k: mag[k] / wn[k] for k in mag}, "alignment only": ali}
        for tau in (0.01, 0.003):
            for name, sc in rules.items():
                print(f"zero tau={tau} {name}", ev(neutralized(sc, tau)), flush=True)
            g = torch.Generator().manual_seed(0)
            print(f"zero tau={tau} random control", ev(neutralized({k: torch.rand(v.numel(), generator=g) for k, v in mag.items()}, tau)), flush=True)
    else:
        rec = load_instructions(f"{args.data_dir}/consistency_data/consistency_data.json")
        sc = acc.scores(0.01)
        for tau, obj, lr in ((0.01, "distill", 2e-5), (0.01, "distill", 5e-5), (0.005, "distill", 2e-5)):
            t = time.perf_counter()
            w = neutralized(sc, tau)
            recover(w, tok, rec, RecoveryConfig(num_samples=100, steps=50, lr=lr, objective=obj),
                    teacher=copy.deepcopy(sus) if obj == "distill" else None, precision="bf16-mixed", progress=False)
            print(f"zero tau={tau} + {obj} 50 steps lr {lr}", ev(w), f"{time.perf_counter() - t:.0f}s", flush=True)


@torch.no_grad()
def oracle_part(args, sus, tok, acc, mods, ev, zeroed, dead_neurons) -> None:
    """Where the planted backdoor lives, with knowledge no defender has: the un-poisoned model.

    Reverting every MLP weight (or every attention weight) to the un-poisoned model's says which
    of the two holds the backdoor; reverting or zeroing the top-τ channels by the planting's own
    update ``‖(θ_sus - θ_base)_j‖`` says whether it sits in a few MLP channels at all; the overlap
    of those channels with the signature says whether the variants found them.
    """
    base = load_causal_lm("smollm2-135m-instruct")
    bn, sn = dict(base.named_modules()), dict(sus.named_modules())
    plant = {cm.key: (channel_rows(sn[cm.key].weight, cm).float() - channel_rows(bn[cm.key].weight, cm).float()).norm(dim=1)
             for cm in mods}

    def reverted(pred=None, masks=None):
        w = copy.deepcopy(sus)
        wn, bp = dict(w.named_modules()), dict(base.named_parameters())
        if pred is not None:
            for name, p in w.named_parameters():
                if pred(name):
                    p.copy_(bp[name])
        for cm in mods if masks is not None else ():
            m = masks[cm.key]
            rows = channel_rows(wn[cm.key].weight.data, cm)
            rows[m] = channel_rows(bn[cm.key].weight, cm)[m].to(rows.dtype)
        return w

    print("un-poisoned model", ev(base), flush=True)
    print("revert every MLP weight to the un-poisoned model's", ev(reverted(lambda n: ".mlp." in n)), flush=True)
    print("revert every attention weight to the un-poisoned model's",
          ev(reverted(lambda n: ".self_attn." in n)), flush=True)
    n_layers = sus.config.num_hidden_layers
    for a, b in args.oracle_blocks:
        b = min(b, n_layers)
        print(f"revert the MLP weights of blocks {a}-{b - 1} to the un-poisoned model's",
              ev(reverted(lambda n, a=a, b=b: ".mlp." in n and a <= int(n.split(".layers.")[1].split(".")[0]) < b)),
              flush=True)
    sc = acc.scores(0.01) if acc is not None else None
    cn = acc.scores(0.01, clean_normalize=True) if acc is not None and acc.has_clean_norms() else None
    for tau in (float(t) for t in args.taus.split(",")):
        masks = select_channels(plant, tau)
        n = sum(int(m.sum()) for m in masks.values())
        overlaps = []
        for name, scores in (("published", sc), ("clean_normalize", cn)):
            if scores is not None:
                sel = select_channels(scores, tau)
                overlaps.append(f"{name} {sum(int((masks[k] & sel[k]).sum()) for k in masks) / n:.1%}")
        seen = f"; flagged by the signature at the same tau: {', '.join(overlaps)} (random: {tau:.1%})" if overlaps else ""
        print(f"top {tau:.1%} per module by planting update: {dead_neurons(masks)} neurons{seen}", flush=True)
        print(f"  revert them to the un-poisoned model's", ev(reverted(masks=masks)), flush=True)
        print(f"  zero them", ev(zeroed(masks, plant)), flush=True)


def neuron_attribution(model, tok, records, mods, max_length: int = 96) -> dict:
    """First-order change of ``model``'s LM loss on ``records`` when each intermediate neuron is
    zeroed: ``-Σ_tokens a_j · ∂L/∂a_j`` at the down projection's input (block name -> vector)."""
    from lightning_bdvax.data import make_loader, tokenize_records

    named = dict(model.named_modules())
    acts: dict = {}
    hooks = [named[cm.key].register_forward_hook(lambda m, i, o, b=cm.block: acts.__setitem__(b, i[0]))
             for cm in mods if cm.role == "in"]
    total: dict = {}
    was = model.training
    model.eval()
    try:
        loader = make_loader(tokenize_records(tok, list(records), max_length), tok.pad_token_id, 8, False, 0)
        for batch in loader:
            acts.clear()
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        use_cache=False)
            xs = dict(acts)
            grads = torch.autograd.grad(out.loss, list(xs.values()))
            for (b, x), g in zip(xs.items(), grads):
                d = -(x.detach().float() * g.float()).sum(dim=(0, 1))
                total[b] = total.get(b, 0) + d
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return total


def attribution_part(args, sus, tok, mods, ev, zeroed, dead_neurons) -> None:
    """Is there a small set of MLP neurons that carries the backdoor at all? With knowledge no
    defender has (the attacker's poisoned training samples), score each neuron by how much
    zeroing it raises the loss of the planted behaviour minus how much it raises the loss of the
    clean training answers (first order), and zero each block's top τ whole neurons."""
    cell = backdoorllm_cell(args.data_dir, args.task, args.attack)
    bd = neuron_attribution(sus, tok, cell.train_poison[:64], mods)
    cl = neuron_attribution(sus, tok, cell.train_clean[:64], mods)
    score = {b: bd[b] - cl[b] for b in bd}
    if args.spare_massive > 0:  # the first-order estimate misses what zeroing a massive neuron does
        from lightning_bdvax.pipeline import clean_neuron_peaks
        from lightning_bdvax.signature import massive_neurons

        peaks = clean_neuron_peaks(sus, tok, load_instructions("builtin:3000:1")[:64], max_length=96)
        for b, m in sorted(massive_neurons(peaks, args.spare_massive).items()):
            if m.any():
                score[b][m] = float("-inf")
                print(f"{b}: {int(m.sum())} massive neurons never zeroed", flush=True)
    for tau in (float(t) for t in args.taus.split(",")):
        top = {}
        for b, s in score.items():
            top[b] = torch.zeros(s.numel(), dtype=torch.bool)
            top[b][torch.topk(s, max(1, round(tau * s.numel()))).indices] = True
        masks = {cm.key: top[cm.block] for cm in mods}
        print(f"zero each block's top {tau:.1%} neurons by attribution (planted minus clean loss rise): "
              f"{dead_neurons(masks)} neurons", ev(zeroed(masks, {k: torch.zeros(v.numel()) for k, v in masks.items()})),
              flush=True)


def clean_down_input_means(model, tok, records, max_length: int = 96) -> dict:
    """Mean input of every MLP down projection over the non-padding tokens of ``records``
    (block name -> vector of intermediate-neuron means)."""
    from lightning_bdvax.baselines import _mlp_linears, forward_inputs
    from lightning_bdvax.data import make_loader, tokenize_records

    sums: dict = {}
    counts: dict = {}

    def add(block, x):
        sums[block] = sums.get(block, 0) + x.float().sum(0)
        counts[block] = counts.get(block, 0) + x.shape[0]

    loader = make_loader(tokenize_records(tok, list(records), max_length), tok.pad_token_id, 8, False, 0)
    forward_inputs(model, loader, {mod: (lambda x, b=cm.block: add(b, x))
                                   for cm, mod, _ in _mlp_linears(model) if cm.role == "in"})
    return {b: v / counts[b] for b, v in sums.items()}


@torch.no_grad()
def add_mean_bias_(w, sus, mods, masks, means) -> None:
    """Give each zeroed block of ``w`` back the mean output of its dead neurons (as in ``sus``)."""
    dead: dict = {}
    for cm in mods:
        dead[cm.block] = dead.get(cm.block, torch.zeros_like(masks[cm.key])) | masks[cm.key]
    ws, named = dict(sus.named_modules()), dict(w.named_modules())
    for cm in mods:
        if cm.role != "in" or not dead[cm.block].any():
            continue
        d = dead[cm.block]
        wd = ws[cm.key].weight.float()
        b = wd[:, d] @ means[cm.block][d]
        mod = named[cm.key]
        mod.bias = torch.nn.Parameter(b.to(mod.weight.dtype) + (mod.bias if mod.bias is not None else 0))


def cached_stage1s(cell_dir: str, mods: list) -> tuple[list[str], list[SignatureAccumulator]]:
    """Every cached stage-1 state of a cell (``<cell_dir>-work-*``), in name order."""
    dirs = sorted(glob.glob(cell_dir + "-work-*"))
    accs = []
    for d in dirs:
        a = SignatureAccumulator(mods)
        a.load(d + "/stage1.safetensors")
        accs.append(a)
    return dirs, accs


def jaccard(a: dict, b: dict, keys=None) -> float:
    """|A ∩ B| / |A ∪ B| of two flagged sets (per-module masks), over ``keys`` (default: all)."""
    keys = list(a) if keys is None else keys
    return sum(int((a[k] & b[k]).sum()) for k in keys) / sum(int((a[k] | b[k]).sum()) for k in keys)


def pooled_scores(accs: list, lam: float = 0.01) -> dict:
    """The published score over the union of several accumulators' variants (streaming form)."""
    n = sum(a.n for a in accs)
    out = {}
    for k in accs[0].modules:
        mag = sum(torch.stack(a.norms_per_variant[k]).double().sum(0) for a in accs) / n
        s = sum(a.unit_sum[k].double() for a in accs)
        self_terms = sum(torch.stack([(v > 1e-12).double() for v in a.norms_per_variant[k]]).sum(0) for a in accs)
        out[k] = (mag + lam * (s.pow(2).sum(1) - self_terms) / (n * (n - 1))).float()
    return out


def pooled_part(args, sus, tok) -> None:
    """Signatures from every cached stage 1 of the cell pooled (the variants of several recipe
    seeds), then the recipe's neutralization and recovery, evaluated as bench_backdoorllm does."""
    from lightning_bdvax.evaluate import evaluate_backdoor
    from lightning_bdvax.pipeline import load_bdvax_config

    cfg = load_bdvax_config(str(ROOT / "recipes/smollm2_full.yaml"))
    mods = find_mlp_modules(sus)
    dirs, accs = cached_stage1s(args.cell_dir, mods)
    for a in accs:
        one = pooled_scores([a], cfg.signature.lam)
        ref = a.scores(cfg.signature.lam)
        assert all(torch.allclose(one[k], ref[k], rtol=1e-4, atol=1e-6) for k in ref), "pooled score != score"
    cell = backdoorllm_cell(args.data_dir, args.task, args.attack)
    rec = load_instructions(f"{args.data_dir}/consistency_data/consistency_data.json")
    sets = [list(range(len(accs)))] + ([[0, 1]] if len(accs) > 2 else [])
    for idx in sets:
        t = time.perf_counter()
        sc = pooled_scores([accs[i] for i in idx], cfg.signature.lam)
        masks = select_channels(sc, cfg.signature.tau)
        for i, a in enumerate(accs):
            mi = select_channels(a.scores(cfg.signature.lam), cfg.signature.tau)
            print(f"pooled {[Path(dirs[x]).name[-10:] for x in idx]} vs {Path(dirs[i]).name[-10:]}: "
                  f"Jaccard {jaccard(masks, mi):.3f}")
        w = copy.deepcopy(sus)
        neutralize_(w, Signature(masks, sc, {}), mode=cfg.neutralize.mode)
        recover(w, tok, rec, cfg.recovery, seed=cfg.seed, precision="bf16-mixed", progress=False)
        w.eval()
        r = evaluate_backdoor(w, tok, cell.test_poison[:50], cell.triggers, task=args.task, target=cell.target,
                              heldout=cell.test_clean[:100], max_new_tokens=32, batch_size=64)
        n = sum(accs[i].n for i in idx)
        print(f"pooled N = {n} ({len(idx)} stage-1 runs), tau {cfg.signature.tau:g}: ASR {r['asr']:.2f} "
              f"prefix {r['prefix']:.2f} ppl {r['ppl']:.2f} consistency {r['consistency']:.3f} FTR {r['ftr']:.2f} "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
        del w


if __name__ == "__main__":
    main()
