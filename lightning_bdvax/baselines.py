"""Baseline defenses to compare BD-VAX against (issue 5), as library components.

Every defense changes the model it is given **in place** (pass a copy to keep the original) and
spends the same clean-data budget as BD-VAX's recovery: a list of clean instruction records plus
a :class:`~lightning_bdvax.pipeline.RecoveryConfig` (``num_samples``, ``steps``, ``lr``,
``batch_size``, ``max_length``). The ones that train are Lightning fits with a fresh Trainer
(:func:`~lightning_bdvax.pipeline.make_trainer`).

==================  ===========================================================================
name                what it does
==================  ===========================================================================
``ft``              clean fine-tune only: :func:`~lightning_bdvax.pipeline.recover` with the
                    ``"lm"`` objective (:func:`defend_ft`).
``prune-magnitude`` unstructured magnitude pruning of the MLP weights, per module
                    (:func:`prune_magnitude_`).
``prune-wanda``     Wanda pruning of the MLP weights, calibrated on the clean records
                    (:func:`prune_wanda_`).
``fineprune``       prune (Wanda by default), then the ``"lm"`` fine-tune with the pruned
                    entries held at zero by gradient masks (:func:`defend_fineprune`).
``quant-int8``      weight-only round-to-nearest symmetric int8, per output channel
                    (:func:`quantize_weights_`).
``quant-int4``      the same at int4, groups of 128 input features.
``crow``            CROW consistency fine-tune (:class:`CROWModule`, :func:`defend_crow`).
``random``          random-channel control: neutralize as many random MLP channels per module
                    as a BD-VAX signature flags, then the same recovery
                    (:func:`random_channels_signature`, :func:`defend_random`).
==================  ===========================================================================

:func:`run_defense` runs any of them by name (:data:`DEFENSES`) and returns a JSON-ready
``info`` dict (``defense``, ``wall_s``, ``steps`` and what the defense measured: sparsity
reached, quantization error, channels flagged...). :func:`run_lora_defense` runs them on a LoRA
artefact (base + suspicious adapter): ``ft`` and ``crow`` train the adapter itself, the
weight-editing ones act on the merged model.

Choices (and why)
-----------------
Pruning
    Only the MLP projections found by :func:`~lightning_bdvax.arch.find_mlp_modules` are pruned
    (gate/up/down in a gated MLP), as the issue asks: that is where the backdoor lives
    (DESIGN.md §1), and it keeps the comparison with BD-VAX's channel surgery on the same
    weights. Biases are left alone. *Magnitude*: each weight matrix loses its
    ``floor(sparsity · numel)`` smallest ``|w|`` (per-layer, as in the Wanda repository's
    magnitude baseline). *Wanda* (Sun et al. 2024, "A Simple and Effective Pruning Approach for
    Large Language Models"): score ``S_ij = |W_ij| · ‖X_j‖₂``, ``X_j`` the ``j``-th input
    feature of the projection over every (non-padding) calibration token, and each *output row*
    is a comparison group that loses its ``floor(sparsity · in_features)`` lowest scores (the
    paper's per-output grouping). Achieved sparsity is therefore the target within one element
    per module (magnitude) or per row (Wanda).

Fine-pruning
    Prune, then fine-tune with :class:`~lightning_bdvax.modules.RecoveryModule`'s ``grad_masks``
    holding every pruned entry at exactly zero. Without the masks the pruned weights get
    gradients and regrow, and the result drifts towards plain FT from a perturbed start; with
    them the fine-tune repairs the *remaining* weights around the pruning, which is what
    fine-pruning means (Liu et al. 2018). AdamW with a zero gradient and no weight decay leaves
    a zero entry at zero, so the sparsity reached by the pruning survives the fine-tune exactly.
    Wanda is the default pruner (BackdoorLLM's pruning defense is Wanda); ``method="magnitude"``
    is available.

Quantization
    Weight-only, round-to-nearest, symmetric: ``q = clamp(round(w / s), −(2^(b−1)−1), 2^(b−1)−1)``
    with ``s = max|w| / (2^(b−1)−1)`` per output channel (``group_size=None``) or per group of
    ``group_size`` consecutive input features of a row, dequantized back into the float weights
    (fake quantization: the model stays a normal float model, the values are the ones an int
    kernel would see). Since ``|w| ≤ max|w|`` nothing is clipped, so the error of every element
    is at most ``s/2`` (in fp32; a bf16 model adds the cast's rounding). int8 defaults to per
    channel, int4 to groups of 128 (the usual GPTQ/AWQ setting); when ``in_features`` is not a
    multiple of 128 (SmolLM2's 576) the last group of a row is shorter rather than falling back
    to per-channel scales, so every projection gets 128-wide groups. All ``nn.Linear`` (and
    ``transformers`` ``Conv1D``) weights are quantized **except** the input embeddings and the
    output head (``lm_head``), which weight-only LLM quantization keeps in high precision
    (quantizing the head costs much more perplexity than any other layer; a tied head is the
    embedding matrix). LoRA adapter matrices (``lora_*``) are skipped: merge first.

CROW
    Min et al., "CROW: Eliminating Backdoors from Large Language Models via Internal Consistency
    Regularization", ICML 2025 (arXiv 2411.12768), and its reference trainer
    (``consistency_trainer.py``, ``CROWTrainer.compute_loss``). Per step:

    1. ``E = embed(input_ids)``; forward with hidden states ``h_0 … h_L`` (``h_0`` the
       embeddings, ``h_L`` after the final norm).
    2. ``L_cons = mean over l, tokens of (1 − cos(h_l, h_{l+1}))`` for consecutive decoder-layer
       outputs ``l = 1 … L−2`` (the reference's ``hidden_states[1:-2]`` vs ``[2:-1]``: neither
       the embeddings nor the normed last state).
    3. FGSM: ``δ = ε · sign(∇_E L_cons)`` (a constant), ``E' = E + δ``.
    4. ``L_cons'`` on the forward of ``E'``; ``total = L_LM + α · L_cons'`` with ``L_LM`` the
       next-token loss on the clean input. Published defaults α = 5.5, ε = 0.1, ~100 clean
       samples.

    Deviations, all documented in :class:`CROWModule`: the token mean skips padding (the
    reference averages padded positions too); ``L_LM`` is taken from the logits of forward 1
    (the same function of the same clean input as the reference's separate third forward, one
    forward fewer); a model with 2 decoder layers (too shallow for the reference's pairs) uses
    the pair (embeddings, layer 1). The fine-tune is full-parameter like BD-VAX's recovery (the
    reference trains a LoRA adapter) with the same budget (``cfg.num_samples`` records).

Random-channel control
    :func:`random_channels_signature` flags, in every module of a given BD-VAX signature, the
    same number of channels, drawn uniformly at random and independently per module (BD-VAX
    selects per projection too). Then :func:`~lightning_bdvax.neutralize.neutralize_` (``"zero"``
    by default, as :class:`~lightning_bdvax.pipeline.NeutralizeConfig`) and the *same* recovery
    as BD-VAX (``cfg.objective``; for ``"distill"`` the teacher is a copy of the model taken
    before neutralization, i.e. the suspicious model, as in :func:`~lightning_bdvax.pipeline.purify`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arch import ChannelModule, channel_module_index, find_channel_modules, find_mlp_modules
from .data import make_loader, tokenize_records
from .modules import CausalLMModule
from .neutralize import NEUTRALIZE_MODES, neutralize_
from .signature import Signature

__all__ = [
    "DEFENSES", "DEFENSE_NAMES", "DEFENSE_OPTIONS", "run_defense",
    "defend_ft",
    "prune_magnitude_", "prune_wanda_", "collect_input_norms", "mlp_sparsity", "defend_fineprune",
    "quantize_tensor", "quantize_weights_", "quantizable_linears",
    "layer_consistency_loss", "CROWModule", "defend_crow",
    "random_channels_signature", "defend_random",
    "ADAPTER_TRAINED", "run_lora_defense",
]


# ------------------------------------------------------------------ helpers
def _recovery_cfg(cfg: Any = None, **overrides: Any):
    """A :class:`RecoveryConfig` from a RecoveryConfig, a mapping, any object with its fields, or None."""
    from .pipeline import RecoveryConfig

    if cfg is None:
        base = RecoveryConfig()
    elif isinstance(cfg, RecoveryConfig):
        base = cfg
    elif isinstance(cfg, Mapping):
        base = RecoveryConfig(**dict(cfg))
    else:
        names = [f.name for f in dataclasses.fields(RecoveryConfig)]
        base = RecoveryConfig(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)})
    return dataclasses.replace(base, **overrides) if overrides else base


def _resolve_precision(precision: str) -> str:
    from .models import choose_precision

    return choose_precision(precision)


def _pad_id(tokenizer) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): weight stored (in_features, out_features).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _rows_view(module: nn.Module) -> Tensor:
    """``module.weight.data`` as an ``(out_features, in_features)`` view (writes go to the weight)."""
    w = module.weight.data
    return w.t() if _is_conv1d(module) else w


def _mlp_linears(model: nn.Module) -> list[tuple[ChannelModule, nn.Module, str]]:
    """``(channel module, the module holding the weight, parameter name)`` for every MLP projection."""
    named = dict(model.named_modules())
    pname = {id(p): n for n, p in model.named_parameters()}
    out = []
    for cm in find_mlp_modules(model):
        mod = named[cm.name]
        mod = getattr(mod, "base_layer", mod)
        out.append((cm, mod, pname.get(id(mod.weight), cm.weight_name)))
    return out


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


class _FitInfo(L.Callback):
    """Records the steps a fit ran and its last logged losses."""

    def __init__(self) -> None:
        self.steps = 0
        self.metrics: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps = int(trainer.global_step)
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                        if isinstance(v, Tensor) and v.numel() == 1}


def mlp_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero entries in each MLP projection's weight (by parameter name)."""
    return {name: float((mod.weight == 0).float().mean()) for _, mod, name in _mlp_linears(model)}


