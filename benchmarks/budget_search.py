"""Budget search (issue 31) measured against what a user would do without it.

For every task x seed it trains, with `peft_mimi.train.train` (the loop `peft-mimi train` runs), on the same
training images less the same validation split (``--validation-fraction`` of them, stratified and seeded):
- ``search``: the default MiMi from σ0 = 4 down to the floor ``--floor`` (σt), ``MiMiConfig(budget_tolerance=...)``
  with `TrainingRecipe`'s default schedule: every round one epoch (trained alike), the smallest round within the
  tolerance of the best on validation kept, then finished with the rest of ``2·(R+1)`` epochs;
- ``sweep``: vanilla adapters at each σ of ``--sweep`` (the paper's plain adapters, as the structured suite's
  ``adapter`` rows), each trained as many epochs as the search trains in all and measured on the validation split;
  the user's choice is the smallest within the tolerance of the best size on validation (the same rule,
  `peft_mimi.pruning.budget_search`, over sizes instead of rounds).
The test split is never used for choosing; it is recorded for every round and size to judge the choices afterwards.
Compute is counted as training epochs over the training images (every epoch of a search round or of a sweep size
counts one) and as measured training seconds.

    python benchmarks/budget_search.py --resume --out benchmarks/results/structured-budget-search
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
import structured_tasks  # noqa: E402
from common import Method  # noqa: E402

from peft_mimi.config import DEFAULT_DESIGN  # noqa: E402
from peft_mimi.pruning import budget_search  # noqa: E402

NAME = "budget_search"


def run_one(kind: str, task: str, seed: int, sigma: float | None, args) -> dict:
    """Train one ``search`` run, or one ``sweep`` size ``sigma``; return its rounds and the saved adapter's numbers."""
    from peft_mimi.train import TrainingRecipe, train

    data = common.task_dataset(task)
    model, processor = common.load_model(args.backbone, common.num_labels_of(task))
    if kind == "search":
        method = search_method(model, args)
    else:
        method = Method("adapter", f"σ={sigma:g}", init_compression=sigma, target_compression=sigma)
    peft_model = common.build(method, model, seed)
    recipe = TrainingRecipe(
        batch_size=64, lr=args.lr, seed=seed, image_size=args.image_size, max_train_samples=args.max_train,
        max_eval_samples=args.max_test, validation_fraction=args.validation_fraction,
        **({} if args.augment else {"flip": False, "random_crop": False}),
        **({} if kind == "search" else {"epochs_per_round": search_epochs(args, task)}))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        result = train(peft_model, data, Path(scratch) / "run", recipe, processor=processor)
    return {
        "kind": kind, "backbone": args.backbone, "task": task, "seed": seed, "sigma": sigma,
        "validation_fraction": args.validation_fraction, "test_accuracy": result.accuracy,
        "validation_accuracy": result.validation_accuracy, "params": result.live_params,
        "chosen_round": result.chosen_round, "epochs": result.history[-1]["epoch"],
        "train_s": round(result.seconds, 1), "wall_s": round(time.perf_counter() - start, 1),
        "device": common.device_name(),
        "rounds": [{key: row.get(key) for key in ("round", "epoch", "live_params", "accuracy", "validation_accuracy",
                                                  "chosen_round", "finish")} for row in result.history],
    }


_EPOCHS: dict[str, int] = {}


def search_method(model, args) -> Method:
    """The search: the default design at the budget of the floor's plain adapters, as the suite's MiMi rows."""
    return Method("mimi", "search", mimi_options={"design": DEFAULT_DESIGN, "budget_tolerance": args.tolerance,
                                                  "target_params": common.adapter_budget(model, args.floor)})


def search_epochs(args, task: str) -> int:
    """The epochs the search trains in all on ``task`` (its R rounds of one epoch, then the finish)."""
    if task not in _EPOCHS:
        from peft_mimi.recipe import TrainingRecipe

        model, _ = common.load_model(args.backbone, common.num_labels_of(task))
        rounds = common.build(search_method(model, args), model, 0).base_model.planned_rounds()
        _EPOCHS[task] = sum(TrainingRecipe().segment_epochs(rounds, finish=True))
    return _EPOCHS[task]


# -------------------------------------------------------------------------------------------------- reading
def judge(search: dict, sweep: list[dict], tolerance: float) -> dict:
    """One task x seed: the search's saved adapter against its own rounds (test accuracy of the round that reads
    best on test, trained alike) and against the sweep (its choice on validation, and its best size on test)."""
    rounds = [r for r in search["rounds"] if not r["finish"]]
    best_round = max(rounds, key=lambda r: (r["accuracy"], -r["round"]))
    result = {"best_round": best_round["round"], "best_round_test": best_round["accuracy"],
              "within_on_test": 100 * (best_round["accuracy"] - search["test_accuracy"]) <= tolerance + 1e-9,
              "rounds_trained": len(rounds), "search_epochs": search["epochs"]}
    if sweep:
        sizes = sorted(sweep, key=lambda r: -r["sigma"])  # smallest adapter first
        chosen = sizes[budget_search([r["params"] for r in sizes], [r["validation_accuracy"] for r in sizes],
                                     tolerance)]
        best = max(sizes, key=lambda r: r["test_accuracy"])
        result.update(sweep_sigma=chosen["sigma"], sweep_params=chosen["params"], sweep_test=chosen["test_accuracy"],
                      sweep_best_sigma=best["sigma"], sweep_best_test=best["test_accuracy"],
                      sweep_epochs=sum(r["epochs"] for r in sweep), sweep_train_s=sum(r["train_s"] for r in sweep),
                      sweep_sizes=len(sizes))
    return result


