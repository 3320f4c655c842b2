"""Where the MLP channels are, for each architecture.

BD-VAX scores and neutralizes *channels* of the MLP blocks. Channel ``j`` of a block is
intermediate neuron ``j``: the weights that write it (rows of ``gate_proj``/``up_proj`` in a
gated MLP, of ``c_fc``/``fc1``/``dense_h_to_4h`` in a plain one) and the weights that read it
(column ``j`` of ``down_proj``/``fc2``/``dense_4h_to_h``).

Every other part of the package (delta accumulation, neutralization of full weights and of
LoRA adapters, analysis) goes through :func:`find_mlp_modules` and :func:`channel_rows`, so an
architecture is supported as soon as it has an entry in :data:`MLP_LAYOUTS`.

Adding an architecture
----------------------
Append a :class:`MLPLayout` to :data:`MLP_LAYOUTS` (or pass ``layouts=`` to
:func:`find_mlp_modules`): give the MLP submodule's name suffix (``"mlp"``), the names of the
projections that write the intermediate activation (role ``"out"``) and of the one that reads
it (role ``"in"``), how many row blocks a fused projection packs (2 for Phi-3's
``gate_up_proj``), and whether weights are stored transposed (GPT-2 ``Conv1D``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ArchitectureError",
    "MLPLayout",
    "MLP_LAYOUTS",
    "ChannelModule",
    "find_mlp_modules",
    "channel_rows",
    "set_channel_rows_",
    "channel_param_names",
]


class ArchitectureError(ValueError):
    """The model's MLP channels cannot be located."""


@dataclass(frozen=True)
class MLPLayout:
    """How one family lays out its MLP.

    Args:
        name: family name used in messages.
        mlp: regex matched against the *last* component of the MLP container's name.
        out_projs: projections whose output features are the intermediate channels.
        in_projs: projections whose input features are the intermediate channels.
        fused: row blocks per out projection (2 for a fused gate+up projection).
        transposed: weights stored as (in_features, out_features) (GPT-2 ``Conv1D``).
    """

    name: str
    mlp: str
    out_projs: tuple[str, ...]
    in_projs: tuple[str, ...]
    fused: int = 1
    transposed: bool = False


MLP_LAYOUTS: list[MLPLayout] = [
    MLPLayout("gated (llama/mistral/qwen/gemma)", r"mlp", ("gate_proj", "up_proj"), ("down_proj",)),
    MLPLayout("fused gated (phi3)", r"mlp", ("gate_up_proj",), ("down_proj",), fused=2),
    MLPLayout("gpt2", r"mlp", ("c_fc",), ("c_proj",), transposed=True),
    MLPLayout("gpt-neox", r"mlp", ("dense_h_to_4h",), ("dense_4h_to_h",)),
    MLPLayout("opt / decoder layer fc", r"layers\.\d+", ("fc1",), ("fc2",)),
]


@dataclass(frozen=True)
class ChannelModule:
    """One projection of one MLP block, seen as a bank of channels.

    ``role == "out"``: channel ``j`` is output feature ``j`` (a row of an ``nn.Linear`` weight).
    ``role == "in"``: channel ``j`` is input feature ``j`` (a column of an ``nn.Linear`` weight).
    ``fused`` row blocks: channel ``j`` spans rows ``j, j + C, ...`` of the weight.
    ``transposed``: the weight is stored (in, out) as in GPT-2's ``Conv1D``.
    """

    name: str
    block: str
    layer: int
    proj: str
    role: str
    n_channels: int
    fused: int = 1
    transposed: bool = False

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias"

    @property
    def key(self) -> str:
        """Short stable identifier, e.g. ``"model.layers.3.mlp.gate_proj"``."""
        return self.name


_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")


def _weight_of(module: nn.Module) -> Tensor | None:
    w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) and w.dim() == 2 else None


