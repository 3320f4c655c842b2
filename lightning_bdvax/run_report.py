"""A human-readable report of one purification run: ``report.md`` plus PNG pictures.

:func:`write_run_report` writes, into the run's output directory:

* ``report.md``: what was flagged and why, with links to the pictures;
* ``report_signature_heatmap.png``: signature scores by layer (rows) and projection (columns):
  mean score, max score and fraction of channels flagged;
* ``report_score_hist.png``: the distribution of channel scores per projection (log axes), with
  the selection threshold marked (per-module top-τ: each module's cutoff, i.e. its lowest flagged
  score, as a tick, and their median as a line; global top-τ or a fixed threshold: one line);
* with the accumulator: ``report_score_components.png`` (each channel's mean delta norm against
  its cross-variant alignment, flagged channels highlighted) and ``report_signature_vs_n.png``
  (how much of the final signature the first ``n`` variants already find).

The Markdown also has the before/after metrics (ASR, false-trigger rate, perplexity...) when
the run was evaluated, the time of each stage and the resolved config. Every section is
optional: what the report lacks is left out, and a picture that fails to draw is replaced by a
note (the report is written after the purified model, and never fails the run for a picture).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["write_run_report", "signature_table", "selection_cutoffs", "REPORT_FILES"]

REPORT_FILES = {
    "heatmap": "report_signature_heatmap.png",
    "hist": "report_score_hist.png",
    "components": "report_score_components.png",
    "vs_n": "report_signature_vs_n.png",
}

# metric key -> (label, kind); kind "rate" is shown as a percentage.
_METRICS = [
    ("asr", "ASR (keyword rule, triggered prompts)", "rate"),
    ("ftr", "false-trigger rate (clean prompts)", "rate"),
    ("asr_target", "ASR (exact target)", "rate"),
    ("ftr_target", "false-trigger rate (exact target)", "rate"),
    ("prefix", "target-prefix rate (triggered)", "rate"),
    ("prefix_clean", "target-prefix rate (clean)", "rate"),
    ("consistency", "trigger consistency", "float"),
    ("ppl", "perplexity (held-out)", "float"),
]


# ------------------------------------------------------------------ signature summaries
def _module_info(signature, key: str) -> tuple[int | None, str]:
    from .arch import _layer_index

    info = (signature.meta or {}).get("modules", {}).get(key) if signature is not None else None
    if info:
        return info.get("layer"), str(info.get("proj", key.rsplit(".", 1)[-1]))
    return _layer_index(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[-1]


def signature_table(signature) -> tuple[list[int | None], list[str], dict[str, list[list[float]]]]:
    """Per (layer, projection): ``mean`` score, ``max`` score, ``frac`` flagged, ``flagged`` count
    and ``channels``. Returns ``(layers, projs, {stat: [[value per proj] per layer]})``; NaN where a
    layer lacks a projection."""
    cells: dict[tuple, dict] = {}
    projs: list[str] = []
    for key, s in signature.scores.items():
        layer, proj = _module_info(signature, key)
        if proj not in projs:
            projs.append(proj)
        s = s.detach().float().flatten()
        m = signature.masks[key].flatten() if key in signature.masks else torch.zeros(s.numel(), dtype=torch.bool)
        c = cells.setdefault((layer, proj), {"sum": 0.0, "n": 0, "max": -math.inf, "flagged": 0})
        c["sum"] += float(s.double().sum())
        c["n"] += s.numel()
        c["max"] = max(c["max"], float(s.max())) if s.numel() else c["max"]
        c["flagged"] += int(m.sum())
    layers = sorted({k[0] for k in cells}, key=lambda x: (x is None, x if x is not None else 0))
    nan = float("nan")
    stats: dict[str, list[list[float]]] = {k: [] for k in ("mean", "max", "frac", "flagged", "channels")}
    for layer in layers:
        for k in stats:
            stats[k].append([])
        for proj in projs:
            c = cells.get((layer, proj))
            stats["mean"][-1].append(c["sum"] / c["n"] if c and c["n"] else nan)
            stats["max"][-1].append(c["max"] if c and c["n"] else nan)
            stats["frac"][-1].append(c["flagged"] / c["n"] if c and c["n"] else nan)
            stats["flagged"][-1].append(c["flagged"] if c else nan)
            stats["channels"][-1].append(c["n"] if c else nan)
    return layers, projs, stats


def selection_cutoffs(signature) -> dict[str, float]:
    """Each module's cutoff: its lowest flagged score (the k-th largest for top-τ selection).
    Modules with nothing flagged are left out."""
    out = {}
    for key, s in signature.scores.items():
        m = signature.masks.get(key)
        if m is not None and bool(m.any()):
            out[key] = float(s.flatten()[m.flatten()].min())
    return out


def _threshold_text(signature) -> tuple[str, dict]:
    meta = signature.meta or {}
    sel = meta.get("selection", "per_module")
    tau = meta.get("tau")
    cut = selection_cutoffs(signature)
    vals = sorted(cut.values())
    info: dict[str, Any] = {"selection": sel, "tau": tau}
    if sel == "threshold" and meta.get("threshold") is not None:
        info["line"] = float(meta["threshold"])
        return f"Threshold: fixed score threshold s_j ≥ {float(meta['threshold']):.4g}.", info
    if not vals:
        return "Threshold: no channel was flagged.", info
    med = vals[len(vals) // 2]
    if sel == "global":
        info["line"] = vals[0]
        return (f"Threshold: global top-τ (τ = {tau}) over all {signature.n_channels} channels; the global "
                f"threshold (lowest flagged score) is {vals[0]:.4g}."), info
    info["line"] = med
    info["ticks"] = vals
    return (f"Threshold: per-module top-τ (τ = {tau}): the top ⌈τ·C⌉ channels of each module are flagged, so each "
            f"module has its own cutoff (its lowest flagged score). Cutoffs over {len(vals)} modules: "
            f"min {vals[0]:.4g}, median {med:.4g}, max {vals[-1]:.4g}."), info


# ------------------------------------------------------------------ pictures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_heatmap(signature, path: Path) -> None:
    import numpy as np

    plt = _plt()
    layers, projs, st = signature_table(signature)
    panels = [("mean", "mean channel score"), ("max", "max channel score"), ("frac", "fraction flagged")]
    h = max(3.0, 0.22 * len(layers) + 1.4)
    fig, axes = plt.subplots(1, 3, figsize=(3.2 * 3, h))
    for ax, (k, title) in zip(axes, panels):
        a = np.array(st[k], dtype=float)
        kw = {"vmin": 0.0, "vmax": max(float(np.nanmax(a)), 1e-9) if np.isfinite(a).any() else 1.0} if k == "frac" else {}
        im = ax.imshow(a, aspect="auto", interpolation="nearest", cmap="viridis" if k != "frac" else "magma", **kw)
        ax.set_xticks(range(len(projs)), projs, rotation=30, fontsize=7)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6 if len(layers) > 16 else 8)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    axes[0].set_ylabel("layer")
    fig.suptitle(f"BD-VAX signature: {signature.n_flagged}/{signature.n_channels} channels flagged", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_hist(signature, path: Path, info: dict) -> None:
    import numpy as np

    plt = _plt()
    by_proj: dict[str, list[Tensor]] = {}
    for key, s in signature.scores.items():
        by_proj.setdefault(_module_info(signature, key)[1], []).append(s.detach().float().flatten())
    allv = torch.cat([torch.cat(v) for v in by_proj.values()]).numpy()
    pos = allv[allv > 0]
    n_zero = int((allv <= 0).sum())
    fig, ax = plt.subplots(figsize=(7, 3.8))
    log = pos.size > 0 and pos.max() / max(pos.min(), 1e-300) > 50
    if log:
        bins = np.logspace(np.log10(pos.min()), np.log10(pos.max()), 60)
        ax.set_xscale("log")
    else:
        bins = 60
    for proj, vs in by_proj.items():
        v = torch.cat(vs).numpy()
        v = v[v > 0] if log else v
        ax.hist(v, bins=bins, histtype="step", lw=1.2, label=f"{proj} ({v.size})")
    ax.set_yscale("log")
    line = info.get("line")
    if line is not None:
        lbl = {"per_module": "median per-module cutoff", "global": "global threshold",
               "threshold": "fixed threshold"}.get(info.get("selection"), "threshold")
        ax.axvline(line, color="red", ls="--", lw=1.2, label=f"{lbl} = {line:.3g}")
    ticks = info.get("ticks")
    if ticks:
        import matplotlib.transforms as mtransforms

        trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(ticks, [0.97] * len(ticks), "|", color="red", ms=8, transform=trans,
                label="each module's cutoff")
    ax.set_xlabel("channel score s_j" + (" (log)" if log else ""))
    ax.set_ylabel("channels (log)")
    title = "distribution of channel scores"
    if n_zero and log:
        title += f" ({n_zero} zero scores not shown)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_components(acc, signature, path: Path, cap: int = 20000) -> None:
    import numpy as np

    plt = _plt()
    mag, ali = acc.magnitude(), acc.alignment()
    xs, ys, fl = [], [], []
    for k in acc.modules:
        if k not in signature.masks:
            continue
        xs.append(mag[k].float())
        ys.append(ali[k].float())
        fl.append(signature.masks[k].flatten())
    x, y, f = torch.cat(xs).numpy(), torch.cat(ys).numpy(), torch.cat(fl).numpy()
    rng = np.random.default_rng(0)
    keep = np.arange(x.size)
    if x.size > cap:  # keep up to half the points for flagged channels, subsample the rest
        flagged, rest = np.flatnonzero(f), np.flatnonzero(~f)
        n_f = min(flagged.size, max(cap // 2, cap - rest.size))
        flagged = rng.choice(flagged, n_f, replace=False) if n_f < flagged.size else flagged
        rest = rng.choice(rest, min(rest.size, cap - n_f), replace=False)
        keep = np.concatenate([flagged, rest])
    x, y, f = x[keep], y[keep], f[keep]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(x[~f], y[~f], s=3, alpha=0.3, color="gray", label="not flagged")
    ax.scatter(x[f], y[f], s=6, alpha=0.8, color="red", label="flagged")
    if (x > 0).all() and x.max() / max(x.min(), 1e-300) > 50:
        ax.set_xscale("log")
    ax.set_xlabel("mean ‖Δ_ij‖ over variants (magnitude)")
    ax.set_ylabel("mean pairwise cosine (alignment)")
    ax.set_title(f"score components, N = {acc.n} variants", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _signature_vs_n(acc, signature) -> list[dict]:
    from .signature import select_channels

    meta = signature.meta or {}
    lam = float(meta.get("lambda", 0.01))
    tau = float(meta.get("tau") or 0.01)
    sel = meta.get("selection", "per_module")
    thr = meta.get("threshold")
    final = {k: m.flatten() for k, m in signature.masks.items()}
    rows = []
    for n in range(1, acc.n + 1):
        masks = select_channels(acc.scores(lam=lam, n=n), tau, sel, thr)
        inter = sum(int((masks[k] & final[k]).sum()) for k in final if k in masks)
        union = sum(int((masks[k] | final[k]).sum()) for k in final if k in masks)
        nf = sum(int(final[k].sum()) for k in final)
        rows.append({"n": n, "flagged": sum(int(m.sum()) for m in masks.values()),
                     "jaccard": inter / union if union else 1.0, "recall": inter / nf if nf else 1.0})
    return rows


def _plot_vs_n(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ns = [r["n"] for r in rows]
    ax.plot(ns, [r["jaccard"] for r in rows], "o-", label="Jaccard with final signature")
    ax.plot(ns, [r["recall"] for r in rows], "s--", label="share of final signature found")
    ax.set_xticks(ns)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("variants used (n)")
    ax.set_title("signature from the first n variants", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ Markdown helpers
def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[Any]]) -> str:
    out = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    return out + "".join("| " + " | ".join(_cell(c) for c in r) + " |\n" for r in rows)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _fmt_metric(v: Any, kind: str) -> str:
    x = _num(v)
    if x is None:
        return "—"
    return f"{x:.1%}" if kind == "rate" else f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _before_after(report: Mapping) -> str:
    before, after = report.get("before"), report.get("after")
    before = before if isinstance(before, Mapping) else {}
    after = after if isinstance(after, Mapping) else {}
    if not before and not after:
        return ""
    known = [m for m in _METRICS if _num(before.get(m[0])) is not None or _num(after.get(m[0])) is not None]
    if not known:
        return ""
    rows = []
    for key, label, kind in known:
        b, a = _num(before.get(key)), _num(after.get(key))
        if b is not None and a is not None:
            d = a - b
            change = f"{d:+.1%}" if kind == "rate" else f"{d:+.3f}"
        else:
            change = "—"
        rows.append([label, _fmt_metric(b, kind), _fmt_metric(a, kind), change])
    text = "## Before / after\n\n" + _table(["metric", "before", "after", "change"], rows)
    n = after.get("n_test", before.get("n_test"))
    if n is not None:
        text += f"\n{n} triggered test prompts.\n"
    tb = ((before.get("responses") or {}).get("triggered") or [])[:3]
    ta = ((after.get("responses") or {}).get("triggered") or [])[:3]
    if tb or ta:
        samples = [[i + 1, (tb[i] if i < len(tb) else "")[:160], (ta[i] if i < len(ta) else "")[:160]]
                   for i in range(max(len(tb), len(ta)))]
        text += "\nFirst responses to triggered prompts:\n\n" + _table(["#", "before", "after"], samples)
    return text + "\n"


def _timings(report: Mapping) -> str:
    t = report.get("timings")
    if not isinstance(t, Mapping) or not t:
        return ""
    total = _num(t.get("total_s"))
    rows = []
    for k, v in t.items():
        x = _num(v)
        if x is None:
            continue
        stage = k[:-2] if k.endswith("_s") else k
        share = f"{x / total:.0%}" if total and k != "total_s" else ""
        rows.append([stage, f"{x:.1f}", share])
    text = "## Timing per stage\n\n" + (_table(["stage", "seconds", "share of total"], rows) if rows else "")
    fits = t.get("fits")
    if isinstance(fits, list) and fits:
        agg: dict[str, list[float]] = {}
        for f in fits:
            if not isinstance(f, Mapping):
                continue
            a = agg.setdefault(str(f.get("role", "?")), [0, 0, 0.0])
            a[0] += 1
            a[1] += int(f.get("steps") or 0)
            a[2] += float(f.get("seconds") or 0.0)
        frows = [[role, n, steps, f"{sec:.1f}", f"{sec / n:.1f}"] for role, (n, steps, sec) in agg.items()]
        text += "\nStage-1 fits (each variant's backdoor fit and its clean counterpart):\n\n" + _table(
            ["role", "fits", "steps", "seconds", "seconds per fit"], frows)
    return text + "\n"


def _config_block(report: Mapping) -> str:
    cfg = report.get("config")
    if not cfg:
        return ""
    plain = json.loads(json.dumps(cfg, default=str))
    try:
        import yaml

        body, lang = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True).rstrip(), "yaml"
    except Exception:  # pragma: no cover - yaml is a dependency of the CLI
        body, lang = json.dumps(plain, indent=2), "json"
    return f"## Resolved config\n\n```{lang}\n{body}\n```\n"


def _variants(signature) -> str:
    vs = (signature.meta or {}).get("variants") if signature is not None else None
    if not vs:
        return ""
    rows = [[v.get("index", i), v.get("key", ""), v.get("style", ""), str(v.get("behaviour", ""))[:60]]
            for i, v in enumerate(vs) if isinstance(v, Mapping)]
    return "### Synthetic variants\n\n" + _table(["#", "trigger key", "insertion", "behaviour"], rows) + "\n"


# ------------------------------------------------------------------ the writer
def write_run_report(out_dir: str | os.PathLike, signature=None, report: Mapping | None = None,
                     acc=None, title: str = "BD-VAX run report") -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``; return the path of ``report.md``.

    Args:
        out_dir: the run's output directory (created if missing).
        signature: the :class:`~lightning_bdvax.signature.Signature` (None: no signature sections).
        report: the run's report dict: ``config``, ``timings``, ``signature``, optional
            ``before``/``after`` (``evaluate`` results), ``precision``. Missing keys are skipped.
        acc: optional :class:`~lightning_bdvax.signature.SignatureAccumulator` of the run, for the
            score-components scatter and the signature-vs-n chart.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report or {}
    parts: list[str] = [f"# {title}\n"]
    notes: list[str] = []

    def picture(name: str, draw, alt: str) -> str:
        path = out / REPORT_FILES[name]
        try:
            draw(path)
        except Exception as e:  # a picture must never fail the run
            notes.append(f"{REPORT_FILES[name]} not drawn: {type(e).__name__}: {e}")
            return ""
        return f"![{alt}]({REPORT_FILES[name]})\n\n"

    summary = []
    if signature is not None:
        meta = signature.meta or {}
        frac = signature.n_flagged / signature.n_channels if signature.n_channels else 0.0
        summary.append(f"- flagged: **{signature.n_flagged} / {signature.n_channels}** MLP channels ({frac:.2%})")
        summary.append(f"- variants: N = {meta.get('n_variants', '?')}; scoring: mean ‖Δ‖ + λ · alignment with "
                       f"λ = {meta.get('lambda', '?')} (pairwise: {meta.get('pairwise', '?')}); selection: "
                       f"{meta.get('selection', '?')}, τ = {meta.get('tau', '?')}")
        if meta.get("model_path"):
            summary.append(f"- model: `{meta['model_path']}`")
    elif isinstance(report.get("signature"), Mapping):
        s = report["signature"]
        summary.append(f"- flagged: {s.get('n_flagged', '?')} / {s.get('n_channels', '?')} channels")
    if report.get("precision"):
        summary.append(f"- precision: {report['precision']}")
    if summary:
        parts.append("\n".join(summary) + "\n")

    parts.append(_before_after(report))

    if signature is not None and signature.scores:
        thr_text, info = _threshold_text(signature)
        sec = ["## Signature by layer and projection\n",
               "Each MLP channel's score s_j = mean_i ‖Δ_ij‖ + λ · mean pairwise cosine of its updates across "
               "the synthetic variants. Rows are layers, columns projections.\n",
               picture("heatmap", lambda p: _plot_heatmap(signature, p), "signature heatmap")]
        layers, projs, st = signature_table(signature)
        rows = []
        for i, layer in enumerate(layers):
            fl = [st["flagged"][i][j] for j in range(len(projs))]
            ch = [st["channels"][i][j] for j in range(len(projs))]
            nfl = int(sum(x for x in fl if x == x))
            nch = int(sum(x for x in ch if x == x))
            rows.append([layer] + [("—" if x != x else int(x)) for x in fl] + [f"{nfl / nch:.1%}" if nch else "—",
                        f"{max(v for v in st['max'][i] if v == v):.4g}"])
        sec.append("Flagged channels per layer:\n\n" + _table(["layer"] + projs + ["flagged", "max score"], rows))
        sec.append("\n## Distribution of channel scores\n")
        sec.append(thr_text + "\n")
        sec.append(picture("hist", lambda p: _plot_hist(signature, p, info), "score distribution"))
        if acc is not None and getattr(acc, "n", 0) >= 1:
            sec.append("## Why these channels\n\nMagnitude (mean update norm) against alignment (mean pairwise "
                       "cosine across variants) for every channel; flagged channels in red.\n")
            sec.append(picture("components", lambda p: _plot_components(acc, signature, p), "score components"))
            if acc.n >= 2:
                try:
                    vrows = _signature_vs_n(acc, signature)
                except Exception as e:
                    vrows = []
                    notes.append(f"signature vs n not computed: {type(e).__name__}: {e}")
                if vrows:
                    sec.append("## Signature vs number of variants\n\nThe signature from the first n variants "
                               "(same τ and λ), compared with the final one; no extra fine-tune is needed.\n")
                    sec.append(picture("vs_n", lambda p: _plot_vs_n(vrows, p), "signature vs n"))
                    sec.append(_table(["n", "flagged", "Jaccard with final", "share of final found"],
                                      [[r["n"], r["flagged"], f"{r['jaccard']:.3f}", f"{r['recall']:.1%}"]
                                       for r in vrows]) + "\n")
        sec.append(_variants(signature))
        parts.append("\n".join(s for s in sec if s))

    parts.append(_timings(report))
    parts.append(_config_block(report))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    md = "\n".join(p for p in parts if p)
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(path)
    return path
