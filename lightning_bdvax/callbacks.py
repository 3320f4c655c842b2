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

from .arch import ChannelModule, channel_rows, find_mlp_modules
from .neutralize import NEUTRALIZE_MODES, neutralize_
from .signature import Signature, SignatureAccumulator

__all__ = ["SignatureCallback", "NeutralizeCallback", "find_hf_model", "mlp_channel_state"]


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
    """Channel-row fp32 copies of every tracked projection's weight."""
    named = dict(model.named_modules())
    out = {}
    for cm in modules:
        mod = named[cm.key]
        w = getattr(mod, "base_layer", mod).weight
        out[cm.key] = channel_rows(w.detach(), cm).float().clone()
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
        found = {cm.key: cm for cm in find_mlp_modules(hf)}
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
