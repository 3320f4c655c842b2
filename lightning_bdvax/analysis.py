"""The paper's sanity checks, and ASR as a function of the number of variants N.

Where does a backdoor live? When the model the suspicious one was fine-tuned from (the
*reference*) is at hand, as in a lab, the fine-tune's update ``Δ = θ_sus − θ_ref`` can be split
by part and reverted piece by piece:

* :func:`revert_deltas` returns a copy of the suspicious model whose attention projections or
  MLP projections (of all layers, or of chosen layers) are put back to the reference's weights;
* :func:`reverted` does the same in place for the duration of a ``with`` block and then restores
  the suspicious weights exactly (no full model copy: only the reverted tensors are saved);
* :func:`sanity_checks` evaluates the suspicious model with attention deltas reverted, with MLP
  deltas reverted, and with MLP deltas reverted in ``k`` consecutive blocks for a range of ``k``.

The paper's finding (LLaMA-2-7B): the trigger→behaviour association lives in the MLP deltas,
redundantly across layers; reverting the attention deltas leaves the backdoor in place
(attention only amplifies the trigger), reverting the MLP deltas removes it, and reverting MLP
deltas in fewer than ~12 consecutive blocks does not.

What counts as a part
    *MLP*: the projections that :func:`lightning_bdvax.arch.find_mlp_modules` finds (gate/up/down
    and their equivalents), weight and bias. *Attention*: every module with a 2-D weight inside a
    container whose name component is ``self_attn``, ``attn``, ``attention``, ``self_attention``
    or ``cross_attn`` (q/k/v/o, fused ``c_attn``/``query_key_value``, ``dense``...), weight and
    bias. Norm weights inside attention blocks (Qwen3/Gemma3 ``q_norm``/``k_norm``), layer norms
    and embeddings are never reverted. Vision/audio towers are skipped, as in :mod:`.arch`.

Which windows
    For each ``k`` smaller than the number of blocks ``L``, ``n_windows`` windows of ``k``
    consecutive blocks are evaluated, with starts spread evenly from the first block to the last
    possible one (``n_windows=3``: start, middle, end; see :func:`window_starts`). Pass
    ``n_windows=None`` for every window (``L − k + 1`` evaluations per ``k``). ``k ≥ L`` is the
    ``revert_mlp`` row. Cost: ``2 + [reference] + Σ_k min(n_windows, L − k + 1)`` evaluations.

ASR vs N
    :func:`asr_vs_n` builds the signature from the first ``n`` variants for each ``n`` in ``ns``
    with :meth:`~lightning_bdvax.signature.SignatureAccumulator.scores` ``(n=n)`` (the
    accumulator keeps per-variant norms and ``‖S_n‖²``), so no variant is fine-tuned again;
    each ``n`` neutralizes a fresh copy of the model, optionally recovers it, and evaluates it.
"""

from __future__ import annotations

import copy
import math
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .arch import DEFAULT_EXCLUDE, _base_layer, _layer_index, _strip_peft_prefix, _weight_of, find_mlp_modules
from .signature import Signature, SignatureAccumulator

__all__ = ["PARTS", "ATTENTION_CONTAINER", "part_tensors", "revert_deltas", "reverted", "delta_norms",
           "window_starts", "sanity_checks", "asr_vs_n", "make_recover_fn", "PAPER_FINDING"]

PARTS = ("attention", "mlp")

#: Regex (``re.fullmatch``) on one name component: the containers whose 2-D weights are "attention".
ATTENTION_CONTAINER = r"(self_|cross_)?(attn|attention)"

#: The published finding the sanity checks are compared with.
PAPER_FINDING = (
    "Li & Kim (ICLR 2026), LLaMA-2-7B: the backdoor association is carried by the MLP updates, redundantly "
    "across many layers. Reverting (zeroing) the attention updates leaves the backdoor in place: attention only "
    "amplifies the trigger. Reverting the MLP updates removes it. Reverting the MLP updates in fewer than ~12 "
    "consecutive blocks (of 32) does not remove it."
)


# ------------------------------------------------------------------ which tensors form a part
def _skip_name(name: str) -> bool:
    parts = name.split(".")
    return any(p == "base_layer" or p.startswith("lora_") for p in parts)


