"""Accuracy at matched parameter budgets (paper Table 1 / Fig. 3, reduced), the ablation (Table 2, reduced), the
per-layer allocation (Fig. 5) and a sweep of MiMi's schedule, on small pretrained backbones and CPU-sized tasks.

    python benchmarks/bench_accuracy.py --what accuracy --out DIR   # -> DIR/accuracy.{md,json,png}
    python benchmarks/bench_accuracy.py --what ablation             # -> results/ablation.{md,json}
    python benchmarks/bench_accuracy.py --what sweep                # -> results/sweep.{md,json}
    python benchmarks/bench_accuracy.py --what allocation           # -> results/allocation_<task>.png (+ .json)
    python benchmarks/bench_accuracy.py --smoke --out /tmp/x        # all four, tiny random ViT, under a minute

The exact commands behind results/ are in benchmarks/README.md.
Every method goes through `common.run`, which trains with `peft_mimi.train.train` (the loop of `peft-mimi train`:
same subsets, batch order, augmentation, epochs, optimizer and schedule). MiMi trains ``(R+1)·E`` epochs; the other
methods at a budget train the same number of epochs in one cosine schedule. Every table also has the sanity floors:
logistic regression on raw pixels and a converged linear probe on the frozen features.
Results are rewritten after every run, so an interrupted run leaves its finished rows (marked partial).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from peft_mimi.recipe import DEFAULT_HEAD_LR, DEFAULT_LR

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Method  # noqa: E402


def methods_at(budget_sigma: float, lora_rank: int, mimi_options: dict | None = None) -> list[Method]:
    """The methods at one budget. ``mimi_options``: `MiMiConfig` or `TrainingRecipe` fields for MiMi's rows (e.g.
    ``selection=local`` or ``score=gradient``, or the product's default schedule ``epochs_per_round=1
    final_epochs=<R+2> restart_lr=false``), named in the row's label so that its rows never mix with the plain
    "MiMi" rows, which are the paper's schedule (`common.run`)."""
    from peft_mimi import MiMiConfig

    s = f"{budget_sigma:g}"
    options = dict(mimi_options or {})
    variant = "".join(f" + {k}={v}" for k, v in sorted(options.items()))
    config = {k: v for k, v in options.items() if k in MiMiConfig.__dataclass_fields__}
    recipe = {k: v for k, v in options.items() if k not in config}
    return [
        Method("mimi", f"MiMi σ0=4→σt={s}{variant}", target_compression=budget_sigma, mimi_options=config,
               recipe_options=recipe),
        Method("adapter", f"Adapters σ={s} (vanilla, uniform)", init_compression=budget_sigma,
               target_compression=budget_sigma),
        Method("lora", f"LoRA r={lora_rank} (≈B(σt={s}))", lora_rank=lora_rank),
        Method("adalora", f"AdaLoRA r̄={lora_rank} (from r={4 * lora_rank}, ≈B(σt={s}))", lora_rank=lora_rank),
    ]


FIXED = [
    Method("adapter", "Adapters σ=4 (vanilla, large)", init_compression=4.0, target_compression=4.0),
    Method("linear", "Head only (same epochs)"),
    Method("bitfit", "BitFit (biases + head)"),
    Method("full", "Full fine-tuning"),
    Method("probe", "Floor: linear probe, converged (logistic regression on frozen features)"),
    Method("pixels", "Floor: logistic regression on raw pixels (32x32)"),
]


def lr_for(method: Method, args) -> float:
    return args.lr_full if method.kind == "full" else args.lr


def run_order(entry: tuple) -> tuple:
    """The order in which a grid runs at each seed and task, so that an interrupted grid has the comparisons that
    matter most: the floors (seconds), MiMi and vanilla adapters of its size at each budget, the σ = 4 adapters,
    then LoRA, AdaLoRA and full fine-tuning (the slowest)."""
    method, _, sigma = entry
    rank = {"probe": 0, "pixels": 1, "mimi": 2, "adapter": 3, "lora": 5, "adalora": 6, "linear": 7, "bitfit": 8,
            "full": 9}[method.kind]
    if method.kind == "adapter" and sigma is None:
        rank = 4  # the large σ = 4 adapters, after every budget's MiMi / vanilla pair
    if rank < 2:
        return (0, rank, 0.0)
    if rank < 4:
        return (1, -(sigma or 0), rank)
    return (2, rank, -(sigma or 0))


