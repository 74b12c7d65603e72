"""PNG plots of the benchmarks whose scripts write tables only, drawn from their committed JSON (no training):

    python benchmarks/plot_results.py   # results/{ablation,sweep,inference,storage,training_cost}.png

Each plot shows the numbers of the .json next to it; a missing .json is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _grouped_accuracy(raw: dict) -> dict[tuple, list[float]]:
    groups: dict[tuple, list[float]] = {}
    for row in raw["rows"]:
        groups.setdefault((row["budget_sigma"], row["label"], row["epochs"]), []).append(100 * row["accuracy"])
    return groups


def plot_ablation(raw: dict, ax) -> None:
    groups = _grouped_accuracy(raw)
    budgets = sorted({sigma for sigma, _, _ in groups})
    labels = list(dict.fromkeys(label for _, label, _ in groups))
    width = 0.8 / len(budgets)
    for b, sigma in enumerate(budgets):
        stats = [common.mean_std(next((v for (s, lab, _), v in groups.items() if s == sigma and lab == label), [0.0]))
                 for label in labels]
        ax.bar([i + b * width for i in range(len(labels))], [m for m, _ in stats], width, yerr=[s for _, s in stats],
               capsize=2, label=f"σt = {sigma:g}")
    ax.set_xticks([i + width * (len(budgets) - 1) / 2 for i in range(len(labels))], labels, rotation=30, ha="right",
                  fontsize=7)
    ax.set_ylim(min(m for v in groups.values() for m in v) - 5, max(m for v in groups.values() for m in v) + 2)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Ablation (fmnist-swin / digits)", fontsize=10)
    ax.legend(fontsize=7)


def plot_sweep(raw: dict, ax) -> None:
    points: dict[str, list] = {"MiMi": [], "vanilla": []}
    for (_, label, epochs), values in _grouped_accuracy(raw).items():
        mean, std = common.mean_std(values)
        points["MiMi" if label.startswith("MiMi") else "vanilla"].append((epochs, mean, std, label))
    for family, marker in (("MiMi", "o"), ("vanilla", "s")):
        for epochs, mean, std, label in points[family]:
            ax.errorbar(epochs, mean, yerr=std, marker=marker, capsize=3, color="C0" if family == "MiMi" else "C1")
            if family == "MiMi":
                ax.annotate(label.removeprefix("MiMi "), (epochs, mean), fontsize=6, xytext=(4, -8),
                            textcoords="offset points")
    ax.plot([], [], "o", color="C0", label="MiMi")
    ax.plot([], [], "s", color="C1", label="vanilla adapters, same epochs")
    ax.set_xlabel("total epochs")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Schedule sweep at σt = {raw['config']['sweep_budget']:g}", fontsize=10)
    ax.legend(fontsize=7)


def plot_inference(raw: dict, axes) -> None:
    for ax, (backbone, res) in zip(axes, raw["results"].items()):
        variants = res["variants"]
        base = variants["backbone (no adapter)"]
        labels = [label for label in variants if label != "backbone (no adapter)"  # rows counted and timed
                  and variants[label].get("gflops") is not None and "32" in variants[label].get("latency_s", {})]
        flops = [100 * (variants[label]["gflops"] / base["gflops"] - 1) for label in labels]
        latency = [100 * (statistics.median(variants[label]["latency_s"]["32"])
                          / statistics.median(base["latency_s"]["32"]) - 1) for label in labels]
        # the ONNX and compiled rows: against the backbone run the same way (paired ratio), FLOPs not counted
        same_form = [label for label, v in variants.items() if "32" in v.get("same_form_ratio", {})]
        labels += [f"{label}, vs the backbone in the same form" for label in same_form]
        flops += [float("nan")] * len(same_form)
        latency += [100 * (variants[label]["same_form_ratio"]["32"] - 1) for label in same_form]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], flops, 0.4, label="counted GFLOPs")
        ax.bar([x + 0.2 for x in xs], latency, 0.4, label="median latency, batch 32")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=6)
        ax.set_ylabel("% over the bare backbone")
        ax.set_title(f"{backbone} ({res['image_size']} px)", fontsize=9)
        ax.legend(fontsize=6)


def plot_storage(raw: dict, ax) -> None:
    for b, (backbone, res) in enumerate(raw["results"].items()):
        for precision, marker in (("fp32", "o"), ("bf16", "^")):
            xs = [v[precision]["stored_values"] for v in res["variants"] if precision in v]
            ys = [v[precision]["weights_file_bytes"] for v in res["variants"] if precision in v]
            ax.scatter(xs, ys, marker=marker, color=f"C{b}", label=f"{backbone} {precision}", s=18)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("values stored in the per-task file")
    ax.set_ylabel("file bytes")
    ax.set_title("Storage: bytes against stored values", fontsize=10)
    ax.legend(fontsize=6)


def plot_training_cost(raw: dict, axes) -> None:
    runs = raw["runs"]
    labels = list(runs)
    walls = [common.mean_std([r["wall_s"] for r in runs[label]]) for label in labels]
    axes[0].bar(range(len(labels)), [m for m, _ in walls], yerr=[s for _, s in walls], capsize=3)
    axes[0].set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=7)
    axes[0].set_ylabel(f"wall seconds for {raw['epochs']} epochs")
    axes[0].set_title("Whole schedule", fontsize=10)
    mimi = next(label for label in labels if label.startswith("MiMi"))
    for i, run in enumerate(runs[mimi]):
        segments = run["segments"]
        axes[1].plot([s["live_params"] for s in segments],
                     [1000 * s["seconds"] / s["epochs"] for s in segments], marker="o", label=f"repeat {i + 1}")
    axes[1].set_xscale("log")
    axes[1].invert_xaxis()
    axes[1].set_xlabel("live adapter parameters in the segment (shrinking →)")
    axes[1].set_ylabel("ms per epoch (with the round's evaluation)")
    axes[1].set_title("MiMi: time per epoch as the adapters shrink", fontsize=10)
    axes[1].legend(fontsize=7)


PLOTS = {"ablation": (plot_ablation, 1, (9, 4.5)), "sweep": (plot_sweep, 1, (7, 4.5)),
         "inference": (plot_inference, 4, (20, 5.5)), "storage": (plot_storage, 1, (7, 4.5)),
         "training_cost": (plot_training_cost, 2, (11, 4.5))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR, help="where the .json files are")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: --results)")
    args = parser.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    for name, (plot, panels, size) in PLOTS.items():
        source = args.results / f"{name}.json"
        if not source.is_file():
            print(f"{source} not found: {name}.png skipped")
            continue
        fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
        plot(json.loads(source.read_text()), axes[0] if panels > 1 else axes[0][0])
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        print(f"{out / f'{name}.png'}")


if __name__ == "__main__":
    main()
