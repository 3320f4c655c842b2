"""Where the MLP channels are, for each architecture.

BD-VAX scores and neutralizes *channels* of the MLP blocks. Channel ``j`` of a block is
intermediate neuron ``j``: the weights that write it (rows of ``gate_proj``/``up_proj`` in a
gated MLP, of ``c_fc``/``fc1``/``dense_h_to_4h`` in a plain one) and the weights that read it
(column ``j`` of ``down_proj``/``fc2``/``dense_4h_to_h``).

Every other part of the package (delta accumulation, neutralization of full weights and of
LoRA adapters, analysis) goes through :func:`find_mlp_modules` and :func:`channel_rows` /
:func:`set_channel_rows_`, so an architecture is supported as soon as it has an entry in
:data:`MLP_LAYOUTS`.

Known layouts
-------------
(family: projections writing channel ``j`` -> projection reading it)

- Llama, Mistral, Qwen2/3, Gemma 1/2/3: ``mlp.gate_proj``, ``mlp.up_proj`` -> ``mlp.down_proj``
- Phi-3 (fused): ``mlp.gate_up_proj`` rows ``j`` and ``I + j`` -> ``mlp.down_proj``
- GPT-2 (``Conv1D``, stored (in, out)): ``mlp.c_fc`` column ``j`` -> ``mlp.c_proj`` row ``j``
- StarCoder2, GPT-BigCode (same names, ``nn.Linear``): ``mlp.c_fc`` -> ``mlp.c_proj``
- GPT-NeoX/Pythia, Falcon, BLOOM: ``mlp.dense_h_to_4h`` -> ``mlp.dense_4h_to_h``
- Phi-1/2: ``mlp.fc1`` -> ``mlp.fc2``
- GPT-J: ``mlp.fc_in`` -> ``mlp.fc_out``
- OPT: ``layers.N.fc1`` -> ``layers.N.fc2`` (the decoder layer is the container)

Whether a weight is stored ``(out, in)`` (``nn.Linear``) or ``(in, out)`` (``transformers``'
``Conv1D``) is read from the module's type, so ``c_fc``/``c_proj`` is right both for GPT-2 and
for StarCoder2; :attr:`MLPLayout.transposed` only decides for module types that are neither.
A peft-wrapped projection is looked through (its ``base_layer`` holds the weight). Containers
inside a vision/audio tower of a multimodal model (any name component matching
:data:`DEFAULT_EXCLUDE`, e.g. Gemma 3's ``vision_tower``) are skipped: text-only fine-tunes
never update them.

Adding an architecture
----------------------
Describe its MLP with an :class:`MLPLayout` and either pass it for one call or register it::

    from lightning_bdvax.arch import MLPLayout, MLP_LAYOUTS, find_mlp_modules

    # a block ``model.blocks.N.ffn`` with ``w_in`` (hidden -> I) and ``w_out`` (I -> hidden)
    layout = MLPLayout("my-arch", mlp=r"ffn", out_projs=("w_in",), in_projs=("w_out",))
    find_mlp_modules(model, layouts=[layout])   # just this call
    MLP_LAYOUTS.append(layout)                  # every call in this process (neutralize_, the pipeline, ...)

The fields are: ``mlp``, a regex matched against the *last* component of the MLP container's
module name (or the last two, when the regex contains ``\\.``, as for OPT's ``layers\\.\\d+``);
``out_projs``, the projections whose *output* features are the intermediate channels (each
contributes rows; a gated MLP lists gate and up); ``in_projs``, the projection whose *input*
features are the channels (down); ``fused``, how many row blocks one out projection packs
(2 for Phi-3's ``gate_up_proj``: channel ``j`` = rows ``j`` and ``I + j``); ``transposed``,
for custom module types that store their weight ``(in, out)``. A layout only matches when
every named projection exists with a 2-D ``weight`` and all of them agree on the number of
channels. When nothing matches, :class:`ArchitectureError` lists the linear module names it
saw and, when it can, a suggested :class:`MLPLayout`.
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
    "DEFAULT_EXCLUDE",
    "ChannelModule",
    "find_mlp_modules",
    "channel_rows",
    "set_channel_rows_",
    "channel_param_names",
    "AttentionLayout",
    "ATTENTION_LAYOUTS",
    "find_attention_modules",
    "find_channel_modules",
    "channel_module_index",
]


class ArchitectureError(ValueError):
    """The model's MLP channels cannot be located."""