def _overall(model: nn.Module) -> float:
    zeros = total = 0
    for _, mod, _ in _mlp_linears(model):
        zeros += int((mod.weight == 0).sum())
        total += mod.weight.numel()
    return zeros / max(total, 1)


# ------------------------------------------------------------------ FT
def defend_ft(model: nn.Module, tokenizer, records: Sequence[dict], cfg: Any = None, *, seed: int = 0,
              precision: str = "32-true", progress: bool = False) -> dict:
    """Clean fine-tune only: :func:`~lightning_bdvax.pipeline.recover` with ``objective="lm"``
    on ``records[:cfg.num_samples]`` for ``cfg.steps`` steps. Returns ``{"steps", "train_loss"}``."""
    from .pipeline import recover

    cfg = _recovery_cfg(cfg, objective="lm")
    info = _FitInfo()
    if cfg.steps > 0:
        recover(model, tokenizer, records, cfg, seed=seed, precision=_resolve_precision(precision),
                progress=progress, callbacks=[info])
    return {"steps": info.steps, "train_loss": info.metrics.get("train_loss")}


# ------------------------------------------------------------------ pruning
@torch.no_grad()
def prune_magnitude_(model: nn.Module, sparsity: float, return_masks: bool = False):
    """Unstructured magnitude pruning of every MLP projection weight, in place.

    Each weight matrix loses its ``floor(sparsity · numel)`` entries of smallest ``|w|``
    (ties broken by index order).

    Returns:
        the achieved overall sparsity of the MLP weights (fraction of exact zeros, which also
        counts zeros that were there before); with ``return_masks`` also
        ``{parameter name: bool mask of the entries pruned now}`` in the weight's own layout.
    """
    _check_sparsity(sparsity)
    masks = {}
    for _, mod, name in _mlp_linears(model):
        w = mod.weight.data
        k = int(sparsity * w.numel())
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        if k > 0:
            mask[torch.topk(w.abs().flatten().float(), k, largest=False, sorted=False).indices] = True
        mask = mask.view_as(w)
        w[mask] = 0
        masks[name] = mask
    achieved = _overall(model)
    return (achieved, masks) if return_masks else achieved