def _base_layer(module: nn.Module) -> nn.Module:
    # peft wraps a Linear in a LoraLayer that keeps the original as ``base_layer``.
    return getattr(module, "base_layer", module)


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def find_mlp_modules(
    model: nn.Module, layouts: Sequence[MLPLayout] | None = None
) -> list[ChannelModule]:
    """All MLP projections of ``model`` as :class:`ChannelModule` s, in layer order.

    Works on a plain ``transformers`` model and on a peft-wrapped one (the names returned are
    then the peft module names, whose ``base_layer`` holds the weight).

    Raises:
        ArchitectureError: no known MLP layout matches; the message lists what was seen.
    """
    layouts = list(layouts) if layouts is not None else MLP_LAYOUTS
    named = dict(model.named_modules())
    found: list[ChannelModule] = []
    for container_name, container in named.items():
        if not container_name:
            continue
        last = container_name.rsplit(".", 1)[-1]
        for layout in layouts:
            # For layouts whose container is the decoder layer itself (OPT), match the tail.
            tail = ".".join(container_name.split(".")[-2:]) if r"\." in layout.mlp else last
            if not re.fullmatch(layout.mlp, tail):
                continue
            outs = [getattr(container, p, None) for p in layout.out_projs]
            ins = [getattr(container, p, None) for p in layout.in_projs]
            if any(m is None for m in outs + ins):
                continue
            mods = [_base_layer(m) for m in outs + ins]
            weights = [_weight_of(m) for m in mods]
            if any(w is None for w in weights):
                continue
            w_out, w_in = weights[0], weights[len(outs)]
            if layout.transposed:
                n = w_out.shape[1] // layout.fused
                n_in = w_in.shape[0]
            else:
                n = w_out.shape[0] // layout.fused
                n_in = w_in.shape[1]
            if n != n_in:
                continue
            m = _LAYER_RE.search(container_name + ".")
            layer = int(m.group(1)) if m else len({c.block for c in found})
            for proj in layout.out_projs:
                found.append(
                    ChannelModule(f"{container_name}.{proj}", container_name, layer, proj, "out",
                                  n, layout.fused, layout.transposed)
                )
            for proj in layout.in_projs:
                found.append(
                    ChannelModule(f"{container_name}.{proj}", container_name, layer, proj, "in",
                                  n, 1, layout.transposed)
                )
            break
    if not found:
        seen = sorted({n.rsplit(".", 1)[-1] for n, m in named.items() if _weight_of(m) is not None})
        raise ArchitectureError(
            f"no MLP modules found in {type(model).__name__}: known layouts are "
            f"{', '.join(l.name for l in layouts)}; linear module names seen: {', '.join(seen[:20])}. "
            "Add an MLPLayout to lightning_bdvax.arch.MLP_LAYOUTS (see its docstring)."
        )
    return found


def channel_rows(weight: Tensor, cm: ChannelModule) -> Tensor:
    """``weight`` as a ``(n_channels, d)`` matrix: row ``j`` holds every weight of channel ``j``.

    Returns a view when the layout allows it, otherwise a copy (fused projections).
    """
    out_dim_first = not cm.transposed  # Linear: (out, in); Conv1D: (in, out)
    if cm.role == "out":
        w = weight if out_dim_first else weight.t()
        if cm.fused == 1:
            return w
        c = cm.n_channels
        return w.reshape(cm.fused, c, -1).permute(1, 0, 2).reshape(c, -1)
    # role == "in": channel j is input feature j
    return weight.t() if out_dim_first else weight


def set_channel_rows_(weight: Tensor, cm: ChannelModule, idx: Tensor, values: Tensor | float) -> None:
    """In place: set the weights of channels ``idx`` to ``values`` (shape ``(len(idx), d)`` or scalar)."""
    with torch.no_grad():
        if cm.role == "out" and cm.fused > 1:
            w = weight if not cm.transposed else weight.t()
            blocks = w.view(cm.fused, cm.n_channels, -1)
            if isinstance(values, Tensor):
                values = values.reshape(len(idx), cm.fused, -1).permute(1, 0, 2)
            blocks[:, idx, :] = values
            return
        rows = channel_rows(weight, cm)
        rows[idx] = values


def channel_param_names(modules: Iterable[ChannelModule]) -> list[str]:
    """Parameter names (``<module>.weight``) covered by ``modules``."""
    return [cm.weight_name for cm in modules]
