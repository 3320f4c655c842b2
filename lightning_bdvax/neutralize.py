"""Stage 2a: neutralize the flagged channels.

Full model: re-initialise (Xavier-uniform, as published) or zero the rows of the projections
that write a flagged channel and the columns of the one that reads it; biases of flagged
output channels are zeroed.

LoRA adapters: see :func:`lightning_bdvax.lora.zero_lora_channels_`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .arch import ChannelModule, channel_module_index, set_channel_rows_
from .signature import Signature

__all__ = ["NEUTRALIZE_MODES", "RECOVERY_SCOPES", "neutralize_", "recovery_grad_masks", "xavier_bound"]

NEUTRALIZE_MODES = ("reinit", "zero")


def xavier_bound(weight: torch.Tensor, gain: float = 1.0) -> float:
    """Xavier-uniform bound ``gain·sqrt(6 / (fan_in + fan_out))`` of a 2-D weight."""
    fan_out, fan_in = weight.shape
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


def _channel_bias(mod: nn.Module, cm: ChannelModule) -> torch.Tensor | None:
    """The bias of an out projection (one entry per channel, per fused block); None otherwise."""
    bias = getattr(mod, "bias", None)
    return bias if cm.role == "out" and isinstance(bias, torch.Tensor) else None


def _set_bias_channels_(bias: torch.Tensor, cm: ChannelModule, idx: torch.Tensor, value) -> None:
    """In place: set the bias entries of channels ``idx`` (every fused block's copy) to ``value``."""
    if cm.fused > 1:
        bias.view(cm.fused, cm.n_channels)[:, idx] = value
    else:
        bias[idx] = value


@torch.no_grad()
def neutralize_(model: nn.Module, signature: Signature, mode: str = "reinit", seed: int = 0,
                scale: float = 1.0) -> dict[str, int]:
    """Neutralize ``signature``'s channels of ``model`` in place.

    Args:
        mode: ``"reinit"`` (Xavier-uniform × ``scale``) or ``"zero"``.
        seed: seed of the re-initialisation draw (a private generator; global RNG untouched).

    Returns:
        number of channels touched per module.
    """
    if mode not in NEUTRALIZE_MODES:
        raise ValueError(f"neutralize mode must be one of {NEUTRALIZE_MODES}, got {mode!r}")
    modules = channel_module_index(model)  # MLP banks, and attention banks (signature.attention)
    unknown = set(signature.masks) - set(modules)
    if unknown:
        raise ValueError(f"signature names modules the model lacks, e.g. {sorted(unknown)[0]}: wrong model?")
    named = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    touched = {}
    for key, mask in signature.masks.items():
        cm: ChannelModule = modules[key]
        if mask.numel() != cm.n_channels:
            raise ValueError(f"{key}: signature has {mask.numel()} channels, model has {cm.n_channels}")
        idx = mask.nonzero().flatten()
        if idx.numel() == 0:
            continue
        mod = getattr(named[key], "base_layer", named[key])
        w = mod.weight
        if mode == "zero":
            set_channel_rows_(w.data, cm, idx, 0.0)
        else:
            d = w.numel() // cm.n_channels
            bound = xavier_bound(w) * scale
            vals = (torch.rand((idx.numel(), d), generator=gen) * 2 - 1) * bound
            set_channel_rows_(w.data, cm, idx, vals.to(w.dtype))
        bias = _channel_bias(mod, cm)
        if bias is not None:
            _set_bias_channels_(bias.data, cm, idx, 0)
        touched[key] = int(idx.numel())
    return touched


RECOVERY_SCOPES = ("all", "unflagged", "flagged")


def recovery_scope_problem(scope, field: str = "recovery scope") -> str | None:
    """The message for an unknown recovery scope named by ``field`` (``None`` when it is known):
    one wording for every place that checks it (config validation, the CLI, the dataclass)."""
    if scope in RECOVERY_SCOPES:
        return None
    return f"{field}: expected one of {', '.join(RECOVERY_SCOPES)}, got {scope!r}"


def recovery_grad_masks(model: nn.Module, signature: Signature, scope: str = "all") -> dict[str, torch.Tensor]:
    """Gradient masks (``{parameter name: bool}``, True = keep the current value) that restrict the
    recovery fine-tune to part of the model, for :class:`~lightning_bdvax.modules.RecoveryModule`.

    ``"all"``: no masks (the published recovery). ``"unflagged"``: the flagged channels' slices
    stay as neutralized (zero), everything else trains. ``"flagged"``: only the flagged channels'
    slices train; every other parameter keeps its value.
    """
    if problem := recovery_scope_problem(scope):
        raise ValueError(problem)
    if scope == "all":
        return {}
    modules = channel_module_index(model)  # MLP banks, and attention banks (signature.attention)
    named = dict(model.named_modules())
    names = {id(p): n for n, p in model.named_parameters()}
    flagged: dict[str, torch.Tensor] = {}
    for key, mask in signature.masks.items():
        cm = modules[key]
        idx = mask.nonzero().flatten()
        mod = getattr(named[key], "base_layer", named[key])
        m = torch.zeros_like(mod.weight, dtype=torch.bool)
        if idx.numel():
            set_channel_rows_(m, cm, idx, True)
        flagged[names[id(mod.weight)]] = m
        bias = _channel_bias(mod, cm)
        if bias is not None:
            b = torch.zeros_like(bias, dtype=torch.bool)
            if idx.numel():
                _set_bias_channels_(b, cm, idx, True)
            flagged[names[id(bias)]] = b
    if scope == "unflagged":
        return {n: m for n, m in flagged.items() if m.any()}
    return {n: ~flagged[n] if n in flagged else torch.ones_like(p, dtype=torch.bool)
            for n, p in model.named_parameters() if p.requires_grad}
