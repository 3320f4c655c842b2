"""The driver: variants → signature → neutralize → recover → save.

Every fit uses a fresh :class:`lightning.Trainer` (a Trainer fits once) and fresh callbacks,
except the :class:`~lightning_bdvax.signature.SignatureAccumulator`, which is shared on purpose.
Fits are driven from here, never from inside a callback.

Stage-1 progress is saved after each finished variant under ``work_dir``; running the same
command again skips finished variants and ends with the same signature.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch import nn

from .arch import find_mlp_modules
from .callbacks import NeutralizeCallback, SignatureCallback
from .data import load_instructions, make_loader, tokenize_records
from .modules import RecoveryModule, VariantModule
from .signature import Signature, SignatureAccumulator
from .variants import BEHAVIOURS, INSERTION_STYLES, build_variant_datasets, make_variants

__all__ = ["VaccinationConfig", "SignatureConfig", "NeutralizeConfig", "RecoveryConfig", "BDVaxConfig",
           "run_vaccination", "build_signature", "recover", "purify", "PurifyResult", "make_trainer",
           "bdvax_config_from_dict", "load_bdvax_config", "save_purified"]

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
        shared_clean: train one clean counterpart on the union of the slices and share it
            (N+1 fits instead of 2N).
        styles: trigger insertion styles cycled across variants.
        behaviours: malicious behaviour pool (default: :data:`~lightning_bdvax.variants.BEHAVIOURS`).
        keys: explicit trigger keys (default: nonce words drawn from the seed).
        pairwise: ``"stream"`` (constant memory) or ``"exact"`` pairwise cosine.
        trainable: ``"all"`` parameters (published) or ``"mlp"`` only.
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
        if self.pairwise not in ("stream", "exact"):
            raise ValueError(f"bdvax.vaccination.pairwise must be 'stream' or 'exact', got {self.pairwise!r}")
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

    def __post_init__(self) -> None:
        if self.selection != "threshold" and not 0 < self.tau < 1:
            raise ValueError(f"bdvax.signature.tau must be in (0, 1), got {self.tau}")
        if self.lam < 0:
            raise ValueError(f"bdvax.signature.lam must be >= 0, got {self.lam}")
        if self.selection not in ("per_module", "global", "threshold"):
            raise ValueError(f"bdvax.signature.selection must be per_module, global or threshold, got {self.selection!r}")
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
        if self.scale < 0:
            raise ValueError(f"bdvax.neutralize.scale must be >= 0, got {self.scale}")


@dataclass
class RecoveryConfig:
    """Stage 2b: the clean fine-tune. ``objective``: ``"lm"`` (published) or ``"distill"``
    (match the suspicious model's own next-token distribution on clean inputs)."""

    num_samples: int = 200
    steps: int = 50
    lr: float = 2e-5
    batch_size: int = 8
    max_length: int = 128
    objective: str = "distill"
    temperature: float = 1.0
    lm_weight: float = 0.0

    def __post_init__(self) -> None:
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
                 progress: bool = True, accelerator: str = "auto", **kwargs: Any) -> L.Trainer:
    """A fresh single-device Trainer for one inner fit (no logger, no checkpoints)."""
    return L.Trainer(max_steps=max_steps, max_epochs=-1, callbacks=list(callbacks), precision=precision,
                     accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                     limit_val_batches=0.0, **kwargs)


def _resolve_precision(p: str) -> str:
    if p == "auto":
        from .models import choose_precision

        return choose_precision("auto")
    return p


def _fingerprint(cfg: VaccinationConfig, seed: int, n_clean: int, model: nn.Module) -> str:
    h = hashlib.sha256(json.dumps([asdict(cfg), seed, n_clean], sort_keys=True, default=str).encode())
    for cm in find_mlp_modules(model)[:2]:
        w = dict(model.named_modules())[cm.key]
        h.update(getattr(w, "base_layer", w).weight.detach().float().flatten()[:64].numpy().tobytes())
    return h.hexdigest()[:16]


def _steps(n_samples: int, batch: int, epochs: float, cap: int | None) -> int:
    s = max(1, math.ceil(epochs * n_samples / batch))
    return min(s, cap) if cap else s


