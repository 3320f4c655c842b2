"""Callbacks: snapshot MLP weights around a fit, and neutralize a signature before one.

Modelled on Lightning's own ``ModelPruning``/``BaseFinetuning``: arguments are checked in
``__init__``, work happens in the matching fit hook, ``state_dict`` holds plain tensors.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from .arch import ChannelModule, channel_module_index, channel_rows, find_channel_modules, find_mlp_modules
from .neutralize import NEUTRALIZE_MODES, neutralize_
from .signature import Signature, SignatureAccumulator

__all__ = ["SignatureCallback", "NeutralizeCallback", "BDVaxCallback", "find_hf_model", "mlp_channel_state",
           "batch_to_examples"]


def find_hf_model(pl_module: nn.Module, attr: str | None = None) -> nn.Module:
    """The causal LM inside ``pl_module``: ``pl_module.<attr>`` if given, else the first
    submodule that has MLP channels (``pl_module.model`` is tried first)."""
    if attr:
        obj = pl_module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise AttributeError(f"{type(pl_module).__name__} has no attribute path '{attr}'")
            obj = getattr(obj, part)
        return obj
    for cand in [getattr(pl_module, "model", None)] + [m for _, m in pl_module.named_children()]:
        if isinstance(cand, nn.Module):
            try:
                find_mlp_modules(cand)
                return cand
            except ValueError:
                continue
    return pl_module


@torch.no_grad()
def mlp_channel_state(model: nn.Module, modules: list[ChannelModule]) -> dict[str, Tensor]:
    """Channel-row fp32 CPU copies of every tracked projection's weight."""
    named = dict(model.named_modules())
    out = {}
    for cm in modules:
        mod = named[cm.key]
        w = getattr(mod, "base_layer", mod).weight
        out[cm.key] = channel_rows(w.detach(), cm).float().cpu().clone()  # statistics live on the CPU
    return out


class SignatureCallback(Callback):
    """Snapshots the MLP weights at fit start; at fit end adds the fit's update to ``accumulator``.

    One instance per fit (a Trainer fits once); the ``accumulator`` is shared across fits on
    purpose and pairs each variant's backdoor and clean updates into Δ.

    Args:
        accumulator: the running statistics shared across fits.
        variant: variant index (None with ``role="clean"``: the shared clean counterpart).
        role: ``"backdoor"`` or ``"clean"``.
        model_attr: attribute path of the HF model in the LightningModule (auto-detected if None).
        on_variant_done: called with the variant index when its Δ has been accumulated.
        state_fn: ``f(hf_model, modules) -> {key: (C, d) fp32 tensor}`` giving the per-channel
            state whose change is the update (default :func:`mlp_channel_state`, the full
            weights; the LoRA path passes the effective adapter update ``scaling·B·A``).
    """

    def __init__(self, accumulator: SignatureAccumulator, variant: int | None, role: str,
                 model_attr: str | None = None, on_variant_done: Callable[[int], None] | None = None,
                 state_fn: Callable[[nn.Module, list[ChannelModule]], dict[str, Tensor]] | None = None):
        if role not in ("backdoor", "clean"):
            raise ValueError(f"role must be 'backdoor' or 'clean', got {role!r}")
        if variant is None and role != "clean":
            raise ValueError("variant=None (shared counterpart) is only valid with role='clean'")
        if not isinstance(accumulator, SignatureAccumulator):
            raise TypeError(f"accumulator must be a SignatureAccumulator, got {type(accumulator).__name__}")
        self.accumulator = accumulator
        self.variant = variant
        self.role = role
        self.model_attr = model_attr
        self.on_variant_done = on_variant_done
        self.state_fn = state_fn or mlp_channel_state
        self._start: dict[str, Tensor] | None = None

    def _modules(self, hf: nn.Module) -> list[ChannelModule]:
        found = channel_module_index(hf)
        missing = set(self.accumulator.modules) - set(found)
        if missing:
            raise ValueError(f"model lacks tracked modules, e.g. {sorted(missing)[0]}")
        return [found[k] for k in self.accumulator.modules]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hf = find_hf_model(pl_module, self.model_attr)
        self._start = self.state_fn(hf, self._modules(hf))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            return
        if trainer.interrupted:
            self._start = None
            return
        hf = find_hf_model(pl_module, self.model_attr)
        end = self.state_fn(hf, self._modules(hf))
        update = {k: end[k] - self._start[k] for k in end}
        self._start = None
        del end
        done = self.accumulator.add_update(self.variant, self.role, update)
        if done and self.on_variant_done is not None:
            self.on_variant_done(self.variant)

    def state_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "role": self.role}


