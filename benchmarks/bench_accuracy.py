"""Accuracy at matched parameter budgets (paper Table 1 / Fig. 3, reduced), the ablation (Table 2, reduced) and
the per-layer allocation (Fig. 5), on a small pretrained backbone and CPU-sized tasks.

    python benchmarks/bench_accuracy.py --what accuracy     # -> results/accuracy.{md,json,png}
    python benchmarks/bench_accuracy.py --what ablation     # -> results/ablation.{md,json}
    python benchmarks/bench_accuracy.py --what allocation   # -> results/allocation_<task>.png (+ allocation.json)
    python benchmarks/bench_accuracy.py --smoke --out /tmp/x   # all three, tiny random ViT, seconds

Every method goes through `common.run` (same tensors, batch order, epochs, optimizer and schedule). MiMi trains
``(R+1)·E`` epochs; the other methods at a budget train the same number of epochs in one cosine schedule.
Results are rewritten after every run, so an interrupted run leaves its finished rows (marked partial).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Method  # noqa: E402


def methods_at(budget_sigma: float, lora_rank: int) -> list[Method]:
    s = f"{budget_sigma:g}"
    return [
        Method("mimi", f"MiMi σ0=4→σt={s}", target_compression=budget_sigma),
        Method("adapter", f"Adapters σ={s} (vanilla, uniform)", init_compression=budget_sigma,
               target_compression=budget_sigma),
        Method("lora", f"LoRA r={lora_rank} (≈B(σt={s}))", lora_rank=lora_rank),
    ]


FIXED = [
    Method("adapter", "Adapters σ=4 (vanilla, large)", init_compression=4.0, target_compression=4.0),
    Method("linear", "Linear probe (head only)"),
    Method("bitfit", "BitFit (biases + head)"),
    Method("full", "Full fine-tuning"),
]


def lr_for(method: Method, args) -> float:
    return args.lr_full if method.kind == "full" else args.lr


def fmt(values: list[float], scale: float = 100.0) -> str:
    mean, std = common.mean_std([v * scale for v in values])
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def run_grid(args, backbone: str, task: str, entries: list[tuple[Method, int, float | None]], name: str,
             write) -> list[dict]:
    """Run every (method, total epochs, budget σt) for every seed; call ``write(rows)`` after each run."""
    rows = []
    for seed in args.seeds:
        for method, total_epochs, sigma in entries:
            done = [r for r in args.previous.get(name, []) if (r["task"], r["label"], r["seed"], r["budget_sigma"])
                    == (task, method.label, seed, sigma)]
            if done:  # --resume: a finished run of the same settings, recorded in the previous results
                rows.append(done[0])
                continue
            data = common.task_tensors(task, args.processor, args.max_train, args.max_test)
            result = common.run(method, backbone, data, seed=seed, epochs_per_round=args.epochs_per_round,
                                total_epochs=total_epochs, lr=lr_for(method, args), batch_size=args.batch_size)
            row = {"task": task, "budget_sigma": sigma, "label": method.label, "method": asdict(method),
                   "seed": seed, "lr": lr_for(method, args), **asdict(result)}
            rows.append(row)
            print(f"[{name}] {task} seed={seed} {method.label}: acc={result.accuracy:.4f} "
                  f"params={result.method_params} epochs={result.epochs} wall={result.wall_s:.0f}s", flush=True)
            write(rows)
    return rows


def summarise(rows: list[dict], backbone_size: int) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["budget_sigma"], row["label"]), []).append(row)
    out = []
    for (task, sigma, label), rs in groups.items():
        params = [r["method_params"] for r in rs]
        out.append({"task": task, "budget_sigma": sigma, "label": label, "seeds": [r["seed"] for r in rs],
                    "accuracy": [r["accuracy"] for r in rs], "method_params": params,
                    "params_pct": 100 * statistics_mean(params) / backbone_size, "epochs": rs[0]["epochs"],
                    "head_params": rs[0]["head_params"], "wall_s": [r["wall_s"] for r in rs]})
    return out


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot_accuracy(summary: list[dict], path: Path, backbone: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        families: dict[str, list] = {}
        for s in summary:
            if s["task"] != task:
                continue
            family = s["label"].split(" ")[0] if s["budget_sigma"] is not None else s["label"]
            mean, std = common.mean_std([a * 100 for a in s["accuracy"]])
            families.setdefault(family, []).append((max(statistics_mean(s["method_params"]), 1), mean, std))
        for family, points in sorted(families.items()):
            points.sort()
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=family, linestyle="-" if len(xs) > 1 else "")
        ax.set_xscale("log")
        ax.set_xlabel("parameters trained besides the head (log; probe drawn at 1)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{backbone} on {task}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ parts
def accuracy_part(args, out: Path, backbone_size: int, probe_model) -> None:
    entries = []
    max_epochs = 0
    for sigma in args.budgets:
        rounds = common.planned_rounds(args.backbone, args.num_labels, Method("mimi", "", target_compression=sigma))
        total = (rounds + 1) * args.epochs_per_round
        max_epochs = max(max_epochs, total)
        rank = common.lora_rank_for_budget(probe_model, common.adapter_budget(probe_model, sigma))
        entries += [(m, total, sigma) for m in methods_at(sigma, rank)]
    entries += [(m, max_epochs, None) for m in FIXED if m.kind in args.fixed]
    started = time.time()

    def write(rows: list[dict], final: bool = False) -> None:
        summary = summarise(rows, backbone_size)
        table_rows = [[s["task"], "—" if s["budget_sigma"] is None else f"{s['budget_sigma']:g}", s["label"],
                       f"{statistics_mean(s['method_params']):,.0f}", f"{s['params_pct']:.2f}%", s["epochs"],
                       fmt(s["accuracy"]), len(s["seeds"])] for s in summary]
        md = [f"# Accuracy at matched budgets ({'final' if final else 'PARTIAL: run still going or interrupted'})",
              "", f"Backbone `{args.backbone}` ({backbone_size:,} parameters without head), tasks {args.tasks} "
              f"(train ≤ {args.max_train}, test ≤ {args.max_test}), seeds {args.seeds}, E = {args.epochs_per_round} "
              f"epoch(s) per MiMi segment, batch {args.batch_size}, AdamW lr {args.lr} (full FT {args.lr_full}), "
              "wd 0.05, cosine with 10% warm-up, no augmentation. Params = trained parameters besides the "
              "classification head (every method also trains the head: "
              f"{summary[0]['head_params'] if summary else '?'} parameters). Accuracy = test top-1 %, mean ± std "
              "over seeds.", "",
              common.table(["task", "σt", "method", "params", "% of backbone", "epochs", "accuracy %", "seeds"],
                           table_rows)]
        if args.notes:
            md += ["", args.notes]
        common.write_results(out, "accuracy", {"config": vars_for_json(args), "rows": rows, "summary": summary,
                                               "elapsed_s": time.time() - started, "final": final}, "\n".join(md))
        if summary:
            plot_accuracy(summary, out / "accuracy.png", args.backbone)

    rows = []
    for task in args.tasks:
        rows += run_grid(args, args.backbone, task, entries, "accuracy", lambda r, done=rows: write(done + r))
    write(rows, final=True)


def ablation_part(args, out: Path, backbone_size: int) -> None:
    sigma = args.ablation_budget
    variants = [("global", "mimi"), ("local", "mimi"), ("global", "l1"), ("global", "random")]
    if args.smoke:
        variants = variants[:2]
    entries = [(Method("mimi", f"{sel} / {score}", target_compression=sigma,
                       mimi_options={"selection": sel, "score": score}), None, sigma) for sel, score in variants]
    vanilla_rounds = common.planned_rounds(args.backbone, args.num_labels, Method("mimi", "", target_compression=sigma))
    entries.append((Method("adapter", f"vanilla σ={sigma:g}", init_compression=sigma, target_compression=sigma),
                    (vanilla_rounds + 1) * args.epochs_per_round, sigma))
    started = time.time()

    def write(rows: list[dict], final: bool = False) -> None:
        summary = summarise(rows, backbone_size)
        table_rows = []
        for s in summary:
            removed = [sum(w == 0 for w in r["widths"].values()) for r in rows
                       if r["label"] == s["label"] and r["task"] == s["task"] and r["widths"]]
            table_rows.append([s["task"], s["label"], f"{statistics_mean(s['method_params']):,.0f}", s["epochs"],
                               fmt(s["accuracy"]), (f"{statistics_mean(removed):.1f}" if removed else "—"),
                               len(s["seeds"])])
        md = [f"# Ablation: selection and score at σt = {sigma:g} "
              f"({'final' if final else 'PARTIAL: run still going or interrupted'})", "",
              f"Backbone `{args.backbone}`, tasks {args.tasks}, seeds {args.seeds}, σ0 = 4, ρ = 0.5, "
              f"E = {args.epochs_per_round}; same loop and settings as accuracy.md. 'l1' = the eq. 3 numerator "
              "without the 2·d normalisation.", "",
              common.table(["task", "selection / score", "params", "epochs", "accuracy %", "adapters removed",
                            "seeds"], table_rows)]
        if args.notes:
            md += ["", args.notes]
        common.write_results(out, "ablation", {"config": vars_for_json(args), "rows": rows, "summary": summary,
                                               "elapsed_s": time.time() - started, "final": final}, "\n".join(md))

    rows = []
    for task in args.tasks:
        rows += run_grid(args, args.backbone, task, entries, "ablation", lambda r, done=rows: write(done + r))
    write(rows, final=True)


def allocation_part(args, out: Path) -> None:
    """Final per-layer widths of MiMi at σt = --ablation-budget on each task: from the MiMi rows (first seed) of
    an accuracy.json given with --from-json, else from fresh runs."""
    from peft_mimi.plots import plot_widths

    sigma = args.ablation_budget
    recorded = {}
    if args.from_json:
        for row in json.loads(Path(args.from_json).read_text())["rows"]:
            if row["method"]["kind"] == "mimi" and row["budget_sigma"] == sigma and row["seed"] == args.seeds[0]:
                recorded[row["task"]] = row
    raw = []
    for task in args.tasks:
        if task in recorded:
            row, source = recorded[task], str(args.from_json)
        else:
            data = common.task_tensors(task, args.processor, args.max_train, args.max_test)
            row = asdict(common.run(Method("mimi", "MiMi", target_compression=sigma), args.backbone, data,
                                    seed=args.seeds[0], epochs_per_round=args.epochs_per_round, total_epochs=None,
                                    lr=args.lr, batch_size=args.batch_size))
            source = "this run"
        path = plot_widths(row["widths"], out / f"allocation_{task}.png", initial=row["initial_widths"],
                           title=f"MiMi on {args.backbone}/{task}, σt={sigma:g}, acc {100 * row['accuracy']:.1f}%")
        alive = sum(w > 0 for w in row["widths"].values())
        raw.append({"task": task, "sigma_t": sigma, "seed": args.seeds[0], "accuracy": row["accuracy"],
                    "widths": row["widths"], "initial_widths": row["initial_widths"], "plot": path.name,
                    "adapters_alive": alive, "source": source})
        print(f"[allocation] {task}: acc={row['accuracy']:.4f} alive={alive}/{len(row['widths'])} "
              f"widths={row['widths']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocation.json").write_text(json.dumps({"command": common.command_line(),
                                                      "environment": common.environment(), "runs": raw},
                                                     indent=1) + "\n")


RESUME_KEYS = ("backbone", "epochs_per_round", "batch_size", "lr", "lr_full", "max_train", "max_test")


def vars_for_json(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("processor", "previous")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", nargs="+", default=["accuracy"], choices=["accuracy", "ablation", "allocation"])
    parser.add_argument("--backbone", default="fmnist-vit")
    parser.add_argument("--tasks", nargs="+", default=["digits"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[16.0, 64.0])
    parser.add_argument("--ablation-budget", type=float, default=64.0)
    parser.add_argument("--fixed", nargs="*", default=["adapter", "linear", "bitfit", "full"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs-per-round", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-full", type=float, default=3e-4)
    parser.add_argument("--max-train", type=int, default=1500)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-json", default=None, help="allocation: take MiMi widths from this accuracy.json")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs already recorded in <out>/<what>.json with the same settings")
    parser.add_argument("--notes", default="", help="a paragraph appended to the .md (the honest reading)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="tiny random ViT, a few images, one seed: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.seeds, args.budgets, args.max_train, args.max_test = common.SMOKE, [0], [16.0], 48, 32
        args.ablation_budget = 16.0
        args.what = ["accuracy", "ablation", "allocation"]
        args.fixed = ["linear"]
    torch.set_num_threads(args.threads)
    args.previous = {}
    for what in ("accuracy", "ablation"):
        path = args.out / f"{what}.json"
        if args.resume and path.is_file():
            previous = json.loads(path.read_text())
            same = all(previous["config"].get(k) == getattr(args, k) for k in RESUME_KEYS)
            args.previous[what] = previous["rows"] if same else []
    probe_model, args.processor = common.load_model(args.backbone, 10)
    backbone_size = common.backbone_params(probe_model)
    first = common.task_tensors(args.tasks[0], args.processor, args.max_train, args.max_test)
    args.num_labels = first[4]
    if "accuracy" in args.what:
        accuracy_part(args, args.out, backbone_size, probe_model)
    if "ablation" in args.what:
        ablation_part(args, args.out, backbone_size)
    if "allocation" in args.what:
        allocation_part(args, args.out)


if __name__ == "__main__":
    main()