def publish(args, rows: list[dict], final: bool) -> None:
    searches = {(r["task"], r["seed"]): r for r in rows if r["kind"] == "search"}
    sweeps: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "sweep":
            sweeps.setdefault((r["task"], r["seed"]), []).append(r)
    complete = len(args.sweep)
    per_seed, judged = [], []
    for (task, seed), search in sorted(searches.items()):
        sweep = sweeps.get((task, seed), [])
        j = judge(search, sweep if len(sweep) == complete else [], args.tolerance)
        judged.append((task, seed, search, j))
        per_seed.append([
            task, seed, f"{search['chosen_round']}/{j['rounds_trained']}", f"{search['params']:,}",
            f"{100 * search['test_accuracy']:.1f}", f"{100 * j['best_round_test']:.1f} (round {j['best_round']})",
            "yes" if j["within_on_test"] else "**no**",
            *((f"σ={j['sweep_sigma']:g}: {j['sweep_params']:,}", f"{100 * j['sweep_test']:.1f}",
               f"{100 * j['sweep_best_test']:.1f} (σ={j['sweep_best_sigma']:g})",
               f"{100 * (search['test_accuracy'] - j['sweep_test']):+.1f}",
               f"{j['search_epochs']} / {j['sweep_epochs']}", f"{search['train_s']:.0f} / {j['sweep_train_s']:.0f}")
              if "sweep_test" in j else ["—"] * 6)])
    summary = []
    for task in sorted({t for t, _, _, _ in judged}):
        mine = [(s, j) for t, _, s, j in judged if t == task]
        swept = [(s, j) for s, j in mine if "sweep_test" in j]
        mean = common.mean_std
        summary.append({
            "task": task, "seeds": len(mine), "within_on_test": sum(j["within_on_test"] for _, j in mine),
            "search_test": mean([100 * s["test_accuracy"] for s, _ in mine]),
            "search_params": mean([s["params"] for s, _ in mine]),
            "sweep_seeds": len(swept),
            "sweep_test": mean([100 * j["sweep_test"] for _, j in swept]) if swept else None,
            "sweep_params": mean([j["sweep_params"] for _, j in swept]) if swept else None,
            "compute_ratio": mean([j["search_epochs"] / j["sweep_epochs"] for _, j in swept]) if swept else None,
        })

    def pm(value, digits=1):
        return "—" if value is None else f"{value[0]:,.{digits}f} ± {value[1]:,.{digits}f}"

    summary_md = [[s["task"], s["seeds"], f"{s['within_on_test']}/{s['seeds']}", pm(s["search_params"], 0),
                   pm(s["search_test"]), pm(s["sweep_params"], 0), pm(s["sweep_test"]),
                   pm(s["compute_ratio"], 2)] for s in summary]
    status = "" if final else "**PARTIAL: the run is still going.**\n\n"
    images = math.ceil(args.validation_fraction * (args.max_train or 1000))
    sizes = ", ".join(f"{s:g}" for s in args.sweep)
    markdown = f"""# Budget search against a sweep of vanilla adapter sizes

{status}`{args.backbone}`{f" at {args.image_size} px" if args.image_size else ""}; the same training images
(`--max-train {args.max_train}`) less the same validation split ({args.validation_fraction:g} of them, stratified,
seeded: about {images} images) for every run; {"random crops and flips" if args.augment else "no augmentation"};
lr {args.lr:g}, batch 64, tolerance {args.tolerance:g} point(s); on {common.environment()["device"]}.

- **search**: the default MiMi (`MiMiConfig(budget_tolerance={args.tolerance:g})`, Adapter+'s adapters), σ0 = 4 down
  to the floor σt = {args.floor:g}, every round trained one epoch, the kept round then finished with the rest of
  2·(R+1) epochs;
- **sweep**: vanilla adapters at σ ∈ {{{sizes}}}, each trained the search's total epochs; the user keeps the
  smallest within {args.tolerance:g} point(s) of the best size on validation.

"Within on test": the search's saved adapter is at most {args.tolerance:g} point(s) below the round that reads best on
**test** (the rounds as the search compared them, one epoch each). Compute: training epochs over the training images,
search / sweep (every size counts).

{common.table(["task", "seeds", "search within on test", "search params", "search test acc.",
               "sweep's choice params", "sweep's choice test acc.", "compute search / sweep"], summary_md)}

Per seed (chosen round / rounds trained; test accuracy in %):

{common.table(["task", "seed", "chosen / trained", "search params", "search test", "best round's test",
               "within on test", "sweep's choice", "its test", "best size's test", "search − sweep",
               "epochs search / sweep", "train s search / sweep"], per_seed)}
"""
    markdown += "\n" + reading(args, judged) + "\n"
    if args.notes:
        notes = Path(args.notes)
        markdown += "\n" + (notes.read_text() if notes.is_file() else args.notes) + "\n"
    raw = {"final": final, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "summary": summary, "rows": rows}
    common.write_results(args.out, NAME, raw, markdown)


