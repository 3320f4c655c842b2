"""The backdoor signature: streaming per-channel statistics, scoring and selection.

For variant ``i`` the update of channel ``j`` of an MLP projection is
``Δ_ij = (θ_bd_i − θ_clean_i)[channel j]``. The published score is

    s_j = mean_i ‖Δ_ij‖₂ + λ · mean_{i<l} max(0, cos(Δ_ij, Δ_lj))

Streaming (the default, ``pairwise="stream"``)
    Keeps, per channel, the sum of norms and the sum of unit vectors ``S = Σ_i Δ_ij/‖Δ_ij‖``.
    The mean pairwise cosine is then ``(‖S‖² − N) / (N (N − 1))`` exactly, for any N, with
    memory the size of the MLP weights however large N grows. It is the mean of the *unclipped*
    cosines: a negative pair lowers the score instead of counting as zero.

Exact (``pairwise="exact"``)
    Keeps every unit vector and computes ``mean max(0, cos)`` as published. Memory grows with N;
    it is the reference the tests compare against.

Per-variant norm sums and ``‖S_n‖²`` after each variant are also kept (a few floats per channel
per variant), so the score at every ``n ≤ N`` is available without more fine-tunes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from .arch import ChannelModule

__all__ = ["SignatureAccumulator", "Signature", "score_channels", "select_channels", "spare_important_neurons"]

_EPS = 1e-12


class SignatureAccumulator:
    """Running per-channel statistics of variant deltas; memory independent of N.

    Args:
        modules: the MLP projections to track (from :func:`lightning_bdvax.arch.find_mlp_modules`).
        pairwise: ``"stream"`` (sum of unit vectors, constant memory) or ``"exact"``
            (keep every unit vector; published clipped cosine).

    Updates arrive from fits (see :class:`lightning_bdvax.callbacks.SignatureCallback`): each
    variant's backdoor-fit update and clean-fit update are paired by :meth:`add_update`; a
    ``shared`` clean update, when given, serves every variant.
    """

    def __init__(self, modules: Iterable[ChannelModule], pairwise: str = "stream"):
        if pairwise not in ("stream", "exact"):
            raise ValueError(f"pairwise must be 'stream' or 'exact', got {pairwise!r}")
        self.modules = {cm.key: cm for cm in modules}
        if not self.modules:
            raise ValueError("no modules to track")
        self.pairwise = pairwise
        self.n = 0
        self.norm_sum: dict[str, Tensor] = {}
        self.unit_sum: dict[str, Tensor] = {}
        self.norms_per_variant: dict[str, list[Tensor]] = {k: [] for k in self.modules}
        self.sq_sum_per_variant: dict[str, list[Tensor]] = {k: [] for k in self.modules}
        self.units: dict[str, list[Tensor]] = {k: [] for k in self.modules}
        #: per variant, the norm of each channel's update in the clean counterpart fit (how far
        #: an ordinary fine-tune moves the channel); used by ``scores(clean_normalize=True)``.
        self.clean_norms_per_variant: dict[str, list[Tensor]] = {k: [] for k in self.modules}
        self.variants_done: list[int] = []
        self._pending: dict[int, dict[str, dict[str, Tensor]]] = {}
        self._shared_clean: dict[str, Tensor] | None = None

    # -------------------------------------------------------------- accumulation
    def add_update(self, variant: int | None, role: str, update: Mapping[str, Tensor]) -> bool:
        """Record one fit's update (channel rows, fp32). Returns True when a variant completed.

        ``role`` is ``"backdoor"`` or ``"clean"``; ``variant=None`` with ``role="clean"`` sets the
        shared clean counterpart used by every variant.
        """
        if role not in ("backdoor", "clean"):
            raise ValueError(f"role must be 'backdoor' or 'clean', got {role!r}")
        if variant is None:
            if role != "clean":
                raise ValueError("only a clean update can be shared (variant=None)")
            self._shared_clean = dict(update)
            return False
        if variant in self.variants_done:
            raise ValueError(f"variant {variant} was already accumulated")
        slot = self._pending.setdefault(variant, {})
        slot[role] = dict(update)
        clean = slot.get("clean", self._shared_clean)
        if "backdoor" in slot and clean is not None:
            delta = {k: slot["backdoor"][k] - clean[k] for k in self.modules}
            clean_norms = {k: clean[k].float().norm(dim=1) for k in self.modules}
            del self._pending[variant]
            self.add_delta(delta, clean_norms)
            self.variants_done.append(variant)
            return True
        return False

    @torch.no_grad()
    def add_delta(self, delta: Mapping[str, Tensor], clean_norms: Mapping[str, Tensor] | None = None) -> None:
        """Add one variant's Δ (``{module key: (C, d) tensor}``) and, optionally, the per-channel
        norms of its clean counterpart's update (``{module key: (C,) tensor}``)."""
        missing = set(self.modules) - set(delta)
        if missing:
            raise KeyError(f"delta lacks modules: {sorted(missing)[:3]}...")
        if clean_norms is not None:
            missing = set(self.modules) - set(clean_norms)
            if missing:
                raise KeyError(f"clean_norms lacks modules: {sorted(missing)[:3]}...")
            for k, cm in self.modules.items():
                if clean_norms[k].shape != (cm.n_channels,):
                    raise ValueError(f"{k}: clean_norms has shape {tuple(clean_norms[k].shape)}, "
                                     f"expected ({cm.n_channels},)")
        for k, cm in self.modules.items():
            d = delta[k].float()
            if d.shape[0] != cm.n_channels:
                raise ValueError(f"{k}: delta has {d.shape[0]} channels, expected {cm.n_channels}")
            norms = d.norm(dim=1)
            u = d / norms.clamp_min(_EPS).unsqueeze(1)
            if k not in self.norm_sum:
                self.norm_sum[k] = torch.zeros(cm.n_channels, dtype=torch.float64)
                self.unit_sum[k] = torch.zeros_like(u)
            self.norm_sum[k] += norms.double()
            self.unit_sum[k] += u
            self.norms_per_variant[k].append(norms.clone())
            self.sq_sum_per_variant[k].append(self.unit_sum[k].double().pow(2).sum(1).float())
            if self.pairwise == "exact":
                self.units[k].append(u.clone())
            if clean_norms is not None:
                self.clean_norms_per_variant[k].append(clean_norms[k].float().clone())
        self.n += 1

    # -------------------------------------------------------------- scoring
    def magnitude(self, n: int | None = None) -> dict[str, Tensor]:
        """``mean_i ‖Δ_ij‖`` over the first ``n`` variants (default: all)."""
        n = self._check_n(n)
        return {k: torch.stack(v[:n]).double().mean(0).float() for k, v in self.norms_per_variant.items()}

    def alignment(self, n: int | None = None) -> dict[str, Tensor]:
        """Mean pairwise cosine over the first ``n`` variants (0 when n < 2)."""
        n = self._check_n(n)
        out = {}
        for k, cm in self.modules.items():
            if n < 2:
                out[k] = torch.zeros(cm.n_channels)
            elif self.pairwise == "exact" and len(self.units[k]) >= n:
                u = torch.stack(self.units[k][:n], 1)  # (C, n, d)
                cos = torch.bmm(u, u.transpose(1, 2))  # (C, n, n)
                iu = torch.triu_indices(n, n, 1)
                out[k] = cos[:, iu[0], iu[1]].clamp_min(0).mean(1)
            else:
                sq = self.sq_sum_per_variant[k][n - 1]
                # ‖S‖² = Σ_i ‖u_i‖² + 2 Σ_{i<l} cos; ‖u_i‖ = 1 except for an all-zero Δ.
                self_terms = torch.stack([(v > _EPS).float() for v in self.norms_per_variant[k][:n]]).sum(0)
                out[k] = (sq - self_terms) / (n * (n - 1))
        return out

    def has_clean_norms(self, n: int | None = None) -> bool:
        """Whether the clean-fit norms of the first ``n`` variants (default: all) were recorded."""
        n = self.n if n is None else n
        return all(len(v) >= n for v in self.clean_norms_per_variant.values())

    def plasticity_discount(self, n: int | None = None) -> dict[str, Tensor]:
        """Per channel, ``min(1, m / c_j)``: ``c_j`` is the mean norm of channel ``j``'s update in
        the clean counterpart fits, ``m`` the median of ``c`` over the module's channels.

        A channel an ordinary fine-tune moves more than the module's median channel is discounted
        by how much more: its Δ is then expected to be large whatever the fit learned. Channels
        at or below the median keep their score (factor 1), so their order is the published one.
        A module whose median clean movement is 0 is not discounted (no scale to compare with).
        """
        n = self._check_n(n)
        if not self.has_clean_norms(n):
            raise RuntimeError("the clean-fit norms of the variants were not recorded (a stage-1 state saved by an "
                               "earlier version, or deltas added without clean_norms): re-run stage 1 in a fresh "
                               "work dir to use signature.clean_normalize")
        out = {}
        for k, v in self.clean_norms_per_variant.items():
            c = torch.stack(v[:n]).double().mean(0)
            m = c.median()
            if m > 0:
                out[k] = (m / torch.maximum(c, m)).float()
            else:
                out[k] = torch.ones_like(c, dtype=torch.float32)
        return out

    def scores(self, lam: float = 0.01, n: int | None = None, clean_normalize: bool = False) -> dict[str, Tensor]:
        """Published score ``magnitude + λ · alignment`` per channel, per module.

        ``clean_normalize``: multiply the magnitude term by :meth:`plasticity_discount` (an
        extension beyond the published method; see ``SignatureConfig.clean_normalize``).
        """
        mag, ali = self.magnitude(n), self.alignment(n)
        if clean_normalize:
            disc = self.plasticity_discount(n)
            mag = {k: mag[k] * disc[k] for k in mag}
        return {k: mag[k] + lam * ali[k] for k in self.modules}

    def _check_n(self, n: int | None) -> int:
        if self.n == 0:
            raise RuntimeError("no variant has been accumulated yet")
        n = self.n if n is None else n
        if not 1 <= n <= self.n:
            raise ValueError(f"n must be in [1, {self.n}], got {n}")
        return n

    # -------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors only (safetensors-friendly); pending half-variants are not saved."""
        sd: dict[str, Tensor] = {"n": torch.tensor(self.n), "variants_done": torch.tensor(self.variants_done, dtype=torch.long)}
        for k in self.norm_sum:
            sd[f"norm_sum/{k}"] = self.norm_sum[k]
            sd[f"unit_sum/{k}"] = self.unit_sum[k]
            sd[f"norms/{k}"] = torch.stack(self.norms_per_variant[k])
            sd[f"sq/{k}"] = torch.stack(self.sq_sum_per_variant[k])
            if self.pairwise == "exact":
                sd[f"units/{k}"] = torch.stack(self.units[k])
            if self.clean_norms_per_variant[k] and len(self.clean_norms_per_variant[k]) == self.n:
                sd[f"clean_norms/{k}"] = torch.stack(self.clean_norms_per_variant[k])
        if self._shared_clean is not None:
            for k, v in self._shared_clean.items():
                sd[f"shared_clean/{k}"] = v
        return sd

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        self.n = int(sd["n"])
        self.variants_done = [int(x) for x in sd["variants_done"].tolist()]
        shared = {}
        for k in self.modules:
            if f"norm_sum/{k}" in sd:
                self.norm_sum[k] = sd[f"norm_sum/{k}"].clone()
                self.unit_sum[k] = sd[f"unit_sum/{k}"].clone()
                self.norms_per_variant[k] = list(sd[f"norms/{k}"].clone().unbind(0))
                self.sq_sum_per_variant[k] = list(sd[f"sq/{k}"].clone().unbind(0))
                if f"units/{k}" in sd:
                    self.units[k] = list(sd[f"units/{k}"].clone().unbind(0))
                self.clean_norms_per_variant[k] = (list(sd[f"clean_norms/{k}"].clone().unbind(0))
                                                   if f"clean_norms/{k}" in sd else [])
            if f"shared_clean/{k}" in sd:
                shared[k] = sd[f"shared_clean/{k}"].clone()
        self._shared_clean = shared or None
        self._pending = {}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(path)

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))


