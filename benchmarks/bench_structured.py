"""The structured suite: VTAB-1k's structured group, generated offline (`structured_tasks.py`), plus one real task
(elpv), where parameter-efficient methods differ by 10-20 points instead of one.

Protocol (as VTAB-1k): 1,000 training images per task, a test set of >= 2,000 images from another seed (elpv: a
fixed stratified split); the learning rate of each method family chosen per task on an 800 / 200 split of the
training images (seed 0, ``--what lr``), then every method trained on all 1,000 with that rate and tested
(``--what grid``) for every seed, but the linear probe: one converged fit per task on frozen features (the first
seed; another would only reshuffle the cross-validation folds that choose C). Every trained row runs through
`peft_mimi.train.train` (``common.run``), as a user's run does, without data augmentation (VTAB-1k's protocol: a
random crop moves the object a location label describes and changes the size a distance label is read from, a
flip mirrors positions, orientations and azimuths; ``--augmentation crop+flip`` reproduces the first sitting, which
trained with the product's default crops and flips).
Epochs: the rows at a budget σt train MiMi's default total, ``2·(R+1)`` epochs for its R pruning rounds (10 at
σt = 64, 14 at σt = 256 on DINOv2-S), so that MiMi, vanilla adapters, Adapter+ and LoRA at one budget see the same
epochs; the budget-free rows (σ = 4 adapters, full fine-tuning) train ``--fixed-epochs``.

    python benchmarks/bench_structured.py --what lr --resume             # learning rates, seed 0, validation split
    python benchmarks/bench_structured.py --what grid --resume           # the table, 3 seeds (long: see REPORT)
    python benchmarks/bench_structured.py --what publish                 # tables and plot from what is recorded

Results: ``<out>/accuracy.json`` (``runs``: one record per trained or fitted run) with ``accuracy.md`` and
``accuracy.png``; ``<out>/lr_selection.json`` / ``.md`` (the validation runs). Each record says on which device it ran.
An interrupted grid continues with ``--resume``: a run counts as done when a record with the same task, method,
budget, seed, image size, epochs, learning rate and augmentation exists (in ``<out>`` or in ``--merge`` files from other
machines).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import structured_tasks  # noqa: E402
from common import Method  # noqa: E402

from peft_mimi.config import DEFAULT_DESIGN  # noqa: E402

OUT = common.RESULTS_DIR / "structured"
BACKBONE = "dinov2-s14"
# the learning-rate grid of each method family (chosen per task on the validation split, seed 0); the first value
# listed in DEFAULT_LR is used where no selection is recorded
LR_GRID = {"mimi": [1e-3, 3e-3, 1e-2], "adapter": [1e-3, 3e-3, 1e-2], "adapter_plus": [1e-3, 3e-3, 1e-2],
           "lora": [1e-3, 3e-3, 1e-2], "adalora": [1e-3, 3e-3, 1e-2], "full": [3e-5, 1e-4, 3e-4]}
DEFAULT_LR = {"mimi": 3e-3, "adapter": 3e-3, "adapter_plus": 3e-3, "lora": 3e-3, "adalora": 3e-3, "full": 1e-4}
METHOD_ORDER = ("probe", "adapter4", "full", "mimi", "mimi_long", "mimi_gradient", "mimi_plus", "mimi_paper",
                "mimi_paper_long", "mimi_paper_mlp", "mimi_widths", "adapter", "adapter_plus", "adapter_plus_widths",
                "lora", "adalora")
LABELS = {"probe": "linear probe", "adapter4": "adapters σ=4", "mimi": "MiMi (default: Adapter+'s adapters)",
          "mimi_long": "MiMi (default), 3 epochs before the first cut",
          "mimi_gradient": "MiMi (default), the gradient score",
          "mimi_plus": "MiMi on Adapter+'s adapters (prototype)",
          "mimi_paper": "MiMi, the paper's adapters", "mimi_paper_long": "MiMi, the paper's adapters, 3 epochs before "
                                                                        "the first cut",
          "mimi_paper_mlp": "MiMi, the paper's adapters on MLP outputs only",
          "mimi_widths": "the paper's MiMi's widths from scratch", "adapter": "vanilla adapters",
          "adapter_plus": "Adapter+", "adapter_plus_widths": "Adapter+ at the default MiMi's widths, from scratch",
          "lora": "LoRA", "adalora": "AdaLoRA", "full": "full fine-tuning"}
# Raw records written before MiMiConfig's default design became Adapter+'s (2026-12-07) name the MiMi rows by what
# they were then: the default (the paper's adapters) was "mimi". `load_records` reads them by today's names.
RENAMED = {"mimi": "mimi_paper", "mimi_long": "mimi_paper_long", "mimi_mlp": "mimi_paper_mlp",
           "mimi_plus_long": "mimi_long"}
# the product's default schedule: one epoch per cut, the rest at the final widths
MIMI_SCHEDULE = {"epochs_per_round": 1, "final_epochs": None, "restart_lr": False}
# rows that are not the default run of the grid (the decomposition of MiMi's effect, issue 31); mimi_plus, the
# benchmark's prototype of Adapter+'s design in MiMi (seed 0), is a label of recorded runs only: `mimi` runs it now
OPTIONAL_METHODS = ("mimi_long", "mimi_gradient", "mimi_paper", "mimi_paper_long", "mimi_paper_mlp", "mimi_widths",
                    "adapter_plus_widths")
# the "allocation only" rows of the decomposition: a MiMi row's final widths (same task, seed and budget) trained
# from scratch, each with the design and learning rate of the uniform adapters it is compared with
WIDTHS_OF = {"mimi_widths": "mimi_paper", "adapter_plus_widths": "mimi"}
WIDTHS_FAMILY = {"mimi_widths": "adapter", "adapter_plus_widths": "adapter_plus"}
RECORDED_ONLY = ("mimi_plus",)
LONG_FIRST_EPOCHS = 3  # the *_long rows: the wide adapters' epochs before the first cut (the default trains one)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: ``method`` (a key of LABELS) at budget ``sigma_t`` (None: budget-free; 4 for the
    large adapters)."""

    method: str
    sigma_t: float | None

    @property
    def family(self) -> str:  # whose learning rate the row trains with
        if self.method in WIDTHS_FAMILY:
            return WIDTHS_FAMILY[self.method]
        if self.method.startswith("mimi"):
            return "mimi"
        return "adapter" if self.method == "adapter4" else self.method

    @property
    def record_method(self) -> str:  # the `method` field of accuracy.json's records
        return "adapter" if self.method == "adapter4" else self.method

    @property
    def label(self) -> str:
        return LABELS[self.method] + (f" σt={self.sigma_t:g}" if self.sigma_t and self.method != "adapter4" else "")


