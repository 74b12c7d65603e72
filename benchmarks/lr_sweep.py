"""The learning-rate sweep behind `peft_mimi.recipe.DEFAULT_LR`: peak AdamW learning rate of the adapters and of
the head for MiMi's default short schedule (σ0 = 4 → σt = 64, E = 2 epochs per round, batch 64), on two shipped
backbones and three tasks, trained through `peft_mimi.train.train` like every other number here.

    python benchmarks/lr_sweep.py --resume                      # -> results/lr_sweep.{md,json,png}
    python benchmarks/lr_sweep.py --smoke --out /tmp/x          # a tiny random ViT, seconds

Stage 1 runs the whole (lr, head_lr) grid with one seed; stage 2 reruns the best few settings of stage 1 (by mean
accuracy over every backbone and task) with more seeds, next to the paper's recipe scaled to batch 64
(5e-4 · 64/512 = 6.25e-5, the old default). The winner of stage 2 is the default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Method  # noqa: E402

PAPER_LR = 5e-4 * 64 / 512


def key(row: dict) -> tuple:
    return row["backbone"], row["task"], row["lr"], row["head_lr"], row["seed"]


def setting(lr: float, head_lr: float | None) -> str:
    return f"lr {lr:g}, head {head_lr:g}" if head_lr is not None else f"lr {lr:g} (head too)"


def run_all(args, todo: list[tuple], rows: list[dict], write) -> None:
    done = {key(r) for r in rows}
    for backbone, task, lr, head_lr, seed in todo:
        if (backbone, task, lr, head_lr, seed) in done:
            continue
        method = Method("mimi", "MiMi", target_compression=args.sigma)
        start = time.perf_counter()
        result = common.run(method, backbone, task, seed=seed, epochs_per_round=args.epochs_per_round,
                            total_epochs=None, lr=lr, batch_size=64, max_train=args.max_train,
                            max_test=args.max_test, head_lr=head_lr, image_size=args.image_size)
        rows.append({"backbone": backbone, "task": task, "lr": lr, "head_lr": head_lr, "seed": seed,
                     "accuracy": result.accuracy, "epochs": result.epochs, "method_params": result.method_params,
                     "final_loss": result.segments[-1]["loss"][-1], "wall_s": time.perf_counter() - start})
        done.add(key(rows[-1]))
        print(f"{backbone} {task} {setting(lr, head_lr)} seed {seed}: {result.accuracy:.4f}", flush=True)
        write(rows)


def ranking(rows: list[dict], seeds: set[int] | None = None) -> list[tuple[float, float | None, float, int]]:
    """(lr, head_lr, mean accuracy over backbones, tasks and seeds, number of runs), best first."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if seeds is None or r["seed"] in seeds:
            groups.setdefault((r["lr"], r["head_lr"]), []).append(r["accuracy"])
    complete = max((len(a) for a in groups.values()), default=0)  # settings not run everywhere are not ranked
    return sorted(((lr, h, statistics.fmean(a), len(a)) for (lr, h), a in groups.items() if len(a) == complete),
                  key=lambda t: -t[2])