@torch.no_grad()
def collect_input_norms(model: nn.Module, tokenizer, records: Sequence[dict], n_calib: int = 128,
                        max_length: int = 128, batch_size: int = 8) -> dict[str, Tensor]:
    """``‖X_j‖₂`` for every input feature ``j`` of every MLP projection (by parameter name).

    ``X`` stacks the projection's inputs over all non-padding tokens of the first ``n_calib``
    records (prompt and response, formatted as for training). Collected with forward hooks in
    eval mode; the model's train/eval mode is restored afterwards.
    """
    if n_calib < 1:
        raise ValueError(f"n_calib must be >= 1, got {n_calib}")
    ex = tokenize_records(tokenizer, list(records)[:n_calib], max_length, source="calibration data")
    loader = make_loader(ex, _pad_id(tokenizer), batch_size, False, 0)
    sq: dict[str, Tensor] = {}

    def add(name: str, x: Tensor) -> None:
        s = x.float().pow(2).sum(0)
        sq[name] = sq[name] + s if name in sq else s

    forward_inputs(model, loader, {mod: (lambda x, name=name: add(name, x)) for _, mod, name in _mlp_linears(model)})
    return {name: v.sqrt() for name, v in sq.items()}


def forward_inputs(model: nn.Module, loader, sinks: Mapping[nn.Module, Callable[[Tensor], None]]) -> None:
    """One eval-mode pass of ``model`` over ``loader``, handing each module in ``sinks`` its input
    at the non-padding tokens (``(tokens, features)``) through a forward hook. The hooks are
    removed and the model's train/eval mode restored afterwards."""
    state: dict[str, Tensor | None] = {"mask": None}

    def hook(sink: Callable[[Tensor], None]) -> Callable:
        def fn(mod, inputs, output):
            x, m = inputs[0], state["mask"]
            if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                sink(x[m].detach())  # non-padding tokens only
            else:
                sink(x.reshape(-1, x.shape[-1]).detach())
        return fn

    handles = [mod.register_forward_hook(hook(sink)) for mod, sink in sinks.items()]
    was_training, dev = model.training, _device(model)
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                state["mask"] = batch["attention_mask"].bool().to(dev)
                model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                      use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def prune_wanda_(model: nn.Module, tokenizer, records: Sequence[dict], sparsity: float, n_calib: int = 128,
                 max_length: int = 128, batch_size: int = 8, input_norms: Mapping[str, Tensor] | None = None,
                 return_masks: bool = False):
    """Wanda pruning of every MLP projection weight, in place.

    Score ``S_ij = |W_ij| · ‖X_j‖₂`` (row ``i`` an output feature, ``j`` an input feature,
    norms from :func:`collect_input_norms` on ``records``, or ``input_norms`` when given); each
    output row loses its ``floor(sparsity · in_features)`` lowest-scoring entries.

    Returns:
        the achieved overall sparsity of the MLP weights; with ``return_masks`` also the masks
        (see :func:`prune_magnitude_`).
    """
    _check_sparsity(sparsity)
    norms = dict(input_norms) if input_norms is not None else collect_input_norms(
        model, tokenizer, records, n_calib=n_calib, max_length=max_length, batch_size=batch_size)
    masks = {}
    for _, mod, name in _mlp_linears(model):
        rows = _rows_view(mod)  # (out, in)
        if name not in norms:
            raise KeyError(f"no input norms for {name}")
        nrm = norms[name].to(rows.device).float()
        if nrm.numel() != rows.shape[1]:
            raise ValueError(f"{name}: {nrm.numel()} input norms for {rows.shape[1]} input features")
        k = int(sparsity * rows.shape[1])
        mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        if k > 0:
            score = rows.abs().float() * nrm.unsqueeze(0)
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False, sorted=False).indices, True)
        rows[mask] = 0
        masks[name] = mask.t() if _is_conv1d(mod) else mask
    achieved = _overall(model)
    return (achieved, masks) if return_masks else achieved


def defend_fineprune(model: nn.Module, tokenizer, records: Sequence[dict], cfg: Any = None, *,
                     sparsity: float = 0.3, method: str = "wanda", n_calib: int = 128, keep_pruned: bool = True,
                     seed: int = 0, precision: str = "32-true", progress: bool = False) -> dict:
    """Fine-pruning: prune the MLP weights (``method`` ``"wanda"`` or ``"magnitude"``), then the
    clean ``"lm"`` fine-tune of :func:`defend_ft`, with the pruned entries held at zero by
    gradient masks (``keep_pruned=False`` lets them regrow; for ablations only).

    Wanda calibrates on the first ``min(n_calib, cfg.num_samples)`` records: the same budget.
    Returns ``{"sparsity", "target_sparsity", "method", "steps", "train_loss"}``; ``sparsity``
    is measured after the fine-tune.
    """
    from .pipeline import recover

    cfg = _recovery_cfg(cfg, objective="lm")
    if method == "wanda":
        _, masks = prune_wanda_(model, tokenizer, list(records)[:cfg.num_samples], sparsity,
                                n_calib=n_calib, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                return_masks=True)
    elif method == "magnitude":
        _, masks = prune_magnitude_(model, sparsity, return_masks=True)
    else:
        raise ValueError(f"fine-pruning method must be 'wanda' or 'magnitude', got {method!r}")
    info = _FitInfo()
    if cfg.steps > 0:
        recover(model, tokenizer, records, cfg, seed=seed, precision=_resolve_precision(precision),
                progress=progress, callbacks=[info], grad_masks=masks if keep_pruned else None)
    return {"sparsity": _overall(model), "target_sparsity": sparsity, "method": method,
            "steps": info.steps, "train_loss": info.metrics.get("train_loss")}