def rows_of(args) -> list[Row]:
    rows = []
    for name in args.methods:
        if name in ("probe", "full"):
            rows.append(Row(name, None))
        elif name == "adapter4":
            rows.append(Row(name, 4.0))
        elif name == "adalora":
            rows += [Row(name, b) for b in args.adalora_budgets]
        else:
            rows += [Row(name, b) for b in args.budgets]
    return rows


# ------------------------------------------------------------------------------------------ planning a run
class Planner:
    """Turns a table row into the `common.Method` that trains it and its epochs, on ``args.backbone``."""

    def __init__(self, args):
        self.args = args
        self._rounds: dict[tuple, int] = {}
        self._model = None

    def model(self):
        if self._model is None:
            self._model, _ = common.load_model(self.args.backbone, 2)
        return self._model

    def rounds(self, key: tuple, method: Method) -> int:
        """The pruning rounds ``method`` plans on this backbone, computed once per ``key``."""
        if key not in self._rounds:
            self._rounds[key] = common.build(method, self.model(), 0).base_model.planned_rounds()
            self._model = None  # build wrapped it: load a fresh one next time
        return self._rounds[key]

    def epochs(self, row: Row) -> int:
        if row.method == "probe":
            return 0
        if row.sigma_t is None or row.method == "adapter4":
            return self.args.fixed_epochs
        rounds = self.rounds(("paper", row.sigma_t), Method("mimi", "MiMi", target_compression=row.sigma_t,
                                                            mimi_options={"design": "paper"}))
        return 2 * (rounds + 1)  # the paper's MiMi's default total at this budget (its plain adapters' σt)

    def method(self, row: Row, widths: dict[str, int] | None = None) -> Method:
        """``widths``: for the rows of `WIDTHS_OF`, the final widths of their MiMi run (same task, seed, budget)."""
        if row.method == "probe":
            return Method("probe", row.label)
        if row.method == "full":
            return Method("full", row.label)
        if row.method == "adapter4":
            return Method("adapter", row.label, init_compression=4.0, target_compression=4.0)
        if row.method == "adapter":
            return Method("adapter", row.label, init_compression=row.sigma_t, target_compression=row.sigma_t)
        if row.method in ("mimi", "mimi_long", "mimi_gradient"):  # the product's default (Adapter+'s adapters on
            # the MLP outputs) at the budget B(σt) of the plain adapters on both outputs, one epoch per cut, the rest
            # at the final widths; mimi_long trains the wide adapters LONG_FIRST_EPOCHS before the first cut;
            # mimi_gradient ranks neurons by their accumulated gradients (score="gradient") instead of weights that
            # one epoch of warm-up has barely moved from their start
            score = {"score": "gradient"} if row.method == "mimi_gradient" else {}
            return self._mimi(row, {"design": DEFAULT_DESIGN, **score,
                                    "target_params": common.adapter_budget(self.model(), row.sigma_t)},
                              LONG_FIRST_EPOCHS if row.method == "mimi_long" else 1)
        if row.method in ("mimi_paper", "mimi_paper_long"):  # the paper's adapters on both outputs, budget σt
            return self._mimi(row, {"design": "paper"}, LONG_FIRST_EPOCHS if row.method == "mimi_paper_long" else 1,
                              target_compression=row.sigma_t)
        if row.method == "mimi_paper_mlp":  # the paper's adapters on the MLP outputs only, at the same B(σt)
            from adapter_plus import mlp_outputs

            return self._mimi(row, {"design": "paper", "target_modules": mlp_outputs(self.model()),
                                    "target_params": common.adapter_budget(self.model(), row.sigma_t)}, 1)
        if row.method in RECORDED_ONLY:
            raise ValueError(f"{row.method} labels recorded runs of a prototype that no longer exists; run 'mimi'")
        if row.method == "adapter_plus":
            return Method("adapter_plus", row.label, target_compression=row.sigma_t)
        if row.method == "mimi_widths":  # "allocation only": the paper's MiMi's final widths, trained from scratch
            return Method("widths", row.label, widths=widths)
        if row.method == "adapter_plus_widths":  # the same for the default: its widths, Adapter+'s adapters
            return Method("widths", row.label, widths=widths, mimi_options={"design": DEFAULT_DESIGN})
        budget = common.adapter_budget(self.model(), row.sigma_t)
        rank = common.lora_rank_for_budget(self.model(), budget)
        return Method(row.method, row.label, lora_rank=rank)


    def _mimi(self, row: Row, options: dict, first_epochs: int, target_compression: float | None = None) -> Method:
        """A MiMi row: σ0 = 4, MiMiConfig ``options`` (with ``target_params``, or the budget ``target_compression``),
        one epoch per cut (``first_epochs`` before the first) and the rest of the row's total at the final widths."""
        method = Method("mimi", row.label, init_compression=4.0, target_compression=target_compression,
                        recipe_options=dict(MIMI_SCHEDULE), mimi_options=options)
        rounds = self.rounds((row.method, row.sigma_t), method)
        first = first_epochs if rounds else 1
        if first > 1:
            method.recipe_options["first_epochs"] = first
        method.recipe_options["final_epochs"] = self.epochs(row) - rounds - (first - 1)
        return method