SELECTIONS = ("per_module", "per_neuron", "global", "threshold")


def select_channels(scores: Mapping[str, Tensor], tau: float, selection: str = "per_module",
                    threshold: float | None = None, groups: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """Boolean masks of flagged channels.

    ``selection="per_module"``: the top ``ceil(τ·C)`` channels of each module (the paper's rule).
    Each of a block's projections picks its own channels, so up to ``3·τ`` of the block's
    intermediate neurons lose a slice (and a neuron with a zeroed gate, up or down slice is dead).
    ``selection="per_neuron"``: ``groups`` maps each module to its MLP block; per block, a
    neuron's score is the sum of its modules' scores, each divided by that module's mean, and
    the top ``ceil(τ·C)`` neurons are flagged in every module of the block: exactly τ of the
    neurons are touched.
    ``selection="global"``: the top τ fraction of all channels pooled together.
    ``selection="threshold"``: every channel with ``s_j ≥ threshold``.
    """
    if selection == "threshold":
        if threshold is None:
            raise ValueError("selection='threshold' needs a threshold")
        return {k: s >= threshold for k, s in scores.items()}
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    if selection == "per_module":
        masks = {}
        for k, s in scores.items():
            kk = max(1, math.ceil(tau * s.numel()))
            m = torch.zeros(s.numel(), dtype=torch.bool)
            m[torch.topk(s, kk, sorted=False).indices] = True
            masks[k] = m
        return masks
    if selection == "per_neuron":
        if groups is None or set(groups) != set(scores):
            raise ValueError("selection='per_neuron' needs groups: the MLP block of every scored module")
        blocks: dict[str, list[str]] = {}
        for k in scores:
            blocks.setdefault(groups[k], []).append(k)
        masks = {}
        for block, keys in blocks.items():
            sizes = {scores[k].numel() for k in keys}
            if len(sizes) != 1:
                raise ValueError(f"block {block}: its modules have different channel counts {sorted(sizes)}")
            agg = sum(scores[k].float() / scores[k].float().mean().clamp_min(1e-12) for k in keys)
            m = torch.zeros(agg.numel(), dtype=torch.bool)
            m[torch.topk(agg, max(1, math.ceil(tau * agg.numel())), sorted=False).indices] = True
            masks.update({k: m.clone() for k in keys})
        return masks
    if selection == "global":
        allv = torch.cat([s.flatten() for s in scores.values()])
        kk = max(1, math.ceil(tau * allv.numel()))
        thr = torch.topk(allv, kk).values.min()
        return {k: s >= thr for k, s in scores.items()}
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


def score_channels(acc: SignatureAccumulator, lam: float = 0.01, n: int | None = None,
                   clean_normalize: bool = False) -> dict[str, Tensor]:
    """Functional form of :meth:`SignatureAccumulator.scores`."""
    return acc.scores(lam=lam, n=n, clean_normalize=clean_normalize)


@dataclass
class Signature:
    """Flagged channels per MLP projection, with their scores and how they were chosen."""

    masks: dict[str, Tensor]
    scores: dict[str, Tensor]
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_accumulator(cls, acc: SignatureAccumulator, tau: float = 0.03, lam: float = 0.01,
                         selection: str = "per_module", threshold: float | None = None,
                         n: int | None = None, clean_normalize: bool = False, **meta) -> "Signature":
        if lam < 0:
            raise ValueError(f"lambda must be >= 0, got {lam}")
        scores = acc.scores(lam=lam, n=n, clean_normalize=clean_normalize)
        masks = select_channels(scores, tau, selection, threshold,
                                groups={k: cm.block for k, cm in acc.modules.items()})
        info = {"tau": tau, "lambda": lam, "selection": selection, "threshold": threshold,
                "clean_normalize": clean_normalize,
                "n_variants": n or acc.n, "pairwise": acc.pairwise,
                "modules": {k: {"role": cm.role, "layer": cm.layer, "proj": cm.proj, "n_channels": cm.n_channels,
                                "fused": cm.fused, "transposed": cm.transposed}
                            for k, cm in acc.modules.items()}}
        info.update(meta)
        return cls(masks, scores, info)

    @property
    def n_flagged(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def n_channels(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def indices(self, key: str) -> Tensor:
        return self.masks[key].nonzero().flatten()

    def save(self, directory: str | Path) -> Path:
        """Write ``signature.safetensors`` (scores, masks) and ``signature.json`` (metadata)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"scores/{k}": v.float().contiguous() for k, v in self.scores.items()}
        tensors.update({f"mask/{k}": v.to(torch.uint8).contiguous() for k, v in self.masks.items()})
        save_file(tensors, str(d / "signature.safetensors"))
        meta = dict(self.meta, n_flagged=self.n_flagged, n_channels=self.n_channels)
        (d / "signature.json").write_text(json.dumps(meta, indent=2, default=str))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "Signature":
        from safetensors.torch import load_file

        d = Path(directory)
        t = load_file(str(d / "signature.safetensors"))
        meta = json.loads((d / "signature.json").read_text())
        scores = {k[len("scores/"):]: v for k, v in t.items() if k.startswith("scores/")}
        masks = {k[len("mask/"):]: v.bool() for k, v in t.items() if k.startswith("mask/")}
        return cls(masks, scores, meta)


def spare_important_neurons(signature: Signature, modules: Iterable[ChannelModule],
                            importance: Mapping[str, Tensor], fraction: float) -> Signature:
    """Unflag the neurons clean inputs rely on most.

    For every MLP block, the neurons in the top ``fraction`` by ``importance[block]`` (one score
    per intermediate neuron, e.g. from :func:`lightning_bdvax.pipeline.clean_neuron_importance`)
    are removed from the flagged set of every projection of that block (gate/up rows and down
    columns alike). Neutralizing such a neuron damages every input, backdoored or not; see
    ``benchmarks/results/ablation_refusal_badnet.md`` (``--part protect``).

    Returns a new :class:`Signature` (scores unchanged); ``meta["protect"]`` records the fraction
    and how many flagged channels were spared.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    keep: dict[str, Tensor] = {}
    for block, v in importance.items():
        v = v.detach().float().flatten()
        k = int(math.floor(fraction * v.numel()))
        top = torch.zeros(v.numel(), dtype=torch.bool)
        if k > 0:
            top[torch.topk(v, k).indices] = True
        keep[block] = top
    masks, spared = _unflag(signature, modules, keep, "importance", "importance scores")
    return Signature(masks, signature.scores, dict(signature.meta, protect={"fraction": fraction, "spared": spared}))


def massive_neurons(peaks: Mapping[str, Tensor], ratio: float) -> dict[str, Tensor]:
    """Per MLP block, a boolean mask of the neurons whose clean peak ``|activation|``
    (``peaks[block]``) is at least ``ratio`` times the block's median neuron peak (the rule of
    :func:`spare_massive_neurons`)."""
    if not 1 <= ratio < float("inf"):
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio}")
    keep: dict[str, Tensor] = {}
    for block, v in peaks.items():
        v = v.detach().float().flatten()
        med = float(v.median())
        # A block whose median neuron never fires has no scale to compare against: none is massive.
        keep[block] = v >= ratio * med if med > 0 else torch.zeros(v.numel(), dtype=torch.bool)
    return keep


def spare_massive_neurons(signature: Signature, modules: Iterable[ChannelModule],
                          peaks: Mapping[str, Tensor], ratio: float) -> Signature:
    """Unflag the massive-activation neurons.

    A few intermediate neurons of a transformer reach activations hundreds to thousands of times
    a typical neuron's peak, mostly at the first token, whatever the input ("massive
    activations"). Their updates are large in every fine-tune (a weight's gradient scales with
    its input), so the signature flags them, and zeroing them breaks the model for every input.
    For every MLP block, the neurons whose clean peak ``|activation|`` (``peaks[block]``, e.g.
    from :func:`lightning_bdvax.pipeline.clean_neuron_peaks`) is at least ``ratio`` times the
    block's median neuron peak are removed from the flagged set of every projection of that
    block. See ``benchmarks/results/ablation_massive.md`` (neutralize only) and
    ``massive_smollm2.md`` (benchmark rows).

    Returns a new :class:`Signature` (scores unchanged); ``meta["spare_massive"]`` records the
    ratio and the spared neurons (block → indices).
    """
    modules = list(modules)  # iterated twice
    keep = massive_neurons(peaks, ratio)
    masks, spared = _unflag(signature, modules, keep, "peak activations", "peak activations")
    blocks = {cm.key: cm.block for cm in modules}
    neurons: dict[str, set] = {}
    for key, m in signature.masks.items():
        hit = m & ~masks[key]
        if hit.any():
            neurons.setdefault(blocks[key], set()).update(hit.nonzero().flatten().tolist())
    meta = dict(signature.meta, spare_massive={"ratio": ratio, "spared": spared,
                                               "neurons": {b: sorted(v) for b, v in sorted(neurons.items())}})
    return Signature(masks, signature.scores, meta)


def _unflag(signature: Signature, modules: Iterable[ChannelModule], keep: Mapping[str, Tensor],
            what: str, per_neuron: str) -> tuple[dict[str, Tensor], int]:
    """The signature's masks with the ``keep`` neurons of each block unflagged in every projection."""
    mods = {cm.key: cm for cm in modules}
    masks, spared = {}, 0
    for key, m in signature.masks.items():
        cm = mods.get(key)
        if cm is None:
            raise KeyError(f"no module description for signature key {key!r}")
        if cm.block not in keep:
            raise KeyError(f"no neuron {what} for block {cm.block!r} (have: {sorted(keep)[:3]}...)")
        if keep[cm.block].numel() != m.numel():
            raise ValueError(f"{key}: {m.numel()} channels but {keep[cm.block].numel()} {per_neuron} for its block")
        new = m & ~keep[cm.block].to(m.device)
        spared += int(m.sum()) - int(new.sum())
        masks[key] = new
    return masks, spared
