"""The report of a prepared data set: ``report.md`` for a person, ``report.json`` for a program, and
``split_counts.png``, a bar chart of images per class per split."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from common.checkpoint import atomic_write_text

LIST_LIMIT = 50  # paths shown in the Markdown per section; the JSON holds them all


def save_counts_png(counts: dict[str, dict[str, int]], classes: list[str], path: Path, title: str) -> None:
    """Grouped bars: one group per class, one bar per split, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    splits = list(counts)
    x = np.arange(len(classes))
    width = 0.8 / len(splits)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes) + 2), 4.5))
    for k, split in enumerate(splits):
        ax.bar(x + (k - (len(splits) - 1) / 2) * width, [counts[split][c] for c in classes], width, label=split)
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center",
                  fontsize=8)  # fmt: skip
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _list(lines: list[str]) -> list[str]:
    shown = lines[:LIST_LIMIT]
    if len(lines) > LIST_LIMIT:
        shown.append(f"- ... and {len(lines) - LIST_LIMIT} more (all in report.json)")
    return shown


def render_markdown(p) -> str:
    splits = list(p.counts)
    total = {s: sum(p.counts[s].values()) for s in splits}
    removed = sum(len(d["removed"]) for d in p.duplicates)
    md = [
        f"# Data set prepared from `{p.source}`",
        "",
        f"{sum(total.values())} images in {len(p.classes)} classes: "
        + ", ".join(f"{total[s]} {s}" for s in splits)
        + f". {len(p.bad)} bad file(s) left out, {removed} duplicate(s) removed from {len(p.duplicates)} group(s), "
        f"{sum(len(c['paths']) for c in p.conflicts)} image(s) found under several classes left out.",
        "",
        f"Settings: {', '.join(f'{k}={v}' for k, v in p.settings.items() if v is not None)}. "
        f"Written as {p.written.get('links', 0)} hard link(s) and {p.written.get('copies', 0)} copies; "
        "`splits.csv` maps every written file to its source.",
        "",
        "![images per class per split](split_counts.png)",
        "",
        "## Images per class per split",
        "",
        "| class | " + " | ".join(splits) + " | total |",
        "|---|" + "---:|" * (len(splits) + 1),
    ]
    for c in p.classes:
        row = [p.counts[s][c] for s in splits]
        md.append(f"| {c} | " + " | ".join(str(n) for n in row) + f" | {sum(row)} |")
    md.append("| **all** | " + " | ".join(str(total[s]) for s in splits) + f" | {sum(total.values())} |")
    md += ["", "## Warnings", ""] + ([f"- {w}" for w in p.warnings] or ["None."])
    md += ["", "## Bad files (left out)", ""]
    md += _list([f"- `{path}`: {why}" for path, why in p.bad.items()]) or ["None."]
    md += ["", "## Duplicate groups (one kept)", ""]
    md += _list([f"- kept `{d['kept']}`; removed " + ", ".join(f"`{r}`" for r in d["removed"]) for d in p.duplicates])
    md += [] if p.duplicates else ["None."]
    md += ["", "## The same image under several classes (all left out)", ""]
    md += _list([", ".join(f"`{path}` ({label})" for path, label in zip(c["paths"], c["labels"], strict=True))
                 for c in p.conflicts]) or ["None."]  # fmt: skip
    return "\n".join(md) + "\n"


def write_report(p, folder: Path) -> None:
    """``report.md``, ``report.json`` and ``split_counts.png`` in ``folder``."""
    folder = Path(folder)
    save_counts_png(p.counts, p.classes, folder / "split_counts.png", f"{Path(p.source).name}: images per split")
    atomic_write_text(folder / "report.json", json.dumps(dataclasses.asdict(p), indent=2))
    atomic_write_text(folder / "report.md", render_markdown(p))