@dataclass(frozen=True)
class MLPLayout:
    """How one family lays out its MLP.

    Args:
        name: family name used in messages.
        mlp: regex matched (``re.fullmatch``) against the *last* component of the MLP
            container's name (the last two when the regex contains ``\\.``).
        out_projs: projections whose output features are the intermediate channels.
        in_projs: projections whose input features are the intermediate channels.
        fused: row blocks per out projection (2 for a fused gate+up projection).
        transposed: weights stored as (in_features, out_features), for module types that are
            neither ``nn.Linear`` (never transposed) nor ``transformers``' ``Conv1D`` (always).
    """

    name: str
    mlp: str
    out_projs: tuple[str, ...]
    in_projs: tuple[str, ...]
    fused: int = 1
    transposed: bool = False

    def __post_init__(self) -> None:
        if not self.out_projs or not self.in_projs:
            raise ValueError(f"MLPLayout {self.name!r} needs at least one out and one in projection")
        if self.fused < 1:
            raise ValueError(f"MLPLayout {self.name!r}: fused must be >= 1, got {self.fused}")
        re.compile(self.mlp)


MLP_LAYOUTS: list[MLPLayout] = [
    MLPLayout("gated (llama/mistral/qwen/gemma)", r"mlp", ("gate_proj", "up_proj"), ("down_proj",)),
    MLPLayout("fused gated (phi3)", r"mlp", ("gate_up_proj",), ("down_proj",), fused=2),
    MLPLayout("gpt2 / starcoder2 / gpt-bigcode", r"mlp", ("c_fc",), ("c_proj",), transposed=True),
    MLPLayout("gpt-neox / falcon / bloom", r"mlp", ("dense_h_to_4h",), ("dense_4h_to_h",)),
    MLPLayout("phi-1/2", r"mlp", ("fc1",), ("fc2",)),
    MLPLayout("gpt-j", r"mlp", ("fc_in",), ("fc_out",)),
    MLPLayout("opt / decoder layer fc", r"layers\.\d+", ("fc1",), ("fc2",)),
]

#: Module-name components matching this regex (``re.search``) are not searched for MLPs:
#: vision/audio towers and projectors of multimodal models.
DEFAULT_EXCLUDE = r"vision|visual|image|audio|speech|multi_modal|mm_projector"


