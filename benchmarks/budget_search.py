"""Budget search (issue 13) measured: does "the smallest adapter within `--tolerance` points of the best round's
validation accuracy" hold on the test split too, how small is it, and how does it compare with MiMi at a fixed σt?

For every backbone x task x seed it trains, with `peft_mimi.train.train` (the loop `peft-mimi train` runs):
- ``search``: MiMi from σ0 = 4 down to at most the floor ``--floor`` (σt), ``MiMiConfig(budget_tolerance=...)``,
  the validation split ``--validation-fractions`` of the training images (once per fraction);
- ``fixed``: MiMi at ``--fixed-sigma`` (σt = 64) on all the training images, the paper's stop rule.
Both train ``E`` epochs per round, the search down to its floor. The test split
is never used for choosing; its accuracy is recorded after every round to judge the choice afterwards.

    python benchmarks/budget_search.py --threads 2          # -> results/budget_search.{md,json}
    python benchmarks/budget_search.py --smoke --out /tmp/x  # a tiny random ViT, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "budget_search"


def run_one(kind: str, backbone: str, task: str, seed: int, fraction: float | None, args) -> dict:
    """Train one ``search`` or ``fixed`` run; return its per-round history and the saved adapter's numbers."""
    from peft import get_peft_model

    from peft_mimi import MiMiConfig
    from peft_mimi.train import TrainingRecipe, train

    data = common.task_dataset(task)
    model, processor = common.load_model(backbone, common.num_labels_of(task), args.image_size)
    torch.manual_seed(seed)
    if kind == "search":
        config = MiMiConfig(target_compression=args.floor, budget_tolerance=args.tolerance, **common.PAPER)
    else:
        config = MiMiConfig(target_compression=args.fixed_sigma, **common.PAPER)
    config.modules_to_save, config.seed = ["classifier"], seed
    peft_model = get_peft_model(model, config)
    # --schedule paper: E epochs in every segment, the schedule restarted at each cut (as the first results ran);
    # default: TrainingRecipe's own (one epoch per cut, the rest of 2·(R+1) epochs at the last round's widths)
    schedule = common.paper_schedule(args.epochs_per_round) if args.schedule == "paper" else {}
    recipe = TrainingRecipe(**schedule, batch_size=64, lr=args.lr, seed=seed, max_train_samples=args.max_train,
                            max_eval_samples=args.max_test, validation_fraction=fraction)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        result = train(peft_model, data, Path(scratch) / "run", recipe, processor=processor)
    return {
        "kind": kind, "backbone": backbone, "task": task, "seed": seed, "validation_fraction": fraction,
        "test_accuracy": result.accuracy, "validation_accuracy": result.validation_accuracy,
        "params": result.live_params, "budget": result.budget, "chosen_round": result.chosen_round,
        "epochs": result.history[-1]["epoch"],
        "wall_s": round(time.perf_counter() - start, 2),
        "rounds": [{key: row[key] for key in ("round", "epoch", "live_params", "accuracy", "validation_accuracy",
                                              "chosen_round")} for row in result.history],
    }


# -------------------------------------------------------------------------------------------------- reading
def judge(search: dict, tolerance: float) -> dict:
    """What one search run says on the test split: its chosen round against the round with the best test accuracy
    (the best round) and against the round with the best validation accuracy."""
    rounds = search["rounds"]
    best_test = max(rounds, key=lambda r: (r["accuracy"], -r["round"]))
    best_validation = max(rounds, key=lambda r: (r["validation_accuracy"], -r["round"]))
    loss = 100 * (best_test["accuracy"] - search["test_accuracy"])
    return {"best_round": best_test["round"], "best_round_test": best_test["accuracy"],
            "best_validation_round_test": best_validation["accuracy"], "test_loss_points": loss,
            "within_on_test": loss <= tolerance + 1e-9, "rounds_trained": len(rounds)}