def augmentation(record: dict) -> str:
    """``"none"`` or ``"crop+flip"``: the first sitting's records predate the field and trained with crops and flips
    (the product's defaults); the probe never augments."""
    return record.get("augmentation", "none" if record["method"] == "probe" else "crop+flip")


def run_key(record: dict) -> tuple:
    return (record["task"], record["method"], record["sigma_t"], record["seed"], record["image_size"],
            record["epochs"], record["lr"], record.get("split", "test"), augmentation(record))


def train_one(args, planner: Planner, row: Row, task: str, seed: int, lr: float | None, validation: bool,
              widths: dict[str, int] | None = None) -> dict:
    """Train (or fit) ``row`` on ``task`` and return its record."""
    method = planner.method(row, widths)
    epochs = planner.epochs(row)
    data_task = f"{task}:val" if validation else task
    started = time.time()
    result = common.run(method, args.backbone, data_task, seed=seed, epochs_per_round=1,
                        total_epochs=epochs or None, lr=lr or DEFAULT_LR["adapter"], batch_size=args.batch_size,
                        image_size=args.image_size, max_train=args.max_train, max_test=args.max_test,
                        mixed_precision=args.mixed_precision, num_workers=args.num_workers,
                        augment=args.augmentation != "none")
    record = {
        "task": task, "method": row.record_method, "label": row.label, "sigma_t": row.sigma_t,
        "params": result.method_params, "head_params": result.head_params, "epochs": epochs, "seed": seed,
        "accuracy": round(100 * result.accuracy, 2), "image_size": args.image_size, "device": common.device_name(),
        "lr": lr, "split": "validation" if validation else "test", "backbone": args.backbone,
        "mixed_precision": args.mixed_precision, "augmentation": "none" if row.method == "probe" else args.augmentation,
        "wall_s": round(time.time() - started, 1),
        "train_s": round(result.wall_s, 1), "rounds": result.segments, "widths": result.widths,
        "n_train": len(common.task_dataset(data_task)["train"]) if args.max_train is None else args.max_train,
        "n_test": len(common.task_dataset(data_task)["test"]) if args.max_test is None else args.max_test,
    }
    if method.kind in ("lora", "adalora"):
        record["lora_rank"] = method.lora_rank
    if method.kind == "mimi":
        record["design"] = method.mimi_options["design"]
        record["score"] = method.mimi_options.get("score", "mimi")
    if row.method == "probe":
        record["lr"] = None
    return record


# ------------------------------------------------------------------------------------------ results files
def load_records(path: Path) -> list[dict]:
    """The runs of an ``accuracy.json`` / ``lr_selection.json``, MiMi's rows under today's names (`RENAMED`)."""
    return [renamed(r) for r in json.loads(path.read_text())["runs"]] if path.is_file() else []