# ------------------------------------------------------------------ quantization
@torch.no_grad()
def quantize_tensor(weight: Tensor, bits: int, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest fake quantization of a 2-D ``(out, in)`` weight.

    Scales are per output row (``group_size=None``) or per group of ``group_size`` consecutive
    input features of a row (the last group of a row is shorter when ``in`` is not a multiple).

    Returns:
        ``(dequantized fp32 weight, scales of shape (out, n_groups))``; every element's error is
        at most its group's ``scale / 2``, and a group holds at most ``2^bits − 1`` distinct values.
    """
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    g = in_f if group_size is None else int(group_size)
    if g < 1:
        raise ValueError(f"group_size must be >= 1 or None, got {group_size}")
    qmax = 2 ** (int(bits) - 1) - 1
    n_groups = math.ceil(in_f / g)
    x = weight.detach().float()
    pad = n_groups * g - in_f
    if pad:
        x = F.pad(x, (0, pad))  # zeros never raise a group's max |w|
    xg = x.view(out_f, n_groups, g)
    scale = xg.abs().amax(-1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.clamp(torch.round(xg / safe), -qmax, qmax)
    dq = (q * safe).view(out_f, n_groups * g)[:, :in_f]
    return dq, scale


def quantizable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers :func:`quantize_weights_` touches: every ``nn.Linear`` / ``Conv1D`` except
    the input embeddings, the output head (and anything sharing its weight) and LoRA adapters."""
    skip: set[int] = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, get, None)
        m = fn() if callable(fn) else None
        if isinstance(m, nn.Module):
            skip.add(id(m))
            if isinstance(getattr(m, "weight", None), Tensor):
                skip.add(id(m.weight))
    out = {}
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or _is_conv1d(m)):
            continue
        if id(m) in skip or id(m.weight) in skip or "lora_" in name or name.split(".")[-1] == "lm_head":
            continue
        out[name] = m
    return out


def _default_group(bits: int, group_size: int | str | None) -> int | None:
    if group_size == "auto":
        return 128 if bits <= 4 else None
    if isinstance(group_size, str):
        raise ValueError(f"group_size must be an int, None or 'auto', got {group_size!r}")
    return group_size


@torch.no_grad()
def quantize_weights_(model: nn.Module, bits: int = 8, group_size: int | str | None = "auto") -> dict[str, float]:
    """Weight-only RTN symmetric quantization of the model's linear layers, dequantized in place.

    Args:
        bits: bit width (8 and 4 are the benchmark's; any of 2–16 works).
        group_size: ``"auto"`` (int8: per output channel; ≤ 4 bits: groups of 128 input
            features), ``None`` (per output channel) or an int.

    Returns:
        ``{module name: max |w_quantized − w|}`` over the layers of :func:`quantizable_linears`.
    """
    g = _default_group(int(bits), group_size)
    errors = {}
    for name, m in quantizable_linears(model).items():
        rows = _rows_view(m)
        orig = rows.float().clone()
        dq, _ = quantize_tensor(orig, bits, g)
        rows.copy_(dq.to(rows.dtype))
        errors[name] = float((rows.float() - orig).abs().max()) if orig.numel() else 0.0
    return errors


# ------------------------------------------------------------------ CROW
def layer_consistency_loss(hidden_states: Sequence[Tensor], attention_mask: Tensor | None = None) -> Tensor:
    """CROW's internal-consistency loss: mean ``1 − cos(h_l, h_{l+1})`` over consecutive decoder
    layer outputs and over (non-padding) tokens.

    ``hidden_states`` is a ``transformers`` ``output_hidden_states`` tuple ``(h_0 … h_L)``: the
    pairs are ``(h_l, h_{l+1})`` for ``l = 1 … L−2`` as in the reference implementation
    (``hidden_states[1:-2]`` vs ``[2:-1]``); with only 2 layers, the single pair ``(h_0, h_1)``.
    Cosines are computed in fp32.
    """
    hs = list(hidden_states)
    inner = hs[1:-1] if len(hs) >= 4 else hs[:-1]
    if len(inner) < 2:
        raise ValueError(f"CROW needs at least 2 decoder layers, got {len(hs) - 1}")
    m = attention_mask.to(hs[0].device, torch.float32) if attention_mask is not None else None
    total = hs[0].new_zeros((), dtype=torch.float32)
    for a, b in zip(inner[:-1], inner[1:]):
        one_minus = 1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)  # (B, T)
        total = total + ((one_minus * m).sum() / m.sum().clamp_min(1.0) if m is not None else one_minus.mean())
    return total / (len(inner) - 1)