def publish(args, rows: list[dict], final: bool) -> None:
    fixed = {(r["backbone"], r["task"], r["seed"]): r for r in rows if r["kind"] == "fixed"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "search":
            groups.setdefault((r["backbone"], r["task"], r["validation_fraction"]), []).append(r)
    summary, per_seed = [], []
    for (backbone, task, fraction), runs in sorted(groups.items()):
        judged = [judge(r, args.tolerance) for r in runs]
        matched = [fixed.get((backbone, task, r["seed"])) for r in runs]
        fixed_runs = [f for f in matched if f is not None]
        mean = common.mean_std
        summary.append({
            "backbone": backbone, "task": task, "validation_fraction": fraction, "seeds": len(runs),
            "params": mean([r["params"] for r in runs]), "chosen_round": mean([r["chosen_round"] for r in runs]),
            "epochs": mean([r["epochs"] for r in runs]),
            "validation": mean([100 * r["validation_accuracy"] for r in runs]),
            "test": mean([100 * r["test_accuracy"] for r in runs]),
            "best_round_test": mean([100 * j["best_round_test"] for j in judged]),
            "fixed_test": mean([100 * f["test_accuracy"] for f in fixed_runs]) if fixed_runs else None,
            "fixed_params": mean([f["params"] for f in fixed_runs]) if fixed_runs else None,
            "within_on_test": sum(j["within_on_test"] for j in judged),
            "wall_s": mean([r["wall_s"] for r in runs]),
            "fixed_wall_s": mean([f["wall_s"] for f in fixed_runs]) if fixed_runs else None,
        })
        for r, j, f in zip(runs, judged, matched, strict=True):
            per_seed.append([backbone, task, f"{fraction:g}", r["seed"], f"{r['chosen_round']}/{j['rounds_trained']}",
                             f"{r['params']:,}", f"{100 * r['validation_accuracy']:.1f}",
                             f"{100 * r['test_accuracy']:.1f}",
                             f"{100 * j['best_round_test']:.1f} (round {j['best_round']})",
                             f"{j['test_loss_points']:+.1f}", "yes" if j["within_on_test"] else "**no**",
                             f"{100 * f['test_accuracy']:.1f} ({f['params']:,})" if f else "—"])

    def pm(value, digits=1):
        return "—" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"

    rows_md = [[s["backbone"], s["task"], f"{s['validation_fraction']:g}",
                f"{s['params'][0]:,.0f}", f"{s['fixed_params'][0]:,.0f}" if s["fixed_params"] else "—",
                pm(s["chosen_round"]), pm(s["epochs"]), pm(s["validation"]), pm(s["test"]), pm(s["best_round_test"]),
                pm(s["fixed_test"]), f"{s['within_on_test']}/{s['seeds']}",
                f"{s['wall_s'][0]:.0f} / {s['fixed_wall_s'][0]:.0f}" if s["fixed_wall_s"] else "—"]
               for s in summary]
    status = "" if final else "**PARTIAL: the run is still going.**\n\n"
    compared = (f"Compared with MiMi at a fixed σt = {args.fixed_sigma:g} (the paper's stop rule, all training images, "
                "same E)." if args.fixed_sigma else "No fixed-budget runs here (`--fixed-sigma 0`).")
    pixels = f" at {args.image_size} px" if args.image_size else ""

    def searched_table(header: list[str], body: list[list]) -> str:
        """``common.table``, without the fixed-budget runs' columns when there are none."""
        keep = [i for i, name in enumerate(header) if args.fixed_sigma or not ("σt=" in name or "fixed" in name)]
        return common.table([header[i] for i in keep], [[row[i] for i in keep] for row in body])
    device = common.environment()["device"]  # with --publish-only, the machine that measured the rows
    schedule_text = (f"the paper's schedule (E = {args.epochs_per_round} epochs per round, the learning rate "
                     "restarted at each cut)" if args.schedule == "paper" else
                     "`TrainingRecipe`'s default schedule (one epoch per round, the rest of 2·(R+1) epochs after the "
                     "last cut, one warm-up + cosine)")
    markdown = f"""# Budget search: the smallest adapter within {args.tolerance:g} point(s) of the best round

{status}MiMi from σ0 = 4 toward the floor σt = {args.floor:g}, {schedule_text},
`MiMiConfig(budget_tolerance={args.tolerance:g})`: after each round, accuracy on a validation split carved from the
training images (stratified, seeded); the rounds go on down to the floor, and the smallest round within
{args.tolerance:g} point(s) of the best validation accuracy is restored and saved. {compared}
{args.max_train} training images (class-balanced subset, the validation split comes out of them), {args.max_test}
test images{pixels}, lr {args.lr:g}, batch 64, seeds {sorted({r['seed'] for r in rows})}, on {device}.

"Best round" is the trained round with the highest **test** accuracy (known only afterwards); "within on test" counts
the seeds where the saved adapter's test accuracy is at most {args.tolerance:g} point(s) below it.

{searched_table(["backbone", "task", "val. fraction", "search params", f"σt={args.fixed_sigma:g} params",
                 "chosen round", "epochs", "validation acc.", "test acc.", "best round test acc.",
                 f"σt={args.fixed_sigma:g} test acc.", "within on test", "wall s (search / fixed)"], rows_md)}

Per seed (chosen round / rounds trained; test loss = best round's test accuracy minus the saved one's, in points{
"; σt=" + f"{args.fixed_sigma:g}: its test accuracy and parameters" if args.fixed_sigma else ""}):

{searched_table(["backbone", "task", "val. fraction", "seed", "chosen / trained", "params", "validation acc.",
                 "test acc.", "best round test acc.", "test loss", "within on test", f"σt={args.fixed_sigma:g}"],
                per_seed)}
"""
    markdown += "\n" + reading(args, summary) + "\n"
    if args.notes:
        notes = Path(args.notes)
        markdown += "\n" + (notes.read_text() if notes.is_file() else args.notes) + "\n"
    raw = {"final": final, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "summary": summary, "rows": rows}
    common.write_results(args.out, NAME, raw, markdown)


def reading(args, summary: list[dict]) -> str:
    """A plain reading of the summary rows, computed from them."""
    if not summary:
        return ""
    mean = common.mean_std
    lines = ["## Reading", ""]
    for fraction in sorted({s["validation_fraction"] for s in summary}):
        rows = [s for s in summary if s["validation_fraction"] == fraction]
        held = sum(s["within_on_test"] for s in rows)
        seeds = sum(s["seeds"] for s in rows)
        every = [f"{s['backbone']}/{s['task']}" for s in rows if s["within_on_test"] == s["seeds"]]
        on_mean = sum(s["best_round_test"][0] - s["test"][0] <= args.tolerance + 1e-9 for s in rows)
        with_fixed = [s for s in rows if s["fixed_test"]]
        images = math.ceil(fraction * args.max_train)
        accuracy = mean([s["validation"][0] / 100 for s in rows])[0]
        noise = 100 * math.sqrt(accuracy * (1 - accuracy) / images)
        lines.append(
            f"- Validation fraction {fraction:g} ({images} images): the saved adapter is within {args.tolerance:g} "
            f"point(s) of the best round on test in {held}/{seeds} seeds; on every seed for "
            f"{', '.join(every) if every else 'no task'} ({len(every)}/{len(rows)} tasks); on the mean over seeds in "
            f"{on_mean}/{len(rows)} tasks. One validation measurement at {100 * accuracy:.0f} % has a standard error "
            f"of {noise:.1f} points at this size, so a tolerance of {args.tolerance:g} point(s) is below the noise "
            "of the signal the choice rests on.")
        if with_fixed:
            params = mean([s["params"][0] / s["fixed_params"][0] for s in with_fixed])[0]
            gap = mean([s["test"][0] - s["fixed_test"][0] for s in with_fixed])[0]
            lines.append(
                f"  Against MiMi at σt = {args.fixed_sigma:g}: {params:.2f}x its parameters and "
                f"{gap:+.1f} test points on the mean over tasks (the search trains on {100 * (1 - fraction):.0f} % "
                f"of the images, and its rounds go on toward the floor σt = {args.floor:g}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["fmnist-swin", "fmnist-vit"])
    parser.add_argument("--tasks", nargs="+", default=["digits", "textures"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tolerance", type=float, default=1.0, help="MiMiConfig.budget_tolerance (points)")
    parser.add_argument("--validation-fractions", nargs="+", type=float, default=[0.1, 0.2])
    parser.add_argument("--floor", type=float, default=256.0, help="σt of the search: how far it may prune")
    parser.add_argument("--fixed-sigma", type=float, default=64.0,
                        help="σt of the fixed-budget runs compared with; 0: no fixed runs (search only)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize the images to this many pixels (default: the backbone's native size)")
    parser.add_argument("--epochs-per-round", type=int, default=2, help="E of --schedule paper")
    parser.add_argument("--schedule", choices=["paper", "default"], default="paper",
                        help="paper: E epochs per round, the learning rate restarted at each cut; default: "
                             "TrainingRecipe's own schedule")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help=f"keep the runs already in {NAME}.json")
    parser.add_argument("--notes", default="", help="text (or a file) appended to the markdown")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--publish-only", action="store_true", help=f"rewrite {NAME}.md from {NAME}.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbones, args.tasks, args.seeds, args.validation_fractions = [common.SMOKE], ["digits"], [0], [0.2]
        args.floor, args.fixed_sigma, args.max_train, args.max_test, args.epochs_per_round = 16.0, 8.0, 80, 32, 1
    torch.set_num_threads(args.threads)
    path = args.out / f"{NAME}.json"
    rows = json.loads(path.read_text())["rows"] if (args.resume or args.publish_only) and path.is_file() else []
    if args.publish_only:  # the markdown keeps the command and environment that measured the rows
        saved = json.loads(path.read_text())
        common.command_line, common.environment = (lambda: saved["command"]), (lambda: saved["environment"])
        return publish(args, rows, final=saved.get("final", False))
    done = {(r["kind"], r["backbone"], r["task"], r["seed"], r["validation_fraction"]) for r in rows}
    for backbone in args.backbones:
        for task in args.tasks:
            for seed in args.seeds:
                kinds = [("fixed", None)] if args.fixed_sigma else []
                for kind, fraction in [*kinds, *(("search", f) for f in args.validation_fractions)]:
                    if (kind, backbone, task, seed, fraction) in done:
                        continue
                    row = run_one(kind, backbone, task, seed, fraction, args)
                    rows.append(row)
                    print(f"{backbone} {task} seed {seed} {kind}"
                          f"{'' if fraction is None else f' (validation {fraction:g})'}: test "
                          f"{100 * row['test_accuracy']:.1f}, {row['params']:,} params, round "
                          f"{row['chosen_round']}, {row['wall_s']:.0f} s", flush=True)
                    publish(args, rows, final=False)
    publish(args, rows, final=True)


if __name__ == "__main__":
    main()