class NeutralizeCallback(Callback):
    """Applies ``signature`` to the model when a fit starts (before the first step).

    Args:
        signature: a :class:`Signature` or a directory written by :meth:`Signature.save`.
        mode: ``"reinit"`` (Xavier-uniform, as published) or ``"zero"``.
        scale: multiplies the re-initialisation bound.
        seed: seed of the re-initialisation draw.
        model_attr: attribute path of the HF model in the LightningModule (auto-detected if None).
    """

    def __init__(self, signature: Signature | str, mode: str = "reinit", scale: float = 1.0, seed: int = 0,
                 model_attr: str | None = None):
        if mode not in NEUTRALIZE_MODES:
            raise ValueError(f"mode must be one of {NEUTRALIZE_MODES}, got {mode!r}")
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        self.signature = signature if isinstance(signature, Signature) else Signature.load(signature)
        self.mode = mode
        self.scale = scale
        self.seed = seed
        self.model_attr = model_attr
        self.applied = False
        self.touched: dict[str, int] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.applied:
            return
        hf = find_hf_model(pl_module, self.model_attr)
        self.touched = neutralize_(hf, self.signature, mode=self.mode, seed=self.seed, scale=self.scale)
        self.applied = True

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "mode": self.mode}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))


# ----------------------------------------------------------------------------------------------
# BD-VAX inside a user's own fine-tuning job
# ----------------------------------------------------------------------------------------------