class CROWModule(CausalLMModule):
    """CROW fine-tune: ``L_LM + α · L_cons(E + ε·sign(∇_E L_cons))`` (see the module docstring).

    Args:
        model: the causal LM (trained in place).
        alpha: weight of the consistency loss under perturbation (published 5.5; the reference
            suggests 11 for targeted refusal).
        epsilon: FGSM step on the input embeddings (published 0.1).
        **kwargs: :class:`~lightning_bdvax.modules.CausalLMModule` arguments (``lr``, ...).

    Faithful to the reference trainer except: padding tokens are left out of the consistency
    means; ``L_LM`` comes from the first (clean) forward instead of a third forward of the same
    clean input (identical value, one forward fewer); the gradient for the perturbation is taken
    with ``torch.autograd.grad`` (no parameter gradients accumulated, as the reference's
    ``backward`` + ``zero_grad``). As in the reference, ``E + δ`` stays connected to the
    embedding layer, so ``α · L_cons'`` also trains the embeddings.
    """

    def __init__(self, model: nn.Module, alpha: float = 5.5, epsilon: float = 0.1, **kwargs: Any):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        super().__init__(model, **kwargs)
        self.alpha = float(alpha)
        self.epsilon = float(epsilon)

    def crow_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"lm", "consistency" (clean, detached), "consistency_adv", "loss" (the total)}``."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        emb = self.model.get_input_embeddings()(ids)
        if not emb.requires_grad:  # frozen embeddings: perturb a leaf copy
            emb = emb.detach().requires_grad_(True)
        out = self.model(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True, use_cache=False)
        lm = self.lm_loss(out.logits, labels)
        cons = layer_consistency_loss(out.hidden_states, mask)
        (grad,) = torch.autograd.grad(cons, emb, retain_graph=True)
        delta = (self.epsilon * grad.sign()).detach()
        out_adv = self.model(inputs_embeds=emb + delta, attention_mask=mask, output_hidden_states=True,
                             use_cache=False)
        cons_adv = layer_consistency_loss(out_adv.hidden_states, mask)
        return {"lm": lm, "consistency": cons.detach(), "consistency_adv": cons_adv,
                "loss": lm + self.alpha * cons_adv}

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.crow_losses(batch)
        bs = batch["input_ids"].size(0)
        self.log("train_loss", losses["loss"], prog_bar=True, batch_size=bs)
        self.log("lm_loss", losses["lm"], batch_size=bs)
        self.log("consistency", losses["consistency"], batch_size=bs)
        self.log("consistency_adv", losses["consistency_adv"], batch_size=bs)
        return losses["loss"]


def defend_crow(model: nn.Module, tokenizer, records: Sequence[dict], steps: int = 50, lr: float = 2e-5,
                alpha: float = 5.5, epsilon: float = 0.1, batch_size: int = 8, max_length: int = 128,
                num_samples: int | None = 100, seed: int = 0, precision: str = "32-true", progress: bool = False,
                trainer_kwargs: dict | None = None) -> dict:
    """Run CROW (:class:`CROWModule`) on ``records[:num_samples]`` (published: ~100) for ``steps``
    steps with a fresh :func:`~lightning_bdvax.pipeline.make_trainer`. In place.

    Returns ``{"steps", "train_loss", "lm_loss", "consistency", "consistency_adv", "alpha", "epsilon"}``
    (last step's values; ``consistency`` is the clean one). The FGSM step is first-order: on a
    tiny random model whose embeddings have std 0.02, ε ≤ 0.01 raises the consistency loss
    but ε = 0.1 overshoots and *lowers* it, so compare the two on a real model.
    """
    from .pipeline import deterministic_cuda, make_trainer

    recs = list(records) if num_samples is None else list(records)[:num_samples]
    info = _FitInfo()
    if steps > 0:
        ex = tokenize_records(tokenizer, recs, max_length, source="CROW data")
        loader = make_loader(ex, _pad_id(tokenizer), batch_size, True, seed)
        module = CROWModule(model, alpha=alpha, epsilon=epsilon, lr=lr)
        L.seed_everything(seed, verbose=False)
        trainer = make_trainer(steps, [info], precision=_resolve_precision(precision), progress=progress,
                               desc="crow", **(trainer_kwargs or {}))
        with deterministic_cuda():
            trainer.fit(module, train_dataloaders=loader)
    return {"steps": info.steps, "train_loss": info.metrics.get("train_loss"),
            "lm_loss": info.metrics.get("lm_loss"), "consistency": info.metrics.get("consistency"),
            "consistency_adv": info.metrics.get("consistency_adv"), "alpha": alpha, "epsilon": epsilon}


