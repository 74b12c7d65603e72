"""Plots of where MiMi's budget goes: adapter widths per layer (needs matplotlib: ``pip install "peft-mimi[plot]"``)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def plot_widths(widths: dict[str, int], path: str | os.PathLike, *, title: str = "MiMi adapter widths",
                initial: dict[str, int] | None = None) -> Path:
    """Bar chart of the adapter width of every adapted module, grouped by block: attention-output and MLP-output
    adapters side by side, removed adapters (width 0) marked with an ``x``; ``initial`` widths drawn as outlines.
    Writes a PNG atomically and returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('Plotting needs matplotlib: pip install "peft-mimi[plot]"') from error

    names = list(widths)
    kinds = ["MLP" if re.search(r"fc2|mlp|output\.dense$", n) and "attention" not in n else "attention"
             for n in names]
    blocks = [re.sub(r"\.(attention|mlp|output|intermediate).*$", "", n) for n in names]
    order = list(dict.fromkeys(blocks))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(order) + 2), 3.6))
    for offset, kind, color in ((-0.2, "attention", "tab:blue"), (0.2, "MLP", "tab:orange")):
        xs, ys, outline = [], [], []
        for name, block, k in zip(names, blocks, kinds):
            if k == kind:
                xs.append(order.index(block) + offset)
                ys.append(widths[name])
                outline.append((initial or {}).get(name))
        if not xs:
            continue
        ax.bar(xs, ys, width=0.38, color=color, label=f"{kind} adapter")
        if initial:
            ax.bar(xs, [o or 0 for o in outline], width=0.38, fill=False, edgecolor=color, linestyle=":")
        removed = [x for x, y in zip(xs, ys) if y == 0]
        ax.scatter(removed, [0] * len(removed), marker="x", color=color, zorder=3)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([_short(b) for b in order], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("width (neurons)")
    ax.set_title(title + ("  (dotted: initial width; x: removed)" if initial else "  (x: removed)"), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=target.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _short(block: str) -> str:
    """'vit.layers.3' -> 'block 3'; 'swin.encoder.layers.1.blocks.0' -> 'stage 1.0'."""
    numbers = re.findall(r"\d+", block)
    return ("stage " if "blocks" in block else "block ") + ".".join(numbers) if numbers else block
