"""Speed and memory of BD-VAX on this machine: matmul peak, training throughput and MFU,
generation throughput, stage-1 peak memory against N, and the wall time of each stage.

Every comparison is measured side by side in the same run (same process, same threads), and the
figures go to ``--out`` (default ``benchmarks/results/speed.json``) with a Markdown summary next
to it. Parts (``--parts``, comma-separated):

* ``peak``: the best dense matmul throughput of this machine, fp32 and bf16 (square
  ``--peak-sizes``), the denominator of MFU;
* ``profile``: torch.profiler over three training steps of the ``--headline`` setting; self
  CPU time grouped into matmul, attention, optimizer, dtype casts, elementwise, loss, other;
* ``matmuls``: a training step's matrix products alone (every linear layer forward and
  backward, eager attention's score/value products) at the stage-1 batches' shapes, for each
  batch size of ``--sweep-batch-sizes`` and with ``--stacked`` variants' fits batched into one
  call: the MFU these products allow is a ceiling for any implementation of the step here;
* ``batch``: the ``--headline`` setting at each batch size of ``--sweep-batch-sizes`` (MFU
  against how many rows each matmul gets);
* ``train``: stage-1 fine-tuning steps of the real model (batch ``--batch-size``, the project's
  own data at ``--max-length`` tokens) under each setting of ``--train-settings``: precision
  ``fp32``/``bf16`` (Lightning ``32-true``/``bf16-mixed``), AdamW ``foreach`` or single-tensor,
  denormal flushing on/off, attention kernel (``sdpa`` or ``eager``), logits at every position
  or only where the loss needs them (``-all-logits`` settings: every position). MFU = the
  step's FLOPs (6 · parameters + attention per processed token, the LM head's only at the
  response tokens the loss reads) ÷ its seconds ÷ the measured peak of that precision;
* ``generate``: greedy generation, batched (left-padded, stops at end-of-sequence) against one
  prompt at a time, fp32 and bf16;
* ``memory``: peak resident memory of stage 1 for each N in ``--memory-n``, each in a fresh
  process (fits capped at ``--memory-steps`` steps: the memory does not depend on the length);
* ``tokenize``: :func:`~lightning_bdvax.data.tokenize_records` on ``--tokenize-n`` of the
  project's records (milliseconds per record), next to one ``tokenizer.get_vocab()`` call (what
  looking the end-of-turn token up in the whole vocabulary used to cost every record);
* ``stages-from-results``: the stage times of the BD-VAX rows ``bench_backdoorllm.py`` measured
  (``--results``), without re-running them;
* ``stages``: one whole purification with the recipe's settings (variants, scoring,
  neutralize + recovery) and the evaluation, timed per stage; ``--shared-clean`` adds the
  N+1-fit variant of stage 1 next to it.

Example (the committed ``benchmarks/results/speed.json``)::

    python benchmarks/bench_speed.py --threads 2 --parts peak,train,generate,memory,stages

``--device cuda`` runs the peak, training, generation and stages on a CUDA GPU instead (memory
is a CPU measurement and is skipped there). ``--random-init`` builds ``--model`` (a local
directory with ``config.json`` and the tokenizer) with random weights: the same shapes and so
the same speed, where the trained weights cannot be brought (the stages' backdoor figures then
mean nothing; only their times are reported). ``benchmarks/run_gpu_check.sh`` runs both.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_bdvax.models import attention_kernel, cpu_description  # noqa: E402
from lightning_bdvax.report import run_versions  # noqa: E402
from lightning_bdvax.pipeline import VaccinationConfig  # noqa: E402

DEFAULT_PAD = VaccinationConfig().pad_to_multiple_of  # the package default of stage 1 and recovery

DEVICE = "cpu"  # where the peak, training, generation and stages run (--device)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else cpu_description()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def random_init_copy(directory: str) -> str:
    """A temporary model directory: ``directory``'s config with random weights (seed 0), saved
    with ``save_pretrained``, plus its tokenizer files; removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(directory)
    if not (src / "config.json").is_file():
        raise SystemExit(f"--random-init: {src} has no config.json")
    tmp = Path(tempfile.mkdtemp(prefix="bench_speed_random_"))
    atexit.register(shutil.rmtree, tmp, True)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp)
    for f in src.iterdir():
        if f.is_file() and not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    log(f"random-init: {src}'s architecture with random weights in {tmp}")
    return str(tmp)


# ------------------------------------------------------------------ peak
def _time_it(fn, seconds: float = 1.5, warmup: int = 2) -> float:
    """Seconds per call of ``fn``: ``warmup`` calls, then calls for about ``seconds`` (at least 3).
    A GPU queues the calls; they are synchronised every 10, so the clock follows the device."""
    for _ in range(warmup):
        fn()
    _sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or reps < 3:
        for _ in range(10 if DEVICE == "cuda" else 1):
            fn()
            reps += 1
        _sync()
    return (time.perf_counter() - t0) / reps


def peak_burst(dtype: torch.dtype, n: int, seconds: float = 0.25, warmup: int = 1) -> float:
    """FLOP/s of ``n``-square products over about ``seconds``: the machine's speed of the moment."""
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    return 2 * n ** 3 / _time_it(lambda: a @ b, seconds, warmup)


def matmul_peak(dtype: torch.dtype, sizes=(512, 1024, 2048), seconds: float = 2.0) -> dict:
    """Best FLOP/s of ``a @ b`` over square sizes (each run for about ``seconds``)."""
    best = {"flops": 0.0, "size": None}
    for n in sizes:
        rate = peak_burst(dtype, n, seconds, warmup=3)
        if rate > best["flops"]:
            best = {"flops": rate, "size": n}
    return best


# ------------------------------------------------------------------ training
def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 · (parameters used in matmuls) + 12 · layers · d · seq (attention)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    n = sum(p.numel() for p in model.parameters())
    # A tied input embedding is the LM head's matmul (counted once); an untied one is only a lookup.
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb:
        n -= emb.numel()
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def peak_kind(setting: dict) -> tuple[str, torch.dtype]:
    """The matmul peak a training setting is measured against: ("bf16", bf16) for the bf16
    precisions, else ("fp32", fp32)."""
    return ("bf16", torch.bfloat16) if setting["precision"].startswith("bf16") else ("fp32", torch.float32)


