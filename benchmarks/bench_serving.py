"""Serving many MiMi tasks from one backbone: throughput of mixed-task batches, and memory per added task.

    python benchmarks/bench_serving.py                 # about 2 minutes on 2 CPU cores
    python benchmarks/bench_serving.py --repeats 5     # quicker, noisier

Backbone: the shape of the built-in ``fmnist-vit`` (ViT, 32x32 images, patch 4, width 64, depth 6; random
weights, which do not change the cost). Every task has MiMi adapters pruned to its own budget (σt cycling through
8, 16, 32, 64, so some adapters are removed) and its own head (2 to 10 classes).

Throughput (images/s, median over ``--repeats`` timed runs after warm-up) of one batch whose images are spread
over the tasks in turn, answered four ways:

* ``mixed``: one forward pass, ``model(pixel_values, adapter_names=...)`` (every image its own task);
* ``per-task``: for each task of the batch, ``set_adapter(task)`` and a forward pass on its images alone;
* ``one adapter``: the whole batch through one task (what a single-task model costs, the ceiling for ``mixed``);
* ``backbone only``: the whole batch through the plain backbone, without PEFT (the floor).

Memory when loading 1, 5 and 20 saved tasks onto the backbone (``load_task_adapters``): the growth of parameter
and buffer bytes (exact), of Python-level allocations (tracemalloc: module objects, configs) and of the process
RSS (noisy: the allocator keeps freed pages).

Writes ``benchmarks/results/serving.json`` (every number, settings, versions) and ``serving.md`` (tables).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import ViTConfig, ViTForImageClassification

from peft_mimi import MiMiConfig
from peft_mimi.serving import load_task_adapters, parameter_bytes

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (8.0, 16.0, 32.0, 64.0)


def backbone(num_labels: int = 10) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                       intermediate_size=128, num_labels=num_labels)
    return ViTForImageClassification(config).eval()


def task_model(index: int) -> PeftModel:
    """Task ``index``: its own head (2..10 classes), random adapters pruned to budget ``BUDGETS[index % 4]``."""
    base = backbone()
    torch.manual_seed(index + 1)
    base.classifier = torch.nn.Linear(base.config.hidden_size, 2 + index % 9)
    config = MiMiConfig(target_compression=BUDGETS[index % len(BUDGETS)], init_weights=False,
                        modules_to_save=["classifier"], design="paper")  # the published rows' design
    model = get_peft_model(base, config)
    while model.base_model.num_rounds():
        model.base_model.prune_round()
    return model


def save_tasks(root: Path, count: int) -> dict[str, Path]:
    dirs = {}
    for i in range(count):
        dirs[f"task{i:02d}"] = root / f"task{i:02d}"
        task_model(i).save_pretrained(dirs[f"task{i:02d}"])
    return dirs


def images_per_second(runs: dict[str, Any], batch: int, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median images/s of each function in ``runs``; the functions take turns, so that a change in the machine's
    load (the cores may be shared) hits all of them alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return {name: batch / statistics.median(times) for name, times in seconds.items()}


@torch.no_grad()
def throughput(model: PeftModel, tasks: list[str], batch: int, repeats: int) -> dict[str, float]:
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names = [tasks[i % len(tasks)] for i in range(batch)]
    groups = {task: torch.tensor([i for i, n in enumerate(names) if n == task]) for task in dict.fromkeys(names)}

    def mixed():
        return model(pixel_values=x, adapter_names=names).logits

    def per_task():
        outputs = []
        for task, index in groups.items():
            model.set_adapter(task)
            outputs.append((index, model(pixel_values=x[index]).logits))
        return outputs  # each task's logits, at its own head's size

    def one_adapter():  # whichever task per_task left active
        return model(pixel_values=x).logits

    plain = backbone()

    def backbone_only():  # the backbone without PEFT: the cost of the frozen model alone
        return plain(pixel_values=x).logits

    runs = {"mixed": mixed, "per-task": per_task, "one adapter": one_adapter, "backbone only": backbone_only}
    return images_per_second(runs, batch, repeats)


def rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def memory(dirs: dict[str, Path], counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """Growth when loading the first ``n`` tasks of ``dirs`` for each ``n`` in ``counts``, on a fresh backbone."""
    rows = []
    for n in counts:
        base = backbone()
        gc.collect()
        before_params, before_rss = parameter_bytes(base), rss_bytes()
        tracemalloc.start()
        model = load_task_adapters(base, dict(list(dirs.items())[:n]))
        gc.collect()
        python_bytes, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        after_rss = rss_bytes()
        files = sum((path / "adapter_model.safetensors").stat().st_size for path in list(dirs.values())[:n])
        adapter_params = sum(model.base_model.live_params(task) for task in list(dirs)[:n])
        rows.append({
            "tasks": n,
            "backbone_param_bytes": before_params,
            "param_bytes_growth": parameter_bytes(model) - before_params,
            "adapter_params": adapter_params,
            "safetensors_file_bytes": files,
            "tracemalloc_bytes": python_bytes,
            "rss_growth_bytes": None if before_rss is None else after_rss - before_rss,
        })
        del model, base
    return rows


def write_markdown(result: dict[str, Any], path: Path) -> None:
    s = result["settings"]
    lines = [
        "# Serving many MiMi tasks from one backbone",
        "",
        f"`python benchmarks/bench_serving.py` — {s['model']}; torch {result['versions']['torch']}, "
        f"{s['threads']} thread(s), {result['machine']['cpus']} CPU(s) shared with other work (1-minute load "
        f"average {result['machine']['load_average_start'][0]} at start, {result['machine']['load_average_end'][0]} at "
        f"the end); median of {s['repeats']} timed runs after 3 warm-up runs, the "
        "four ways taking turns. The batch's images are spread over the tasks in turn.",
        "",
        "## Throughput (images/s)",
        "",
        "| tasks | batch | mixed | per-task (set_adapter) | mixed / per-task | one adapter | mixed / one adapter "
        "| backbone only |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["throughput"]:
        lines.append(
            f"| {row['tasks']} | {row['batch']} | {row['mixed']:.0f} | {row['per-task']:.0f} | "
            f"{row['mixed'] / row['per-task']:.2f}x | {row['one adapter']:.0f} | "
            f"{row['mixed'] / row['one adapter']:.2f} | {row['backbone only']:.0f} |"
        )
    lines += [
        "",
        "A mixed batch costs one pass of the backbone plus, in every adapted layer, one gather, one small adapter "
        "and one scatter per task present in the batch (removed adapters cost nothing); answering task by task "
        "costs one pass per task on a small sub-batch, plus a `set_adapter`. The more tasks share a batch, the "
        "fewer images each task has and the more mixing wins over switching; the per-task adapter calls on few "
        "rows are also what separates `mixed` from `one adapter`.",
        "",
        "## Memory when loading tasks onto one backbone",
        "",
        "| tasks | adapter parameters | parameter + buffer bytes added | saved files (bytes) | Python objects "
        "(tracemalloc) | RSS growth |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["memory"]:
        rss = "n/a" if row["rss_growth_bytes"] is None else f"{row['rss_growth_bytes'] / 2**20:.1f} MiB"
        lines.append(
            f"| {row['tasks']} | {row['adapter_params']:,} | {row['param_bytes_growth']:,} | "
            f"{row['safetensors_file_bytes']:,} | {row['tracemalloc_bytes'] / 2**20:.2f} MiB | {rss} |"
        )
    backbone_bytes = result["memory"][0]["backbone_param_bytes"]
    lines += [
        "",
        f"The backbone holds {backbone_bytes:,} parameter and buffer bytes. Parameter bytes grow by exactly each "
        "task's tensors: its live adapter neurons, its head and one bool per neuron (the neuron masks); a removed "
        "adapter adds nothing. Saved files are a little larger (safetensors header). tracemalloc counts the Python "
        "side of each task (modules, dicts, configs), RSS what the process really took (allocator slack included).",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on shared cores)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    started, load_at_start = time.perf_counter(), os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_tasks(Path(tmp), 20)
        memory_rows = memory(dirs, (1, 5, 20))
        throughput_rows = []
        for count in (4, 20):
            model = load_task_adapters(backbone(), dict(list(dirs.items())[:count]))
            for batch in (32, 64):
                row = {"tasks": count, "batch": batch, **throughput(model, list(dirs)[:count], batch, args.repeats)}
                throughput_rows.append(row)
                print(json.dumps(row))

    result = {
        "settings": {"model": "ViT 32x32, patch 4, width 64, depth 6 (fmnist-vit shape, random weights)",
                     "repeats": args.repeats, "threads": args.threads, "budgets_sigma_t": BUDGETS,
                     "head_classes": "2 + task index % 9"},
        "throughput": throughput_rows,
        "memory": memory_rows,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "load_average_start": [round(v, 2) for v in load_at_start],
                    "load_average_end": [round(v, 2) for v in os.getloadavg()], "platform": platform.platform()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "command": " ".join(["python", *sys.argv]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "serving.md")
    print(json.dumps(memory_rows, indent=1))
    print(f"wrote {args.out / 'serving.md'} and serving.json in {result['seconds']} s")


if __name__ == "__main__":
    main()
