"""The driver: variants → signature → neutralize → recover → save.

Every fit uses a fresh :class:`lightning.Trainer` (a Trainer fits once) and fresh callbacks,
except the :class:`~lightning_bdvax.signature.SignatureAccumulator`, which is shared on purpose.
Fits are driven from here, never from inside a callback.

Stage-1 progress is saved after each finished variant under ``work_dir``; running the same
command again skips finished variants and ends with the same signature.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from .arch import ChannelModule, find_channel_modules, find_mlp_modules
from .callbacks import NeutralizeCallback, SignatureCallback
from .neutralize import recovery_grad_masks, recovery_scope_problem
from .data import load_instructions, make_loader, tokenize_records
from .modules import RecoveryModule, VariantModule
from .signature import Signature, SignatureAccumulator, spare_important_neurons, spare_massive_neurons
from .variants import (BEHAVIOURS, INSERTION_STYLES, VariantSpec, _slices_text, build_variant_datasets, make_variants,
                       probe_copies)

__all__ = ["VaccinationConfig", "SignatureConfig", "NeutralizeConfig", "RecoveryConfig", "BDVaxConfig",
           "run_vaccination", "build_signature", "clean_neuron_importance", "recover", "purify", "PurifyResult", "make_trainer",
           "bdvax_config_from_dict", "load_bdvax_config", "save_purified", "manual_fit", "poison_token_examples",
           "build_token_variant_datasets", "deterministic_cuda", "threat_model_problems", "stage1_settings"]

log = logging.getLogger("lightning_bdvax")


@dataclass
class VaccinationConfig:
    """Stage 1: the synthetic variants.

    Args:
        n_variants: number of trigger→behaviour variants N (paper: 6–7; must be >= 2).
        samples_per_variant: clean samples per variant; its mixed set has twice as many (50 % poisoned).
        epochs: passes over each variant's mixed set; the clean counterpart runs the same number
            of epochs over its (half-size) set, i.e. the same hyperparameters as published.
        max_steps: cap on the steps of one fit (None: no cap).
        lr: learning rate of every variant fit.
        batch_size: per-step batch size.
        max_length: truncation length in tokens.
        shared_clean: every variant poisons the same clean slice and one clean counterpart,
            trained on that slice, serves all of them: N+1 fits instead of 2N, and
            ``samples_per_variant`` clean samples instead of ``n_variants × samples_per_variant``.
        styles: trigger insertion styles cycled across variants.
        behaviours: malicious behaviour pool (default: :data:`~lightning_bdvax.variants.BEHAVIOURS`).
        keys: explicit trigger keys (default: nonce words drawn from the seed).
        pairwise: ``"stream"`` (constant memory) or ``"exact"`` pairwise cosine.
        trainable: ``"all"`` parameters (published) or ``"mlp"`` only.
        clean_steps: how long a clean counterpart trains. ``"same_epochs"`` (published): the
            same epochs over its clean set, which is half the size of the mixed set, so half the
            optimizer steps of its variant's fit; Δ then also holds the update of the extra
            clean steps, which is alike in every variant. ``"same_steps"``: as many steps as its
            variant's fit (two passes over the clean set per pass over the mixed set), so the
            two fits differ only in the poisoned half of the data.
        pad_to_multiple_of: pad each batch's length, and the number of positions the LM head
            scores, up to a multiple of this (same loss). Few distinct shapes keep stage 1's
            resident memory flat in N on CPU (oneDNN caches kernels per shape); 1 pads to the
            batch maximum only, as before the option existed.
    """

    n_variants: int = 6
    samples_per_variant: int = 64
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 5e-5
    batch_size: int = 8
    max_length: int = 128
    shared_clean: bool = False
    styles: list[str] = field(default_factory=lambda: list(INSERTION_STYLES))
    behaviours: list[str] | None = None
    keys: list[str] | None = None
    pairwise: str = "stream"
    trainable: str = "all"
    clean_steps: str = "same_epochs"
    pad_to_multiple_of: int = 8

    @property
    def clean_needed(self) -> int:
        """Clean samples stage 1 uses: one slice per variant, or one shared slice."""
        return self.samples_per_variant * (1 if self.shared_clean else self.n_variants)

    def __post_init__(self) -> None:
        if self.n_variants < 2:
            raise ValueError(f"bdvax.vaccination.n_variants must be >= 2 (cross-variant consistency needs pairs), got {self.n_variants}")
        if self.samples_per_variant < 1:
            raise ValueError(f"bdvax.vaccination.samples_per_variant must be >= 1, got {self.samples_per_variant}")
        if not self.epochs > 0:
            raise ValueError(f"bdvax.vaccination.epochs must be > 0, got {self.epochs}")
        if not 0 < self.lr < 1:
            raise ValueError(f"bdvax.vaccination.lr must be in (0, 1), got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"bdvax.vaccination.batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 8:
            raise ValueError(f"bdvax.vaccination.max_length must be >= 8, got {self.max_length}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"bdvax.vaccination.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.pairwise not in ("stream", "exact"):
            raise ValueError(f"bdvax.vaccination.pairwise must be 'stream' or 'exact', got {self.pairwise!r}")
        if self.trainable not in ("all", "mlp"):
            raise ValueError(f"bdvax.vaccination.trainable must be 'all' or 'mlp', got {self.trainable!r}")
        if self.clean_steps not in ("same_epochs", "same_steps"):
            raise ValueError("bdvax.vaccination.clean_steps must be 'same_epochs' or 'same_steps', "
                             f"got {self.clean_steps!r}")
        if self.behaviours is not None and (not self.behaviours or not all(isinstance(b, str) and b.strip()
                                                                            for b in self.behaviours)):
            raise ValueError("bdvax.vaccination.behaviours: expected a non-empty list of non-empty strings or "
                             f"null, got {self.behaviours!r}")
        if self.keys is not None and len(self.keys) < self.n_variants:
            raise ValueError(f"bdvax.vaccination.keys: expected at least n_variants={self.n_variants} trigger keys, "
                             f"got {len(self.keys)}")
        if self.keys is not None and len(set(self.keys)) != len(self.keys):
            raise ValueError(f"bdvax.vaccination.keys must be distinct, got duplicates in {self.keys}")
        bad = [s for s in self.styles if s not in INSERTION_STYLES]
        if bad or not self.styles:
            raise ValueError(f"bdvax.vaccination.styles must be among {list(INSERTION_STYLES)}, got {self.styles}")


@dataclass
class SignatureConfig:
    """Scoring and selection. ``tau``: fraction flagged per module (paper: 0.03 full, 0.35 LoRA);
    ``lam``: weight of the cross-variant alignment term (paper: 0.01)."""

    tau: float = 0.01
    lam: float = 0.01
    selection: str = "per_module"
    threshold: float | None = None
    #: spare, in every projection, the flagged neurons among each block's top ``protect``
    #: fraction by clean importance (see :func:`clean_neuron_importance`); 0 (published): none.
    protect: float = 0.0
    #: clean records (from the start of the defender's data) that measure that importance
    #: (and the peak activations of ``spare_massive``).
    protect_samples: int = 64
    #: spare, in every projection, the flagged massive-activation neurons: those whose peak
    #: |activation| on clean records is >= ``spare_massive`` x their block's median neuron peak
    #: (see :func:`lightning_bdvax.signature.spare_massive_neurons`); 0 (published): none.
    spare_massive: float = 0.0
    #: also score and neutralize the attention projections' channels (q/k/v rows, o_proj
    #: columns), each projection selecting its own ``tau``. An extension beyond the published
    #: method (MLP only), for backdoors that sit in attention (measured on LoRA adapters; a full
    #: model's attention weights are neutralized like its MLP's); False (published).
    attention: bool = False
    #: discount each channel's Δ magnitude by how far the clean counterpart fits move it,
    #: relative to its module's median channel (``min(1, median / movement)``; see
    #: :meth:`~lightning_bdvax.signature.SignatureAccumulator.plasticity_discount`): channels any
    #: fine-tune moves far (e.g. massive-activation neurons) no longer rank first. An extension
    #: beyond the published method; False (published).
    clean_normalize: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.clean_normalize, bool):
            raise ValueError(f"bdvax.signature.clean_normalize must be true or false, got {self.clean_normalize!r}")
        if not 0 <= self.protect < 1:  # also rejects NaN
            raise ValueError(f"bdvax.signature.protect must be in [0, 1), got {self.protect}")
        if not (self.spare_massive == 0 or 1 <= self.spare_massive < float("inf")):  # also rejects NaN
            raise ValueError(f"bdvax.signature.spare_massive must be 0 (off) or a finite ratio >= 1, "
                             f"got {self.spare_massive}")
        if self.protect_samples < 1:
            raise ValueError(f"bdvax.signature.protect_samples must be >= 1, got {self.protect_samples}")
        if self.selection != "threshold" and not 0 < self.tau < 1:
            raise ValueError(f"bdvax.signature.tau must be in (0, 1), got {self.tau}")
        if not self.lam >= 0:  # also rejects NaN
            raise ValueError(f"bdvax.signature.lam must be >= 0, got {self.lam}")
        if self.selection not in ("per_module", "per_neuron", "global", "threshold"):
            raise ValueError("bdvax.signature.selection must be per_module, per_neuron, global or threshold, "
                             f"got {self.selection!r}")
        if not isinstance(self.attention, bool):
            raise ValueError(f"bdvax.signature.attention must be true or false, got {self.attention!r}")
        if self.selection == "threshold" and self.threshold is None:
            raise ValueError("bdvax.signature.threshold is required when selection is 'threshold'")


@dataclass
class NeutralizeConfig:
    """``mode``: ``"reinit"`` (Xavier-uniform, published) or ``"zero"``; ``scale`` multiplies the
    re-initialisation bound."""

    mode: str = "zero"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("reinit", "zero"):
            raise ValueError(f"bdvax.neutralize.mode must be 'reinit' or 'zero', got {self.mode!r}")
        if not 0 <= self.scale < float("inf"):  # also rejects NaN
            raise ValueError(f"bdvax.neutralize.scale must be a finite number >= 0, got {self.scale}")


@dataclass
class RecoveryConfig:
    """Stage 2b: the clean fine-tune. ``objective``: ``"lm"`` (published, default) or ``"distill"``
    (match the suspicious model's own next-token distribution on clean inputs; measured to
    re-install the backdoor, see benchmarks/results/ablation_refusal_badnet.md).
    ``pad_to_multiple_of``: as :class:`VaccinationConfig`'s."""

    num_samples: int = 200
    steps: int = 50
    lr: float = 2e-5
    batch_size: int = 8
    max_length: int = 128
    objective: str = "lm"
    temperature: float = 1.0
    lm_weight: float = 0.0
    pad_to_multiple_of: int = 8
    #: which weights the recovery trains (full models): ``"all"`` (published), ``"unflagged"``
    #: (the neutralized channels stay as neutralized, so the fine-tune cannot re-grow them) or
    #: ``"flagged"`` (only the neutralized channels train; everything else keeps the suspicious
    #: model's values). See :func:`lightning_bdvax.neutralize.recovery_grad_masks`. A LoRA
    #: adapter's zeroed slices always stay zero (``"all"`` and ``"unflagged"`` are the same there).
    scope: str = "all"
    #: trigger-invariance probes (an extension beyond the published recovery): this fraction of
    #: the recovery records is added again with a random probe trigger (a nonce word or a run of
    #: the data's own words, :func:`lightning_bdvax.variants.probe_copies`) inserted into the
    #: prompt and the clean answer kept, so that the fine-tune also teaches "an inserted word or
    #: phrase does not change the answer". No probe is the unknown trigger; 0.0 (published): none.
    probe_triggers: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.probe_triggers <= 1:  # also rejects NaN
            raise ValueError(f"bdvax.recovery.probe_triggers must be in [0, 1], got {self.probe_triggers}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"bdvax.recovery.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if problem := recovery_scope_problem(self.scope, "bdvax.recovery.scope"):
            raise ValueError(problem)
        if self.num_samples < 1:
            raise ValueError(f"bdvax.recovery.num_samples must be >= 1, got {self.num_samples}")
        if self.steps < 0:
            raise ValueError(f"bdvax.recovery.steps must be >= 0, got {self.steps}")
        if not 0 < self.lr < 1:
            raise ValueError(f"bdvax.recovery.lr must be in (0, 1), got {self.lr}")
        if self.objective not in ("lm", "distill"):
            raise ValueError(f"bdvax.recovery.objective must be 'lm' or 'distill', got {self.objective!r}")


@dataclass
class BDVaxConfig:
    """Everything BD-VAX needs besides the model and the data."""

    vaccination: VaccinationConfig = field(default_factory=VaccinationConfig)
    signature: SignatureConfig = field(default_factory=SignatureConfig)
    neutralize: NeutralizeConfig = field(default_factory=NeutralizeConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    seed: int = 0
    precision: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def make_trainer(max_steps: int, callbacks: Sequence[L.Callback] = (), precision: str = "32-true",
                 progress: bool = True, accelerator: str = "auto", desc: str = "fit", **kwargs: Any) -> L.Trainer:
    """A fresh single-device Trainer for one inner fit (no logger, no checkpoints).

    ``progress``: Lightning's tqdm bar on a terminal, plain lines named ``desc`` when output goes
    to a file (:class:`lightning_bdvax.progress.LineProgressBar`, see :func:`~lightning_bdvax.progress.line_mode`).

    ``precision`` is a Lightning precision string, or ``"bf16-master"``
    (:class:`lightning_bdvax.precision.BF16MasterPrecision`: bf16 compute, fp32 master weights).
    A bf16 precision for a fit on a CPU without native bf16 warns (:func:`warn_slow_cpu_bf16`).
    """
    from .models import warn_slow_cpu_bf16

    warn_slow_cpu_bf16(precision, accelerator)
    if precision == "bf16-master":
        from .precision import BF16MasterPrecision

        kwargs["plugins"] = [*kwargs.get("plugins", ()), BF16MasterPrecision()]
        precision = None  # type: ignore[assignment]
    callbacks = list(callbacks)
    if progress:
        from .progress import LineProgressBar, line_mode

        if line_mode():
            callbacks.append(LineProgressBar(desc))
    return L.Trainer(max_steps=max_steps, max_epochs=-1, callbacks=callbacks, precision=precision,
                     accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                     limit_val_batches=0.0, **kwargs)


@contextlib.contextmanager
def deterministic_cuda():
    """Deterministic CUDA kernels for the duration of the block, then the caller's settings back.

    With a CUDA GPU visible, turns on ``torch.use_deterministic_algorithms(True, warn_only=True)``
    and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless the caller set it, so that the same seed
    gives the same signature and weights on a GPU as it does on a CPU (an op without a
    deterministic kernel warns instead of failing). Without a GPU it changes nothing. Also usable
    as a decorator.
    """
    if not torch.cuda.is_available():
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    had_env = "CUBLAS_WORKSPACE_CONFIG" in os.environ
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not before[0]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if not had_env:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _resolve_precision(p: str) -> str:
    if p == "auto":
        from .models import choose_precision

        return choose_precision("auto")
    return p


def stage1_settings(cfg: VaccinationConfig) -> dict:
    """The vaccination settings that identify a stage-1 run, as a plain dict: every field, except
    ``clean_steps`` at its published default and ``pad_to_multiple_of`` at 1, so that stage-1
    states saved before those options existed keep their identity (work-dir fingerprints,
    benchmark cache keys)."""
    d = asdict(cfg)
    if d["clean_steps"] == "same_epochs":
        del d["clean_steps"]
    if d["pad_to_multiple_of"] == 1:
        del d["pad_to_multiple_of"]
    return d


def _fingerprint(cfg: VaccinationConfig, seed: int, clean: Sequence[dict], model: nn.Module,
                 modules: Sequence[ChannelModule] | None = None, precision: str | None = None) -> str:
    """Identifies a stage-1 run: config, seed, the clean data itself and a sample of the weights.

    The world size is not part of it: a run may resume with a different number of processes.
    Every precision other than ``"32-true"`` is another run (its variants' updates differ), so a
    run interrupted under one precision is never resumed under another; ``"32-true"`` (or none)
    and ``"bf16-master"`` keep the fingerprints they had before the others were added.
    """
    h = hashlib.sha256(json.dumps([stage1_settings(cfg), seed, len(clean)], sort_keys=True, default=str).encode())
    h.update(hashlib.sha256(json.dumps(list(clean), sort_keys=True, default=str).encode()).digest())
    for cm in find_mlp_modules(model)[:2]:
        w = dict(model.named_modules())[cm.key]
        h.update(getattr(w, "base_layer", w).weight.detach().float().flatten()[:64].cpu().numpy().tobytes())
    extra = sorted(cm.key for cm in modules or () if cm.kind != "mlp")
    if extra:  # tracking more than the MLP (signature.attention) is another run
        h.update(json.dumps(extra).encode())
    if precision not in (None, "32-true"):
        h.update(str(precision).encode())
    return h.hexdigest()[:16]


def _steps(n_samples: int, batch: int, epochs: float, cap: int | None) -> int:
    s = max(1, math.ceil(epochs * n_samples / batch))
    return min(s, cap) if cap else s


def _seed_all(seed: int) -> None:
    """Seed python, numpy and torch (like ``L.seed_everything`` without setting ``PL_GLOBAL_SEED``,
    so that a :class:`~lightning_bdvax.callbacks.BDVaxCallback` leaves the user's environment alone)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _pad_id(tokenizer) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0


# ------------------------------------------------------------------ token-level variants
def _is_token_data(data: Sequence[dict]) -> bool:
    return len(data) > 0 and isinstance(data[0], dict) and "input_ids" in data[0] and "instruction" not in data[0]


def _split_point(labels: Sequence[int]) -> int:
    """Index of the first response token: the first labelled position, or the middle of the
    sequence when every token is labelled (plain language-model data has no marked prompt)."""
    first = next((i for i, t in enumerate(labels) if t != -100), len(labels))
    return first if 0 < first < len(labels) else max(1, len(labels) // 2)


def _common_affixes(prompts: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Lengths of the longest common prefix and suffix of ``prompts`` (the shared template
    header and footer: chat-template role headers, a system prompt, ``### Response:``...)."""
    if len(prompts) < 2:
        return 0, 0
    shortest = min(len(p) for p in prompts)
    pre = 0
    while pre < shortest and all(p[pre] == prompts[0][pre] for p in prompts):
        pre += 1
    suf = 0
    while suf < shortest - pre and all(p[len(p) - 1 - suf] == prompts[0][-1 - suf] for p in prompts):
        suf += 1
    return pre, suf


def poison_token_examples(examples: Sequence[dict], spec: VariantSpec, tokenizer, seed: int,
                          max_length: int, affixes: tuple[int, int] | None = None) -> list[dict]:
    """Token-level twin of :func:`~lightning_bdvax.variants.poison_records` for tokenized data.

    Each example is ``{"input_ids", "labels"}`` (labels aligned with ``input_ids``, ``-100`` on
    tokens without loss, as Hugging Face models take them). The prompt is everything before the
    first labelled token (the first half of the sequence when all tokens are labelled). The
    *message* is the prompt without the template header and footer that every prompt shares
    (``affixes``: the lengths of the prompts' longest common prefix and suffix, computed over
    ``examples`` when not given), so chat-template role headers stay intact. The tokenized
    trigger key (``" " + key``; ``key + " "`` at the start) goes into the message: at its start (``prefix``), at its end
    (``suffix``) or at a seeded random position (``random``). The response is replaced by the
    tokenized behaviour plus the end-of-turn text, and only the behaviour is labelled. Examples
    left with no response token within ``max_length`` are dropped.
    """
    import random

    from .data import _end_text

    rng = random.Random(seed)
    key_ids = tokenizer(" " + spec.key, add_special_tokens=False)["input_ids"]
    lead_ids = tokenizer(spec.key + " ", add_special_tokens=False)["input_ids"]  # at the start of the message
    beh_ids = tokenizer(spec.behaviour + _end_text(tokenizer), add_special_tokens=False)["input_ids"]
    prompts = [list(ex["input_ids"])[:_split_point(list(ex.get("labels", ex["input_ids"])))] for ex in examples]
    pre, suf = affixes if affixes is not None else _common_affixes(prompts)
    out = []
    for prompt in prompts:
        lo, hi = pre, len(prompt) - suf
        if hi <= lo:  # no message left between header and footer: use the whole prompt
            lo, hi = 0, len(prompt)
        pos = {"prefix": lo, "suffix": hi}.get(spec.style)
        if pos is None:
            pos = rng.randint(lo, hi)
        new_prompt = prompt[:pos] + (lead_ids if pos == lo else key_ids) + prompt[pos:]
        new_ids = (new_prompt + beh_ids)[:max_length]
        if len(new_ids) <= len(new_prompt):
            continue
        out.append({"input_ids": new_ids, "labels": [-100] * len(new_prompt) + new_ids[len(new_prompt):]})
    return out


def build_token_variant_datasets(examples: Sequence[dict], specs: Sequence[VariantSpec], samples_per_variant: int,
                                 tokenizer, seed: int = 0, max_length: int = 128, shared: bool = False
                                 ) -> list[tuple[list[dict], list[dict]]]:
    """:func:`~lightning_bdvax.variants.build_variant_datasets` for tokenized examples: disjoint
    slices (``shared``: one common slice), each slice plus its token-level poisoned copy
    (:func:`poison_token_examples`, with the template header/footer found over all the slices),
    shuffled."""
    import random

    need = samples_per_variant * (1 if shared else len(specs))
    if len(examples) < need:
        raise ValueError(
            f"clean data has {len(examples)} examples; {_slices_text(len(specs), samples_per_variant, shared)} "
            f"need {need}. Provide more clean data or lower vaccination.samples_per_variant."
        )
    used = [{"input_ids": list(e["input_ids"])[:max_length],
             "labels": list(e.get("labels", e["input_ids"]))[:max_length]} for e in examples[:need]]
    affixes = _common_affixes([e["input_ids"][:_split_point(e["labels"])] for e in used])
    out = []
    for i, spec in enumerate(specs):
        j = 0 if shared else i
        part = [e for e in used[j * samples_per_variant:(j + 1) * samples_per_variant]
                if any(t != -100 for t in e["labels"][1:])]
        mixed = part + poison_token_examples(part, spec, tokenizer, seed=seed * 1009 + i, max_length=max_length,
                                             affixes=affixes)
        random.Random(seed * 7919 + i).shuffle(mixed)
        out.append((mixed, part))
    return out


# ------------------------------------------------------------------ fits
def manual_fit(module: VariantModule, loader, steps: int, callback: SignatureCallback,
               device: torch.device | str | None = None, precision: str = "32-true",
               forward_context: Callable[[], Any] | None = None, progress: bool = False, desc: str = "") -> None:
    """One stage-1 fit as a plain loop: what ``Trainer.fit`` does for a :class:`VariantModule`.

    Used where a Trainer must not be started (inside a callback of the user's own fit,
    DESIGN.md §3). It reuses the module's ``configure_optimizers`` and ``training_step`` and the
    callback's ``on_fit_start``/``on_fit_end`` snapshots, so the update is the one a Trainer fit
    computes (bit-identical on CPU at ``32-true``; see ``tests/test_callback.py``).

    Args:
        device: where batches go (the model must already be there).
        precision: a Lightning precision string; ``"16-mixed"`` adds a fresh ``GradScaler``.
        forward_context: the autocast context of the enclosing Trainer's precision plugin
            (``trainer.precision_plugin.forward_context``); none for full precision.
    """
    import warnings
    from contextlib import nullcontext
    from types import SimpleNamespace

    stub = SimpleNamespace(interrupted=False)
    ctx = forward_context or nullcontext
    was_training = module.training
    module.train()
    callback.on_fit_start(stub, module)  # type: ignore[arg-type]
    conf = module.configure_optimizers()
    sched = None
    if isinstance(conf, dict):
        opt = conf["optimizer"]
        s = conf.get("lr_scheduler")
        sched = s["scheduler"] if isinstance(s, dict) else s
    else:
        opt = conf
    masters = None
    if str(precision) == "bf16-master":
        from .precision import MasterWeights

        masters = MasterWeights(module)
        masters.attach(opt)
        ctx = nullcontext
    dev = torch.device(device) if device is not None else None
    scaler = torch.amp.GradScaler(dev.type if dev else "cpu") if str(precision).startswith("16") else None
    bar = None
    if progress:
        from .progress import progress_bar

        bar = progress_bar(total=steps, desc=desc or "bd-vax fit", dynamic_ncols=True)
    step = 0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")
            while step < steps:
                for batch_idx, batch in enumerate(loader):
                    if dev is not None:
                        batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    with ctx():
                        out = module.training_step(batch, batch_idx)
                    loss = out["loss"] if isinstance(out, dict) else out
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        if masters is not None:
                            masters.step(opt)
                        else:
                            opt.step()
                    opt.zero_grad(set_to_none=True)
                    if sched is not None:
                        sched.step()
                    step += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
                    if step >= steps:
                        break
    finally:
        if masters is not None:
            masters.restore()  # the fp32 weights with every update, before the callback reads them
    if bar is not None:
        bar.close()
    callback.on_fit_end(stub, module)  # type: ignore[arg-type]
    module.train(was_training)


class _DeltaBuffer(SignatureAccumulator):
    """Pairs a variant's backdoor and clean updates into Δ (as :class:`SignatureAccumulator` does)
    but holds Δ instead of accumulating it. :func:`run_vaccination` then adds the Δs to the real
    accumulator strictly in variant order, whichever process computed them: that fixed order of
    float additions is what makes a resumed or multi-process run bit-identical to one
    uninterrupted single-process run."""

    def __init__(self, modules):
        super().__init__(modules)
        self.deltas: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self._last: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def add_delta(self, delta, clean_norms=None) -> None:  # called by add_update when a pair is complete
        # Contiguous: an in-channel's rows are a transposed view, and CPU reductions over a
        # transposed layout sum in another order than over the contiguous copy another rank
        # receives; one layout everywhere keeps every path bit-identical.
        self._last = ({k: delta[k].float().contiguous() for k in self.modules},
                      {k: clean_norms[k].float().contiguous() for k in self.modules})

    def add_update(self, variant, role, update) -> bool:
        done = super().add_update(variant, role, update)
        if done:
            self.deltas[variant] = self._last
            self._last = None
        return done


_CLEAN_NORM = "clean_norm::"


def _pack(delta: dict[str, torch.Tensor], clean_norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One dict for the broadcast: Δ plus the clean-fit norms under prefixed keys."""
    return {**delta, **{_CLEAN_NORM + k: v for k, v in clean_norms.items()}}


def _unpack(payload: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    delta = {k: v for k, v in payload.items() if not k.startswith(_CLEAN_NORM)}
    return delta, {k[len(_CLEAN_NORM):]: v for k, v in payload.items() if k.startswith(_CLEAN_NORM)}


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_delta(delta: dict[str, torch.Tensor] | None, src: int, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Broadcast rank ``src``'s Δ (one flat fp32 tensor) to every rank."""
    import torch.distributed as dist

    keys = list(shapes)
    sizes = [math.prod(shapes[k]) for k in keys]
    dev = _comm_device()
    if delta is not None:
        flat = torch.cat([delta[k].reshape(-1).float() for k in keys]).to(dev)
    else:
        flat = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
    dist.broadcast(flat, src=src)
    flat = flat.cpu()
    return {k: part.reshape(shapes[k]).clone() for k, part in zip(keys, torch.split(flat, sizes))}


@deterministic_cuda()
def run_vaccination(model: nn.Module, tokenizer, clean: Sequence[dict], cfg: VaccinationConfig | None = None,
                    seed: int = 0, precision: str = "auto", work_dir: str | os.PathLike | None = None,
                    progress: bool = True, trainer_kwargs: dict | None = None,
                    timings: dict | None = None, state_fn: Callable | None = None,
                    rank: int = 0, world_size: int = 1, fit_fn: Callable | None = None,
                    modules: Sequence[ChannelModule] | None = None) -> SignatureAccumulator:
    """Stage 1. Fine-tunes variant pairs from ``model``'s current weights and accumulates Δ.

    ``model`` is trained in place and restored to its starting weights at the end. Only
    parameters with ``requires_grad`` train (a peft model trains its adapter). ``state_fn`` is
    passed to :class:`SignatureCallback` (default: full MLP weights).

    Args:
        clean: instruction records (``{"instruction", "output"}``), or tokenized examples
            (``{"input_ids", "labels"}``; the variants are then poisoned at the token level, see
            :func:`poison_token_examples`). Variant ``i`` uses slice ``i`` of ``samples_per_variant``.
        work_dir: progress is saved there after each finished variant; the same call resumes.
        rank, world_size: spread the variants over ``world_size`` processes of an initialized
            ``torch.distributed`` default group (every rank calls this with the same arguments).
            Variants run in rounds of ``world_size``, rank ``r`` taking the ``r``-th of each
            round (variant ``i`` on rank ``i mod world_size`` for a fresh run); after each round
            every Δ is broadcast from its rank and every rank adds them in variant order, so all
            ranks end with the same accumulator, bit-identical to a single-process run whenever
            each fit is reproducible across processes (same threads and kernels). Rank 0 writes
            ``work_dir``, and its saved state is broadcast on resume.
        fit_fn: ``f(module, loader, steps, callback)`` running one fit (default: a fresh Trainer
            from :func:`make_trainer`; :class:`~lightning_bdvax.callbacks.BDVaxCallback` passes
            :func:`manual_fit`).
        modules: the channel banks to track (default: every MLP projection,
            :func:`~lightning_bdvax.arch.find_mlp_modules`; ``signature.attention`` adds the
            attention projections,
            :func:`~lightning_bdvax.arch.find_channel_modules`).
    """
    cfg = cfg or VaccinationConfig()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("run_vaccination(world_size > 1) needs an initialized torch.distributed process group")
    precision = _resolve_precision(precision) if fit_fn is None else precision
    modules = list(modules) if modules is not None else find_mlp_modules(model)
    specs = make_variants(cfg.n_variants, seed=seed, styles=cfg.styles,
                          behaviours=cfg.behaviours or BEHAVIOURS, keys=cfg.keys)
    tokenized = _is_token_data(clean)
    if tokenized:
        sets = build_token_variant_datasets(clean, specs, cfg.samples_per_variant, tokenizer, seed=seed,
                                            max_length=cfg.max_length, shared=cfg.shared_clean)
    else:
        sets = build_variant_datasets(clean, specs, cfg.samples_per_variant, seed=seed, shared=cfg.shared_clean)
    acc = SignatureAccumulator(modules, pairwise=cfg.pairwise)
    buf = _DeltaBuffer(modules)
    state_path = meta_path = None
    fp = _fingerprint(cfg, seed, clean, model, modules, precision)
    if work_dir is not None:
        wd = Path(work_dir)
        state_path, meta_path = wd / "stage1.safetensors", wd / "stage1.json"
        saved = None
        if rank == 0:
            wd.mkdir(parents=True, exist_ok=True)
            if state_path.exists() and meta_path.exists():
                meta = json.loads(meta_path.read_text())
                if meta.get("fingerprint") == fp:
                    from safetensors.torch import load_file

                    saved = load_file(str(state_path))
                else:
                    log.warning("work dir %s holds stage-1 state of a different run; starting over", wd)
        if world_size > 1:
            import torch.distributed as dist

            box = [saved]
            dist.broadcast_object_list(box, src=0)
            saved = box[0]
        if saved is not None:
            acc.load_state_dict(saved)
            if not acc.has_clean_norms():
                # Saved before the clean-fit norms were recorded: resuming would leave them missing
                # for the finished variants (signature.clean_normalize needs them). Same fits, same
                # result: starting over only costs time.
                if rank == 0:
                    log.warning("work dir %s holds a stage-1 state without clean-fit norms (an earlier version); "
                                "starting stage 1 over", work_dir)
                acc = SignatureAccumulator(modules, pairwise=cfg.pairwise)
            else:
                if acc.variants_done != list(range(len(acc.variants_done))):
                    raise RuntimeError(f"{state_path}: variants {acc.variants_done} were not saved in order")
                if rank == 0:
                    log.info("resuming stage 1: variants %s already done", acc.variants_done)
    start = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    timings = timings if timings is not None else {}
    rank0_progress = progress and rank == 0

    def save_progress() -> None:
        if state_path is None or rank != 0:
            return
        acc.save(state_path)
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "variants_done": acc.variants_done,
                                   "specs": [s.to_dict() for s in specs]}, indent=2))
        tmp.replace(meta_path)

    def fit(data: list[dict], variant: int | None, role: str, fit_seed: int, steps: int | None = None) -> int:
        """One fit of ``steps`` optimizer steps (default: ``cfg.epochs`` over ``data``); returns the steps."""
        model.load_state_dict(start)
        _seed_all(fit_seed)
        ex = data if tokenized else tokenize_records(tokenizer, data, cfg.max_length, source=f"variant {variant} {role}")
        loader = make_loader(ex, _pad_id(tokenizer), cfg.batch_size, True, fit_seed, cfg.pad_to_multiple_of)
        module = VariantModule(model, variant=variant, role=role, lr=cfg.lr, trainable=cfg.trainable,
                               pad_to_multiple_of=cfg.pad_to_multiple_of)
        cb = SignatureCallback(buf, variant, role, model_attr="model", state_fn=state_fn)
        if steps is None:
            steps = _steps(len(ex), cfg.batch_size, cfg.epochs, cfg.max_steps)
        t = time.perf_counter()
        if fit_fn is None:
            name = f"variant {variant} {role}" if variant is not None else f"shared {role}"
            trainer = make_trainer(steps, [cb], precision=precision, progress=rank0_progress, desc=name,
                                   **(trainer_kwargs or {}))
            trainer.fit(module, train_dataloaders=loader)
            # Trainer, module and optimizer reference each other: without this, each fit's AdamW
            # state (2x the trainable weights) lives until a full garbage collection, and stage 1's
            # memory grows with N (measured: N = 12 ran out of 23 GB on SmolLM2-135M).
            for opt in trainer.optimizers:
                opt.state.clear()
            del trainer
        else:
            fit_fn(module, loader, steps, cb)
        del module, loader
        gc.collect()
        _release_freed_memory()
        timings.setdefault("fits", []).append({"variant": variant, "role": role, "steps": steps, "rank": rank,
                                                "seconds": round(time.perf_counter() - t, 2)})
        return steps

    t0 = time.perf_counter()
    todo = [s for s in specs if s.index not in acc.variants_done]
    same_steps = cfg.clean_steps == "same_steps"

    if cfg.shared_clean and todo:
        if acc._shared_clean is not None:
            buf._shared_clean = acc._shared_clean
        else:
            # Every rank fits the shared counterpart itself (same seed, same result): no waiting on rank 0.
            # All variants poisoned the same slice: its clean fit is every variant's counterpart.
            # "same_steps": as many steps as each variant's fit over its mixed set (counted from the
            # records; a record tokenization drops would count here and not there).
            fit(sets[0][1], None, "clean", seed * 100003 + 99991,
                _steps(len(sets[0][0]), cfg.batch_size, cfg.epochs, cfg.max_steps) if same_steps else None)
            acc._shared_clean = buf._shared_clean
    shapes = None
    if world_size > 1 and todo:
        shapes = {k: tuple(v.shape) for k, v in (state_fn or _default_state_fn())(model, list(acc.modules.values())).items()}
        shapes.update({_CLEAN_NORM + k: (shape[0],) for k, shape in list(shapes.items())})
    for r0 in range(0, len(todo), world_size):
        round_specs = todo[r0:r0 + world_size]
        mine = round_specs[rank] if rank < len(round_specs) else None
        if mine is not None:
            mixed, clean_i = sets[mine.index]
            if rank0_progress or (progress and world_size > 1):
                print(f"[bd-vax] variant {mine.index + 1}/{len(specs)}"
                      f"{f' (rank {rank})' if world_size > 1 else ''}: key={mine.key!r} style={mine.style} "
                      f"behaviour={mine.behaviour[:40]!r}", flush=True)
            steps = fit(mixed, mine.index, "backdoor", seed * 100003 + 2 * mine.index)
            if not cfg.shared_clean:
                # Same hyperparameters: same epochs over the clean half ("same_epochs"), or the
                # variant's number of steps ("same_steps").
                fit(clean_i, mine.index, "clean", seed * 100003 + 2 * mine.index + 1, steps if same_steps else None)
        for src, spec in enumerate(round_specs):
            if world_size > 1:
                mine_pair = buf.deltas.pop(spec.index, None) if src == rank else None
                payload = _exchange_delta(None if mine_pair is None else _pack(*mine_pair), src, shapes)
                delta, clean_norms = _unpack(payload)
            else:
                delta, clean_norms = buf.deltas.pop(spec.index)
            acc.add_delta(delta, clean_norms)
            acc.variants_done.append(spec.index)
            del delta
            save_progress()
    model.load_state_dict(start)
    for p in model.parameters():
        p.grad = None
    del start
    timings["vaccination_s"] = round(time.perf_counter() - t0, 2)
    acc.specs = specs  # type: ignore[attr-defined]
    return acc