def _attention_modules(model: nn.Module, exclude: str | None = DEFAULT_EXCLUDE) -> list[tuple[str, int | None, nn.Module]]:
    cont = re.compile(ATTENTION_CONTAINER)
    excl = re.compile(exclude) if exclude else None
    out = []
    for name, mod in model.named_modules():
        if not name or _skip_name(name):
            continue
        comps = name.split(".")
        if excl is not None and any(excl.search(c) for c in comps):
            continue
        # the module must sit *inside* an attention container (not be the container itself)
        if not any(cont.fullmatch(c) for c in comps[:-1]):
            continue
        base = _base_layer(mod)
        if _weight_of(base) is None:
            continue
        out.append((name, _layer_index(name), base))
    return out


def part_tensors(model: nn.Module, part: str, layers: Iterable[int] | None = None) -> dict[str, Tensor]:
    """The parameters (weights and biases) of ``part`` (``"attention"`` or ``"mlp"``) of ``model``,
    restricted to ``layers`` (block indices as they appear in module names; None: all), keyed by
    a peft-independent parameter name (e.g. ``model.layers.3.mlp.up_proj.weight``)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    want = None if layers is None else {int(x) for x in layers}
    if part == "mlp":
        named = dict(model.named_modules())
        mods = [(cm.name, cm.layer, _base_layer(named[cm.name])) for cm in find_mlp_modules(model)]
    else:
        mods = _attention_modules(model)
        if not mods:
            raise ValueError(f"no attention projections found in {type(model).__name__} (looked for 2-D weights "
                             f"inside modules named like {ATTENTION_CONTAINER!r})")
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, layer, mod in mods:
        if want is not None and layer not in want:
            continue
        key = _strip_peft_prefix(name)
        for pname in ("weight", "bias"):
            t = getattr(mod, pname, None)
            if isinstance(t, Tensor) and id(t) not in seen:
                seen.add(id(t))
                out[f"{key}.{pname}"] = t
    return out


def _layers_of(model: nn.Module) -> list[int]:
    """Block indices that have an MLP, in order."""
    return sorted({cm.layer for cm in find_mlp_modules(model)})


def _pairs(suspicious: nn.Module, reference: nn.Module, part: str,
           layers: Iterable[int] | None) -> list[tuple[str, Tensor, Tensor]]:
    layers = None if layers is None else list(layers)
    sus = part_tensors(suspicious, part, layers)
    ref = part_tensors(reference, part, layers)
    if layers is not None and not sus:
        raise ValueError(f"no {part} parameters in layers {layers}; the model has blocks {_layers_of(suspicious)}")
    missing = sorted(set(sus) - set(ref))
    if missing:
        raise ValueError(f"the reference model lacks {len(missing)} {part} parameters of the suspicious model, "
                         f"e.g. {missing[0]}: not the model it was fine-tuned from?")
    out = []
    for k, t in sus.items():
        if tuple(t.shape) != tuple(ref[k].shape):
            raise ValueError(f"{k}: suspicious shape {tuple(t.shape)} != reference shape {tuple(ref[k].shape)}")
        out.append((k, t, ref[k]))
    return out


# ------------------------------------------------------------------ reverting
def revert_deltas(suspicious: nn.Module, reference: nn.Module, part: str = "mlp",
                  layers: Iterable[int] | None = None) -> nn.Module:
    """A copy of ``suspicious`` whose ``part`` weights in ``layers`` are the ``reference``'s.

    Args:
        suspicious: the fine-tuned (possibly backdoored) model; left unchanged.
        reference: the model it was fine-tuned from (same architecture and names).
        part: ``"attention"`` (q/k/v/o projections, found generically) or ``"mlp"``
            (:func:`~lightning_bdvax.arch.find_mlp_modules`).
        layers: block indices to revert (None: every block).

    Reverting a part's delta sets ``θ_part = θ_sus,part − Δ_part = θ_ref,part``; everything else
    keeps the suspicious weights.
    """
    model = copy.deepcopy(suspicious)
    with torch.no_grad():
        for _, t, r in _pairs(model, reference, part, layers):
            t.copy_(r.to(device=t.device, dtype=t.dtype))
    return model


@contextmanager
def reverted(suspicious: nn.Module, reference: nn.Module, part: str = "mlp",
             layers: Iterable[int] | None = None) -> Iterator[nn.Module]:
    """In place, for the ``with`` block: ``suspicious`` with ``part`` deltas in ``layers`` reverted.

    Only the reverted tensors are copied; on exit (also on an exception) the suspicious weights
    and the train/eval mode are restored bit for bit.
    """
    pairs = _pairs(suspicious, reference, part, layers)
    saved = [t.detach().clone() for _, t, _ in pairs]
    was_training = suspicious.training
    try:
        with torch.no_grad():
            for _, t, r in pairs:
                t.copy_(r.to(device=t.device, dtype=t.dtype))
        yield suspicious
    finally:
        with torch.no_grad():
            for (_, t, _), s in zip(pairs, saved):
                t.copy_(s)
        suspicious.train(was_training)


@torch.no_grad()
def delta_norms(suspicious: nn.Module, reference: nn.Module) -> list[dict]:
    """Per block: ``‖Δ‖₂`` of the attention and MLP parameters and ``‖Δ‖/‖θ_ref‖`` (relative size)."""
    rows: dict[int | None, dict] = {}
    for part in PARTS:
        for k, t, r in _pairs(suspicious, reference, part, None):
            layer = _layer_index(k.rsplit(".", 1)[0])
            row = rows.setdefault(layer, {"layer": layer, "attention_sq": 0.0, "mlp_sq": 0.0,
                                          "attention_ref_sq": 0.0, "mlp_ref_sq": 0.0})
            d = t.detach().float().cpu() - r.detach().float().cpu()
            row[f"{part}_sq"] += float(d.pow(2).sum())
            row[f"{part}_ref_sq"] += float(r.detach().float().pow(2).sum())
    out = []
    for layer in sorted(rows, key=lambda x: (x is None, x)):
        r = rows[layer]
        out.append({"layer": layer,
                    "attention": math.sqrt(r["attention_sq"]), "mlp": math.sqrt(r["mlp_sq"]),
                    "attention_rel": math.sqrt(r["attention_sq"] / r["attention_ref_sq"]) if r["attention_ref_sq"] else 0.0,
                    "mlp_rel": math.sqrt(r["mlp_sq"] / r["mlp_ref_sq"]) if r["mlp_ref_sq"] else 0.0})
    return out


# ------------------------------------------------------------------ the sanity checks
def window_starts(n_layers: int, k: int, n_windows: int | None = 3) -> list[int]:
    """Start positions (0-based, into the ordered block list) of the windows of ``k`` consecutive
    blocks to evaluate: ``n_windows`` starts spread evenly over ``0 .. n_layers − k`` (rounded,
    duplicates dropped; one window: the middle one), or every start when ``n_windows`` is None."""
    if not 1 <= k <= n_layers:
        raise ValueError(f"k must be in [1, {n_layers}], got {k}")
    last = n_layers - k
    if n_windows is None or n_windows >= last + 1:
        return list(range(last + 1))
    if n_windows < 1:
        raise ValueError(f"n_windows must be >= 1 or None, got {n_windows}")
    if n_windows == 1:
        return [last // 2]
    return sorted({round(i * last / (n_windows - 1)) for i in range(n_windows)})


def _share(sq: float, total_sq: float) -> float:
    return sq / total_sq if total_sq > 0 else 0.0


def sanity_checks(suspicious: nn.Module, reference: nn.Module, tokenizer: Any = None,
                  eval_fn: Callable[[nn.Module], Mapping] | None = None,
                  ks: Sequence[int] = (1, 2, 4, 8, 12, 16, 24), n_windows: int | None = 3,
                  include_reference: bool = True,
                  on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """The paper's sanity checks: evaluate ``suspicious`` with parts of its fine-tune reverted.

    Args:
        suspicious: the fine-tuned model; modified only inside each check and restored exactly.
        reference: the model it was fine-tuned from.
        tokenizer: not used by the checks themselves (``eval_fn`` carries its own); accepted so
            that calls read like the rest of the API.
        eval_fn: ``eval_fn(model) -> dict`` of metrics (e.g. a closure over
            :func:`~lightning_bdvax.evaluate.evaluate_backdoor`); its items are merged into each row.
        ks: window sizes (numbers of consecutive MLP blocks); sizes ``≥`` the number of blocks
            are skipped (that is the ``revert_mlp`` row).
        n_windows: windows evaluated per ``k`` (see :func:`window_starts`); None: all.
        include_reference: also evaluate the reference model itself (the floor).
        on_row: called with each row as soon as it is computed (for progress / partial results).

    Returns:
        rows with ``check`` (``suspicious``, ``reference``, ``revert_attention``, ``revert_mlp``,
        ``revert_mlp_window``), ``part``, ``layers`` (block indices reverted), ``k``, ``start``,
        ``reverted_share`` (the reverted part of ``‖Δ‖²`` over attention + MLP, in [0, 1]) and the
        metrics of ``eval_fn``, in that order: suspicious, reference, attention, MLP, then windows
        by increasing ``k`` and start.
    """
    if eval_fn is None:
        raise ValueError("sanity_checks needs eval_fn(model) -> dict")
    layers = _layers_of(suspicious)
    n_layers = len(layers)
    sq = {part: {k: float((t.detach().float().cpu() - r.detach().float().cpu()).pow(2).sum())
                 for k, t, r in _pairs(suspicious, reference, part, None)} for part in PARTS}
    total = sum(sum(v.values()) for v in sq.values())

    def part_sq(part: str, chosen: Iterable[int] | None) -> float:
        if chosen is None:
            return sum(sq[part].values())
        chosen = set(chosen)
        return sum(v for k, v in sq[part].items() if _layer_index(k.rsplit(".", 1)[0]) in chosen)

    rows: list[dict] = []

    def emit(row: dict, model: nn.Module) -> None:
        res = eval_fn(model)
        row.update(dict(res or {}))
        rows.append(row)
        if on_row is not None:
            on_row(row)

    base = {"part": None, "layers": [], "k": None, "start": None}
    emit(dict(base, check="suspicious", reverted_share=0.0), suspicious)
    if include_reference:
        emit(dict(base, check="reference", part="all", reverted_share=1.0), reference)
    for part in PARTS:
        with reverted(suspicious, reference, part) as m:
            emit({"check": f"revert_{part}", "part": part, "layers": list(layers), "k": n_layers, "start": 0,
                  "reverted_share": _share(part_sq(part, None), total)}, m)
    for k in sorted({int(k) for k in ks}):
        if k < 1:
            raise ValueError(f"window sizes must be >= 1, got {k}")
        if k >= n_layers:
            continue
        for s in window_starts(n_layers, k, n_windows):
            chosen = layers[s:s + k]
            with reverted(suspicious, reference, "mlp", chosen) as m:
                emit({"check": "revert_mlp_window", "part": "mlp", "layers": chosen, "k": k, "start": s,
                      "reverted_share": _share(part_sq("mlp", chosen), total)}, m)
    return rows


# ------------------------------------------------------------------ ASR vs N
def _cfg_value(cfg: Any, name: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _jaccard(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / union if union else 1.0


def asr_vs_n(acc: SignatureAccumulator, model: nn.Module, tokenizer: Any = None,
             eval_fn: Callable[[nn.Module], Mapping] | None = None, ns: Iterable[int] | None = None,
             signature_cfg: Any = None, neutralize_cfg: Any = None,
             recover_fn: Callable[[nn.Module, Signature], nn.Module | None] | None = None, seed: int = 0,
             on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """ASR (or any ``eval_fn`` metric) of the purified model with a signature from ``n`` variants.

    Args:
        acc: the accumulator of a finished stage 1 (``acc.n`` = N_max variants).
        model: the suspicious model; each ``n`` works on a fresh deep copy.
        tokenizer: not used directly (``eval_fn``/``recover_fn`` carry their own; see
            :func:`make_recover_fn`).
        eval_fn: ``eval_fn(model) -> dict``; merged into each row.
        ns: the numbers of variants (default ``2 .. N_max``); each must be in ``[1, N_max]``.
        signature_cfg: a :class:`~lightning_bdvax.pipeline.SignatureConfig` or a dict with
            ``tau``, ``lam``, ``selection``, ``threshold`` (defaults as in ``SignatureConfig``).
        neutralize_cfg: a :class:`~lightning_bdvax.pipeline.NeutralizeConfig` or a dict with
            ``mode``, ``scale`` (defaults as in ``NeutralizeConfig``).
        recover_fn: optional ``recover_fn(model, signature) -> model | None`` run after
            neutralization (e.g. :func:`make_recover_fn`); None evaluates the neutralized model.
        seed: seed of the re-initialisation draw (``mode="reinit"``).
        on_row: called with each row as soon as it is computed.

    The signature at ``n`` uses only the first ``n`` variants' statistics (prefix scores), so the
    sweep costs one neutralize (+ recovery) + evaluation per ``n`` and no fine-tune.

    Returns:
        one row per ``n``: ``n``, ``n_flagged``, ``n_channels``, ``jaccard_vs_final`` (overlap of the
        flagged set with the signature at N_max) and the metrics of ``eval_fn``.
    """
    from .neutralize import neutralize_

    if eval_fn is None:
        raise ValueError("asr_vs_n needs eval_fn(model) -> dict")
    if acc.n == 0:
        raise ValueError("the accumulator holds no variant")
    ns = list(range(2, acc.n + 1)) if ns is None else [int(n) for n in ns]
    if not ns:
        raise ValueError("ns is empty")
    bad = [n for n in ns if not 1 <= n <= acc.n]
    if bad:
        raise ValueError(f"every n must be in [1, {acc.n}] (the variants accumulated), got {bad}")
    tau = _cfg_value(signature_cfg, "tau", 0.01)
    lam = _cfg_value(signature_cfg, "lam", 0.01)
    selection = _cfg_value(signature_cfg, "selection", "per_module")
    threshold = _cfg_value(signature_cfg, "threshold", None)
    mode = _cfg_value(neutralize_cfg, "mode", "zero")
    scale = _cfg_value(neutralize_cfg, "scale", 1.0)
    specs = getattr(acc, "specs", None)

    def signature_at(n: int) -> Signature:
        meta = {"variants": [s.to_dict() for s in specs[:n]]} if specs is not None else {}
        return Signature.from_accumulator(acc, tau=tau, lam=lam, selection=selection, threshold=threshold, n=n,
                                          **meta)

    final = signature_at(acc.n).masks
    rows = []
    for n in ns:
        sig = signature_at(n)
        m = copy.deepcopy(model)
        neutralize_(m, sig, mode=mode, seed=seed, scale=scale)
        if recover_fn is not None:
            out = recover_fn(m, sig)
            m = out if isinstance(out, nn.Module) else m
        m.eval()
        row = {"n": n, "n_flagged": sig.n_flagged, "n_channels": sig.n_channels,
               "jaccard_vs_final": _jaccard(sig.masks, final), "mode": mode, "recovered": recover_fn is not None}
        row.update(dict(eval_fn(m) or {}))
        rows.append(row)
        if on_row is not None:
            on_row(row)
        del m
    return rows


def make_recover_fn(tokenizer: Any, records: Sequence[dict], cfg: Any = None, teacher: nn.Module | None = None,
                    seed: int = 0, precision: str = "32-true") -> Callable[[nn.Module, Signature], nn.Module]:
    """A ``recover_fn`` for :func:`asr_vs_n`: :func:`lightning_bdvax.pipeline.recover` on ``records``
    with ``cfg`` (a :class:`~lightning_bdvax.pipeline.RecoveryConfig`; its default when None).
    ``teacher``: the suspicious model, for ``objective="distill"`` (as :func:`purify` does)."""
    from .pipeline import RecoveryConfig, recover

    cfg = cfg or RecoveryConfig()

    def fn(model: nn.Module, signature: Signature) -> nn.Module:
        model.train()
        t = teacher if cfg.objective == "distill" else None
        if cfg.objective == "distill" and t is None:
            raise ValueError("objective='distill' needs teacher= (the suspicious model)")
        # RecoveryModule freezes the teacher and sets eval mode: put its flags back afterwards.
        flags = [p.requires_grad for p in t.parameters()] if t is not None else []
        was_training = t.training if t is not None else False
        try:
            return recover(model, tokenizer, records, cfg, teacher=t, seed=seed, precision=precision,
                           progress=False)
        finally:
            if t is not None:
                for p, f in zip(t.parameters(), flags):
                    p.requires_grad_(f)
                t.train(was_training)

    return fn