def renamed(record: dict) -> dict:
    """A MiMi record under today's label; one from before the default design changed (no ``design`` field) under
    today's method name too."""
    if not record["method"].startswith("mimi"):
        return record
    method, extra = record["method"], {}
    if "design" not in record and method != "mimi_widths":
        method = RENAMED.get(method, method)
        if record["method"] == "mimi_plus" and record["seed"] > 0:  # MiMiConfig's options: today's default
            method = "mimi"
        extra["design"] = "adapter_plus" if method in ("mimi", "mimi_long", "mimi_plus") else "paper"
    return {**record, **extra, "method": method, "label": Row(method, record["sigma_t"]).label}


def merged(records: list[dict]) -> list[dict]:
    """One record per run (the first seen)."""
    first: dict[tuple, dict] = {}
    for record in records:
        first.setdefault(run_key(record), record)
    return list(first.values())


def chosen_lrs(selection: list[dict]) -> dict[tuple[str, str], dict]:
    """``{(task, family): {"lr": best, "validation": {lr: accuracy}}}`` from the validation runs (seed 0): the rate
    with the best validation accuracy, summed over the family's rows (ties: the smaller rate)."""
    scores: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in selection:
        family = "adapter" if r["method"] == "adapter" else r["method"]
        scores.setdefault((r["task"], family), {}).setdefault(r["lr"], []).append(r["accuracy"])
    out = {}
    for key, by_lr in scores.items():
        means = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
        best = max(sorted(means), key=lambda lr: means[lr])
        out[key] = {"lr": best, "validation": means}
    return out


def lr_for(args, row: Row, task: str) -> tuple[float | None, str]:
    if row.method == "probe":
        return None, "probe: converged logistic regression, C chosen by cross-validation"
    chosen = args.chosen.get((task, row.family))
    if chosen:
        return chosen["lr"], "validation"
    return DEFAULT_LR[row.family], "default (no validation runs recorded)"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], one_fit: bool = False) -> str:
    """``mean ± std`` over seeds; ``(n=k)`` below 3 seeds, unless the row is ``one_fit`` (the probe)."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "") + ("" if len(values) >= 3 or one_fit else
                                                                         f" (n={len(values)})")


def summary(records: list[dict], tasks: list[str]) -> list[dict]:
    """Per table row: accuracy per task (every seed), the mean over tasks of the per-task means, params, epochs,
    wall time, devices."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["label"], r["sigma_t"]), []).append(r)
    out = []
    for (method, label, sigma_t), rs in groups.items():
        per_task = {t: [r["accuracy"] for r in rs if r["task"] == t] for t in tasks}
        complete = all(per_task[t] for t in tasks)
        out.append({
            "method": method, "label": label, "sigma_t": sigma_t, "per_task": per_task,
            "task_means": {t: statistics.fmean(v) for t, v in per_task.items() if v},
            "task_stds": {t: statistics.stdev(v) for t, v in per_task.items() if len(v) > 1},
            "mean": statistics.fmean(statistics.fmean(v) for v in per_task.values()) if complete else None,
            "params": statistics.median(r["params"] for r in rs), "epochs": sorted({r["epochs"] for r in rs}),
            "wall_s": statistics.median(r["wall_s"] for r in rs), "devices": sorted({r["device"] for r in rs}),
            "lrs": {t: sorted({r["lr"] for r in rs if r["task"] == t and r["lr"] is not None}) for t in tasks},
            "default_lr": {t: any(r.get("lr_source", "").startswith("default") for r in rs if r["task"] == t)
                           for t in tasks},
            "seeds": sorted({r["seed"] for r in rs}),
        })
    return sorted(out, key=table_order)


def table_order(row: dict) -> tuple:
    """The probe, the σ = 4 adapters and full fine-tuning first, then each budget's methods in METHOD_ORDER."""
    method = "adapter4" if (row["method"], row["sigma_t"]) == ("adapter", 4.0) else row["method"]
    budget = 0.0 if method in ("probe", "adapter4", "full") else row["sigma_t"]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return budget, rank, row["label"]


def same_size_spread(rows: list[dict], tasks: list[str]) -> list[list[Any]]:
    """Per budget and task: the spread (best - worst mean) between the methods trained at that budget."""
    lines = []
    for sigma_t in sorted({s["sigma_t"] for s in rows if s["sigma_t"] and s["sigma_t"] != 4}):
        at = [s for s in rows if s["sigma_t"] == sigma_t]
        cells = []
        for t in tasks:
            means = {s["label"]: s["task_means"][t] for s in at if t in s["task_means"]}
            cells.append(f"{max(means.values()) - min(means.values()):.1f} ({len(means)} methods)"
                         if len(means) > 1 else "—")
        lines.append([f"σt = {sigma_t:g}", *cells])
    return lines


# the same-size alternatives the default MiMi has to beat (issue 31's bar), and the row whose seed spread it matches
ALTERNATIVES = ("adapter", "adapter_plus", "lora", "adalora")
SPREAD_REFERENCE = "adapter"