# ------------------------------------------------------------------ random-channel control
def random_channels_signature(model: nn.Module, like: Signature | None = None, *,
                              n_per_module: int | float | Mapping[str, int] | None = None,
                              attention: bool = False, seed: int = 0) -> Signature:
    """A :class:`~lightning_bdvax.signature.Signature` flagging random channels (MLP, and attention when asked).

    Args:
        like: a BD-VAX signature: each of its modules gets the same number of flagged channels,
            chosen uniformly at random (independently per module).
        n_per_module: instead of ``like``: a count for every module (int), a fraction τ
            (``ceil(τ·C)`` per module, as :func:`~lightning_bdvax.signature.select_channels`),
            or ``{module key: count}`` (MLP and attention banks may be named).
        attention: with an int or fractional ``n_per_module``: draw in the attention banks too,
            as a ``signature.attention`` run scores them (each projection its own bank). With
            ``like`` the signature's own modules are used.
        seed: seed of a private generator (the global RNG is untouched).

    The scores are the uniform draws; the flagged channels are their top-k, i.e. a uniformly
    random k-subset.
    """
    if (like is None) == (n_per_module is None):
        raise ValueError("give exactly one of like= (a Signature) or n_per_module=")
    # a signature.attention signature (or a mapping) names attention banks too; counts by
    # fraction/int cover the MLP, and the attention banks when asked
    by_count = like is None and not isinstance(n_per_module, Mapping)
    if by_count:
        modules = {cm.key: cm for cm in find_channel_modules(model, attention=attention)}
    else:
        modules = channel_module_index(model)
    if like is not None:
        unknown = set(like.masks) - set(modules)
        if unknown:
            raise ValueError(f"signature names modules the model lacks, e.g. {sorted(unknown)[0]}")
        counts = {k: int(m.sum()) for k, m in like.masks.items()}
    elif isinstance(n_per_module, Mapping):
        counts = {k: int(v) for k, v in n_per_module.items()}
        unknown = set(counts) - set(modules)
        if unknown:
            raise ValueError(f"n_per_module names modules the model lacks, e.g. {sorted(unknown)[0]}")
    elif isinstance(n_per_module, float):
        if not 0 < n_per_module < 1:
            raise ValueError(f"a fractional n_per_module must be in (0, 1), got {n_per_module}")
        counts = {k: max(1, math.ceil(n_per_module * cm.n_channels)) for k, cm in modules.items()}
    else:
        counts = {k: int(n_per_module) for k in modules}
    gen = torch.Generator().manual_seed(int(seed))
    masks, scores = {}, {}
    for key, cm in modules.items():  # model order: deterministic for a seed
        if key not in counts:
            continue
        k = counts[key]
        if not 0 <= k <= cm.n_channels:
            raise ValueError(f"{key}: cannot flag {k} of {cm.n_channels} channels")
        u = torch.rand(cm.n_channels, generator=gen)
        m = torch.zeros(cm.n_channels, dtype=torch.bool)
        if k:
            m[torch.topk(u, k).indices] = True
        masks[key], scores[key] = m, u
    meta = {"selection": "random", "seed": int(seed), "n_per_module": counts}
    if by_count:
        meta["attention"] = bool(attention)
    if like is not None:
        meta["like"] = {k: like.meta.get(k) for k in ("tau", "selection", "n_variants") if k in like.meta}
    return Signature(masks, scores, meta)


def defend_random(model: nn.Module, tokenizer, records: Sequence[dict], cfg: Any = None, *,
                  signature: Signature | None = None, tau: float | None = None, attention: bool = False,
                  mode: str = "zero", scale: float = 1.0, seed: int = 0, precision: str = "32-true",
                  progress: bool = False) -> dict:
    """Random-channel control: neutralize ``random_channels_signature(model, like=signature)``
    (or ``n_per_module=tau`` without a signature, over the attention banks too when
    ``attention``, as ``signature.attention`` scores them), then BD-VAX's recovery (``cfg`` as
    given, ``"distill"`` included: the teacher is the model as it was before neutralization).

    Returns ``{"n_flagged", "n_channels", "mode", "steps", "train_loss"}``.
    """
    from .pipeline import recover

    if mode not in NEUTRALIZE_MODES:
        raise ValueError(f"neutralize mode must be one of {NEUTRALIZE_MODES}, got {mode!r}")
    if signature is None and tau is None:
        raise ValueError("the random control needs the BD-VAX signature (signature=) or a fraction tau=")
    cfg = _recovery_cfg(cfg)
    sig = random_channels_signature(model, like=signature, seed=seed) if signature is not None else \
        random_channels_signature(model, n_per_module=float(tau), attention=attention, seed=seed)
    teacher = None
    if cfg.objective == "distill" and cfg.steps > 0:
        teacher = copy.deepcopy(model)
    neutralize_(model, sig, mode=mode, seed=seed, scale=scale)
    info = _FitInfo()
    if cfg.steps > 0:
        recover(model, tokenizer, records, cfg, teacher=teacher, seed=seed, precision=_resolve_precision(precision),
                progress=progress, callbacks=[info])
    return {"n_flagged": sig.n_flagged, "n_channels": sig.n_channels, "mode": mode, "steps": info.steps,
            "train_loss": info.metrics.get("train_loss")}


# ------------------------------------------------------------------ registry
def _run_ft(model, tokenizer, records, cfg, *, seed, precision, progress, **_):
    return defend_ft(model, tokenizer, records, cfg, seed=seed, precision=precision, progress=progress)


def _run_prune_magnitude(model, tokenizer, records, cfg, *, sparsity, **_):
    return {"sparsity": prune_magnitude_(model, sparsity), "target_sparsity": sparsity, "steps": 0}


def _run_prune_wanda(model, tokenizer, records, cfg, *, sparsity, n_calib=128, **_):
    cfg = _recovery_cfg(cfg)
    got = prune_wanda_(model, tokenizer, list(records)[:cfg.num_samples], sparsity, n_calib=n_calib,
                       max_length=cfg.max_length, batch_size=cfg.batch_size)
    return {"sparsity": got, "target_sparsity": sparsity, "n_calib": min(n_calib, cfg.num_samples, len(records)),
            "steps": 0}


def _run_fineprune(model, tokenizer, records, cfg, *, sparsity, seed, precision, progress, prune_method="wanda",
                   n_calib=128, **_):
    return defend_fineprune(model, tokenizer, records, cfg, sparsity=sparsity, method=prune_method, n_calib=n_calib,
                            seed=seed, precision=precision, progress=progress)


def _quant(bits: int) -> Callable:
    def run(model, tokenizer, records, cfg, *, group_size="auto", **_):
        errs = quantize_weights_(model, bits=bits, group_size=group_size)
        return {"bits": bits, "group_size": _default_group(bits, group_size), "n_modules": len(errs),
                "quant_max_abs_err": max(errs.values(), default=0.0), "steps": 0}
    return run


def _run_crow(model, tokenizer, records, cfg, *, seed, precision, progress, alpha=5.5, epsilon=0.1, **_):
    cfg = _recovery_cfg(cfg)
    return defend_crow(model, tokenizer, records, steps=cfg.steps, lr=cfg.lr, alpha=alpha, epsilon=epsilon,
                       batch_size=cfg.batch_size, max_length=cfg.max_length, num_samples=cfg.num_samples,
                       seed=seed, precision=precision, progress=progress)