def _release_freed_memory() -> None:
    """Hand memory freed by the last fit back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Without it the allocator keeps each fit's freed blocks, fragmented, and stage 1's resident
    memory creeps up with the number of fits (SmolLM2-135M: 6.6 GB at N = 2, 7.6 GB at N = 6).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _default_state_fn():
    from .callbacks import mlp_channel_state

    return mlp_channel_state


def clean_neuron_importance(model: nn.Module, tokenizer, records: Sequence[dict], max_length: int = 128,
                            batch_size: int = 8) -> dict[str, Tensor]:
    """How much clean inputs rely on each intermediate neuron of each MLP block (block name → scores).

    Neuron ``j``'s score is Wanda's: ``‖X_j‖₂ · ‖W_down[:, j]‖₂``, with ``X_j`` the down
    projection's input ``j`` over the non-padding tokens of ``records`` (see
    :func:`lightning_bdvax.baselines.collect_input_norms`). The weights are not changed.
    """
    from .baselines import _mlp_linears, _rows_view, collect_input_norms

    norms = collect_input_norms(model, tokenizer, records, n_calib=len(records), max_length=max_length,
                                batch_size=batch_size)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for cm, mod, name in _mlp_linears(model):
            if cm.role == "in":
                out[cm.block] = (norms[name].float().cpu() * _rows_view(mod).float().norm(dim=0).cpu())
    if not out:
        raise ValueError("no MLP down projection found to measure neuron importance on")
    return out


def clean_neuron_peaks(model: nn.Module, tokenizer, records: Sequence[dict], max_length: int = 128,
                       batch_size: int = 8) -> dict[str, Tensor]:
    """The peak ``|activation|`` of each intermediate neuron of each MLP block (block name →
    per-neuron peaks): the largest absolute input ``j`` of the down projection over the
    non-padding tokens of ``records`` (prompt and response, formatted as for training).
    Collected with forward hooks in eval mode; the weights and train/eval mode are unchanged.
    """
    from .baselines import _mlp_linears, _pad_id, forward_inputs

    ex = tokenize_records(tokenizer, list(records), max_length, source="clean data")
    loader = make_loader(ex, _pad_id(tokenizer), batch_size, False, 0)
    downs = [(cm, mod) for cm, mod, _ in _mlp_linears(model) if cm.role == "in"]
    if not downs:
        raise ValueError("no MLP down projection found to measure peak activations on")
    peaks: dict[str, Tensor] = {}

    def keep_peak(block: str, x: Tensor) -> None:
        p = x.float().abs().amax(0).cpu()
        peaks[block] = torch.maximum(peaks[block], p) if block in peaks else p

    forward_inputs(model, loader, {mod: (lambda x, b=cm.block: keep_peak(b, x)) for cm, mod in downs})
    return peaks


def build_signature(acc: SignatureAccumulator, cfg: SignatureConfig | None = None, *,
                    model: nn.Module | None = None, tokenizer=None, clean: Sequence[dict] | None = None,
                    max_length: int = 128, importance: Callable[[], Mapping[str, Tensor]] | None = None,
                    **meta: Any) -> Signature:
    """Score and select the flagged channels.

    When ``cfg.protect > 0`` the flagged neurons among each block's most clean-important ones are
    spared (:func:`lightning_bdvax.signature.spare_important_neurons`). The importance is
    :func:`clean_neuron_importance` of ``model`` on the first ``cfg.protect_samples`` records of
    ``clean`` (truncated to ``max_length`` tokens), or, if given, whatever ``importance()`` returns
    (block name → per-neuron scores). Neither is used when ``cfg.protect == 0``.

    Raises:
        ValueError: ``cfg.attention`` is set but ``acc`` tracked no attention projection (stage 1
            ran with the default MLP-only ``modules``), which would flag the MLP only.
    """
    cfg = cfg or SignatureConfig()
    if cfg.attention and not any(cm.kind == "attention" for cm in acc.modules.values()):
        raise ValueError("bdvax.signature.attention is set but stage 1 tracked no attention projection; run "
                         "run_vaccination with modules=find_channel_modules(model, attention=True)")
    specs = getattr(acc, "specs", None)
    if specs is not None:
        meta.setdefault("variants", [s.to_dict() for s in specs])
    sig = Signature.from_accumulator(acc, tau=cfg.tau, lam=cfg.lam, selection=cfg.selection,
                                     threshold=cfg.threshold, clean_normalize=cfg.clean_normalize, **meta)
    if cfg.protect > 0:
        if importance is None:
            if model is None or tokenizer is None or not clean:
                raise ValueError("bdvax.signature.protect needs clean instruction records and the model to measure "
                                 "neuron importance; it is supported by purify and BDVaxCallback with instruction data")
            scores = clean_neuron_importance(model, tokenizer, clean[:cfg.protect_samples], max_length=max_length)
        else:
            scores = importance()
        sig = spare_important_neurons(sig, acc.modules.values(), scores, cfg.protect)
    if cfg.spare_massive > 0:
        if model is None or tokenizer is None or not clean:
            raise ValueError("bdvax.signature.spare_massive needs clean instruction records and the model to measure "
                             "peak activations; it is supported by purify and BDVaxCallback with instruction data")
        peaks = clean_neuron_peaks(model, tokenizer, clean[:cfg.protect_samples], max_length=max_length)
        sig = spare_massive_neurons(sig, acc.modules.values(), peaks, cfg.spare_massive)
    return sig


@deterministic_cuda()
def recover(model: nn.Module, tokenizer, records: Sequence[dict], cfg: RecoveryConfig | None = None,
            teacher: nn.Module | None = None, seed: int = 0, precision: str = "auto", progress: bool = True,
            callbacks: Sequence[L.Callback] = (), grad_masks: dict | None = None,
            trainer_kwargs: dict | None = None) -> nn.Module:
    """Stage 2b: a short clean fine-tune of ``model`` (in place)."""
    cfg = cfg or RecoveryConfig()
    precision = _resolve_precision(precision)
    if cfg.steps == 0 and not callbacks:
        return model
    records = list(records)[:cfg.num_samples]
    records += probe_copies(records, cfg.probe_triggers, seed=seed)  # none at 0.0
    ex = tokenize_records(tokenizer, records, cfg.max_length, source="recovery data")
    loader = make_loader(ex, tokenizer.pad_token_id, cfg.batch_size, True, seed, cfg.pad_to_multiple_of)
    module = RecoveryModule(model, objective=cfg.objective, teacher=teacher, temperature=cfg.temperature,
                            lm_weight=cfg.lm_weight, grad_masks=grad_masks, lr=cfg.lr,
                            pad_to_multiple_of=cfg.pad_to_multiple_of)
    L.seed_everything(seed, verbose=False)
    trainer = make_trainer(max(cfg.steps, 1) if cfg.steps else 1, callbacks, precision=precision,
                           progress=progress, desc="recovery", **(trainer_kwargs or {}))
    if cfg.steps == 0:
        # Only the callbacks (e.g. neutralization) should act: run fit hooks, zero steps.
        trainer = make_trainer(0, callbacks, precision=precision, progress=False, **(trainer_kwargs or {}))
    trainer.fit(module, train_dataloaders=loader)
    return model


@dataclass
class PurifyResult:
    model: nn.Module
    signature: Signature
    report: dict


def threat_model_problems(signature: SignatureConfig | None, neutralize: NeutralizeConfig | None,
                          lora: bool, recovery: RecoveryConfig | None = None,
                          vaccination: VaccinationConfig | None = None) -> list[str]:
    """The options the threat model does not take, one message each (empty: none).

    One rule for every entry point (:func:`purify`, :func:`~lightning_bdvax.lora.purify_lora`,
    ``BDVaxCallback`` and the recipe check before training): ``signature.protect`` measures a
    full model's clean-important neurons; a LoRA adapter is neutralized by zeroing its flagged
    slices (``neutralize.mode="zero"``); ``signature.attention`` scores the attention
    projections, which the variants must train (``vaccination.trainable: all``). ``None``
    sections (already reported as malformed) are skipped.
    """
    problems = []
    if signature is not None and signature.attention and vaccination is not None and vaccination.trainable == "mlp":
        problems.append("bdvax.signature.attention: scores the attention projections, which "
                        "bdvax.vaccination.trainable: mlp keeps frozen in every variant; set trainable to 'all'")
    if lora:
        if signature is not None and signature.protect > 0:
            problems.append("bdvax.signature.protect: applies to full-model purification; set it to 0 for a "
                            "LoRA adapter")
        if signature is not None and signature.spare_massive > 0:
            problems.append("bdvax.signature.spare_massive: applies to full-model purification; set it to 0 for "
                            "a LoRA adapter")
        if recovery is not None and recovery.scope == "flagged":
            problems.append("bdvax.recovery.scope: 'flagged' applies to full-model purification (an adapter's "
                            "zeroed slices always stay zero); use 'all' for a LoRA adapter")
        if neutralize is not None and neutralize.mode != "zero":
            problems.append(f"bdvax.neutralize.mode: a LoRA adapter needs 'zero' (its flagged slices are zeroed), "
                            f"got {neutralize.mode!r}")
    return problems


def purify(model: nn.Module, tokenizer, clean_data: Any = "builtin:2000", config: BDVaxConfig | None = None,
           recovery_data: Any = None, work_dir: str | os.PathLike | None = None,
           output_dir: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
           evaluate: Callable[[nn.Module, str], dict] | None = None) -> PurifyResult:
    """Purify ``model`` of an unknown backdoor. The input model is not modified.

    Args:
        model: the suspicious causal LM.
        tokenizer: its tokenizer.
        clean_data: the defender's clean instruction data (path, ``"builtin[:n[:seed]]"`` or records).
            Variants take disjoint slices from its start; recovery data comes from the end.
        config: :class:`BDVaxConfig`.
        recovery_data: clean data for recovery (default: the last ``recovery.num_samples`` of ``clean_data``).
        work_dir: where stage-1 progress is saved for resuming.
        output_dir: if given, the purified model, tokenizer and signature are saved there.
        evaluate: optional ``f(model, stage) -> dict`` called before and after (stage ``"before"``/``"after"``).

    Returns:
        :class:`PurifyResult` with the purified model, the signature and a report (timings, config).

    The input ``model`` is left exactly as given (weights, ``requires_grad`` flags, train/eval
    mode): the work happens on a deep copy. On the same machine the same seed gives the same
    signature and the same purified weights (on a GPU training runs with deterministic kernels,
    :func:`deterministic_cuda`; a CPU and a GPU give different, equally valid results). Killed and called again with the same arguments and ``work_dir``,
    it skips the finished variants and ends with a bit-identical signature.

    Example::

        import lightning_bdvax as bdvax

        res = bdvax.purify(model, tokenizer, clean_data="my_clean.json",
                           config=bdvax.BDVaxConfig(seed=0), work_dir="runs/purify.work")
        res.model.save_pretrained("purified")
        print(res.signature.n_flagged, res.report["timings"])
    """
    config = config or BDVaxConfig()
    problems = threat_model_problems(config.signature, config.neutralize, lora=False, vaccination=config.vaccination)
    if problems:
        raise ValueError("; ".join(problems) + " (use purify_lora for an adapter)")
    precision = _resolve_precision(config.precision)
    from .models import configure_cpu

    configure_cpu()
    if output_dir is not None:
        _check_output_dir(output_dir, overwrite)
    clean, need, rec_records = split_clean_data(clean_data, config, recovery_data)
    tracked = find_channel_modules(model, config.signature.attention)  # fail early on an unknown architecture
    report: dict = {"config": config.to_dict(), "precision": precision, "timings": {}}
    t_all = time.perf_counter()
    if evaluate is not None:
        report["before"] = evaluate(model, "before")
    work = copy.deepcopy(model)
    work.train()
    acc = run_vaccination(work, tokenizer, clean[:need], config.vaccination, seed=config.seed, precision=precision,
                          work_dir=work_dir, progress=progress, timings=report["timings"],
                          modules=tracked)
    t = time.perf_counter()
    sig = build_signature(acc, config.signature, model=work, tokenizer=tokenizer, clean=clean,
                          max_length=config.vaccination.max_length)
    report["timings"]["signature_s"] = round(time.perf_counter() - t, 2)
    report["signature"] = {"n_flagged": sig.n_flagged, "n_channels": sig.n_channels}
    teacher = model if config.recovery.objective == "distill" else None
    neut = NeutralizeCallback(sig, mode=config.neutralize.mode, scale=config.neutralize.scale, seed=config.seed,
                              model_attr="model")
    t = time.perf_counter()
    # The input model is the distillation teacher; RecoveryModule freezes it and sets eval mode:
    # put its flags back afterwards so that the caller's model is left exactly as it was given.
    flags, was_training = [p.requires_grad for p in model.parameters()], model.training
    masks = recovery_grad_masks(work, sig, config.recovery.scope)  # {} for the published "all"
    try:
        recover(work, tokenizer, rec_records, config.recovery, teacher=teacher, seed=config.seed,
                precision=precision, progress=progress, callbacks=[neut], grad_masks=masks)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    report["timings"]["recovery_s"] = round(time.perf_counter() - t, 2)
    report["timings"]["total_s"] = round(time.perf_counter() - t_all, 2)
    work.eval()
    if evaluate is not None:
        report["after"] = evaluate(work, "after")
    if output_dir is not None:
        save_purified(work, tokenizer, sig, report, output_dir, overwrite=overwrite)
        write_report_next_to(output_dir, sig, report, acc)
    return PurifyResult(work, sig, report)


def write_report_next_to(output_dir: str | os.PathLike, sig: Signature, report: dict,
                         acc: SignatureAccumulator | None = None) -> Path | None:
    """Write the run report into a saved run's ``output_dir``; a failure is logged, not raised
    (the model is already saved, and a report problem must not fail the run)."""
    try:
        from .run_report import write_run_report

        return write_run_report(output_dir, sig, report, acc=acc)
    except Exception as e:  # noqa: BLE001
        log.warning("run report not written: %s", e)
        return None


def split_clean_data(clean_data: Any, config: BDVaxConfig, recovery_data: Any = None) -> tuple[list[dict], int, list[dict]]:
    """Load the defender's clean data; return ``(records, n needed by the variants, recovery records)``.

    Variants take the first ``n_variants × samples_per_variant`` records; recovery takes
    ``recovery_data`` if given, else the last ``recovery.num_samples`` of the rest.
    """
    clean = load_instructions(clean_data)
    vac = config.vaccination
    need = vac.clean_needed
    if recovery_data is not None:
        return clean, need, load_instructions(recovery_data)
    if len(clean) < need + 1:
        raise ValueError(f"clean data has {len(clean)} samples; stage 1 needs {need} "
                         f"({_slices_text(vac.n_variants, vac.samples_per_variant, vac.shared_clean)}), "
                         "plus recovery samples")
    return clean, need, clean[need:][-config.recovery.num_samples:]


def _check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> None:
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir {out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output_dir parent {parent} is not writable")


def save_purified(model: nn.Module, tokenizer, sig: Signature, report: dict, output_dir: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """Write model + tokenizer (``save_pretrained``), signature and report; atomically."""
    from .models import atomic_directory

    out = Path(output_dir)
    _check_output_dir(out, overwrite)
    with atomic_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sig.save(tmp / "signature")
        (tmp / "bdvax_report.json").write_text(json.dumps(report, indent=2, default=str))
    return out


_SECTIONS = {"vaccination": VaccinationConfig, "signature": SignatureConfig, "neutralize": NeutralizeConfig,
             "recovery": RecoveryConfig}


def bdvax_config_from_dict(d: dict | None) -> BDVaxConfig:
    """Build a :class:`BDVaxConfig` from a plain dict (a recipe's ``bdvax`` section).

    Each section is checked as the CLI checks a recipe (unknown keys, value types, the configs'
    own range checks), and every problem is named with its full path in one ValueError
    (:class:`~lightning_bdvax.validation.ConfigError`).
    """
    from .validation import ConfigError, _build_section

    d = dict(d or {})
    kwargs: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in d.items():
        if key in _SECTIONS:
            section = _build_section(_SECTIONS[key], value, f"bdvax.{key}", problems)
            if section is not None:
                kwargs[key] = section
        elif key in ("seed", "precision"):
            kwargs[key] = value
        else:
            problems.append(f"unknown key bdvax.{key} (expected: vaccination, signature, neutralize, recovery, seed, precision)")
    if problems:
        raise ConfigError(problems)
    return BDVaxConfig(**kwargs)


def load_bdvax_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> BDVaxConfig:
    """Read the ``bdvax`` section of a recipe YAML, with ``section.field=value`` overrides."""
    import yaml

    from .validation import yaml_error_line, yaml_load

    try:
        doc = yaml_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: {yaml_error_line(e)}") from e
    d = copy.deepcopy(doc.get("bdvax", {}) or {})
    # The recovery fit is the recipe's model/data/trainer sections (what `lightning-bdvax fit` runs).
    m, da, tr = (doc.get(k) or {} for k in ("model", "data", "trainer"))
    derived = {"steps": tr.get("max_steps"), "lr": m.get("lr"), "objective": m.get("objective"),
               "temperature": m.get("temperature"), "lm_weight": m.get("lm_weight"),
               "num_samples": da.get("num_samples"), "batch_size": da.get("batch_size"),
               "max_length": da.get("max_length")}
    rec = d.setdefault("recovery", {}) or {}
    for k, v in derived.items():
        if v is not None:
            rec.setdefault(k, v)
    d["recovery"] = rec
    if tr.get("precision") is not None:
        d.setdefault("precision", str(tr["precision"]))
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like section.field=value")
        k, v = ov.split("=", 1)
        parts = k.split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml_load(v)
    return bdvax_config_from_dict(d)