def publish(args, rows: list[dict], final: bool) -> None:
    cells = sorted({(r["backbone"], r["task"]) for r in rows})
    settings = sorted({(r["lr"], r["head_lr"]) for r in rows}, key=lambda s: (s[0], s[1] or 0))
    table_rows = []
    for lr, head_lr in settings:
        row = [setting(lr, head_lr)]
        for cell in cells:
            accs = [r["accuracy"] * 100 for r in rows if (r["backbone"], r["task"], r["lr"], r["head_lr"]) ==
                    (*cell, lr, head_lr)]
            row.append(f"{statistics.fmean(accs):.1f}" + (f" ({len(accs)})" if len(accs) > 1 else "") if accs
                       else "—")
        table_rows.append(row)
    best = ranking(rows, set(args.confirm_seeds))
    confirmed = [b for b in best if b[3] >= len(cells) * len(args.confirm_seeds)]
    lines = [f"# Learning-rate sweep ({'final' if final else 'PARTIAL: still running or interrupted'})", "",
             f"MiMi σ0 = 4 → σt = {args.sigma:g}, E = {args.epochs_per_round} epochs per round, batch 64, "
             f"{f'{args.image_size} px, ' if args.image_size else ''}AdamW "
             "(wd 0.05), warm-up 10 % + cosine per round, clipping 5.0, augmentation as `peft-mimi train` "
             f"(random resized crop, flips where the dataset allows), train ≤ {args.max_train} class-balanced "
             f"images, test ≤ {args.max_test}. Each cell: test accuracy %, mean over seeds (number of seeds when "
             "more than one). 'head too' = the head trains at the adapters' rate.", "",
             common.table(["setting", *[f"{b}/{t}" for b, t in cells]], table_rows), ""]
    if confirmed:
        lines += ["Mean over every backbone, task and seed of stage 2 (seeds "
                  f"{args.confirm_seeds}), best first:", "",
                  common.table(["setting", "mean accuracy %", "runs"],
                               [[setting(lr, h), f"{100 * a:.1f}", n] for lr, h, a, n in confirmed]), ""]
    if args.notes:
        lines += [args.notes]
    common.write_results(args.out, "lr_sweep", {"config": {k: v for k, v in vars(args).items() if k != "out"},
                                                "rows": rows, "final": final}, "\n".join(lines))
    plot(rows, cells, args.out / "lr_sweep.png")


def plot(rows: list[dict], cells: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(3.6 * len(cells), 3.2), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        heads = sorted({r["head_lr"] for r in rows if (r["backbone"], r["task"]) == cell}, key=lambda h: h or 0)
        for head_lr in heads:
            points: dict[float, list[float]] = {}
            for r in rows:
                if (r["backbone"], r["task"], r["head_lr"]) == (*cell, head_lr):
                    points.setdefault(r["lr"], []).append(100 * r["accuracy"])
            xs = sorted(points)
            ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o",
                    label="head = lr" if head_lr is None else f"head {head_lr:g}")
        ax.set_xscale("log")
        ax.set_xlabel("adapter learning rate")
        ax.set_title(f"{cell[0]} / {cell[1]}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy %")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["fmnist-vit", "fmnist-swin"])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist", "textures"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--head-lrs", nargs="*", type=float, default=[3e-2, 1e-1],
                        help="head rates besides 'the same as the adapters'")
    parser.add_argument("--sigma", type=float, default=64.0)
    parser.add_argument("--image-size", type=int, default=None, help="default: each backbone's own")
    parser.add_argument("--epochs-per-round", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--grid-seed", type=int, default=0)
    parser.add_argument("--confirm-seeds", nargs="*", type=int, default=[1])
    parser.add_argument("--confirm-top", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--notes", default="")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbones, args.tasks, args.lrs, args.head_lrs = [common.SMOKE], ["digits"], [1e-3, 1e-2], [1e-2]
        args.sigma, args.max_train, args.max_test, args.confirm_seeds, args.confirm_top = 16.0, 48, 32, [1], 1
    torch.set_num_threads(args.threads)
    path = args.out / "lr_sweep.json"
    rows = json.loads(path.read_text())["rows"] if args.resume and path.is_file() else []
    write = lambda r: publish(args, r, final=False)  # noqa: E731
    grid = [(lr, h) for lr in args.lrs for h in [None, *args.head_lrs] if h != lr]
    run_all(args, [(b, t, lr, h, args.grid_seed) for b in args.backbones for t in args.tasks for lr, h in grid],
            rows, write)
    top = [(lr, h) for lr, h, _, _ in ranking(rows, {args.grid_seed})[: args.confirm_top]]
    confirm = [*top, (PAPER_LR, None)] + [(lr, None) for lr, h in top if h is not None and (lr, None) not in top]
    run_all(args, [(b, t, lr, h, s) for s in args.confirm_seeds for b in args.backbones for t in args.tasks
                   for lr, h in confirm], rows, write)
    publish(args, rows, final=True)
    seeds = set(args.confirm_seeds) or {args.grid_seed}
    lr, head_lr, accuracy, _ = ranking(rows, seeds)[0]
    print(f"best: {setting(lr, head_lr)}, mean accuracy {accuracy:.4f} over seeds {sorted(seeds)}")


if __name__ == "__main__":
    main()