class _StepTimer:
    """Times each training step; with ``burst`` = (dtype, size), also the matmul peak of the
    moment just before and just after each step (outside the timed span)."""

    def __init__(self, warmup: int, burst: tuple | None = None):
        import lightning as L

        from lightning_bdvax.modules import loss_tokens

        outer = self

        class CB(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if burst is not None and batch_idx >= warmup:
                    outer.peaks_before.append(peak_burst(*burst))
                _sync()
                outer._t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _sync()
                if batch_idx >= warmup:
                    outer.times.append(time.perf_counter() - outer._t)
                    # The work counted is that of the batch padded to its longest sequence, with
                    # the LM head at the response tokens the loss reads, whatever the setting
                    # computes: the rounding to a multiple (pad_to_multiple_of) and any other
                    # head position (all logits, or a column some row needs) are overhead.
                    mask = batch["attention_mask"]
                    longest = int(mask.sum(1).max())
                    outer.tokens.append(int(mask.sum()))
                    outer.padded.append(mask.size(0) * longest)
                    outer.seq.append(longest)
                    lab = batch["labels"][:, :longest]
                    outer.head_rows.append(int(loss_tokens(lab).sum()))
                    if burst is not None:
                        outer.peaks_after.append(peak_burst(*burst))

        self.callback = CB()
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.padded: list[int] = []
        self.seq: list[int] = []
        self.head_rows: list[int] = []
        self.peaks_before: list[float] = []
        self.peaks_after: list[float] = []


def fit_and_restore(model, tok, examples, setting: dict, steps: int, batch_size: int, callbacks: list) -> None:
    """A stage-1 fit of ``steps`` steps under ``setting``, then the model's weights as they were."""
    from lightning_bdvax.data import make_loader
    from lightning_bdvax.modules import VariantModule
    from lightning_bdvax.pipeline import make_trainer

    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    module = VariantModule(model, lr=5e-5, foreach=setting.get("foreach"), fused=setting.get("fused"),
                           loss_positions_only=setting.get("loss_positions_only", True),
                           pad_to_multiple_of=setting.get("pad", DEFAULT_PAD),
                           sparse_tied_embedding=setting.get("sparse_tied_embedding", True))
    loader = make_loader(examples, tok.pad_token_id, batch_size, True, 0, setting.get("pad", DEFAULT_PAD))
    trainer = make_trainer(steps, callbacks, precision=setting["precision"], progress=False,
                           accelerator="gpu" if DEVICE == "cuda" else "cpu")
    trainer.fit(module, train_dataloaders=loader)
    for opt in trainer.optimizers:  # free the AdamW state now (trainer <-> module cycles)
        opt.state.clear()
    del trainer, module
    gc.collect()
    model.to(next(iter(start.values())).dtype)  # "bf16-true" casts the model itself
    model.load_state_dict(start)


def train_throughput(model, tok, examples, setting: dict, steps: int, warmup: int, batch_size: int,
                     peak: dict, burst_size: int | None = None) -> dict:
    """Steps/s, tokens/s and MFU of a stage-1 fit under ``setting``. With ``burst_size``, each
    step's MFU is also taken against the matmul peak measured just before and after that step
    (``burst_size``-square products in the setting's dtype), and the median over steps reported as
    ``mfu_interleaved``: on a machine whose speed swings within seconds, the only fair MFU."""
    torch.set_flush_denormal(setting.get("flush_denormal", True))
    if setting.get("compile"):
        model.compile(dynamic=True)  # in place: parameter names and state_dict keys unchanged
    key, dtype = peak_kind(setting)
    burst = (dtype, burst_size) if burst_size else None
    timer = _StepTimer(warmup, burst)
    with attention_kernel(model, setting.get("attn")):
        fit_and_restore(model, tok, examples, setting, warmup + steps, batch_size, [timer.callback])
    if setting.get("compile"):
        model._compiled_call_impl = None  # undo nn.Module.compile
        torch._dynamo.reset()
    torch.set_flush_denormal(True)
    t = sum(timer.times)
    seq = sum(timer.seq) / len(timer.seq)
    fpt = flops_per_token(model, int(seq))
    # The LM head's FLOPs at positions whose logits the loss does not read are not work done.
    head = model.get_output_embeddings()
    head_fpt = 6.0 * head.weight.numel() if head is not None else 0.0
    step_flops = [flops_per_token(model, s) * n - head_fpt * (n - h)
                  for s, n, h in zip(timer.seq, timer.padded, timer.head_rows)]
    padded_rate = sum(timer.padded) / t
    achieved = sum(step_flops) / t
    row = {**setting, "steps": len(timer.times), "s_per_step": round(t / len(timer.times), 3),
           "train_tokens_per_s": round(sum(timer.tokens) / t, 1), "padded_tokens_per_s": round(padded_rate, 1),
           "mean_seq_len": round(seq, 1), "flops_per_token": fpt, "achieved_flops": achieved,
           "head_positions_share": round(sum(timer.head_rows) / sum(timer.padded), 3),
           "mfu": round(achieved / peak[key]["flops"], 4) if key in peak else None}
    if burst is not None:
        import statistics

        per_step = [f / dt / ((b + a) / 2) for f, dt, b, a in
                    zip(step_flops, timer.times, timer.peaks_before, timer.peaks_after)]
        peaks = timer.peaks_before + timer.peaks_after
        q = statistics.quantiles(per_step, n=4) if len(per_step) > 1 else per_step * 3
        row.update(mfu_interleaved=round(statistics.median(per_step), 4),
                   mfu_interleaved_iqr=[round(q[0], 4), round(q[2], 4)], burst_size=burst_size,
                   burst_peak_flops={"min": min(peaks), "median": statistics.median(peaks), "max": max(peaks)})
    return row


# ------------------------------------------------------------------ matmul ceiling
def step_matmuls(model, batch_size: int, seq_len: int, stacked: int = 1, dtype=torch.bfloat16,
                 seconds: float = 1.5) -> dict:
    """The matrix products of one training step, alone, at the step's own shapes.

    For every ``nn.Linear`` of the model (the LM head included) the forward product and the two
    backward ones (input and weight gradients), and eager attention's four score/value products
    per layer (forward two, backward four), on random ``dtype`` tensors of the shapes a batch of
    ``batch_size`` × ``seq_len`` tokens gives. ``stacked`` > 1 runs each product for that many
    independent weight sets in one batched call (``torch.bmm``): the shapes a fit of ``stacked``
    variants at once would give. Returns the seconds these products take and their FLOP/s, which
    bound the MFU any implementation of the step can reach on this machine at these shapes:
    everything else a step does (norms, activations, casts, loss, optimizer) only adds time.
    """
    from collections import Counter

    cfg = model.config
    t = batch_size * seq_len
    shapes = Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))
    total_s, flops, rows = 0.0, 0.0, []
    for (n_in, n_out), count in sorted(shapes.items()):
        x = torch.randn(stacked, t, n_in, dtype=dtype, device=DEVICE)
        w = torch.randn(stacked, n_in, n_out, dtype=dtype, device=DEVICE)
        g = torch.randn(stacked, t, n_out, dtype=dtype, device=DEVICE)

        if stacked == 1:
            x2, w2, g2 = x[0], w[0], g[0]

            def products():
                x2 @ w2, g2 @ w2.T, x2.T @ g2
        else:
            def products():
                torch.bmm(x, w), torch.bmm(g, w.transpose(1, 2)), torch.bmm(x.transpose(1, 2), g)

        s = _time_it(products, seconds)
        f = stacked * 3 * 2.0 * t * n_in * n_out
        rows.append({"shape": f"{t}x{n_in} @ {n_in}x{n_out}", "count": count, "s_each": s, "flops_each": f,
                     "gflops": round(f / s / 1e9, 1)})
        total_s += s * count
        flops += f * count
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    q = torch.randn(stacked * batch_size * heads, seq_len, d, dtype=dtype, device=DEVICE)
    p = torch.randn(stacked * batch_size * heads, seq_len, seq_len, dtype=dtype, device=DEVICE)

    def attention():  # scores and values forward; their four gradients backward
        torch.bmm(q, q.transpose(1, 2)), torch.bmm(p, q)  # q·kᵀ, p·v
        torch.bmm(q, q.transpose(1, 2)), torch.bmm(p.transpose(1, 2), q)  # ∂p = g·vᵀ, ∂v = pᵀ·g
        torch.bmm(p, q), torch.bmm(p.transpose(1, 2), q)  # ∂q = ∂s·k, ∂k = ∂sᵀ·q

    s = _time_it(attention, seconds)
    f = stacked * batch_size * heads * 6 * 2.0 * seq_len * seq_len * d
    rows.append({"shape": f"attention {batch_size * heads}x{seq_len}x{seq_len}x{d}", "count": cfg.num_hidden_layers,
                 "s_each": s, "flops_each": f, "gflops": round(f / s / 1e9, 1)})
    total_s += s * cfg.num_hidden_layers
    flops += f * cfg.num_hidden_layers
    return {"batch_size": batch_size, "seq_len": seq_len, "stacked": stacked, "matmul_s_per_step": round(total_s, 6),
            "matmul_s_per_fit_step": round(total_s / stacked, 6), "matmul_flops_per_step": flops,
            "matmul_gflops": round(flops / total_s / 1e9, 1),
            "products": rows}


