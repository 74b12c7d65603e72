"""Training cost: wall time of a whole MiMi schedule against vanilla adapters trained for the same epochs, and the
time of each MiMi segment as the adapters shrink.

    python benchmarks/bench_training_cost.py                       # -> results/training_cost.{md,json,png}
    python benchmarks/bench_training_cost.py --smoke --out /tmp/x  # tiny random ViT, seconds

All runs use `common.run` (the loop of bench_accuracy.py). Runs of one repeat are interleaved (MiMi, adapters at
σt, adapters at σ=4, then again) so that background load on the shared machine hits each method alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from peft_mimi.recipe import DEFAULT_HEAD_LR, DEFAULT_LR

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Method  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="fmnist-swin")
    parser.add_argument("--task", default="digits")
    parser.add_argument("--sigma", type=float, default=64.0)
    parser.add_argument("--epochs-per-round", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--max-train", type=int, default=1500)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-json", default=None,
                        help="take the runs from this accuracy.json (its MiMi σt and adapter rows) instead of training")
    parser.add_argument("--notes", default="")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.repeats, args.max_train, args.max_test, args.epochs_per_round = common.SMOKE, 1, 64, 32, 1
        args.sigma = 16.0
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    if args.from_json:
        runs, epochs, rounds, n_train, mimi_label, how = recorded_runs(args)
    else:
        runs, epochs, rounds, n_train, mimi_label, how = fresh_runs(args)
    load.append(os.getloadavg()[0])

    rows = []
    for label, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        per_epoch = statistics.median(s["seconds"] / s["epochs"] for r in rs for s in r["segments"])
        rows.append([label, f"{rs[0]['method_params']:,}", epochs, f"{statistics.median(walls):.1f}",
                     f"{1000 * per_epoch:.0f}", f"{100 * statistics.fmean(r['accuracy'] for r in rs):.1f}"])
    seg_rows = []
    for seg_index, seg in enumerate(runs[mimi_label][0]["segments"]):
        per_epoch = [r["segments"][seg_index]["seconds"] / r["segments"][seg_index]["epochs"]
                     for r in runs[mimi_label]]  # training and that round's evaluation
        seg_rows.append([seg["round"], f"{seg['live_params']:,}", seg["adapters_alive"],
                         f"{1000 * statistics.median(per_epoch):.0f}"])
    labels = list(runs)
    busy = ("other jobs shared the cores: wall times are noisier" if max(load) > args.threads + 0.5
            else "nothing else ran on the cores")
    load_note = "" if args.from_json else f" 1-minute load average {load[0]:.2f} before, {load[1]:.2f} after ({busy})."
    base = statistics.median(r["wall_s"] for r in runs[labels[1]])
    ratio = statistics.median(r["wall_s"] for r in runs[mimi_label]) / base
    md = [f"# Training cost on {args.backbone} / {args.task}", "",
          f"{epochs} epochs for every method (MiMi: {rounds} pruning rounds, {args.epochs_per_round} epochs per "
          f"segment), batch {args.batch_size}, {n_train} training images, {args.threads} CPU thread(s), {how}, "
          f"medians over runs.{load_note}",
          "", common.table(["method", "final params", "epochs", "wall s", "ms / epoch", "acc %"], rows), "",
          f"MiMi's whole schedule / vanilla adapters at σt: **{ratio:.2f}×** wall time.", "",
          "## MiMi segments (time per epoch as the adapters shrink)", "",
          common.table(["after round", "live adapter params", "adapters alive", "ms / epoch"], seg_rows)]
    if args.notes:
        md += ["", args.notes]
    common.write_results(args.out, "training_cost", {"config": vars(args), "load_average": load, "epochs": epochs,
                                                     "rounds": rounds, "runs": runs, "mimi_over_vanilla": ratio},
                         "\n".join(md))


def fresh_runs(args):
    mimi = Method("mimi", f"MiMi σ0=4→σt={args.sigma:g}", target_compression=args.sigma)
    rounds = common.planned_rounds(args.backbone, common.num_labels_of(args.task), mimi)
    epochs = (rounds + 1) * args.epochs_per_round
    methods = [mimi,
               Method("adapter", f"Adapters σ={args.sigma:g}", init_compression=args.sigma,
                      target_compression=args.sigma),
               Method("adapter", "Adapters σ=4", init_compression=4.0, target_compression=4.0)]
    runs: dict[str, list[dict]] = {m.label: [] for m in methods}
    for repeat in range(args.repeats):
        for method in methods:
            r = common.run(method, args.backbone, args.task, seed=repeat, epochs_per_round=args.epochs_per_round,
                           total_epochs=epochs, lr=args.lr, batch_size=args.batch_size, max_train=args.max_train,
                           max_test=args.max_test, head_lr=DEFAULT_HEAD_LR)
            runs[method.label].append({"wall_s": r.wall_s, "accuracy": r.accuracy, "method_params": r.method_params,
                                       "segments": r.segments})
            print(f"[training_cost] {method.label} repeat {repeat}: {r.wall_s:.1f}s acc={r.accuracy:.4f}", flush=True)
    n_train = min(args.max_train or 10**9, len(common.task_dataset(args.task)["train"]))
    return runs, epochs, rounds, n_train, mimi.label, f"{args.repeats} interleaved repeat(s)"


def recorded_runs(args):
    """The MiMi σt, vanilla σt and vanilla σ=4 runs (same epochs) recorded by bench_accuracy.py in a JSON file."""
    raw = json.loads(Path(args.from_json).read_text())
    config = raw["config"]
    for key in ("backbone", "epochs_per_round", "batch_size", "lr"):
        setattr(args, key.replace("-", "_"), config[key])
    rows = [r for r in raw["rows"] if r["task"] == args.task]
    mimi = [r for r in rows if r["method"]["kind"] == "mimi" and r["budget_sigma"] == args.sigma]
    if not mimi:
        raise SystemExit(f"{args.from_json} has no MiMi run at σt={args.sigma:g} on {args.task}")
    epochs = mimi[0]["epochs"]
    picks = {mimi[0]["label"]: mimi}
    for sigma in (args.sigma, 4.0):
        same = [r for r in rows if r["method"]["kind"] == "adapter" and r["method"]["init_compression"] == sigma
                and r["epochs"] == epochs]
        if same:
            picks[same[0]["label"]] = same
    runs = {label: [{k: r[k] for k in ("wall_s", "accuracy", "method_params", "segments")} for r in rs]
            for label, rs in picks.items()}
    n_train = f"≤ {config['max_train']}"
    how = f"runs recorded in {args.from_json} (seeds {sorted({r['seed'] for r in mimi})}; not interleaved)"
    return runs, epochs, len(mimi[0]["segments"]) - 1, n_train, mimi[0]["label"], how


if __name__ == "__main__":
    main()
