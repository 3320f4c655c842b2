"""Benchmark result rows: append to JSON as they come, render a Markdown table and a PNG chart."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["append_row", "write_results", "markdown_table", "plot_results", "TABLE_COLUMNS"]

TABLE_COLUMNS = [
    ("task", "task", "{}"), ("attack", "attack", "{}"), ("defense", "defense", "{}"),
    ("asr_before", "ASR before", "{:.1%}"), ("asr_after", "ASR after", "{:.1%}"),
    ("prefix_after", "prefix after", "{:.1%}"), ("ftr_after", "FTR after", "{:.1%}"),
    ("consistency_base", "cons. base", "{:.3f}"), ("consistency_before", "cons. before", "{:.3f}"),
    ("consistency_after", "cons. after", "{:.3f}"),
    ("ppl_before", "ppl before", "{:.2f}"), ("ppl_after", "ppl after", "{:.2f}"), ("wall_s", "wall s", "{:.0f}"),
]


def append_row(path: str | os.PathLike, row: dict) -> list[dict]:
    """Append ``row`` to the JSON list at ``path`` (atomically) and return all rows."""
    p = Path(path)
    rows = json.loads(p.read_text()) if p.exists() else []
    rows.append(row)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1, default=str))
    tmp.replace(p)
    return rows


def _fmt(v, f):
    if v is None:
        return "—"
    try:
        return f.format(v)
    except (ValueError, TypeError):
        return str(v)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in TABLE_COLUMNS) + " |\n" for r in rows)
    return head + body


def plot_results(rows: list[dict], path: str | os.PathLike) -> None:
    """Grouped bars: ASR after, target prefix, and perplexity ratio per cell and defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({f"{r['task']}\n{r['attack']}" for r in rows})
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 2.2 * len(cells) * 1.5), 3.6))
    metrics = [("asr_after", "keyword ASR after"), ("prefix_after", "target-prefix rate after"),
               ("ppl_ratio", "ppl after / ppl before")]
    width = 0.8 / max(1, len(defenses))
    for ax, (key, title) in zip(axes, metrics):
        for j, d in enumerate(defenses):
            vals = []
            for c in cells:
                r = next((r for r in rows if f"{r['task']}\n{r['attack']}" == c and r["defense"] == d), None)
                if r is None:
                    vals.append(0)
                elif key == "ppl_ratio":
                    vals.append(r["ppl_after"] / r["ppl_before"] if r.get("ppl_before") else 0)
                else:
                    vals.append(r.get(key) or 0)
            ax.bar([i + j * width for i in range(len(cells))], vals, width, label=d)
        ax.set_xticks([i + width * (len(defenses) - 1) / 2 for i in range(len(cells))], cells, fontsize=7)
        ax.set_title(title, fontsize=9)
        if key == "ppl_ratio":
            ax.axhline(1.10, color="k", lw=0.8, ls="--")
        else:
            ax.axhline(0.05, color="k", lw=0.8, ls="--")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(json_path: str | os.PathLike, row: dict) -> list[dict]:
    """Append a row, then rewrite the sibling ``.md`` table and ``.png`` chart."""
    rows = append_row(json_path, row)
    p = Path(json_path)
    meta = f"Command: `{row.get('command', '')}`  \nVersions: {row.get('versions', '')}\n\n"
    p.with_suffix(".md").write_text(f"# {p.stem}\n\n{meta}" + markdown_table(rows))
    try:
        plot_results(rows, p.with_suffix(".png"))
    except Exception as e:  # a chart failure must not lose the row
        print(f"chart not written: {e}")
    return rows