def reading(args, judged: list[tuple]) -> str:
    """A plain reading of the judged runs, computed from them."""
    if not judged:
        return ""
    lines = ["## Reading", ""]
    within = sum(j["within_on_test"] for *_, j in judged)
    seeds = sorted({seed for _, seed, _, _ in judged})
    per_seed = {seed: sum(j["within_on_test"] for _, s, _, j in judged if s == seed) for seed in seeds}
    tasks = {seed: sum(1 for _, s, _, _ in judged if s == seed) for seed in seeds}
    validation = [s["validation_accuracy"] for _, _, s, _ in judged]
    accuracy = sum(validation) / len(validation)
    images = math.ceil(args.validation_fraction * (args.max_train or 1000))
    noise = 100 * math.sqrt(accuracy * (1 - accuracy) / images)
    lines.append(f"- Within {args.tolerance:g} point(s) of the best round on test: {within}/{len(judged)} runs ("
                 + ", ".join(f"seed {s}: {per_seed[s]}/{tasks[s]} tasks" for s in seeds)
                 + f"). One validation reading at {100 * accuracy:.0f} % on {images} images has a standard error of "
                 f"{noise:.1f} points.")
    floor = sum(s["chosen_round"] == j["rounds_trained"] - 1 for _, _, s, j in judged)
    lines.append(f"- The search kept the floor in {floor}/{len(judged)} runs.")
    swept = [(s, j) for _, _, s, j in judged if "sweep_test" in j]
    if swept:
        gap = sum(100 * (s["test_accuracy"] - j["sweep_test"]) for s, j in swept) / len(swept)
        params = sum(s["params"] / j["sweep_params"] for s, j in swept) / len(swept)
        compute = sum(j["search_epochs"] / j["sweep_epochs"] for _, j in swept) / len(swept)
        seconds = sum(s["train_s"] for s, _ in swept) / sum(j["sweep_train_s"] for _, j in swept)
        lines.append(f"- Against the sweep's choice ({len(swept)} runs): {gap:+.1f} test points on the mean, "
                     f"{params:.2f}x its parameters, {compute:.2f}x its training epochs ({seconds:.2f}x its "
                     "measured training seconds).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="dinov2-s14")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--tasks", nargs="+", default=list(structured_tasks.TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tolerance", type=float, default=1.0, help="MiMiConfig.budget_tolerance (points)")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--floor", type=float, default=256.0, help="σt of the search: how far it may prune")
    parser.add_argument("--sweep", nargs="*", type=float, default=[4.0, 16.0, 64.0, 256.0],
                        help="σ of the vanilla adapter sizes a user would sweep (none: search only)")
    parser.add_argument("--augment", action="store_true", help="random crops and flips (the structured tasks' "
                                                               "labels forbid them)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help=f"keep the runs already in {NAME}.json")
    parser.add_argument("--notes", default="", help="text (or a file) appended to the markdown")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "structured-budget-search")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--publish-only", action="store_true", help=f"rewrite {NAME}.md from {NAME}.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.image_size, args.tasks, args.seeds, args.sweep = common.SMOKE, None, ["digits"], [0], [8.0]
        args.floor, args.max_train, args.max_test, args.augment = 16.0, 80, 32, True
    torch.set_num_threads(args.threads)
    path = args.out / f"{NAME}.json"
    rows = json.loads(path.read_text())["rows"] if (args.resume or args.publish_only) and path.is_file() else []
    if args.publish_only:  # the markdown keeps the command and environment that measured the rows
        saved = json.loads(path.read_text())
        common.command_line, common.environment = (lambda: saved["command"]), (lambda: saved["environment"])
        return publish(args, rows, final=saved.get("final", False))
    done = {(r["kind"], r["task"], r["seed"], r["sigma"]) for r in rows}
    for task in args.tasks:
        for seed in args.seeds:
            for kind, sigma in [("search", None), *(("sweep", s) for s in args.sweep)]:
                if (kind, task, seed, sigma) in done:
                    continue
                row = run_one(kind, task, seed, sigma, args)
                rows.append(row)
                print(f"{task} seed {seed} {kind}{'' if sigma is None else f' σ={sigma:g}'}: test "
                      f"{100 * row['test_accuracy']:.1f}, validation {100 * row['validation_accuracy']:.1f}, "
                      f"{row['params']:,} params, {row['wall_s']:.0f} s", flush=True)
                publish(args, rows, final=False)
    publish(args, rows, final=True)


if __name__ == "__main__":
    main()