def run_dir(args, name: str, task: str, method: Method, seed: int, sigma: float | None) -> Path | None:
    """Where a run keeps its checkpoints, so that --resume continues a run interrupted in the middle."""
    if args.runs_dir is None:
        return None
    slug = "".join(c if c.isalnum() else "-" for c in f"{method.label}-{sigma}").strip("-")
    return args.runs_dir / name / task / f"{slug}-seed{seed}"


def fmt(values: list[float], scale: float = 100.0) -> str:
    mean, std = common.mean_std([v * scale for v in values])
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def run_grid(args, backbone: str, task: str, entries: list[tuple[Method, int, float | None]], name: str,
             write) -> list[dict]:
    """Run every (method, total epochs, budget σt) for every seed; call ``write(rows)`` after each run."""
    rows = []
    max_train = train_limit(args, task)
    for seed in args.seeds:
        for method, total_epochs, sigma in entries:
            done = [r for r in args.previous.get(name, []) if (r["task"], r["label"], r["seed"], r["budget_sigma"])
                    == (task, method.label, seed, sigma) and total_epochs in (None, r["epochs"])
                    and r.get("max_train", args.max_train) == max_train]
            if done:  # --resume: a finished run of the same settings, recorded in the previous results
                rows.append(done[0])
                continue
            if method.kind == "widths":  # the final widths of this seed's global / mimi run at this budget
                source = next(r for r in rows if (r["label"], r["seed"], r["budget_sigma"]) == ("global / mimi", seed,
                                                                                              sigma))
                method = dataclasses.replace(method, widths=source["widths"])
            result = common.run(method, backbone, task, seed=seed, epochs_per_round=args.epochs_per_round,
                                total_epochs=total_epochs, lr=lr_for(method, args), batch_size=args.batch_size,
                                image_size=args.image_size, max_train=max_train, max_test=args.max_test,
                                run_dir=run_dir(args, name, task, method, seed, sigma),
                                mixed_precision=args.mixed_precision, checkpoint_every_steps=args.checkpoint_every,
                                head_lr=args.head_lr, num_workers=args.num_workers)
            n_train = min(max_train or 10**9, len(common.task_dataset(task)["train"]))
            row = {"task": task, "budget_sigma": sigma, "label": method.label, "method": asdict(method),
                   "seed": seed, "lr": lr_for(method, args), "max_train": max_train, "n_train": n_train,
                   "device": common.device_name(), **asdict(result)}
            rows.append(row)
            print(f"[{name}] {task} seed={seed} {method.label}: acc={result.accuracy:.4f} "
                  f"params={result.method_params} epochs={result.epochs} wall={result.wall_s:.0f}s", flush=True)
            write(rows)
    return rows


def with_pending(args, name: str, rows: list[dict]) -> list[dict]:
    """``rows`` plus the --resume rows not reached yet (same task list, a label still to run), so that rewriting
    the results file while a run is going never drops finished work that a restart would have to redo."""
    key = lambda r: (r["task"], r["label"], r["seed"], r["budget_sigma"])  # noqa: E731
    done = {key(r) for r in rows}
    return rows + [r for r in args.previous.get(name, []) if r["task"] in args.tasks and r["label"] in args.labels
                   and key(r) not in done]


def publish(args, out: Path, name: str, title: str, intro: str, header: list[str], table_rows: list[list],
            rows: list[dict], summary: list[dict], started: float, final: bool) -> None:
    """``<out>/<name>.md`` (title, intro, table, --notes) and ``<out>/<name>.json`` (config, every row)."""
    md = [f"# {title} ({'final' if final else 'PARTIAL: run still going or interrupted'})", "", intro, "",
          common.table(header, table_rows)]
    if args.notes:
        md += ["", args.notes]
    common.write_results(out, name, {"config": vars_for_json(args), "rows": rows, "summary": summary,
                                     "elapsed_s": time.time() - started, "final": final}, "\n".join(md))