def against_alternatives(rows: list[dict], tasks: list[str]) -> list[list[Any]]:
    """Per budget: the best same-size alternative on the mean over tasks (of `ALTERNATIVES` with every task), and
    the default MiMi's mean minus its, on the mean and per task, with the seeds behind each side."""
    lines = []
    for sigma_t in sorted({s["sigma_t"] for s in rows if s["method"] == "mimi"}):
        mimi = next(s for s in rows if (s["method"], s["sigma_t"]) == ("mimi", sigma_t))
        complete = [s for s in rows if s["method"] in ALTERNATIVES and s["sigma_t"] == sigma_t and s["mean"]]
        if mimi["mean"] is None or not complete:
            continue
        best = max(complete, key=lambda s: s["mean"])
        lines.append([f"σt = {sigma_t:g}", LABELS[best["method"]],
                      *(f"{mimi['task_means'][t] - best['task_means'][t]:+.1f} (seeds {len(mimi['per_task'][t])}/"
                        f"{len(best['per_task'][t])})" for t in tasks), f"**{mimi['mean'] - best['mean']:+.1f}**"])
    return lines


def seed_spread(rows: list[dict], tasks: list[str]) -> list[list[Any]]:
    """Per row with at least two seeds on some task: the standard deviation over seeds per task, with the seeds;
    a budget's MiMi rows add their std minus that budget's `SPREAD_REFERENCE` row's (issue 31's bar: at most +1)."""
    lines = []
    for s in rows:
        if not s["task_stds"]:
            continue
        reference = next((r for r in rows if (r["method"], r["sigma_t"]) == (SPREAD_REFERENCE, s["sigma_t"])), None)
        cells = []
        for t in tasks:
            if t not in s["task_stds"]:
                cells.append("—")
                continue
            cell = f"{s['task_stds'][t]:.1f} (n={len(s['per_task'][t])})"
            if s["method"].startswith("mimi") and reference and t in reference["task_stds"]:
                cell += f", {s['task_stds'][t] - reference['task_stds'][t]:+.1f} vs vanilla"
            cells.append(cell)
        lines.append([s["label"], *cells])
    return lines


def at_chosen_rates(args, records: list[dict]) -> list[dict]:
    """The records the table shows: where a learning rate was selected for the row's task and family, only the
    runs at that rate (runs at a family's default rate, trained before the selection, stay in the json)."""
    def family(r: dict) -> str:
        return WIDTHS_FAMILY.get(r["method"], r["method"])
    return [r for r in records if r["method"] == "probe" or (r["task"], family(r)) not in args.chosen
            or r["lr"] == args.chosen[r["task"], family(r)]["lr"]]


def publish(args, records: list[dict], selection: list[dict], final: bool) -> None:
    shown = [r for r in records if augmentation(r) in ("none" if r["method"] == "probe" else args.augmentation,)]
    tasks = [t for t in args.tasks if any(r["task"] == t for r in shown)] or args.tasks
    rows = summary(at_chosen_rates(args, shown), tasks)
    header = ["method", "params", "epochs", *tasks, "mean", "wall s (median)", "device"]
    table = [[s["label"], f"{s['params']:,.0f}", "/".join(map(str, s["epochs"])),
              *(fmt(s["per_task"][t], one_fit=s["method"] == "probe") for t in tasks),
              "—" if s["mean"] is None else f"**{s['mean']:.1f}**", f"{s['wall_s']:.0f}", ", ".join(s["devices"])]
             for s in rows]
    lr_table = [[s["label"], *((", ".join(f"{lr:g}" for lr in s["lrs"][t]) + ("*" if s["default_lr"][t] else ""))
                               or "—" for t in tasks)] for s in rows]
    by = {(s["method"], s["sigma_t"]): s for s in rows}
    probe, big = by.get(("probe", None)), by.get(("adapter", 4.0))
    lines = [f"# The structured suite ({'final' if final else 'PARTIAL: rows still to run'})", "",
             f"{args.backbone} at {args.image_size} px; {len(tasks)} tasks (definitions: `TASKS.md`); 1,000 "
             "training images, test sets of >= 2,000 images (elpv: 1,624); accuracy in % on the test set, mean ± "
             "std over seeds (n = seeds where fewer than 3); `mean` = the mean over tasks of the per-task means, "
             "only for rows with every task. Every trained row through `peft_mimi.train`, "
             f"{'without data augmentation' if args.augmentation == 'none' else 'with random crops and flips'}. "
             "Epochs: rows at a "
             "budget train MiMi's default total at that budget; params = the method's own parameters (head "
             "excluded).", "", common.table(header, table)]
    both = [t for t in tasks if probe and big and t in probe["task_means"] and t in big["task_means"]
            and structured_tasks.TASKS[t].generator is not None]  # the target is on the generated tasks
    if both:
        gap = statistics.fmean(big["task_means"][t] - probe["task_means"][t] for t in both)
        lines += ["", f"Discrimination: σ = 4 adapters {gap:+.1f} points over the linear probe on the mean of "
                      f"{len(both)} generated task(s) ({', '.join(both)}); the suite's target is >= 15."]
    spread = same_size_spread(rows, tasks)
    if spread:
        lines += ["", "Spread between same-size methods (best − worst per-task mean):", "",
                  common.table(["budget", *tasks], spread)]
    versus = against_alternatives(rows, tasks)
    if versus:
        lines += ["", "The default MiMi against the best same-size alternative on the mean (of vanilla adapters, "
                      "Adapter+, LoRA and AdaLoRA): MiMi's mean minus its, per task (seeds: MiMi's/its) and on the "
                      "mean. Issue 31's bar: >= +1 at σt = 64 and >= +2 at σt = 256 on the mean over 3 seeds, and "
                      "never below -1 on a task.", "",
                  common.table(["budget", "best alternative", *tasks, "mean"], versus)]
    stds = seed_spread(rows, tasks)
    if stds:
        lines += ["", "Seed spread: the standard deviation over seeds of each task's accuracy; MiMi's rows also "
                      "minus vanilla adapters' at the same budget (issue 31's bar: at most +1).", "",
                  common.table(["method", *tasks], stds)]
    lines += ["", "Learning rates (chosen on the validation split, seed 0, `lr_selection.md`; * = the family's "
                  "default, no selection recorded for that task):", "",
              common.table(["method", *tasks], lr_table)]
    if args.notes:
        lines += ["", args.notes]
    common.write_results(args.out, "accuracy", {"final": final, "tasks": tasks, "summary": rows, "runs": records},
                         "\n".join(lines))
    if selection:
        sel_header = ["task", "family", "chosen lr", "validation accuracy by lr"]
        sel_rows = [[t, f, f"{c['lr']:g}", ", ".join(f"{lr:g}: {acc:.1f}" for lr, acc in
                                                     sorted(c["validation"].items()))]
                    for (t, f), c in sorted(chosen_lrs([r for r in selection
                                                        if augmentation(r) == args.augmentation]).items())]
        common.write_results(args.out, "lr_selection", {"runs": selection},
                             "# Learning rates chosen on the validation split (800 train / 200 validation, seed "
                             "0)\n\n" + common.table(sel_header, sel_rows))
    plot(rows, tasks, args.out / "accuracy.png", args)
    publish_widths(args, [r for r in shown if r["method"] in ("mimi", "mimi_paper") and r.get("widths")], tasks)