# ------------------------------------------------------------------ profile
OP_GROUPS = (  # first match wins; self CPU time of each aten op is summed into its group
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "onednn")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax")),
    ("optimizer", ("adam", "Optimizer.step", "_foreach")),
    ("dtype casts / copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow", "aten::rsqrt",
                     "aten::mean", "aten::neg", "aten::cat", "aten::sum", "aten::fill_", "aten::zero_", "aten::where",
                     "aten::cos", "aten::sin", "aten::exp", "threshold", "_backward")),
    ("loss / embedding", ("cross_entropy", "nll_loss", "log_softmax", "embedding")),
)


def profile_step(model, tok, examples, setting: dict, batch_size: int, steps: int = 3) -> dict:
    """Self CPU time of one training step's ops, grouped (matmul, attention, optimizer, casts, ...)."""
    import lightning as L
    from torch.profiler import ProfilerActivity, profile

    holder: dict = {}

    class Prof(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:  # after one warm-up step
                holder["p"] = profile(activities=[ProfilerActivity.CPU])
                holder["p"].__enter__()

        def on_train_end(self, trainer, pl_module):
            holder["p"].__exit__(None, None, None)

    with attention_kernel(model, setting.get("attn")):  # eager attention's matmuls count as matmul
        fit_and_restore(model, tok, examples, setting, 1 + steps, batch_size, [Prof()])
    groups = {g: 0.0 for g, _ in OP_GROUPS} | {"other": 0.0}
    top = []
    for ev in holder["p"].key_averages():
        us = ev.self_cpu_time_total
        name = ev.key
        g = next((g for g, keys in OP_GROUPS if any(k.lower() in name.lower() for k in keys)), "other")
        groups[g] += us
        top.append((us, name))
    total = sum(groups.values())
    top.sort(reverse=True)
    return {"steps": steps, "batch_size": batch_size, "setting": setting, "self_cpu_s_per_step": round(total / 1e6 / steps, 3),
            "share": {g: round(v / total, 4) for g, v in groups.items()},
            "top_ops": [{"op": n, "self_s_per_step": round(us / 1e6 / steps, 4)} for us, n in top[:15]]}


# ------------------------------------------------------------------ generation
def gen_throughput(model, tok, records, batch_size: int, precision: str | None, max_new_tokens: int,
                   attn: str = "sdpa") -> dict:
    from lightning_bdvax.evaluate import generate

    model.to(DEVICE)
    _sync()
    t = time.perf_counter()
    outs = generate(model, tok, records, max_new_tokens=max_new_tokens, batch_size=batch_size, precision=precision,
                    attention=attn)
    _sync()
    dt = time.perf_counter() - t
    model.to("cpu")
    new = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
    return {"batch_size": batch_size, "precision": precision or "fp32", "attn": attn, "prompts": len(records),
            "seconds": round(dt, 2), "new_tokens": new, "new_tokens_per_s": round(new / dt, 1),
            "prompts_per_s": round(len(records) / dt, 2)}


# ------------------------------------------------------------------ memory (child process)
def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _reset_hwm() -> bool:
    """Reset this process's peak-RSS mark (``VmHWM``) to the current RSS, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _RssSampler:
    """Highest RSS while active: the kernel's peak mark (``VmHWM``, reset on entry, so model
    loading does not count) where it can be reset, else the highest of samples every ``every``
    seconds (which can miss a short spike)."""

    def __init__(self, every: float = 0.05):
        import threading

        self.peak, self.every = _current_rss_mb(), every
        self.exact = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _current_rss_mb())
            self._stop.wait(self.every)

    def __enter__(self):
        self.exact = _reset_hwm()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _current_rss_mb())
        hwm = _hwm_mb() if self.exact else None
        if hwm is not None:
            self.peak = max(self.peak, hwm)


def memory_child(args) -> None:
    """Runs in a fresh process: load, run stage 1 at N = args.child_n, print peak RSS as JSON."""
    from lightning_bdvax.data import load_instructions
    from lightning_bdvax.models import choose_precision, configure_cpu, load_causal_lm, load_tokenizer
    from lightning_bdvax.pipeline import VaccinationConfig, run_vaccination

    configure_cpu(args.threads)
    if args.no_trim:
        import lightning_bdvax.pipeline as pipeline

        pipeline._release_freed_memory = lambda: None  # the "before" of the malloc_trim change
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    gc.collect()
    after_load = _current_rss_mb()
    cfg = VaccinationConfig(n_variants=args.child_n, samples_per_variant=args.memory_spv,
                            max_steps=args.memory_steps, batch_size=args.batch_size, max_length=args.max_length,
                            **({} if args.child_pad is None else {"pad_to_multiple_of": args.child_pad}))
    clean = load_instructions(f"builtin:{cfg.clean_needed}:1")
    t = time.perf_counter()
    with _RssSampler() as rss:
        acc = run_vaccination(model, tok, clean, cfg, precision=choose_precision(args.precision), progress=False)
    print(json.dumps({"n": args.child_n, "peak_rss_mb": round(rss.peak, 1), "rss_after_load_mb": round(after_load, 1),
                      "peak_from": "VmHWM" if rss.exact else "samples", "pad_to_multiple_of": cfg.pad_to_multiple_of,
                      "stage1_s": round(time.perf_counter() - t, 1),
                      "variants_done": len(acc.variants_done)}))


def memory_by_n(args, trim: bool = True, pad: int | None = None) -> dict:
    out = {}
    for n in [int(x) for x in args.memory_n.split(",")]:
        cmd = [sys.executable, __file__, "--child-n", str(n), "--model", args.model, "--threads", str(args.threads),
               "--memory-steps", str(args.memory_steps), "--memory-spv", str(args.memory_spv),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--precision", args.precision] + ([] if trim else ["--no-trim"]) + (
               [] if pad is None else ["--child-pad", str(pad)])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        log(f"memory{'' if trim else ' (no malloc_trim)'} pad {row['pad_to_multiple_of']}: N={n} stage-1 peak RSS {row['peak_rss_mb']:.0f} MB "
            f"(after load {row['rss_after_load_mb']:.0f} MB)")
        out[str(n)] = row
    return out


# ------------------------------------------------------------------ stages
def stage_times(args, tok, model, shared: bool, attn: str | None = None, precision: str | None = None,
                logits: str = "tokens", pad: int | None = None) -> dict:
    """One whole purification timed per stage, then its evaluation. ``logits``: where every
    fine-tune runs the LM head: ``"tokens"`` (the package default: the response tokens),
    ``"columns"`` (the columns some row needs, ``logits_to_keep``) or ``"all"`` (every position);
    with ``":dense"`` appended, a tied embedding's gradient is dense (no
    ``modules.sparse_tied_embedding_grad``)."""
    from unittest import mock

    from lightning_bdvax import modules
    from lightning_bdvax.data import load_instructions
    from lightning_bdvax.evaluate import evaluate_backdoor
    from lightning_bdvax.pipeline import load_bdvax_config, purify

    sets = list(args.set) + (["vaccination.shared_clean=true"] if shared else [])
    cfg = load_bdvax_config(args.recipe, overrides=sets)
    if precision:
        cfg.precision = precision
    if pad is not None:  # stage 1 and recovery alike
        cfg.vaccination.pad_to_multiple_of = cfg.recovery.pad_to_multiple_of = pad
    clean = load_instructions("builtin:3000:1")
    rec = clean[-cfg.recovery.num_samples:]
    head, _, grads = logits.partition(":")
    if head not in ("tokens", "columns", "all") or grads not in ("", "dense"):
        raise SystemExit(f"bench_speed: --stage-logits takes tokens, columns or all, each optionally with :dense, "
                         f"got {logits!r}")
    where = contextlib.ExitStack()
    if grads == "dense":
        where.enter_context(mock.patch.object(modules, "sparse_tied_embedding_grad",
                                              lambda m: contextlib.nullcontext(False)))
    if head != "tokens":  # as for a model without an output-embedding module (and without logits_to_keep)
        where.enter_context(mock.patch.object(modules, "_output_embeddings", lambda m: None))
    if head == "all":
        where.enter_context(mock.patch.object(modules, "accepts_logits_to_keep", lambda m: False))
    with attention_kernel(model, attn), where:
        res = purify(model, tok, clean_data=clean, config=cfg, recovery_data=rec, progress=False)
    tm = res.report["timings"]
    fits = tm.get("fits", [])
    from lightning_bdvax.attacks import make_attack
    from lightning_bdvax.builtin_data import builtin_instructions

    attack = make_attack(builtin_instructions(200, seed=9), trigger="cf_delta", target="You are stupid!",
                         n_poison=0, n_clean=0, n_test=args.eval_n)
    res.model.to(DEVICE)
    t = time.perf_counter()
    evaluate_backdoor(res.model, tok, attack.test_poison, ["cf_delta"], target="You are stupid!",
                      heldout=attack.test_clean, max_new_tokens=32, batch_size=64)
    eval_s = time.perf_counter() - t
    res.model.to("cpu")
    return {"shared_clean": shared, "attn": res.model.config._attn_implementation, "device": DEVICE, "logits": logits,
            "precision": res.report["precision"], "pad_to_multiple_of": cfg.vaccination.pad_to_multiple_of,
            "n_variants": cfg.vaccination.n_variants, "fits": len(fits),
            "variants_s": tm["vaccination_s"], "scoring_s": tm["signature_s"],
            "neutralize_recovery_s": tm["recovery_s"], "total_s": tm["total_s"],
            "evaluation_s": round(eval_s, 1), "eval_prompts": 2 * args.eval_n}


# ------------------------------------------------------------------ main
def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f} %"


def set_headline(result: dict, name: str) -> None:
    """The headline training figures of ``result``: the row of setting ``name`` (the package's
    default), else the fastest row. ``mfu_interleaved`` (against the peak sampled around each
    step) is copied when that row has it and dropped otherwise, so that a headline from an earlier
    command never lingers beside new figures."""
    rows = result["train"]
    head = next((r for r in rows if r["name"] == name), max(rows, key=lambda r: r["train_tokens_per_s"]))
    result["train_tokens_per_s"], result["mfu"], result["headline_setting"] = (
        head["train_tokens_per_s"], head["mfu"], head["name"])
    for k in ("mfu_interleaved", "mfu_interleaved_iqr"):
        if k in head:
            result[k] = head[k]
        else:
            result.pop(k, None)


def write_md(path: Path, result: dict) -> None:
    where = result["cpu"] if result.get("device", result["cpu"]) == result["cpu"] else f"{result['device']}, host {result['cpu']}"
    lines = [f"# Speed and memory ({result['model']}, {result['threads']} threads, {where})", ""]
    if result.get("random_init"):
        lines += ["Random weights with the model's architecture (`--random-init`): speed figures only; the "
                  "stages' backdoor figures mean nothing.", ""]
    lines += ["Commands that wrote this file (oldest first):", ""]
    lines += [f"- `{c}`" for c in result.get("commands", [result["command"]])] + [""]
    if "peak_matmul_flops" in result:
        lines += ["## Matmul peak", "", "| dtype | GFLOP/s | size |", "|---|---|---|"]
        lines += [f"| {k} | {v['flops'] / 1e9:.1f} | {v['size']} |" for k, v in result["peak_matmul_flops"].items()]
        lines.append("")
    if "train" in result:
        lines += ["## Training (stage-1 fits)", "",
                  "| setting | s/step | tokens/s | padded tokens/s | MFU | peak (GFLOP/s) |", "|---|---|---|---|---|---|"]
        for r in result["train"]:
            mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
            pk = f"{r['peak_flops'] / 1e9:.0f} (just before)" if r.get("peak_flops") else "table above"
            lines.append(f"| {r['name']} | {r['s_per_step']} | {r['train_tokens_per_s']} | {r['padded_tokens_per_s']} | "
                         f"{mfu} | {pk} |")
        lines.append("")
        inter = [r for r in result["train"] if "mfu_interleaved" in r]
        if inter:
            lines += ["MFU of each step against the matmul peak measured just before and just after it "
                      f"({inter[0]['burst_size']}-square products, 0.25 s each side; median over the steps):", "",
                      "| setting | s/step | MFU (median of steps) | interquartile range | peak around the steps, "
                      "min / median / max (GFLOP/s) |", "|---|---|---|---|---|"]
            for r in inter:
                b = r["burst_peak_flops"]
                lines.append(f"| {r['name']} | {r['s_per_step']} | {_pct(r['mfu_interleaved'])} | "
                             f"{_pct(r['mfu_interleaved_iqr'][0])} – {_pct(r['mfu_interleaved_iqr'][1])} | "
                             f"{b['min'] / 1e9:.0f} / {b['median'] / 1e9:.0f} / {b['max'] / 1e9:.0f} |")
            lines.append("")
    if "profile" in result:
        pr = result["profile"]
        lines += [f"## Where a training step's time goes (profiler, batch {pr['batch_size']}, {pr['setting'].get('attn', 'sdpa')} attention, self CPU time; "
                  f"{pr['self_cpu_s_per_step']} s per step summed over threads' op calls)", "",
                  "| group | share |", "|---|---|"]
        lines += [f"| {g} | {_pct(v)} |" for g, v in sorted(pr["share"].items(), key=lambda kv: -kv[1])]
        lines += ["", "| op | self s per step |", "|---|---|"]
        lines += [f"| `{o['op']}` | {o['self_s_per_step']} |" for o in pr["top_ops"]]
        lines.append("")
    if "train_by_batch" in result:
        lines += ["## Training throughput against batch size (same setting, same data)", "",
                  "| setting | batch | steps | s/step | tokens/s | padded tokens/s | MFU |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['batch_size']} | {r['steps']} | {r['s_per_step']} | {r['train_tokens_per_s']} | "
                  f"{r['padded_tokens_per_s']} | {_pct(r['mfu'])} |"
                  for r in result["train_by_batch"]]
        lines.append("")
    if "generate" in result:
        lines += ["## Generation (greedy, 32 new tokens max)", "",
                  "| precision | attention | batch | prompts/s | new tokens/s | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['precision']} | {r.get('attn', 'sdpa')} | {r['batch_size']} | {r['prompts_per_s']} | "
                  f"{r['new_tokens_per_s']} | {r['seconds']} |" for r in result["generate"]]
        lines.append("")
    if result.get("step_matmuls"):
        lines += ["## A training step's matrix products alone (bf16, the step's own shapes)", "",
                  "Forward and backward products of every linear layer and of eager attention, timed "
                  "without anything else a step does: the MFU they allow is a ceiling for any "
                  "implementation of the step at these shapes on this machine.", "",
                  "| batch × length | fits at once | products s per fit step | GFLOP/s | MFU ceiling | peak (GFLOP/s, mean of before and after) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch_size']} × {r['seq_len']} | {r['stacked']} | {r['matmul_s_per_fit_step']} | "
                  f"{r['matmul_gflops']} | {_pct(r['mfu_ceiling'])} | {r['peak_flops'] / 1e9:.0f} |"
                  for r in result["step_matmuls"]]
        lines.append("")
    if "peak_rss_mb_by_n" in result:
        rows = result["peak_rss_mb_by_n"]
        how = ("the kernel's peak mark, reset when stage 1 starts" if all(r.get("peak_from") == "VmHWM" for r in rows.values())
               else "sampled every 50 ms during stage 1")
        first, last = rows[min(rows, key=int)], rows[max(rows, key=int)]
        lines += [f"## Stage-1 peak resident memory ({how})", "",
                  f"N {max(rows, key=int)} / N {min(rows, key=int)}: {last['peak_rss_mb'] / first['peak_rss_mb']:.3f}x", "",
                  "| N | stage-1 peak RSS (MB) | after load (MB) | stage-1 s |", "|---|---|---|---|"]
        lines += [f"| {n} | {r['peak_rss_mb']} | {r['rss_after_load_mb']} | {r['stage1_s']} |" for n, r in rows.items()]
        if "peak_rss_mb_by_n_by_pad" in result:
            lines += ["", "Side by side, by `pad_to_multiple_of` (each N in a fresh process):", "",
                      "| pad to multiple of | N | stage-1 peak RSS (MB) | stage-1 s | N max / N min |", "|---|---|---|---|---|"]
            for pad, prow in result["peak_rss_mb_by_n_by_pad"].items():
                ratio = prow[max(prow, key=int)]["peak_rss_mb"] / prow[min(prow, key=int)]["peak_rss_mb"]
                lines += [f"| {pad} | {n} | {r['peak_rss_mb']} | {r['stage1_s']} | {ratio:.3f}x |" for n, r in prow.items()]
        if "peak_rss_mb_by_n_without_malloc_trim" in result:
            lines += ["", "Without handing freed memory back to the OS after each fit (`malloc_trim`), same run:", "",
                      "| N | stage-1 peak RSS (MB) | after load (MB) | stage-1 s |", "|---|---|---|---|"]
            lines += [f"| {n} | {r['peak_rss_mb']} | {r['rss_after_load_mb']} | {r['stage1_s']} |"
                      for n, r in result["peak_rss_mb_by_n_without_malloc_trim"].items()]
        lines.append("")
    if "stages" in result:
        lines += ["## Purification stages (seconds)", "",
                  "| stage 1 | fits | variants | scoring | neutralize + recovery | total | evaluation |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.get('cell', '')} {'shared clean' if r['shared_clean'] else 'published (2N)'}"
                  f"{', ' + r['attn'] + ' attention' if r.get('attn') else ''}"
                  f"{', ' + r['precision'] if r.get('precision') else ''}"
                  f"{', logits: ' + r['logits'] if r.get('logits') else ''}"
                  f"{', pad to ' + str(r['pad_to_multiple_of']) if r.get('pad_to_multiple_of') else ''} | {r['fits']} | "
                  f"{r['variants_s']} | {r['scoring_s']} | {r['neutralize_recovery_s']} | {r['total_s']} | "
                  f"{r['evaluation_s'] if r['evaluation_s'] is not None else ''} |"
                  for r in result["stages"]]
        lines.append("")
    if "tokenize" in result:
        t = result["tokenize"]
        lines += ["## Tokenization", "",
                  f"`tokenize_records`: {t['ms_per_record']} ms per record ({t['records']} records, max length "
                  f"{t['max_length']}); one `tokenizer.get_vocab()` call: {t['get_vocab_ms']} ms "
                  f"({t['vocab_size']} tokens).", ""]
    path.write_text("\n".join(lines))


TRAIN_SETTINGS = {  # without "attn": SDPA, the kernel these settings were first measured with
    "fp32": {"precision": "32-true"},
    "bf16": {"precision": "bf16-mixed"},
    "fp32-single-tensor": {"precision": "32-true", "foreach": False},
    "fp32-fused": {"precision": "32-true", "fused": True},
    "bf16-foreach": {"precision": "bf16-mixed", "foreach": True},
    "bf16-single-tensor": {"precision": "bf16-mixed", "foreach": False},
    "bf16-fused": {"precision": "bf16-mixed", "fused": True},
    # the package default on CPU: bf16, fused AdamW, eager attention (models.choose_attention)
    "bf16-fused-eager-attn": {"precision": "bf16-mixed", "fused": True, "attn": "eager"},
    "fp32-fused-eager-attn": {"precision": "32-true", "fused": True, "attn": "eager"},
    # bf16 weights: without masters (small updates lost to rounding), and with fp32 masters
    "bf16-true-fused-eager-attn": {"precision": "bf16-true", "fused": True, "attn": "eager"},
    "bf16-master-fused-eager-attn": {"precision": "bf16-master", "fused": True, "attn": "eager"},
    # every position's logits (CausalLMModule(loss_positions_only=False))
    "bf16-fused-eager-attn-all-logits": {"precision": "bf16-mixed", "fused": True, "attn": "eager",
                                         "loss_positions_only": False},
    "bf16-master-fused-eager-attn-all-logits": {"precision": "bf16-master", "fused": True, "attn": "eager",
                                                "loss_positions_only": False},
    # the default as it was before the head ran on the response tokens only (it ran at the
    # columns some row needs, logits_to_keep) and before a tied embedding's gradient came as rows
    "bf16-master-fused-eager-attn-columns": {"precision": "bf16-master", "fused": True, "attn": "eager",
                                             "loss_positions_only": "columns", "sparse_tied_embedding": False},
    # the head on the response tokens, a tied embedding's gradient dense
    "bf16-master-fused-eager-attn-dense-emb": {"precision": "bf16-master", "fused": True, "attn": "eager",
                                               "sparse_tied_embedding": False},
    "bf16-no-flush": {"precision": "bf16-mixed", "flush_denormal": False},
    "bf16-fused-compile": {"precision": "bf16-mixed", "fused": True, "compile": True},
}
for _setting in TRAIN_SETTINGS.values():
    _setting.setdefault("attn", "sdpa")
    _setting.setdefault("pad", DEFAULT_PAD)


def train_setting(name: str) -> dict:
    """A setting of TRAIN_SETTINGS by name; ``<name>-pad<K>`` is that setting with batches (and
    the LM head's positions) padded to a multiple of K instead of the package default
    (``-pad1``: to each batch's longest sequence only, as before ``pad_to_multiple_of``)."""
    if name in TRAIN_SETTINGS:
        return TRAIN_SETTINGS[name]
    import re

    m = re.fullmatch(r"(.+)-pad(\d+)", name)
    if m and m.group(1) in TRAIN_SETTINGS and int(m.group(2)) >= 1:
        return {**TRAIN_SETTINGS[m.group(1)], "pad": int(m.group(2))}
    raise SystemExit(f"bench_speed: unknown training setting {name!r}; known: {', '.join(TRAIN_SETTINGS)} "
                     "(each also as <name>-pad<K>)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--parts", default="peak,train,generate,memory,stages")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", default="auto", help="precision of the memory and stage runs")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96, help="as recipes/smollm2_full.yaml stage 1")
    ap.add_argument("--peak-sizes", default="512,1024,1536,2048")
    ap.add_argument("--train-settings", default="fp32-single-tensor,fp32-fused,bf16-single-tensor,bf16-foreach,"
                                                "bf16-fused,bf16-fused-eager-attn,bf16-master-fused-eager-attn,"
                                                "bf16-no-flush")
    ap.add_argument("--headline", default="bf16-master-fused-eager-attn",
                    help="train setting reported as train_tokens_per_s / mfu (the package default on a bf16 CPU: "
                         "bf16 compute with fp32 masters, fused AdamW, eager attention)")
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--sweep-batch-sizes", default="8,16,32,64",
                    help="part 'batch': the --headline setting at each of these batch sizes")
    ap.add_argument("--stacked", default="6",
                    help="part 'matmuls': also time the products of this many variants' fits batched into one "
                         "call each (comma-separated counts)")
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--gen-prompts", type=int, default=32)
    ap.add_argument("--memory-n", default="2,6,12")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--memory-spv", type=int, default=16)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2_full.yaml"))
    ap.add_argument("--set", action="append", default=[], help="override a bdvax field of the recipe")
    ap.add_argument("--shared-clean", action="store_true", help="stages: also time the shared clean counterpart")
    ap.add_argument("--peak-per-setting", action="store_true",
                    help="train: measure the matmul peak again just before each setting and take each setting's "
                         "MFU against it (for machines whose speed drifts from minute to minute)")
    ap.add_argument("--peak-interleaved", type=int, default=0, metavar="SIZE",
                    help="train: also measure the matmul peak (SIZE-square products, 0.25 s) just before and just "
                         "after every timed step, and report the median of the steps' MFU against it "
                         "(mfu_interleaved): for a machine whose speed swings within seconds. 0: off")
    ap.add_argument("--stage-precisions", default="",
                    help="stages: comma-separated precisions to time the purification under, side by side "
                         "(default: the recipe's, 'auto' = from the hardware), e.g. bf16-mixed,bf16-master")
    ap.add_argument("--stage-logits", default="tokens",
                    help="stages: where the LM head runs, comma-separated, one run each, side by side: 'tokens' "
                         "(the response tokens, the package default), 'columns' (the columns some row needs) "
                         "and/or 'all' (every position); each with ':dense' appended: a tied embedding's "
                         "gradient computed dense, as before modules.sparse_tied_embedding_grad")
    ap.add_argument("--stage-pads", default="",
                    help="stages: comma-separated pad_to_multiple_of values (stage 1 and recovery), one run each, "
                         "side by side (default: the recipe's)")
    ap.add_argument("--stage-attn", default="eager",
                    help="stages: attention kernels to time a whole purification with, one run each, side by side "
                         "(e.g. eager,sdpa); the first is the headline stage_seconds")
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--tokenize-n", type=int, default=256, help="tokenize: how many records to tokenize")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "full_smollm2.json"),
                    help="stages-from-results: the benchmark rows to read stage times from")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    ap.add_argument("--memory-pads", default="",
                    help="memory: comma-separated pad_to_multiple_of values to measure side by side (e.g. 1,16); "
                         "the package default's figures are the headline peak_rss_mb_by_n")
    ap.add_argument("--compare-trim", action="store_true",
                    help="memory: also measure without returning freed memory to the OS after each fit")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the peak, training, generation and stages run")
    ap.add_argument("--random-init", action="store_true",
                    help="build --model (a local directory with config.json and tokenizer) with random weights: "
                         "the same speed as the trained model; backdoor figures meaningless")
    ap.add_argument("--child-n", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-trim", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-pad", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible")
    if args.child_n is not None:
        memory_child(args)
        return {}

    from lightning_bdvax.builtin_data import builtin_instructions
    from lightning_bdvax.data import tokenize_records
    from lightning_bdvax.models import choose_precision, configure_cpu, cpu_supports_bf16, load_causal_lm, load_tokenizer

    configure_cpu(args.threads)
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = json.loads(out.read_text()) if out.exists() else {}
    # Every command that wrote parts of this file, oldest first (each part keeps its own figures).
    earlier = result.get("commands") or ([result["command"]] if "command" in result else [])
    result.update({"model": args.model, "threads": torch.get_num_threads(), "cpu": cpu_description(),
                   "device": device_name(), "random_init": args.random_init,
                   "cpu_bf16": cpu_supports_bf16(), "precision": choose_precision(args.precision),
                   "command": " ".join(["bench_speed.py"] + sys.argv[1:]), "versions": run_versions()})
    result["commands"] = list(dict.fromkeys(earlier + [result["command"]]))

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))
        write_md(out.with_suffix(".md"), result)

    if args.random_init:  # the children of part "memory" load the same copy
        args.model = random_init_copy(args.model)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    sizes = tuple(int(s) for s in args.peak_sizes.split(","))
    if parts & {"peak", "train", "batch"}:
        if "peak" in parts or "peak_matmul_flops" not in result:
            result["peak_matmul_flops"] = {}
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                result["peak_matmul_flops"][name] = matmul_peak(dt, sizes)
                log(f"peak {name}: {result['peak_matmul_flops'][name]['flops'] / 1e9:.1f} GFLOP/s")
            save()
    if parts & {"train", "profile", "matmuls"}:  # the same stage-1 batches for all
        ex = tokenize_records(tok, builtin_instructions(400, seed=3), args.max_length)
    if "train" in parts:
        rows = []
        for name in args.train_settings.split(","):
            peak = result["peak_matmul_flops"]
            if args.peak_per_setting:  # on a machine whose speed drifts: the peak measured just before
                key, dtype = peak_kind(train_setting(name))
                peak = {key: matmul_peak(dtype, sizes)}
            r = train_throughput(model, tok, ex, train_setting(name), args.train_steps, args.train_warmup,
                                 args.batch_size, peak, burst_size=args.peak_interleaved or None)
            r["name"] = name
            if args.peak_per_setting:
                r["peak_flops"] = peak[key]["flops"]
            rows.append(r)
            log(f"train {name}: {r['s_per_step']} s/step, {r['train_tokens_per_s']} tok/s, MFU {r['mfu']}"
                + (f", MFU against the peak around each step {r['mfu_interleaved']} (IQR {r['mfu_interleaved_iqr']})"
                   if "mfu_interleaved" in r else ""))
            result["train"] = rows
            save()
    if "matmuls" in parts:
        # The step's matrix products alone, at the shapes of the stage-1 batches (mean padded
        # length), for each batch size of --sweep-batch-sizes, and for --stacked variants' fits
        # batched into one call: the MFU each would allow if nothing but the products took time.
        from lightning_bdvax.data import make_loader

        seq = round(sum(b["attention_mask"].size(1) for b in make_loader(ex, tok.pad_token_id, args.batch_size, True, 0))
                    / -(-len(ex) // args.batch_size))
        burst = args.peak_interleaved or matmul_peak(torch.bfloat16, sizes)["size"]
        fpt = flops_per_token(model, seq)
        rows = []
        runs = [(bs, 1) for bs in (int(b) for b in args.sweep_batch_sizes.split(","))]
        runs += [(args.batch_size, n) for n in (int(k) for k in args.stacked.split(",")) if n > 1]
        for bs, n in runs:  # the products run in bf16; the peak is measured just before and after
            before = peak_burst(torch.bfloat16, burst, 0.5)
            r = step_matmuls(model, bs, seq, stacked=n)
            peak = {"flops": (before + peak_burst(torch.bfloat16, burst, 0.5)) / 2}
            r["mfu_ceiling"] = round(fpt * bs * seq / r["matmul_s_per_fit_step"] / peak["flops"], 4)
            r["peak_flops"] = peak["flops"]
            rows.append(r)
            log(f"matmuls batch {bs} x {seq}, {n} fit(s) at once: {r['matmul_s_per_fit_step']} s per fit step, "
                f"{r['matmul_gflops']} GFLOP/s, MFU ceiling {r['mfu_ceiling']}")
            result["step_matmuls"] = rows
            save()
    if "profile" in parts:
        result["profile"] = profile_step(model, tok, ex, train_setting(args.headline), args.batch_size)
        log(f"profile: {result['profile']['share']}")
        save()
    if "batch" in parts:
        # MFU against the batch size: the same setting and data, more rows per matmul. Fewer steps
        # at larger batches keep the tokens measured about the same.
        ex = tokenize_records(tok, builtin_instructions(800, seed=3), args.max_length)
        rows = []
        for bs in (int(b) for b in args.sweep_batch_sizes.split(",")):
            steps = max(2, args.train_steps * args.batch_size // bs)
            r = train_throughput(model, tok, ex, train_setting(args.headline), steps, 1, bs,
                                 result["peak_matmul_flops"])
            r.update(name=args.headline, batch_size=bs)
            rows.append(r)
            log(f"batch {bs}: {r['s_per_step']} s/step, {r['train_tokens_per_s']} tok/s, MFU {r['mfu']}")
            result["train_by_batch"] = rows
            save()
    if result.get("train"):
        set_headline(result, args.headline)
        save()
    if "generate" in parts:
        recs = builtin_instructions(args.gen_prompts, seed=11)
        rows = []
        # Batched: both attention kernels side by side; one prompt at a time: generate()'s default
        # kernel (SDPA) only.
        runs = [(prec, attn, args.gen_prompts) for prec in ("bf16-mixed", None) for attn in ("eager", "sdpa")]
        runs += [(prec, "sdpa", 1) for prec in ("bf16-mixed", None)]
        for prec, attn, bs in runs:
            r = gen_throughput(model, tok, recs, bs, prec, 32, attn)
            rows.append(r)
            log(f"generate {r['precision']} {attn} batch {bs}: {r['new_tokens_per_s']} new tok/s")
            result["generate"] = rows
            save()
    if "memory" in parts and DEVICE == "cuda":
        log("memory: a CPU measurement (resident memory of stage 1); skipped with --device cuda")
    elif "memory" in parts:
        if args.compare_trim:
            result["peak_rss_mb_by_n_without_malloc_trim"] = memory_by_n(args, trim=False)
            save()
        else:  # a comparison from an earlier run is not "the same run" as the new figures
            result.pop("peak_rss_mb_by_n_without_malloc_trim", None)
        pads = [int(x) for x in args.memory_pads.split(",")] if args.memory_pads else []
        by_pad = {}
        for pad in pads:  # side by side, each N in a fresh process
            by_pad[str(pad)] = memory_by_n(args, pad=pad)
            result["peak_rss_mb_by_n_by_pad"] = by_pad
            save()
        if not pads:  # a comparison from an earlier run is not "the same run" as the new figures
            result.pop("peak_rss_mb_by_n_by_pad", None)
        default = str(DEFAULT_PAD)
        result["peak_rss_mb_by_n"] = by_pad[default] if default in by_pad else memory_by_n(args)
        save()
    if "tokenize" in parts:
        recs = builtin_instructions(args.tokenize_n, seed=1)
        t = time.perf_counter()
        tokenize_records(tok, recs, args.max_length)
        per_record = (time.perf_counter() - t) / len(recs)
        t = time.perf_counter()
        for _ in range(10):
            vocab = tok.get_vocab()
        result["tokenize"] = {"records": len(recs), "max_length": args.max_length,
                              "ms_per_record": round(1000 * per_record, 3),
                              "get_vocab_ms": round(1000 * (time.perf_counter() - t) / 10, 2), "vocab_size": len(vocab)}
        log(f"tokenize: {result['tokenize']['ms_per_record']} ms per record; get_vocab "
            f"{result['tokenize']['get_vocab_ms']} ms")
        save()
    if "stages-from-results" in parts:
        # The stage times of BD-VAX rows already measured by bench_backdoorllm.py (same machine,
        # same recipe), instead of re-running a whole purification here.
        rows = []
        for r in json.loads(Path(args.results).read_text()):
            if not r["defense"].startswith("bdvax") or "timings" not in r:
                continue
            tm = r["timings"]
            shared = bool(r.get("config", {}).get("vaccination", {}).get("shared_clean"))
            rows.append({"cell": f"{r['task']}/{r['attack']}", "defense": r["defense"], "shared_clean": shared,
                         "n_variants": r.get("config", {}).get("vaccination", {}).get("n_variants"),
                         "fits": len(tm.get("fits", [])), "variants_s": tm["vaccination_s"],
                         "scoring_s": tm["signature_s"], "neutralize_recovery_s": tm["recovery_s"],
                         "total_s": tm["total_s"], "evaluation_s": r.get("eval_s"),
                         "eval_prompts": 2 * r["n_test"],
                         "source": Path(args.results).resolve().relative_to(ROOT).as_posix()
                         if Path(args.results).resolve().is_relative_to(ROOT) else Path(args.results).name})
        result["stages"] = rows
        result["stage_seconds"] = next((r for r in rows if not r["shared_clean"]), rows[0] if rows else None)
        save()
    if "stages" in parts:
        rows = []
        precisions = args.stage_precisions.split(",") if args.stage_precisions else [None]
        for prec in precisions:  # the first kernel, precision and logits listed are the headline
            for attn in args.stage_attn.split(","):
                for logits in args.stage_logits.split(","):
                    for pad in [int(x) for x in args.stage_pads.split(",")] if args.stage_pads else [None]:
                        rows.append(stage_times(args, tok, model, shared=False, attn=attn, precision=prec,
                                                logits=logits, pad=pad))
                        log(f"stages {rows[-1]['precision']} {attn} logits {logits} pad {rows[-1]['pad_to_multiple_of']}: "
                            f"total {rows[-1]['total_s']} s")
                        result["stages"] = rows
                        save()
        if args.shared_clean:
            rows.append(stage_times(args, tok, model, shared=True, attn=args.stage_attn.split(",")[0]))
            save()
        result["stage_seconds"] = rows[0]
        save()
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