@dataclass(frozen=True)
class ChannelModule:
    """One projection of one MLP block (or, with ``kind == "attention"``, one attention
    projection on its own), seen as a bank of channels.

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
    #: ``"mlp"`` or ``"attention"`` (:func:`find_attention_modules`; then ``block`` is the projection itself).
    kind: str = "mlp"

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


_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def _weight_of(module: nn.Module) -> Tensor | None:
    w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) and w.dim() == 2 else None


def _base_layer(module: nn.Module) -> nn.Module:
    # peft wraps a Linear in a LoraLayer that keeps the original as ``base_layer``.
    return getattr(module, "base_layer", module)


def _is_transposed(module: nn.Module, default: bool) -> bool:
    """Whether ``module`` stores its weight (in, out): never for ``nn.Linear`` (and subclasses such
    as Falcon's), always for ``transformers``' ``Conv1D``, else the layout's ``default``."""
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return True
    return default


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _container_matches(layout: MLPLayout, name: str) -> bool:
    parts = name.split(".")
    tail = ".".join(parts[-2:]) if r"\." in layout.mlp else parts[-1]
    return re.fullmatch(layout.mlp, tail) is not None


def _layer_index(name: str) -> int | None:
    nums = _LAYER_RE.findall(name)
    return int(nums[-1]) if nums else None


def _match(container: nn.Module, layout: MLPLayout) -> tuple[int, dict[str, bool]] | str | None:
    """``(n_channels, {proj: transposed})`` when ``layout`` fits ``container``; a reason string
    when every projection exists but their shapes disagree; None when a projection is missing."""
    projs = layout.out_projs + layout.in_projs
    mods = {}
    for p in projs:
        m = getattr(container, p, None)
        if not isinstance(m, nn.Module):
            return None
        m = _base_layer(m)
        if _weight_of(m) is None:
            return None
        mods[p] = m
    trans = {p: _is_transposed(m, layout.transposed) for p, m in mods.items()}
    # (channels, other) per projection, in (out, in) or (in, out) storage as detected.
    ns, others = [], []
    for p in layout.out_projs:
        w = _weight_of(mods[p])
        rows, other = (w.shape[1], w.shape[0]) if trans[p] else (w.shape[0], w.shape[1])
        if rows % layout.fused:
            return f"{p} has {rows} output features, not a multiple of fused={layout.fused}"
        ns.append(rows // layout.fused)
        others.append(other)
    for p in layout.in_projs:
        w = _weight_of(mods[p])
        cols, other = (w.shape[0], w.shape[1]) if trans[p] else (w.shape[1], w.shape[0])
        ns.append(cols)
        others.append(other)
    if len(set(ns)) != 1:
        shapes = {p: tuple(_weight_of(m).shape) for p, m in mods.items()}
        return f"channel counts disagree {dict(zip(projs, ns))} (weights {shapes})"
    if len(set(others)) != 1:
        return f"hidden sizes disagree {dict(zip(projs, others))}"
    return ns[0], trans


def _suggest_layout(named: dict[str, nn.Module], exclude: re.Pattern | None) -> str | None:
    """A guessed ``MLPLayout(...)`` from the first container whose linear children look like an
    MLP: some map hidden -> I and some I -> hidden with I != hidden."""
    for cname, container in named.items():
        if not cname or (exclude is not None and any(exclude.search(c) for c in cname.split("."))):
            continue
        kids = [(n, _base_layer(m)) for n, m in container.named_children()]
        kids = [(n, tuple(_weight_of(m).shape)) for n, m in kids if _weight_of(m) is not None]
        for _, (h, i) in kids:  # a reader has (hidden, I)
            if h == i:
                continue
            outs = [n for n, s in kids if s == (i, h)]
            ins = [n for n, s in kids if s == (h, i)]
            if outs and ins and i > h:
                last = cname.rsplit(".", 1)[-1]
                mlp = r"layers\.\d+" if last.isdigit() else re.escape(last)
                return (f"MLPLayout({type(container).__name__!r}, mlp=r{mlp!r}, "
                        f"out_projs={tuple(outs)!r}, in_projs={tuple(ins)!r})")
    return None


def find_mlp_modules(
    model: nn.Module, layouts: Sequence[MLPLayout] | None = None, exclude: str | None = DEFAULT_EXCLUDE
) -> list[ChannelModule]:
    """All MLP projections of ``model`` as :class:`ChannelModule` s, in layer order.

    Works on a plain ``transformers`` model and on a peft-wrapped one (the names returned are
    then the peft module names, whose ``base_layer`` holds the weight).

    Args:
        layouts: the layouts to try, in order (default :data:`MLP_LAYOUTS`); the first that
            fits a container wins.
        exclude: regex; containers with a name component matching it are skipped
            (default :data:`DEFAULT_EXCLUDE`: vision/audio towers); None searches everything.

    Raises:
        ArchitectureError: no known MLP layout matches; the message lists what was seen and
            how to add a layout.
    """
    layouts = list(layouts) if layouts is not None else list(MLP_LAYOUTS)
    excl = re.compile(exclude) if exclude else None
    named = dict(model.named_modules())
    found: list[ChannelModule] = []
    near: list[str] = []
    n_blocks = 0
    for container_name, container in named.items():
        if not container_name:
            continue
        if excl is not None and any(excl.search(c) for c in container_name.split(".")):
            continue
        for layout in layouts:
            if not _container_matches(layout, container_name):
                continue
            res = _match(container, layout)
            if res is None:
                continue
            if isinstance(res, str):
                near.append(f"{container_name} ({layout.name}): {res}")
                continue
            n, trans = res
            layer = _layer_index(container_name)
            layer = n_blocks if layer is None else layer
            for proj in layout.out_projs:
                found.append(ChannelModule(f"{container_name}.{proj}", container_name, layer, proj, "out",
                                           n, layout.fused, trans[proj]))
            for proj in layout.in_projs:
                found.append(ChannelModule(f"{container_name}.{proj}", container_name, layer, proj, "in",
                                           n, 1, trans[proj]))
            n_blocks += 1
            break
    if not found:
        linear = [n for n, m in named.items() if n and _weight_of(_base_layer(m)) is not None
                  and not n.endswith(".base_layer")]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        msg = [f"no MLP modules found in {type(model).__name__}.",
               f"Known layouts: {'; '.join(f'{l.name} (container {l.mlp!r}: {l.out_projs} -> {l.in_projs})' for l in layouts)}.",
               f"Module names seen with a 2-D weight: {', '.join(leaves[:30])}"
               + (f" (+{len(leaves) - 30} more)" if len(leaves) > 30 else "")
               + (f"; e.g. {', '.join(linear[:6])}" if linear else "") + "."]
        if near:
            msg.append(f"Layouts whose projections exist but whose shapes disagree: {'; '.join(near[:3])}.")
        hint = _suggest_layout(named, excl)
        msg.append("To add a mapping, describe the MLP with lightning_bdvax.arch.MLPLayout(name, mlp=<regex for "
                   "the MLP container's last name component>, out_projs=<projections writing the intermediate "
                   "channels>, in_projs=<projection reading them>) and pass it as "
                   "find_mlp_modules(model, layouts=[...]) or append it to lightning_bdvax.arch.MLP_LAYOUTS "
                   "(see the module docstring)"
                   + (f"; a guess for this model: {hint}" if hint else "") + ".")
        raise ArchitectureError(" ".join(msg))
    return found


def channel_rows(weight: Tensor, cm: ChannelModule) -> Tensor:
    """``weight`` as a ``(n_channels, d)`` matrix: row ``j`` holds every weight of channel ``j``.

    Out projection: row ``j`` is output row ``j`` (for ``fused`` blocks, rows ``j, C + j, ...``
    concatenated); in projection: input column ``j``. Returns a view when the layout allows it
    (use :func:`set_channel_rows_` to write), a copy for fused projections.
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
    """In place: set the weights of channels ``idx`` to ``values`` (shape ``(len(idx), d)`` as laid
    out by :func:`channel_rows`, or a scalar; moved to ``weight``'s device). The inverse of
    :func:`channel_rows`."""
    idx = torch.as_tensor(idx, dtype=torch.long, device=weight.device).flatten()
    with torch.no_grad():
        if cm.role == "out" and cm.fused > 1:
            w = weight if not cm.transposed else weight.t()  # (fused·C, d) view
            c = cm.n_channels
            if isinstance(values, Tensor):
                vals = values.to(device=weight.device, dtype=weight.dtype).reshape(len(idx), cm.fused, -1)
            for b in range(cm.fused):
                w[idx + b * c] = vals[:, b] if isinstance(values, Tensor) else values
            return
        rows = channel_rows(weight, cm)  # a view of weight
        rows[idx] = values.to(device=weight.device, dtype=weight.dtype) if isinstance(values, Tensor) else values


def channel_param_names(modules: Iterable[ChannelModule]) -> list[str]:
    """Parameter names (``<module>.weight``) covered by ``modules``."""
    return [cm.weight_name for cm in modules]


# ----------------------------------------------------------------------------------------------
# Attention projections (an extension beyond the published method, ``signature.attention``)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionLayout:
    """How one family names its attention projections, for ``signature.attention``.

    Unlike an MLP block, an attention block's projections do not share one bank of channels
    (with grouped-query attention ``q_proj`` has more outputs than ``k_proj``/``v_proj``), so
    every projection is its own bank: the output features of each of ``out_projs`` (a row of the
    weight) and the input features of each of ``in_projs`` (a column of ``o_proj``).
    """

    name: str
    container: str
    out_projs: tuple[str, ...]
    in_projs: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.out_projs and not self.in_projs:
            raise ValueError(f"AttentionLayout {self.name!r} names no projection")
        re.compile(self.container)


ATTENTION_LAYOUTS: list[AttentionLayout] = [
    AttentionLayout("q/k/v + o (llama/mistral/qwen/gemma/opt/phi-2)", r"self_attn|attention|attn",
                    ("q_proj", "k_proj", "v_proj"), ("o_proj", "out_proj", "dense")),
]


def find_attention_modules(model: nn.Module, layouts: Sequence[AttentionLayout] | None = None,
                           exclude: str | None = DEFAULT_EXCLUDE) -> list[ChannelModule]:
    """The attention projections of ``model`` as :class:`ChannelModule` s, one channel bank each.

    ``q_proj``/``k_proj``/``v_proj`` are ``"out"`` banks (a channel is an output feature), ``o_proj``
    an ``"in"`` bank (a channel is an input feature: one dimension of one head's output). Each
    projection is its own block, so :func:`lightning_bdvax.signature.select_channels` picks its
    channels alone under every selection rule. Only ``nn.Linear`` projections with separate q, k
    and v are found (a fused ``c_attn``/``qkv_proj`` is not); returns ``[]`` when there is none.
    """
    layouts = list(layouts) if layouts is not None else list(ATTENTION_LAYOUTS)
    excl = re.compile(exclude) if exclude else None
    found: list[ChannelModule] = []
    for cname, container in model.named_modules():
        if not cname or (excl is not None and any(excl.search(c) for c in cname.split("."))):
            continue
        last = cname.rsplit(".", 1)[-1]
        for layout in layouts:
            if re.fullmatch(layout.container, last) is None:
                continue
            mods = {p: _base_layer(getattr(container, p)) for p in layout.out_projs + layout.in_projs
                    if isinstance(getattr(container, p, None), nn.Module)}
            mods = {p: m for p, m in mods.items() if isinstance(m, nn.Linear)}
            if not all(p in mods for p in layout.out_projs) or not any(p in mods for p in layout.in_projs):
                continue
            layer = _layer_index(cname)
            layer = -1 if layer is None else layer
            for p in layout.out_projs:
                found.append(ChannelModule(f"{cname}.{p}", f"{cname}.{p}", layer, p, "out", mods[p].out_features,
                                           kind="attention"))
            for p in layout.in_projs:
                if p in mods:
                    found.append(ChannelModule(f"{cname}.{p}", f"{cname}.{p}", layer, p, "in", mods[p].in_features,
                                               kind="attention"))
                    break  # one output projection per block
            break
    return found


def find_channel_modules(model: nn.Module, attention: bool = False) -> list[ChannelModule]:
    """The channel banks BD-VAX scores: the MLP projections (:func:`find_mlp_modules`), plus the
    attention projections (:func:`find_attention_modules`) when ``attention`` is set.

    Raises:
        ArchitectureError: no MLP found, or ``attention`` is set and no attention projection is.
    """
    mods = find_mlp_modules(model)
    if attention:
        attn = find_attention_modules(model)
        if not attn:
            raise ArchitectureError(
                f"signature.attention is set but no attention projections were found in {type(model).__name__} "
                f"(known layouts: {'; '.join(f'{l.container!r}: {l.out_projs} + {l.in_projs}' for l in ATTENTION_LAYOUTS)}); "
                "append an AttentionLayout to lightning_bdvax.arch.ATTENTION_LAYOUTS")
        mods = mods + attn
    return mods


def channel_module_index(model: nn.Module) -> dict[str, ChannelModule]:
    """Every channel bank of ``model`` (MLP and attention) by key, for looking up a signature's modules."""
    return {cm.key: cm for cm in find_mlp_modules(model) + find_attention_modules(model)}