# the easy tasks' MiMi widths on the same backbone (the earlier suite, trained with crops and flips) for comparison
EASY = common.RESULTS_DIR / "dinov2-s14" / "accuracy.json"


def block_widths(widths: dict[str, int]) -> dict[tuple[int, str], int]:
    """``{(block, "attention" | "MLP"): width}`` from a run's final widths (module names with a block number)."""
    out = {}
    for name, width in widths.items():
        block = int(re.findall(r"\.(\d+)\.", name)[-1])
        out[(block, "attention" if ".attention." in name else "MLP")] = width
    return out


def publish_widths(args, runs: list[dict], tasks: list[str]) -> None:
    """``widths.{md,json,png}``: the per-layer widths MiMi chose on each task (mean over seeds), with its default
    design and the paper's, beside those the paper's design chose on the easy tasks (``EASY``), at each budget the
    structured runs have."""
    if not runs:
        return
    same_setting = args.backbone == BACKBONE and args.image_size == 112 and EASY.is_file()  # what EASY used
    easy = [r for r in (json.loads(EASY.read_text())["rows"] if same_setting else [])
            if r["method"]["kind"] == "mimi" and r.get("widths")]
    sections, raw = [], {}
    for sigma_t in sorted({r["sigma_t"] for r in runs}):
        groups = [(t, kind, [r["widths"] for r in runs if r["task"] == t and r["sigma_t"] == sigma_t
                             and r["method"] == method])
                  for method, kind in (("mimi", "default"), ("mimi_paper", "paper")) for t in tasks]
        groups += [(t, "easy, paper", [r["widths"] for r in easy if r["task"] == t and r["budget_sigma"] == sigma_t])
                    for t in dict.fromkeys(r["task"] for r in easy)]
        groups = [(t, kind, [block_widths(w) for w in ws]) for t, kind, ws in groups if ws]
        keys = sorted({k for _, _, ws in groups for w in ws for k in w}, key=lambda k: (k[0], k[1] != "attention"))
        means = {(t, kind): {k: statistics.fmean(w.get(k, 0) for w in ws) for k in keys} for t, kind, ws in groups}
        n_blocks = max(k[0] for k in keys) + 1
        thirds = [part for i in range(3) if (part := range(i * n_blocks // 3, (i + 1) * n_blocks // 3))]
        table = []
        for t, kind, ws in groups:
            mean = means[t, kind]
            total = sum(mean.values()) or 1.0
            table.append([t, kind, len(ws), f"{sum(mean.values()):.0f}",
                          *(f"{100 * sum(v for k, v in mean.items() if k[0] in third) / total:.0f}"
                            for third in thirds),
                          f"{100 * sum(v for k, v in mean.items() if k[1] == 'MLP') / total:.0f}",
                          f"{statistics.fmean(sum(v == 0 for v in w.values()) for w in ws):.1f}"])
        raw[str(sigma_t)] = {f"{t} ({kind})": {f"{b}.{part}": v for (b, part), v in mean.items()}
                             for (t, kind), mean in means.items()}
        sections += [f"## σt = {sigma_t:g}", "", common.table(
            ["task", "kind", "runs", "neurons", *(f"% in blocks {th[0]}-{th[-1]}" for th in thirds), "% in MLP",
             "adapters removed"], table), "", f"![widths at σt = {sigma_t:g}](widths_{sigma_t:g}.png)", ""]
        plot_widths_grid(groups, means, keys, args.out / f"widths_{sigma_t:g}.png",
                         f"MiMi's final widths, σt = {sigma_t:g}, {args.backbone} (mean over seeds)")
    common.write_results(args.out, "widths", {"widths": raw}, "\n".join([
        "# Where MiMi puts its neurons: structured tasks against easy ones", "",
        "MiMi's final width per adapter, mean over the recorded seeds. `default`: this suite's runs of the default "
        "design (Adapter+'s adapters, MLP outputs only); `paper`: this suite's runs of the paper's adapters "
        "(attention and MLP outputs); `easy, paper`: the paper's design on the same backbone and image size on the "
        f"earlier suite's tasks (`{EASY.relative_to(common.RESULTS_DIR)}`, trained with crops and flips). "
        "Columns: surviving neurons, their share in the first, middle and last third of the blocks and in MLP "
        "adapters, and the adapters removed entirely (width 0).", "", *sections]))


def plot_widths_grid(groups: list, means: dict, keys: list, path: Path, title: str) -> None:
    """A heatmap: one row per task, one column per adapter, the width written in each cell."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    grid = [[means[t, kind][k] for k in keys] for t, kind, _ in groups]
    fig, ax = plt.subplots(figsize=(0.42 * len(keys) + 2.5, 0.42 * len(groups) + 1.6))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if value < 0.6 * max(max(r) for r in grid) else "black")
    ax.set_xticks(range(len(keys)), [f"{b}{'a' if kind == 'attention' else 'm'}" for b, kind in keys], fontsize=7)
    ax.set_yticks(range(len(groups)), [f"{t} ({kind})" for t, kind, _ in groups], fontsize=7)
    for i in range(1, len(groups)):  # a line between the kinds
        if groups[i][1] != groups[i - 1][1]:
            ax.axhline(i - 0.5, color="white", linewidth=2)
    ax.set_xlabel("block and adapter (a: attention output, m: MLP output)", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="neurons")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[dict], tasks: list[str], path: Path, args) -> None:
    """One panel per task with more than one row, and one for the mean over the tasks that every row has."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shown_tasks = [t for t in tasks if sum(t in s["task_means"] for s in rows) > 1]
    common_tasks = [t for t in shown_tasks if all(t in s["task_means"] for s in rows)]
    panels = [*shown_tasks, *(["mean"] if common_tasks else [])]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.2), squeeze=False)
    labels = [s["label"] for s in rows]
    for ax, panel in zip(axes[0], panels):
        if panel == "mean":
            values = [statistics.fmean(s["task_means"][t] for t in common_tasks) for s in rows]
            errors = [0.0] * len(rows)
            title = f"mean of {len(common_tasks)} tasks"
        else:
            values = [s["task_means"].get(panel, 0.0) for s in rows]
            errors = [s["task_stds"].get(panel, 0.0) for s in rows]
            title = panel
        colours = ["tab:red" if s["method"] == "mimi" else "tab:grey" if s["method"] == "probe" else "tab:blue"
                   for s in rows]
        ax.barh(range(len(rows)), values, xerr=errors, color=colours)
        ax.set_yticks(range(len(rows)), labels if ax is axes[0][0] else [""] * len(rows), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("test accuracy %", fontsize=8)
    fig.suptitle(f"Structured suite, {args.backbone} at {args.image_size} px (bars: mean over seeds, ± std)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=("lr", "grid", "publish"), default="grid")
    parser.add_argument("--backbone", default=BACKBONE)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--tasks", nargs="+", default=list(structured_tasks.TASKS))
    parser.add_argument("--methods", nargs="+", choices=[m for m in METHOD_ORDER if m not in RECORDED_ONLY],
                        default=[m for m in METHOD_ORDER if m not in OPTIONAL_METHODS + RECORDED_ONLY],
                        help="adapter4 = vanilla adapters at σ = 4; the others at every --budgets (adalora at "
                             "--adalora-budgets); not run by default: mimi_paper (the paper's adapters), "
                             "mimi_widths (mimi_paper's final widths of the same seed trained from scratch), "
                             "adapter_plus_widths (the default MiMi's, with Adapter+'s adapters) and the other "
                             "decomposition rows (LABELS)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[64.0, 256.0])
    parser.add_argument("--adalora-budgets", nargs="+", type=float, default=[256.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="--what lr: these rates instead of each family's grid (LR_GRID)")
    parser.add_argument("--fixed-epochs", type=int, default=10, help="epochs of the budget-free rows")
    parser.add_argument("--augmentation", choices=("none", "crop+flip"), default="none",
                        help="none: VTAB-1k's protocol; crop+flip: the product's default augmentation (the first "
                             "sitting's runs, whose crops and flips change these tasks' labels)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="bf16")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-train", type=int, default=None, help="smoke runs only: fewer training images")
    parser.add_argument("--max-test", type=int, default=None, help="smoke runs only: fewer test images")
    parser.add_argument("--resume", action="store_true", help="skip the runs already recorded")
    parser.add_argument("--merge", nargs="*", type=Path, default=[], metavar="JSON",
                        help="also count the runs recorded in these accuracy.json / lr_selection.json files (parts "
                             "of the grid run on other machines)")
    parser.add_argument("--notes", default="", help="a paragraph appended to accuracy.md")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--smoke", action="store_true",
                        help="a random ViT, one task, a few images, one seed, every method: a minute")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.image_size, args.tasks, args.seeds = common.SMOKE, None, ["dsprites_location"], [0]
        args.budgets, args.adalora_budgets, args.fixed_epochs = [16.0], [16.0], 1
        args.max_train, args.max_test, args.mixed_precision = 64, 48, "no"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    records = merged(load_records(args.out / "accuracy.json")
                     + [r for p in args.merge if p.name == "accuracy.json" for r in load_records(p)])
    selection = merged(load_records(args.out / "lr_selection.json")
                       + [r for p in args.merge if p.name == "lr_selection.json" for r in load_records(p)])
    if not args.resume and args.what != "publish":
        records, selection = ([], selection) if args.what == "grid" else (records, [])
    args.chosen = chosen_lrs([r for r in selection if augmentation(r) == args.augmentation])
    planner = Planner(args)

    def augmentation_of(row: Row) -> str:
        return "none" if row.method == "probe" else args.augmentation
    todo = rows_of(args)

    def pending() -> bool:
        keys = {run_key(r) for r in records}
        return any((t, row.record_method, row.sigma_t, s, args.image_size, planner.epochs(row), lr_for(args, row, t)[0],
                    "test", augmentation_of(row)) not in keys for s in args.seeds for row in todo for t in args.tasks
                   if s == args.seeds[0] or row.method != "probe")

    if args.what == "lr":
        done = {run_key(r) for r in selection}
        for row in (r for r in todo if r.method not in ("probe", *WIDTHS_OF)):  # their uniform rows' rate
            for task in args.tasks:
                for lr in args.lrs or LR_GRID[row.family]:
                    key = (task, row.record_method, row.sigma_t, 0, args.image_size, planner.epochs(row), lr,
                           "validation", augmentation_of(row))
                    if key in done:
                        continue
                    record = train_one(args, planner, row, task, 0, lr, validation=True)
                    selection.append(record)
                    print(f"[lr] {task} {row.label} lr={lr:g}: validation {record['accuracy']:.1f} % "
                          f"({record['wall_s']:.0f} s)", flush=True)
                    publish(args, records, selection, final=False)
        args.chosen = chosen_lrs([r for r in selection if augmentation(r) == args.augmentation])
    elif args.what == "grid":
        for seed in args.seeds:  # seed 0 of every row first: a slice that is useful on its own
            # the probe is one fit per task: frozen features and a convex fit (a seed would only reshuffle the
            # folds that choose C)
            for row in (r for r in todo if seed == args.seeds[0] or r.method != "probe"):
                for task in args.tasks:
                    lr, source = lr_for(args, row, task)
                    key = (task, row.record_method, row.sigma_t, seed, args.image_size, planner.epochs(row), lr, "test",
                           augmentation_of(row))
                    if key in {run_key(r) for r in records}:
                        continue
                    widths = None
                    if row.method in WIDTHS_OF:
                        widths = next((r["widths"] for r in records if (r["task"], r["method"], r["sigma_t"],
                                       r["seed"], r["image_size"], augmentation(r)) == (
                                           task, WIDTHS_OF[row.method], row.sigma_t, seed, args.image_size,
                                           args.augmentation)),
                                      None)
                        if widths is None:
                            print(f"[grid] {task} seed={seed} {row.label}: skipped, {WIDTHS_OF[row.method]}'s run "
                                  "of this seed and budget is not recorded yet", flush=True)
                            continue
                    record = train_one(args, planner, row, task, seed, lr, validation=False, widths=widths)
                    record["lr_source"] = source
                    records.append(record)
                    print(f"[grid] {task} seed={seed} {row.label}: {record['accuracy']:.1f} % params="
                          f"{record['params']:,} epochs={record['epochs']} ({record['wall_s']:.0f} s)", flush=True)
                    publish(args, records, selection, final=False)
    publish(args, records, selection, final=not pending())


if __name__ == "__main__":
    main()