def _rng_states() -> dict[str, Any]:
    import random

    import numpy as np

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_states(st: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


def _train_loader(trainer: L.Trainer) -> Any:
    """The user's train dataloader, asked from the same source ``Trainer.fit`` will ask
    (datamodule, LightningModule hook, or the loader given to ``fit``), before Lightning wraps it."""
    from collections.abc import Mapping

    loaders = None
    src = getattr(trainer.fit_loop, "_data_source", None)  # private, but the one source of truth
    if src is not None and src.is_defined():
        loaders = src.dataloader()
    elif trainer.datamodule is not None:
        loaders = trainer.datamodule.train_dataloader()
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    if isinstance(loaders, CombinedLoader):
        loaders = loaders.flattened
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


def batch_to_examples(batch: Any) -> list[dict]:
    """Split a collated causal-LM batch back into ``{"input_ids", "labels"}`` examples.

    ``batch`` is a mapping with ``input_ids`` (and optionally ``attention_mask``, ``labels``) or a
    tensor of ids. Padding is removed with ``attention_mask`` (either side); ``labels`` must be
    aligned with ``input_ids`` (``-100``: no loss), as Hugging Face causal LMs take them; without
    labels every token is labelled.
    """
    from collections.abc import Mapping

    if isinstance(batch, Mapping) and "input_ids" in batch:
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    elif isinstance(batch, Tensor) and batch.dim() == 2 and not batch.is_floating_point():
        ids, mask, labels = batch, None, None
    else:
        raise TypeError(
            f"BDVaxCallback cannot read training batches of type {type(batch).__name__}: expected a dict with "
            "'input_ids' (and optionally 'attention_mask', 'labels') or a 2-D tensor of token ids. Pass "
            "example_fn=<batch -> list of {'input_ids', 'labels'}> or clean_data=<records or path>.")
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    out = []
    for row in range(ids.shape[0]):
        keep = torch.as_tensor(mask[row]).bool() if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
        r_ids = ids[row][keep].tolist()
        r_lab = torch.as_tensor(labels[row])[keep].tolist() if labels is not None else list(r_ids)
        if r_ids and any(t != -100 for t in r_lab[1:]):
            out.append({"input_ids": r_ids, "labels": r_lab})
    return out


class BDVaxCallback(Callback):
    """BD-VAX in your own fine-tuning job: your fit becomes the recovery fine-tune.

    Add it to the ``Trainer`` of a job whose LightningModule wraps a Hugging Face causal LM (the
    module needs to know nothing of this package)::

        trainer = L.Trainer(max_steps=200, callbacks=[BDVaxCallback(tokenizer=tokenizer)])
        trainer.fit(MyModule(), datamodule=MyDataModule())

    **When and what.** In ``on_fit_start``, i.e. after ``setup``/``configure_model`` and the
    strategy's setup (the model is materialized, on its device, in the Trainer's precision)
    and before the sanity check and the first training step, it

    1. runs stage 1 (vaccination) on the wrapped model: ``n_variants`` synthetic
       trigger→behaviour variants, each fine-tuned from the model's weights with its clean
       counterpart, their MLP updates accumulated into per-channel statistics
       (:func:`~lightning_bdvax.pipeline.run_vaccination`);
    2. restores the model exactly as it was: weights (from a CPU snapshot), gradients (none),
       train/eval modes and the python/numpy/torch random states, so your fit starts from the
       state it would have started from without the callback;
    3. builds the signature and neutralizes it (zero or Xavier re-init of the flagged MLP
       channels; for a peft LoRA model, zeroed adapter slices plus gradient hooks that keep
       them at zero for the rest of this fit; for a full model the same hooks with
       ``bdvax.recovery.scope`` ``"unflagged"`` or ``"flagged"``).

    Your own fit then trains the neutralized model on your data: that is the recovery. Your
    optimizer, scheduler, loggers, checkpoints and progress bar are untouched (your optimizer
    exists already but has taken no step).

    **Why no Trainer inside.** Lightning does not support ``trainer.fit`` inside a callback
    (DESIGN.md §3: a Trainer fits once, and a nested fit shares global state with the outer one:
    loops, loggers, progress bars, the distributed environment). The ``2N`` variant fits are
    therefore plain loops (:func:`~lightning_bdvax.pipeline.manual_fit`) that reuse
    :class:`~lightning_bdvax.modules.VariantModule`'s ``configure_optimizers`` and
    ``training_step``, the :class:`SignatureCallback` snapshots and the shared
    :class:`~lightning_bdvax.signature.SignatureAccumulator`, on the strategy's root device and
    inside the Trainer's precision-plugin ``forward_context`` (autocast for ``*-mixed``; a
    ``bf16-true`` model is already cast). On CPU at ``32-true`` such a fit computes exactly the
    update a Trainer fit computes (tested). Each variant fit shows its own short tqdm bar, closed
    before your fit's progress bar starts.

    **Clean data** (``clean_data``):

    * ``None`` (default): a slice of the job's own training data. ``n_variants ×
      samples_per_variant`` items are drawn (seeded) from the train dataloader's dataset (the
      first ones of an iterable dataset), collated by that dataloader's own ``collate_fn``, and
      split back into examples (:func:`batch_to_examples`, or your ``example_fn``). The variants
      are then poisoned at the token level
      (:func:`~lightning_bdvax.pipeline.poison_token_examples`): the trigger key's tokens go into
      the prompt (the tokens before the first labelled one, or the first half of a fully
      labelled sequence) and the response becomes the behaviour's tokens.
    * instruction records, a file path or ``"builtin[:n[:seed]]"``: rendered with the
      tokenizer's chat template, as in :func:`~lightning_bdvax.pipeline.purify`.
    * a list of ``{"input_ids", "labels"}`` dicts: tokenized examples, used as given.

    **Distributed.** Under DDP (``ddp``, ``ddp_spawn``, any accelerator) the variants are spread
    over the ranks and every Δ is broadcast and added in variant order
    (:func:`~lightning_bdvax.pipeline.run_vaccination`): every rank gets the same signature,
    bit-identical to a single-process run on CPU, and neutralizes identically, so the replicas
    stay in sync. Stage-1 passes go around the DDP wrapper, so nothing is all-reduced during
    them. Sharded strategies (FSDP, DeepSpeed) are refused.

    Args:
        config: a :class:`~lightning_bdvax.pipeline.BDVaxConfig`; its ``vaccination``,
            ``signature``, ``neutralize`` and ``seed`` are used (``recovery`` is your fit;
            ``precision`` is your Trainer's). Default ``BDVaxConfig()``.
        model_attr: attribute path of the HF model in your LightningModule (e.g. ``"llm"`` or
            ``"net.backbone"``); default: auto-detected by :func:`find_hf_model`.
        tokenizer: the model's tokenizer (needed to tokenize trigger keys and behaviours, and
            records). Default: a ``tokenizer`` attribute of the LightningModule, the datamodule
            or the dataloader's ``collate_fn``.
        clean_data: see above.
        example_fn: ``f(batch) -> list of {"input_ids", "labels"}`` for batches that
            :func:`batch_to_examples` cannot read.
        work_dir: stage-1 progress is saved there after each finished variant; restarting the
            same job resumes stage 1 (the signature is bit-identical to an uninterrupted run).
        signature_dir: where rank 0 saves the signature (:meth:`Signature.save`).
        progress: show stage-1 progress (default: when the Trainer has a progress bar).

    After the fit starts, ``signature``, ``touched`` (channels per module) and ``report``
    (timings, counts) are set. ``state_dict`` records that BD-VAX was applied (and, for LoRA,
    the gradient masks), so resuming your fit from one of its checkpoints does not vaccinate and
    neutralize a second time, and keeps zeroed LoRA slices at zero.
    """

    def __init__(self, config: Any = None, model_attr: str | None = None, tokenizer: Any = None,
                 clean_data: Any = None, example_fn: Callable[[Any], list[dict]] | None = None,
                 work_dir: str | None = None, signature_dir: str | None = None, progress: bool | None = None):
        from .pipeline import BDVaxConfig

        if config is None:
            config = BDVaxConfig()
        if not isinstance(config, BDVaxConfig):
            raise TypeError(f"config must be a BDVaxConfig, got {type(config).__name__}")
        if example_fn is not None and not callable(example_fn):
            raise TypeError("example_fn must be callable")
        if config.recovery.probe_triggers > 0:
            raise ValueError("bdvax.recovery.probe_triggers: with BDVaxCallback your own fit is the recovery, so the "
                             "callback cannot add probe-trigger copies to it; add "
                             "lightning_bdvax.variants.probe_copies(records, fraction) to your training records "
                             "instead, and leave probe_triggers at 0")
        self.config = config
        self.model_attr = model_attr
        self.tokenizer = tokenizer
        self.clean_data = clean_data
        self.example_fn = example_fn
        self.work_dir = work_dir
        self.signature_dir = signature_dir
        self.progress = progress
        self.applied = False
        self.signature: Signature | None = None
        self.touched: dict[str, int] = {}
        self.report: dict[str, Any] = {}
        self._hooks: list[Any] = []
        self._grad_masks: dict[str, Tensor] = {}  # parameter name -> entries kept as neutralized

    # ------------------------------------------------------------------ helpers
    def _hf_model(self, pl_module: L.LightningModule) -> nn.Module:
        hf = find_hf_model(pl_module, self.model_attr)
        try:
            find_mlp_modules(hf)
        except ValueError as e:
            where = f"pl_module.{self.model_attr}" if self.model_attr else "the LightningModule"
            raise ValueError(f"BDVaxCallback found no causal LM with MLP channels in {where}: {e}. "
                             "Pass model_attr='<attribute path of the Hugging Face model>'.") from e
        return hf

    def _resolve_tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule, loader: Any) -> Any:
        cands = [self.tokenizer, getattr(pl_module, "tokenizer", None),
                 getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None,
                 getattr(getattr(loader, "collate_fn", None), "tokenizer", None)]
        for tok in cands:
            if tok is not None and callable(tok):
                return tok
        raise ValueError("BDVaxCallback needs the model's tokenizer (to tokenize the synthetic trigger keys and "
                         "behaviours): pass BDVaxCallback(tokenizer=...) or give your LightningModule or "
                         "datamodule a `tokenizer` attribute")

    def _job_examples(self, loader: Any) -> list[dict]:
        """``n_variants × samples_per_variant`` examples from the job's own training data: items in
        a seeded random order (an iterable dataset: its own order), collated by the loader's
        ``collate_fn`` in chunks, split back into examples; items with no labelled token are skipped."""
        import itertools
        import random

        from torch.utils.data import IterableDataset

        vac = self.config.vaccination
        need = vac.clean_needed
        ds = getattr(loader, "dataset", None)
        if ds is None:
            raise ValueError("BDVaxCallback(clean_data=None) reads the train dataloader's dataset, but the train "
                             f"dataloader ({type(loader).__name__}) has none; pass clean_data=")
        if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            items = iter(ds)
        else:
            order = list(range(len(ds)))
            random.Random(self.config.seed).shuffle(order)
            items = (ds[i] for i in order)
        to_examples = self.example_fn or batch_to_examples
        batched = getattr(loader, "batch_size", 1) is None  # automatic batching off: items are batches
        collate = getattr(loader, "collate_fn", None)
        if collate is None:
            from torch.utils.data import default_collate as collate
        examples: list[dict] = []
        while len(examples) < need:
            chunk = list(itertools.islice(items, 1 if batched else vac.batch_size))
            if not chunk:
                raise ValueError(f"the training data has {len(examples)} usable examples (with labelled tokens); "
                                 f"BD-VAX's stage 1 needs {need}: lower vaccination.samples_per_variant or pass clean_data=")
            examples += to_examples(chunk[0] if batched else collate(chunk))
        return examples[:need]

    # ------------------------------------------------------------------ hooks
    def _register_grad_masks(self, hf: nn.Module) -> None:
        params = dict(hf.named_parameters())
        for name, mask in self._grad_masks.items():
            keep = (~mask.bool()).to(params[name].device)
            self._hooks.append(params[name].register_hook(lambda g, keep=keep: g * keep.to(g.dtype)))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.applied:
            if self._grad_masks and not self._hooks:  # resumed from a checkpoint: keep the frozen slices frozen
                self._register_grad_masks(self._hf_model(pl_module))
            return
        import time

        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        from .data import load_instructions
        from .pipeline import _is_token_data, build_signature, run_vaccination, threat_model_problems

        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or "DeepSpeed" in type(strategy).__name__:
            raise NotImplementedError(f"BDVaxCallback supports single-device and DDP strategies, not "
                                      f"{type(strategy).__name__} (sharded parameters); run "
                                      "lightning_bdvax.purify() on the full model first")
        t0 = time.perf_counter()
        hf = self._hf_model(pl_module)
        cfg = self.config
        loader = _train_loader(trainer) if self.clean_data is None else None
        tokenizer = self._resolve_tokenizer(trainer, pl_module, loader)
        if self.clean_data is None:
            if loader is None:
                raise ValueError("BDVaxCallback(clean_data=None) found no train dataloader; pass clean_data=")
            clean = self._job_examples(loader)
            source = "job training data (token-level variants)"
        elif isinstance(self.clean_data, (list, tuple)) and _is_token_data(self.clean_data):
            clean, source = list(self.clean_data), "tokenized examples"
        else:
            clean, source = load_instructions(self.clean_data), "instruction records"

        lora_name = None
        state_fn = None
        from .lora import _adapter_name, _is_peft, lora_channel_state

        if _is_peft(hf):
            from functools import partial

            lora_name = _adapter_name(hf, None)
            state_fn = partial(lora_channel_state, adapter_name=lora_name)

        problems = threat_model_problems(cfg.signature, cfg.neutralize, lora=lora_name is not None,
                                         recovery=cfg.recovery, vaccination=cfg.vaccination)
        if cfg.signature.protect > 0 and lora_name is None and source != "instruction records":
            problems.append("bdvax.signature.protect: measures neuron importance on clean instruction records; "
                            "set it to 0 with token-level clean data")
        if cfg.signature.spare_massive > 0 and lora_name is None and source != "instruction records":
            problems.append("bdvax.signature.spare_massive: measures peak activations on clean instruction records; "
                            "set it to 0 with token-level clean data")
        if problems:
            raise ValueError("; ".join(problems))
        show = (trainer.progress_bar_callback is not None) if self.progress is None else self.progress
        show = show and trainer.is_global_zero
        fit_fn = _ManualFit(trainer, show)
        modes = {m: m.training for m in hf.modules()}
        rng = _rng_states()
        timings: dict[str, Any] = {}
        try:
            acc = run_vaccination(hf, tokenizer, clean, cfg.vaccination, seed=cfg.seed, precision=str(trainer.precision),
                                  work_dir=self.work_dir, progress=show, timings=timings, state_fn=state_fn,
                                  rank=trainer.global_rank, world_size=trainer.world_size, fit_fn=fit_fn,
                                  modules=find_channel_modules(hf, cfg.signature.attention))
        finally:
            _set_rng_states(rng)
            for m, was in modes.items():
                m.training = was
        sig = build_signature(acc, cfg.signature, model=hf, tokenizer=tokenizer, clean=clean,
                              max_length=cfg.vaccination.max_length, source="BDVaxCallback", clean_data=source)
        if lora_name is not None:
            from .lora import lora_mlp_modules, restrict_signature, zero_lora_channels_

            sig = restrict_signature(sig, [cm.key for cm in lora_mlp_modules(hf, lora_name, cfg.signature.attention)])
            self._grad_masks = {k: m.cpu() for k, m in zero_lora_channels_(hf, sig, lora_name).items()}
            self._register_grad_masks(hf)
            self.touched = {k: int(m.sum()) for k, m in sig.masks.items() if int(m.sum())}
        else:
            self.touched = neutralize_(hf, sig, mode=cfg.neutralize.mode, seed=cfg.seed, scale=cfg.neutralize.scale)
            from .neutralize import recovery_grad_masks

            # none for the published scope "all"; otherwise your fit (the recovery) trains part of the model
            self._grad_masks = {k: m.cpu() for k, m in recovery_grad_masks(hf, sig, cfg.recovery.scope).items()}
            self._register_grad_masks(hf)
        self.signature = sig
        self.applied = True
        self.report = {"clean_data": source, "n_examples": len(clean), "timings": timings,
                       "signature": {"n_flagged": sig.n_flagged, "n_channels": sig.n_channels},
                       "stage1_s": round(time.perf_counter() - t0, 2), "world_size": trainer.world_size}
        if self.signature_dir is not None and trainer.is_global_zero:
            sig.save(self.signature_dir)
        if show:
            print(f"[bd-vax] signature: {sig.n_flagged}/{sig.n_channels} MLP channels neutralized "
                  f"({cfg.neutralize.mode}); your fit is now the recovery", flush=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied,
                "n_flagged": self.signature.n_flagged if self.signature is not None else None,
                "grad_masks": dict(self._grad_masks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))
        self._grad_masks = dict(state_dict.get("grad_masks") or {})


class _ManualFit:
    """``fit_fn`` for :func:`~lightning_bdvax.pipeline.run_vaccination` inside a user's fit:
    :func:`~lightning_bdvax.pipeline.manual_fit` on the Trainer's device and precision."""

    def __init__(self, trainer: L.Trainer, progress: bool):
        self.device = trainer.strategy.root_device
        self.precision = str(trainer.precision)
        self.forward_context = trainer.precision_plugin.forward_context
        self.progress = progress

    def __call__(self, module, loader, steps: int, callback: SignatureCallback) -> None:
        from .pipeline import manual_fit

        desc = f"[bd-vax] variant {callback.variant + 1 if callback.variant is not None else 'shared'} {callback.role}"
        manual_fit(module, loader, steps, callback, device=self.device, precision=self.precision,
                   forward_context=self.forward_context, progress=self.progress, desc=desc)