def run_vaccination(model: nn.Module, tokenizer, clean: Sequence[dict], cfg: VaccinationConfig | None = None,
                    seed: int = 0, precision: str = "auto", work_dir: str | os.PathLike | None = None,
                    progress: bool = True, trainer_kwargs: dict | None = None,
                    timings: dict | None = None, state_fn: Callable | None = None) -> SignatureAccumulator:
    """Stage 1. Fine-tunes variant pairs from ``model``'s current weights and accumulates Δ.

    ``model`` is trained in place and restored to its starting weights at the end. Only
    parameters with ``requires_grad`` train (a peft model trains its adapter). ``state_fn`` is
    passed to :class:`SignatureCallback` (default: full MLP weights).
    """
    cfg = cfg or VaccinationConfig()
    precision = _resolve_precision(precision)
    modules = find_mlp_modules(model)
    specs = make_variants(cfg.n_variants, seed=seed, styles=cfg.styles,
                          behaviours=cfg.behaviours or BEHAVIOURS, keys=cfg.keys)
    sets = build_variant_datasets(clean, specs, cfg.samples_per_variant, seed=seed)
    acc = SignatureAccumulator(modules, pairwise=cfg.pairwise)
    state_path = meta_path = None
    if work_dir is not None:
        wd = Path(work_dir)
        wd.mkdir(parents=True, exist_ok=True)
        state_path, meta_path = wd / "stage1.safetensors", wd / "stage1.json"
        fp = _fingerprint(cfg, seed, len(clean), model)
        if state_path.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == fp:
                acc.load(state_path)
                log.info("resuming stage 1: variants %s already done", acc.variants_done)
            else:
                log.warning("work dir %s holds stage-1 state of a different run; starting over", wd)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    timings = timings if timings is not None else {}

    def save_progress(_: int | None = None) -> None:
        if state_path is None:
            return
        acc.save(state_path)
        meta_path.write_text(json.dumps({"fingerprint": fp, "variants_done": acc.variants_done,
                                         "specs": [s.to_dict() for s in specs]}, indent=2))

    def fit(records: list[dict], variant: int | None, role: str, fit_seed: int) -> None:
        model.load_state_dict(start)
        L.seed_everything(fit_seed, verbose=False)
        ex = tokenize_records(tokenizer, records, cfg.max_length, source=f"variant {variant} {role}")
        loader = make_loader(ex, tokenizer.pad_token_id, cfg.batch_size, True, fit_seed)
        module = VariantModule(model, variant=variant, role=role, lr=cfg.lr, trainable=cfg.trainable)
        cb = SignatureCallback(acc, variant, role, model_attr="model", on_variant_done=save_progress,
                               state_fn=state_fn)
        steps = _steps(len(ex), cfg.batch_size, cfg.epochs, cfg.max_steps)
        trainer = make_trainer(steps, [cb], precision=precision, progress=progress, **(trainer_kwargs or {}))
        t = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        timings.setdefault("fits", []).append({"variant": variant, "role": role, "steps": steps,
                                                "seconds": round(time.perf_counter() - t, 2)})

    t0 = time.perf_counter()
    if cfg.shared_clean:
        union = [r for _, c in sets for r in c]
        fit(union, None, "clean", seed * 100003 + 99991)
    for spec, (mixed, clean_i) in zip(specs, sets):
        if spec.index in acc.variants_done:
            continue
        if progress:
            print(f"[bd-vax] variant {spec.index + 1}/{len(specs)}: key={spec.key!r} style={spec.style} "
                  f"behaviour={spec.behaviour[:40]!r}", flush=True)
        fit(mixed, spec.index, "backdoor", seed * 100003 + 2 * spec.index)
        if not cfg.shared_clean:
            # Same hyperparameters: same epochs over the clean half.
            fit(clean_i, spec.index, "clean", seed * 100003 + 2 * spec.index + 1)
    model.load_state_dict(start)
    del start
    timings["vaccination_s"] = round(time.perf_counter() - t0, 2)
    acc.specs = specs  # type: ignore[attr-defined]
    return acc


def build_signature(acc: SignatureAccumulator, cfg: SignatureConfig | None = None, **meta: Any) -> Signature:
    cfg = cfg or SignatureConfig()
    specs = getattr(acc, "specs", None)
    if specs is not None:
        meta.setdefault("variants", [s.to_dict() for s in specs])
    return Signature.from_accumulator(acc, tau=cfg.tau, lam=cfg.lam, selection=cfg.selection,
                                      threshold=cfg.threshold, **meta)


