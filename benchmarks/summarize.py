"""One table over every backbone's accuracy results: MiMi against each alternative at the same budget, paired by
seed (same split, batch order and epochs), so that "MiMi wins" is counted per seed and not read off overlapping
means.

    python benchmarks/summarize.py   # reads results/<backbone>/accuracy.json -> results/summary.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RIVALS = (("adapter", "vanilla adapters"), ("lora", "LoRA"), ("adalora", "AdaLoRA"))
FIXED = (("adapter", "adapters σ=4"), ("linear", "head only"), ("bitfit", "BitFit"), ("full", "full FT"),
         ("probe", "linear probe (converged)"), ("pixels", "pixels (logistic regression)"))


def _variant(rows: list[dict]) -> str:
    """The MiMi options a file ran with beyond the default (its candidate tables), e.g. ` + reconstruct=True`."""
    options = {}
    for r in rows:
        if r["method"]["kind"] == "mimi":
            options.update({**(r["method"].get("mimi_options") or {}), **(r["method"].get("recipe_options") or {})})
    return "".join(f" + {k}={v}" for k, v in sorted(options.items()))


def _acc(rows: list[dict]) -> str:
    if not rows:
        return "—"
    mean, std = common.mean_std([100 * r["accuracy"] for r in rows])
    return f"{mean:.1f} ± {std:.1f}"


def _paired(mimi: list[dict], rival: list[dict]) -> tuple[str, dict]:
    """Mean of the per-seed differences MiMi − rival (points) and MiMi's wins / ties / losses."""
    by_seed = {r["seed"]: r["accuracy"] for r in rival}
    diffs = [100 * (m["accuracy"] - by_seed[m["seed"]]) for m in mimi if m["seed"] in by_seed]
    if not diffs:
        return "—", {}
    wins, ties = sum(d > 1e-9 for d in diffs), sum(abs(d) <= 1e-9 for d in diffs)
    raw = {"mean_diff": statistics.fmean(diffs), "diffs": diffs, "wins": wins, "ties": ties,
           "losses": len(diffs) - wins - ties}
    return f"{raw['mean_diff']:+.1f} ({wins}/{ties}/{raw['losses']})", raw


def summarize(results: Path) -> tuple[str, dict]:
    lines, raw = [], {"backbones": {}}
    header = ["backbone", "task", "σt", "MiMi params", "MiMi", "vanilla", "LoRA", "AdaLoRA",
              *[f"MiMi − {name}" for _, name in RIVALS]]
    table_rows, fixed_rows = [], []
    for path in sorted(results.glob("*/accuracy.json")):
        data = json.loads(path.read_text())
        backbone = data["config"]["backbone"]
        size = data["config"].get("image_size")
        rows = data["rows"]
        variant = _variant(rows)
        name = f"{backbone}" + (f" @{size}px" if size else "") + variant
        raw["backbones"][name] = {"file": str(path.relative_to(results)), "final": data.get("final"), "cells": []}
        for task in dict.fromkeys(r["task"] for r in rows):
            budgets = sorted({r["budget_sigma"] for r in rows if r["task"] == task and r["budget_sigma"]})
            for sigma in budgets:
                pick = {kind: [r for r in rows if (r["task"], r["budget_sigma"], r["method"]["kind"])
                               == (task, sigma, kind)] for kind in ("mimi", "adapter", "lora", "adalora")}
                mimi = pick["mimi"]
                params = f"{statistics.fmean(r['method_params'] for r in mimi):,.0f}" if mimi else "—"
                diffs = [_paired(mimi, pick[kind]) for kind, _ in RIVALS]
                table_rows.append([name, task, f"{sigma:g}", params, _acc(mimi), _acc(pick["adapter"]),
                                   _acc(pick["lora"]), _acc(pick["adalora"]), *[d[0] for d in diffs]])
                raw["backbones"][name]["cells"].append(
                    {"task": task, "sigma_t": sigma, "mimi_params": [r["method_params"] for r in mimi],
                     **{f"accuracy_{kind}": [r["accuracy"] for r in rs] for kind, rs in pick.items()},
                     **{f"mimi_minus_{kind}": d[1] for (kind, _), d in zip(RIVALS, diffs)}})
            fixed = {label: [r for r in rows if r["task"] == task and r["budget_sigma"] is None
                             and r["method"]["kind"] == kind] for kind, label in FIXED}
            if not variant:  # a candidate table's references are the default table's rows, listed once
                fixed_rows.append([name, task, *[_acc(v) for v in fixed.values()]])
    lines += ["# MiMi against the alternatives, every backbone and task", "",
              "Accuracy: test top-1 %, mean ± std over seeds. `MiMi − X`: mean of the per-seed differences in "
              "points, then (MiMi wins / ties / losses) over the seeds; same split, batch order and epochs for "
              "both. Budgets are matched by counted parameters: see each backbone's accuracy.md for the counts of "
              "every method (LoRA and AdaLoRA cannot go below rank 1 and may hold more). A backbone named with "
              "`+ option=value` is a candidate table (issue 13): MiMi with that `MiMiConfig` option, against the "
              "same vanilla, LoRA and AdaLoRA rows as the default's table.", "",
              common.table(header, table_rows), "",
              "## Budget-free references (same tasks, the longest epoch count of each file)", "",
              common.table(["backbone", "task", *[label for _, label in FIXED]], fixed_rows)]
    return "\n".join(lines), raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args()
    markdown, raw = summarize(args.results)
    common.write_results(args.results, "summary", raw, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