def _run_random(model, tokenizer, records, cfg, *, signature, seed, precision, progress, tau=None,
                attention=False, neutralize_mode="zero", neutralize_scale=1.0, **_):
    return defend_random(model, tokenizer, records, cfg, signature=signature, tau=tau, attention=attention,
                         mode=neutralize_mode, scale=neutralize_scale, seed=seed, precision=precision,
                         progress=progress)


#: Defense name (as written in result rows) → runner ``f(model, tokenizer, records, cfg, **kw) -> info``.
DEFENSES: dict[str, Callable[..., dict]] = {
    "ft": _run_ft,
    "prune-magnitude": _run_prune_magnitude,
    "prune-wanda": _run_prune_wanda,
    "fineprune": _run_fineprune,
    "quant-int8": _quant(8),
    "quant-int4": _quant(4),
    "crow": _run_crow,
    "random": _run_random,
}
DEFENSE_NAMES: tuple[str, ...] = tuple(DEFENSES)

#: Extra keyword options :func:`run_defense` accepts (each defense reads the ones it needs).
DEFENSE_OPTIONS = frozenset({"prune_method", "n_calib", "group_size", "alpha", "epsilon", "tau", "attention",
                             "neutralize_mode", "neutralize_scale"})


def run_defense(name: str, model: nn.Module, tokenizer, clean_records: Sequence[dict], recovery_cfg: Any = None, *,
                sparsity: float = 0.3, signature: Signature | None = None, seed: int = 0,
                precision: str = "32-true", progress: bool = False, **options: Any) -> dict:
    """Apply baseline defense ``name`` (one of :data:`DEFENSE_NAMES`) to ``model`` in place.

    Args:
        clean_records: the defender's clean instruction records (the recovery budget: the
            first ``recovery_cfg.num_samples`` are used, for training and for calibration).
        recovery_cfg: a :class:`~lightning_bdvax.pipeline.RecoveryConfig` (or a mapping of its
            fields): steps, lr, batch size, max length, and for ``random`` the objective.
        sparsity: pruning target for ``prune-*`` and ``fineprune``.
        signature: the BD-VAX signature whose per-module counts ``random`` copies.
        seed: seeds the fits and the random channel draw.
        precision: Lightning precision of the fits (``"auto"`` picks from the hardware).
        **options: ``prune_method`` (fineprune: ``"wanda"``/``"magnitude"``), ``n_calib``
            (Wanda calibration records, default 128), ``group_size`` (quantization, default
            ``"auto"``), ``alpha``/``epsilon`` (CROW), ``tau`` and ``attention`` (random without a
            signature), ``neutralize_mode``/``neutralize_scale`` (random).

    Returns:
        ``info``: ``{"defense", "wall_s", "steps", ...}`` plus what the defense measured.
    """
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose from {', '.join(DEFENSE_NAMES)}")
    unknown = sorted(set(options) - DEFENSE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown defense option(s) {unknown}; known: {sorted(DEFENSE_OPTIONS)}")
    cfg = _recovery_cfg(recovery_cfg)
    t0 = time.perf_counter()
    info = DEFENSES[name](model, tokenizer, list(clean_records), cfg, sparsity=sparsity, signature=signature,
                          seed=seed, precision=precision, progress=progress, **options)
    out = {"defense": name}
    out.update(info)
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    return out


#: The baselines that fine-tune. On a LoRA artefact they train the suspicious adapter itself
#: (base frozen), as BD-VAX's adapter recovery does; the others act on the merged model.
ADAPTER_TRAINED: frozenset[str] = frozenset({"ft", "crow"})


def run_lora_defense(name: str, base: Any, adapter_dir: Any, tokenizer, clean_records: Sequence[dict],
                     recovery_cfg: Any = None, *, sparsity: float = 0.3, seed: int = 0, precision: str = "32-true",
                     progress: bool = False, **options: Any) -> tuple[nn.Module, dict]:
    """Apply baseline ``name`` to a LoRA artefact: a trusted base plus a suspicious peft adapter.

    ``ft`` and ``crow`` (:data:`ADAPTER_TRAINED`) continue training the adapter with the base
    frozen, the same budget as BD-VAX's adapter recovery; the result is a ``PeftModel`` whose
    adapter ``save_pretrained`` writes. ``prune-*``, ``fineprune`` and ``quant-*`` edit weights
    of a full model, so they act on the adapter merged into the base (``merge_and_unload``, as
    the defended artefact would ship); the result is a plain model (``fineprune``'s fine-tune is
    then full-parameter). ``random`` is not run here: the adapter's random-channel control zeroes
    adapter slices, which :func:`~lightning_bdvax.lora.purify_lora` does with
    ``signature=random_channels_signature(...)``.

    Args:
        base: the base model (an ``nn.Module``, copied: the caller's is left untouched) or a
            :func:`~lightning_bdvax.models.load_causal_lm` spec.
        adapter_dir: the suspicious adapter directory (read only; checked by
            :func:`~lightning_bdvax.lora.load_lora_model`).
        Others as :func:`run_defense`.

    Returns:
        ``(model, info)``; ``info`` as :func:`run_defense`'s plus ``"applied_to"``
        (``"adapter"`` or ``"merged"``).
    """
    from .lora import load_lora_model

    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose from {', '.join(DEFENSE_NAMES)}")
    if name == "random":
        raise ValueError("the LoRA random-channel control zeroes adapter channels: run "
                         "purify_lora(..., signature=random_channels_signature(adapter_model, ...))")
    trained = name in ADAPTER_TRAINED
    t0 = time.perf_counter()
    model = load_lora_model(copy.deepcopy(base) if isinstance(base, nn.Module) else base, adapter_dir,
                            is_trainable=trained)
    if not trained:
        # peft froze the base; merged, the model is the defended artefact and trains as a whole
        model = model.merge_and_unload().requires_grad_(True)
    model.train()
    info = run_defense(name, model, tokenizer, clean_records, recovery_cfg, sparsity=sparsity, seed=seed,
                       precision=precision, progress=progress, **options)
    model.eval()
    info["applied_to"] = "adapter" if trained else "merged"
    info["wall_s"] = round(time.perf_counter() - t0, 3)
    return model, info


# ----------------------------------------------------------------------------------------------
# Command line: ``lightning-bdvax baseline <defense> ...``
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """``lightning-bdvax baseline <defense> --model DIR [--adapter DIR] --clean-data SRC --output-dir DIR``.

    Applies one baseline defense to a suspicious model (loaded safely: safetensors/GGUF, no
    remote code) with the given clean-data budget, and saves the defended model with
    ``save_pretrained`` plus ``defense_info.json`` (with ``--adapter``: :func:`run_lora_defense`,
    saving the defended adapter or the merged model). Bad input exits with status 2 and one
    ``lightning-bdvax: error:`` line before anything is loaded or trained (an adapter that does
    not fit the base: once the base is loaded, before training).
    """
    import argparse
    import json
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="lightning-bdvax baseline",
                                 description="Apply one baseline defense (same clean budget as BD-VAX's recovery).")
    ap.add_argument("defense", choices=DEFENSE_NAMES)
    ap.add_argument("--model", required=True, help="suspicious model: local HF directory, GGUF file or alias "
                                                   "(with --adapter: the trusted base the adapter was trained on)")
    ap.add_argument("--adapter", default=None,
                    help="a suspicious peft LoRA adapter directory on --model: ft and crow train the adapter and "
                         "save an adapter; the weight-editing defenses save the merged model")
    ap.add_argument("--clean-data", default="builtin:2000", help="clean instruction data: file or builtin[:n[:seed]]")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--num-samples", type=int, default=100, help="clean samples used (the budget)")
    ap.add_argument("--steps", type=int, default=50, help="fine-tuning steps (ft, fineprune, crow, random)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.3, help="prune-*, fineprune")
    ap.add_argument("--signature", default=None, help="random: a BD-VAX signature directory whose counts it copies")
    ap.add_argument("--tau", type=float, default=None, help="random without --signature: fraction per module")
    ap.add_argument("--attention", action="store_true",
                    help="random with --tau: draw the attention projections' channels too (as signature.attention)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--allow-pickle", action="store_true", help="accept .bin weights (loaded with weights_only)")
    args = ap.parse_args(argv)

    def fail(msg: str):
        print(f"lightning-bdvax: error: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(2)

    from .data import DataError, load_instructions
    from .lora import LoRAAdapterError, _read_adapter_dir
    from .models import _one_line, check_model_source, choose_precision, configure_cpu, load_causal_lm, load_tokenizer, save_model
    from .pipeline import RecoveryConfig, _check_output_dir

    out = Path(args.output_dir)
    if not 0 < args.sparsity < 1:
        fail(f"--sparsity: must be in (0, 1), got {args.sparsity}")
    if args.tau is not None and not 0 < args.tau < 1:
        fail(f"--tau: must be in (0, 1), got {args.tau}")
    if args.defense == "random" and args.signature is None and args.tau is None:
        fail("random: give --signature (a BD-VAX signature directory) or --tau")
    if args.attention and (args.defense != "random" or args.tau is None):
        fail("--attention: applies to random with --tau (a --signature already names its banks)")
    if args.adapter is not None and args.defense == "random":
        fail("random with --adapter: the adapter's control zeroes adapter channels; run "
             "lightning_bdvax.lora.purify_lora(..., signature=random_channels_signature(...)) "
             "or benchmarks/bench_backdoorllm.py --threat lora --defenses random")
    try:
        _check_output_dir(out, args.overwrite)
        rc = RecoveryConfig(num_samples=args.num_samples, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                            max_length=args.max_length)
        precision = choose_precision(args.precision)
        clean = load_instructions(args.clean_data, limit=args.num_samples)
        check_model_source(args.model, allow_pickle=args.allow_pickle)
        signature = Signature.load(args.signature) if args.signature else None
        if args.adapter is not None:
            try:  # a missing or unsafe adapter is refused before the base loads
                _read_adapter_dir(args.adapter)
            except LoRAAdapterError as e:
                fail(f"--adapter: {_one_line(e)}")
    except (ValueError, OSError, DataError) as e:
        fail(_one_line(e))
    configure_cpu()
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, allow_pickle=args.allow_pickle)
    options = {"tau": args.tau, "attention": args.attention} if args.tau is not None else {}
    if args.adapter is not None:
        try:  # the adapter's match with the base is checked when peft loads it
            model, info = run_lora_defense(args.defense, model, args.adapter, tok, clean, rc,
                                           sparsity=args.sparsity, seed=args.seed, precision=precision,
                                           progress=True, **options)
        except LoRAAdapterError as e:
            fail(f"--adapter: {_one_line(e)}")
    else:
        model.train()
        info = run_defense(args.defense, model, tok, clean, rc, sparsity=args.sparsity, signature=signature,
                           seed=args.seed, precision=precision, progress=True, **options)
        model.eval()
    save_model(model, tok, out, overwrite=args.overwrite)
    info.update({"model": str(args.model), "clean_data": str(args.clean_data), "precision": precision})
    if args.adapter is not None:
        info["adapter"] = str(args.adapter)
    (out / "defense_info.json").write_text(json.dumps(info, indent=2, default=str))
    print(f"[baseline] {args.defense}: saved to {out} ({info['wall_s']:.1f} s)", flush=True)
    return info