def train_limit(args, task: str) -> int | None:
    """The training-set cap for ``task``: its --task-max-train entry, else --max-train."""
    return args.task_max_train.get(task, args.max_train)


def summarise(rows: list[dict], backbone_size: int) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["budget_sigma"], row["label"]), []).append(row)
    out = []
    for (task, sigma, label), rs in groups.items():
        params = [r["method_params"] for r in rs]
        out.append({"task": task, "budget_sigma": sigma, "label": label, "seeds": [r["seed"] for r in rs],
                    "accuracy": [r["accuracy"] for r in rs], "method_params": params,
                    "params_pct": 100 * statistics.fmean(params) / backbone_size, "epochs": rs[0]["epochs"],
                    "head_params": rs[0]["head_params"], "wall_s": [r["wall_s"] for r in rs]})
    return out


def plot_task_panels(tasks: list[str], path: Path, backbone: str, draw, *, xlabel: str, ylabel: str,
                     xscale: str = "linear", yscale: str = "linear", legend_size: int = 7) -> None:
    """One panel per task, side by side, written to ``path``: ``draw(ax, task)`` plots a task's lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        draw(ax, task)
        ax.set_xscale(xscale)
        ax.set_yscale(yscale)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{backbone} on {task}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(summary: list[dict], path: Path, backbone: str) -> None:
    def draw(ax, task: str) -> None:
        families: dict[str, list] = {}
        for s in summary:
            if s["task"] != task:
                continue
            family = s["label"].split(" ")[0] if s["budget_sigma"] is not None else s["label"]
            mean, std = common.mean_std([a * 100 for a in s["accuracy"]])
            families.setdefault(family, []).append((max(statistics.fmean(s["method_params"]), 1), mean, std))
        for family, points in sorted(families.items()):
            points.sort()
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=family, linestyle="-" if len(xs) > 1 else "")

    plot_task_panels(sorted({s["task"] for s in summary}), path, backbone, draw, xscale="log",
                     xlabel="parameters trained besides the head (log; probe drawn at 1)", ylabel="test accuracy (%)")


def plot_losses(rows: list[dict], path: Path, backbone: str) -> None:
    """Training loss per epoch (mean over seeds) of every trained method, one panel per task: shows whether the
    σ = 4 adapters have converged in the table's epochs, and MiMi's jumps after each cut."""
    curves: dict[tuple[str, str], list[list[float]]] = {}
    for r in rows:
        losses = [loss for segment in r.get("segments", []) for loss in segment["loss"]]
        if losses:
            curves.setdefault((r["task"], r["label"]), []).append(losses)

    def draw(ax, task: str) -> None:
        for (curve_task, label), runs in sorted(curves.items()):
            if curve_task == task:
                epochs = min(len(run) for run in runs)
                mean = [statistics.fmean(run[e] for run in runs) for e in range(epochs)]
                ax.plot(range(1, epochs + 1), mean, marker=".", label=f"{label} ({len(runs)} seeds)")

    tasks = sorted({task for task, _ in curves})
    if tasks:
        plot_task_panels(tasks, path, backbone, draw, yscale="log", legend_size=6, xlabel="epoch",
                         ylabel="training loss (epoch mean, log)")


# ------------------------------------------------------------------------------------------------ parts
def accuracy_part(args, out: Path, backbone_size: int, probe_model) -> None:
    entries = []
    max_epochs = 0
    for sigma in args.budgets:
        rounds = common.planned_rounds(args.backbone, args.num_labels, Method("mimi", "", target_compression=sigma))
        total = (rounds + 1) * args.epochs_per_round
        max_epochs = max(max_epochs, total)
        rank = common.lora_rank_for_budget(probe_model, common.adapter_budget(probe_model, sigma))
        kinds = args.budget_methods.get(sigma, args.methods)
        entries += [(m, total, sigma) for m in methods_at(sigma, rank, args.mimi_options) if m.kind in kinds]
    # the floors are not trained (their rows record 0 epochs): no epoch count, so that --resume finds them
    entries += [(m, None if m.kind in common.FLOORS else max_epochs, None) for m in FIXED if m.kind in args.fixed]
    entries.sort(key=run_order)  # cheap floors first, then MiMi against its same-size rivals, full FT last
    args.labels = {m.label for m, *_ in entries}  # the whole table's rows, also those --only leaves to others
    if args.only:
        entries = [e for e in entries if e[0].kind in args.only]
    started = time.time()

    def write(rows: list[dict], final: bool = False) -> None:
        rows = with_pending(args, "accuracy", rows)
        summary = summarise(rows, backbone_size)
        table_rows = [[s["task"], "—" if s["budget_sigma"] is None else f"{s['budget_sigma']:g}", s["label"],
                       f"{statistics.fmean(s['method_params']):,.0f}", f"{s['params_pct']:.2f}%", s["epochs"],
                       fmt(s["accuracy"]), len(s["seeds"])] for s in summary]
        heads = {s["task"]: s["head_params"] for s in summary if s["head_params"]}
        intro = (f"Backbone `{args.backbone}` ({backbone_size:,} parameters without head"
                 f"{f', at {args.image_size} px' if args.image_size else ''}), tasks {args.tasks} "
                 f"(train ≤ {args.max_train}{''.join(f', {t} ≤ {n}' for t, n in args.task_max_train.items())}, "
                 f"test ≤ {args.max_test}), seeds {args.seeds}, E = {args.epochs_per_round} "
                 f"epoch(s) per MiMi round, batch {args.batch_size}, AdamW lr {args.lr} (full FT {args.lr_full}; head "
                 f"{args.head_lr or 'the same'}), "
                 f"wd 0.05, warm-up 10 % + cosine per round, clipping 5.0, mixed precision {args.mixed_precision}; "
                 "every trained method runs through `peft_mimi.train.train` (the loop of `peft-mimi train`, with its "
                 "augmentation: random resized crop, flips where the dataset allows). Params = trained parameters "
                 "besides the classification head (every trained method also trains the head: "
                 f"{', '.join(f'{t} {h}' for t, h in heads.items())} parameters). Wall = training plus one test "
                 "evaluation per round (MiMi evaluates after every round). Accuracy = test top-1 %, mean ± std over "
                 "seeds. The two floors are not trained by the loop: logistic regression (scikit-learn, converged, C "
                 "by 3-fold CV on the training set) on the raw pixels and on the frozen backbone's features.")
        devices = collections.Counter(r.get("device", "cpu") for r in rows if r["method"]["kind"] not in ("probe",
                                                                                                        "pixels"))
        if devices:  # rows recorded before devices were (all on this project's 2-core CPU) count as "cpu"
            intro += (" Trained on: " + ", ".join(f"{d} ({n} runs)" for d, n in devices.most_common())
                      + "; each row's device is in the JSON (wall times are not comparable across devices).")
        publish(args, out, "accuracy", "Accuracy at matched budgets", intro,
                ["task", "σt", "method", "params", "% of backbone", "epochs", "accuracy %", "seeds"], table_rows,
                rows, summary, started, final)
        if summary:
            plot_accuracy(summary, out / "accuracy.png", args.backbone)
            plot_losses(rows, out / "accuracy_loss.png", args.backbone)

    rows = []
    for seed in args.seeds:  # seed-major: an interrupted grid has every task at the first seeds
        for task in args.tasks:
            seed_args = argparse.Namespace(**{**vars(args), "seeds": [seed]})
            rows += run_grid(seed_args, args.backbone, task, entries, "accuracy", lambda r, done=rows: write(done + r))
    write(rows, final=True)


ABLATION = [("global", "mimi"), ("local", "mimi"), ("global", "l1"), ("global", "down_l1"), ("global", "gradient"),
            ("global", "random")]
FROM_SCRATCH = "MiMi's widths, from scratch"


def ablation_part(args, out: Path, backbone_size: int) -> None:
    """At each budget in --ablation-budgets: MiMi with each (selection, score), vanilla adapters, and MiMi's final
    widths (of the same seed's global/mimi run) trained from scratch as fixed adapters for the same epochs."""
    variants = ABLATION[:2] if args.smoke else ABLATION
    entries = []
    for sigma in args.ablation_budgets:
        entries += [(Method("mimi", f"{sel} / {score}", target_compression=sigma,
                            mimi_options={"selection": sel, "score": score}), None, sigma) for sel, score in variants]
        rounds = common.planned_rounds(args.backbone, args.num_labels, Method("mimi", "", target_compression=sigma))
        total = (rounds + 1) * args.epochs_per_round
        entries += [(Method("adapter", f"vanilla σ={sigma:g}", init_compression=sigma, target_compression=sigma),
                     total, sigma), (Method("widths", FROM_SCRATCH), total, sigma)]
    args.labels = {m.label for m, *_ in entries}
    started = time.time()

    def write(rows: list[dict], final: bool = False) -> None:
        rows = with_pending(args, "ablation", rows)
        summary = summarise(rows, backbone_size)
        table_rows = []
        for s in summary:
            removed = [sum(w == 0 for w in r["widths"].values()) for r in rows if r["widths"] and
                       (r["label"], r["task"], r["budget_sigma"]) == (s["label"], s["task"], s["budget_sigma"])]
            table_rows.append([s["task"], f"{s['budget_sigma']:g}", s["label"],
                               f"{statistics.fmean(s['method_params']):,.0f}", s["epochs"], fmt(s["accuracy"]),
                               (f"{statistics.fmean(removed):.1f}" if removed else "—"), len(s["seeds"])])
        intro = (f"Backbone `{args.backbone}`, tasks {args.tasks}, seeds {args.seeds}, σ0 = 4, ρ = 0.5, "
                 f"E = {args.epochs_per_round}; same loop and settings as accuracy.md. 'l1' = the eq. 3 numerator "
                 "without the 2·d normalisation; 'down_l1' = W_down only; 'gradient' = |∂L/∂w| summed over the "
                 "neuron's weights and the round's steps, per parameter. "
                 f"'{FROM_SCRATCH}' = fixed adapters with the final per-layer widths of the same seed's global / "
                 "mimi run, trained from the start for the same number of epochs (separates what the allocation buys "
                 "from what training large and then pruning buys).")
        publish(args, out, "ablation", "Ablation: selection, score, and allocation vs pruning", intro,
                ["task", "σt", "selection / score", "params", "epochs", "accuracy %", "adapters removed", "seeds"],
                table_rows, rows, summary, started, final)

    rows = []
    for task in args.tasks:
        rows += run_grid(args, args.backbone, task, entries, "ablation", lambda r, done=rows: write(done + r))
    write(rows, final=True)


def sweep_part(args, out: Path, backbone_size: int) -> None:
    """At one extreme budget (--sweep-budget): MiMi's epochs per round E, the training after the last cut and the
    prune ratio ρ, each against vanilla adapters of the same budget trained for the same total epochs."""
    sigma = args.sweep_budget
    settings = [(e, None, 0.5) for e in args.sweep_epochs] + [(2, f, 0.5) for f in args.sweep_final_epochs]
    settings += [(2, None, rho) for rho in args.sweep_ratios]
    entries = []
    for e, final, rho in settings:
        label = f"MiMi E={e}" + (f", {final} epochs after the last cut" if final else "") + f", ρ={rho:g}"
        method = Method("mimi", label, target_compression=sigma, final_epochs=final, mimi_options={"prune_ratio": rho})
        rounds = common.planned_rounds(args.backbone, args.num_labels, method)
        total = rounds * e + (final or e)
        entries.append((method, None, sigma, e))
        vanilla = Method("adapter", f"vanilla σ={sigma:g}, {total} epochs", init_compression=sigma,
                         target_compression=sigma)
        if all(m.label != vanilla.label for m, *_ in entries):
            entries.append((vanilla, total, sigma, e))
    args.labels = {m.label for m, *_ in entries}
    started = time.time()

    def write(rows: list[dict], final: bool = False) -> None:
        rows = with_pending(args, "sweep", rows)
        summary = summarise(rows, backbone_size)
        table_rows = [[s["task"], s["label"], f"{statistics.fmean(s['method_params']):,.0f}", s["epochs"],
                       fmt(s["accuracy"]), len(s["seeds"])] for s in summary]
        intro = (f"Backbone `{args.backbone}`, tasks {args.tasks}, seeds {args.seeds}, σ0 = 4; same loop and "
                 "settings as accuracy.md. Each MiMi setting is followed by vanilla adapters of the same budget "
                 "trained for the same total epochs.")
        publish(args, out, "sweep", f"Sweep at σt = {sigma:g}: epochs per round, training after the last cut, "
                "prune ratio", intro, ["task", "setting", "params", "epochs", "accuracy %", "seeds"], table_rows,
                rows, summary, started, final)

    rows = []
    for task in args.tasks:
        for method, total, sigma_, e in entries:
            grid_args = argparse.Namespace(**{**vars(args), "epochs_per_round": e})
            rows += run_grid(grid_args, args.backbone, task, [(method, total, sigma_)], "sweep",
                             lambda r, done=rows: write(done + r))
    write(rows, final=True)


def allocation_part(args, out: Path) -> None:
    """Final per-layer widths of MiMi at the first σt of --ablation-budgets on each task: from the MiMi rows (first
    seed) of an accuracy.json given with --from-json, else from fresh runs."""
    from peft_mimi.plots import plot_widths

    sigma = args.ablation_budgets[0]
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
            row = asdict(common.run(Method("mimi", "MiMi", target_compression=sigma), args.backbone, task,
                                    seed=args.seeds[0], epochs_per_round=args.epochs_per_round, total_epochs=None,
                                    lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size,
                                    image_size=args.image_size,
                                    max_train=train_limit(args, task), max_test=args.max_test))
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


PROTOCOL = 2  # 2: trained by peft_mimi.train (fresh heads, augmentation); rows of another protocol are not reused
RESUME_KEYS = ("protocol", "backbone", "epochs_per_round", "batch_size", "lr", "head_lr", "lr_full", "max_train",
               "max_test", "image_size", "mixed_precision")


def vars_for_json(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("processor", "previous", "runs_dir")}


def parse_option(item: str) -> tuple[str, object]:
    """``FIELD=VALUE`` of --mimi-options, checked against `MiMiConfig` and `TrainingRecipe`: true/false, numbers,
    else the string."""
    from peft_mimi import MiMiConfig

    name, sep, text = item.partition("=")
    if not sep or name not in {**MiMiConfig.__dataclass_fields__, **common.BenchmarkRecipe.__dataclass_fields__}:
        raise SystemExit(f"--mimi-options {item!r}: expected FIELD=VALUE with a MiMiConfig or TrainingRecipe "
                         "field, e.g. score=gradient or restart_lr=false")
    lowered = text.lower()
    if lowered in ("true", "false"):
        return name, lowered == "true"
    for kind in (int, float):
        try:
            return name, kind(text)
        except ValueError:
            pass
    return name, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", nargs="+", default=["accuracy"],
                        choices=["accuracy", "ablation", "allocation", "sweep"])
    parser.add_argument("--backbone", default="fmnist-vit")
    parser.add_argument("--tasks", nargs="+", default=["digits"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[16.0, 64.0])
    parser.add_argument("--ablation-budgets", nargs="+", type=float, default=[64.0, 256.0])
    parser.add_argument("--sweep-budget", type=float, default=256.0)
    parser.add_argument("--sweep-epochs", nargs="*", type=int, default=[1, 2, 4], help="sweep: E values")
    parser.add_argument("--sweep-final-epochs", nargs="*", type=int, default=[6],
                        help="sweep: epochs after the last cut (E=2 before it)")
    parser.add_argument("--sweep-ratios", nargs="*", type=float, default=[0.75], help="sweep: ρ values (E=2)")
    parser.add_argument("--methods", nargs="+", default=["mimi", "adapter", "lora", "adalora"],
                        help="the methods run at each budget")
    parser.add_argument("--mimi-options", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="MiMiConfig or TrainingRecipe fields for MiMi's rows, e.g. score=gradient or "
                             "restart_lr=false (named in the rows' label)")
    parser.add_argument("--budget-methods", nargs="*", default=[], metavar="SIGMA=KIND,KIND",
                        help="the methods run at one budget instead of --methods, e.g. 64=mimi,adapter,lora")
    parser.add_argument("--fixed", nargs="*", default=["adapter", "linear", "bitfit", "full", "probe", "pixels"],
                        help="the budget-free methods (adapter = vanilla adapters at σ=4; probe and pixels = the "
                             "sanity floors)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs-per-round", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="default: peft_mimi's default")
    parser.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR,
                        help="the head's learning rate (default: peft_mimi's default; none = the same as --lr)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="checkpoint every N optimizer steps inside a run (long runs; needs --runs-dir)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep every run's files here, so that --resume continues an interrupted run")
    parser.add_argument("--lr-full", type=float, default=3e-4)
    parser.add_argument("--max-train", type=int, default=1500)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--task-max-train", nargs="*", default=[], metavar="TASK=N",
                        help="a smaller training-set cap for some tasks, e.g. mnist=500 (CPU time)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=None,
                        help="run the backbone at this resolution (ViT-like backbones interpolate positions)")
    parser.add_argument("--from-json", default=None, help="allocation: take MiMi widths from this accuracy.json")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs already recorded in <out>/<what>.json with the same settings")
    parser.add_argument("--only", nargs="*", default=[], metavar="KIND",
                        help="accuracy: run only these kinds of the table (e.g. probe pixels on a CPU, the trained "
                             "methods on a GPU machine); the table keeps every other row already recorded")
    parser.add_argument("--resume-from", nargs="*", type=Path, default=[], metavar="JSON",
                        help="with --resume: also reuse the runs recorded in these results files (the same table "
                             "run in parts on other machines; each named like the output, e.g. accuracy.json), "
                             "when their settings match")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per run")
    parser.add_argument("--notes", default="", help="a paragraph appended to the .md (the honest reading)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="tiny random ViT, a few images, one seed: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.seeds, args.budgets, args.max_train, args.max_test = common.SMOKE, [0], [16.0], 48, 32
        args.ablation_budgets, args.sweep_budget = [16.0], 16.0
        args.sweep_epochs, args.sweep_final_epochs, args.sweep_ratios = [1], [2], [0.75]
        args.what = ["accuracy", "ablation", "allocation", "sweep"]
        args.fixed = ["linear", "probe", "pixels"]
    args.protocol = PROTOCOL
    args.task_max_train = {t: int(n) for t, n in (item.split("=") for item in args.task_max_train)}
    args.mimi_options = dict(parse_option(item) for item in args.mimi_options)
    args.budget_methods = {float(b): kinds.split(",") for b, kinds in (item.split("=") for item in args.budget_methods)}
    torch.set_num_threads(args.threads)
    args.previous = {}
    for what in ("accuracy", "ablation", "sweep"):
        args.previous[what] = []
        for path in [args.out / f"{what}.json", *(p for p in args.resume_from if p.stem == what)]:
            if args.resume and path.is_file():
                previous = json.loads(path.read_text())
                if all(previous["config"].get(k) == getattr(args, k) for k in RESUME_KEYS):
                    args.previous[what] += previous["rows"]
        # a run recorded in several files counts once (the first file that has it)
        first: dict[tuple, dict] = {}
        for r in args.previous[what]:
            first.setdefault((r["task"], r["label"], r["seed"], r["budget_sigma"], r["epochs"]), r)
        args.previous[what] = list(first.values())
    probe_model, args.processor = common.load_model(args.backbone, 10, args.image_size)
    backbone_size = common.backbone_params(probe_model)
    args.num_labels = common.num_labels_of(args.tasks[0])
    if "accuracy" in args.what:
        accuracy_part(args, args.out, backbone_size, probe_model)
    if "ablation" in args.what:
        ablation_part(args, args.out, backbone_size)
    if "allocation" in args.what:
        allocation_part(args, args.out)
    if "sweep" in args.what:
        sweep_part(args, args.out, backbone_size)


if __name__ == "__main__":
    main()