def recover(model: nn.Module, tokenizer, records: Sequence[dict], cfg: RecoveryConfig | None = None,
            teacher: nn.Module | None = None, seed: int = 0, precision: str = "auto", progress: bool = True,
            callbacks: Sequence[L.Callback] = (), grad_masks: dict | None = None,
            trainer_kwargs: dict | None = None) -> nn.Module:
    """Stage 2b: a short clean fine-tune of ``model`` (in place)."""
    cfg = cfg or RecoveryConfig()
    precision = _resolve_precision(precision)
    if cfg.steps == 0 and not callbacks:
        return model
    ex = tokenize_records(tokenizer, list(records)[:cfg.num_samples], cfg.max_length, source="recovery data")
    loader = make_loader(ex, tokenizer.pad_token_id, cfg.batch_size, True, seed)
    module = RecoveryModule(model, objective=cfg.objective, teacher=teacher, temperature=cfg.temperature,
                            lm_weight=cfg.lm_weight, grad_masks=grad_masks, lr=cfg.lr)
    L.seed_everything(seed, verbose=False)
    trainer = make_trainer(max(cfg.steps, 1) if cfg.steps else 1, callbacks, precision=precision,
                           progress=progress, **(trainer_kwargs or {}))
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
    """
    config = config or BDVaxConfig()
    precision = _resolve_precision(config.precision)
    from .models import configure_cpu

    configure_cpu()
    if output_dir is not None:
        _check_output_dir(output_dir, overwrite)
    clean = load_instructions(clean_data)
    need = config.vaccination.samples_per_variant * config.vaccination.n_variants
    if recovery_data is None:
        if len(clean) < need + 1:
            raise ValueError(f"clean data has {len(clean)} samples; {config.vaccination.n_variants} variants x "
                             f"{config.vaccination.samples_per_variant} need {need}, plus recovery samples")
        rec_records = clean[need:][-config.recovery.num_samples:]
    else:
        rec_records = load_instructions(recovery_data)
    find_mlp_modules(model)  # fail early on an unknown architecture
    report: dict = {"config": config.to_dict(), "precision": precision, "timings": {}}
    t_all = time.perf_counter()
    if evaluate is not None:
        report["before"] = evaluate(model, "before")
    work = copy.deepcopy(model)
    work.train()
    acc = run_vaccination(work, tokenizer, clean[:need], config.vaccination, seed=config.seed, precision=precision,
                          work_dir=work_dir, progress=progress, timings=report["timings"])
    t = time.perf_counter()
    sig = build_signature(acc, config.signature)
    report["timings"]["signature_s"] = round(time.perf_counter() - t, 2)
    report["signature"] = {"n_flagged": sig.n_flagged, "n_channels": sig.n_channels}
    teacher = model if config.recovery.objective == "distill" else None
    neut = NeutralizeCallback(sig, mode=config.neutralize.mode, scale=config.neutralize.scale, seed=config.seed,
                              model_attr="model")
    t = time.perf_counter()
    recover(work, tokenizer, rec_records, config.recovery, teacher=teacher, seed=config.seed, precision=precision,
            progress=progress, callbacks=[neut])
    report["timings"]["recovery_s"] = round(time.perf_counter() - t, 2)
    report["timings"]["total_s"] = round(time.perf_counter() - t_all, 2)
    work.eval()
    if evaluate is not None:
        report["after"] = evaluate(work, "after")
    if output_dir is not None:
        save_purified(work, tokenizer, sig, report, output_dir, overwrite=overwrite)
    return PurifyResult(work, sig, report)


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
    import shutil

    out = Path(output_dir)
    _check_output_dir(out, overwrite)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    sig.save(tmp / "signature")
    (tmp / "bdvax_report.json").write_text(json.dumps(report, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


_SECTIONS = {"vaccination": VaccinationConfig, "signature": SignatureConfig, "neutralize": NeutralizeConfig,
             "recovery": RecoveryConfig}


def bdvax_config_from_dict(d: dict | None) -> BDVaxConfig:
    """Build a :class:`BDVaxConfig` from a plain dict (a recipe's ``bdvax`` section).

    Unknown keys are errors, named with their full path.
    """
    d = dict(d or {})
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key in _SECTIONS:
            cls = _SECTIONS[key]
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ValueError(f"bdvax.{key} must be a mapping, got {type(value).__name__}")
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown key bdvax.{key}.{unknown[0]} (expected one of: {', '.join(sorted(known))})")
            kwargs[key] = cls(**value)
        elif key in ("seed", "precision"):
            kwargs[key] = value
        else:
            raise ValueError(f"unknown key bdvax.{key} (expected: vaccination, signature, neutralize, recovery, seed, precision)")
    return BDVaxConfig(**kwargs)


def load_bdvax_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> BDVaxConfig:
    """Read the ``bdvax`` section of a recipe YAML, with ``section.field=value`` overrides."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from e
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
        node[parts[-1]] = yaml.safe_load(v)
    return bdvax_config_from_dict(d)
