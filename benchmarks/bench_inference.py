"""Inference cost (paper Table 4): counted GFLOPs and measured CPU latency relative to the bare backbone.

    python benchmarks/bench_inference.py                       # -> results/inference.{md,json}
    python benchmarks/bench_inference.py --configs dinov2-s14@112 --repeats 40   # one backbone at one size
    python benchmarks/bench_inference.py --profile             # -> results/inference_profile.md (where time goes)
    python benchmarks/bench_inference.py --smoke --out /tmp/x  # tiny random ViT, seconds
    python benchmarks/bench_inference.py --device cuda --no-aot --compile --compile-mode reduce-overhead  # a GPU

Variants, on one backbone in one process: the bare backbone; MiMi pruned to the budget B(σt) and compacted, as
``get_peft_model`` gives it (the default path), after ``fuse_for_inference()`` (the fast path), as the plain module
of ``peft_mimi.export.to_plain_module``, exported to ONNX and run by onnxruntime, compiled ahead of time by
AOTInductor (``peft_mimi.export.export_compiled``; the fastest PyTorch form), and the bare backbone each of those
two ways (the fair reference for those rows: their "same way" ratios); a mixed-task batch (``adapter_names``, two
MiMi tasks alternating, batch 1: one name), whose overhead over one task's forward is its ratio to the default row;
LoRA at the rank whose size is closest to B(σt), unmerged and merged (``merge_and_unload``); with ``--compile``, the
bare backbone and the fused model under ``torch.compile`` (inductor). MiMi masked (not shrunk) and vanilla σ=4
adapters are counted (GFLOPs), not timed. Pruning decisions come from the adapters' random initial weights
(``init_weights=False``): this measures what a set of widths costs; a trained model's widths differ but its
parameter count is the same budget.

On a GPU (``--device cuda``) every model and input lives on the device and each timed call ends with
``torch.cuda.synchronize()``; the ONNX and AOTInductor rows (CPU deployments here) are left out, and "CPU ×" counts
the host thread, which waits busily in the synchronisation, so it follows the wall time.

Timing, built for a shared, noisy machine: every repeat runs each variant once, in a fresh random order, so that
load from other processes hits all variants alike; a variant's latency is the median over repeats, and its ratio
to the backbone is the median over repeats of (variant time / backbone time in the same repeat), which cancels
slow drifts in load; the same ratio of process CPU time (all threads) is reported beside it, as a check that
other processes disturb less. The 1-minute load average (``os.getloadavg``) is recorded before and after each block.
Then each timed variant runs alone with its reference (the bare backbone, or the backbone run the same way),
alternating for as many repeats: the "pairs" table, where no other model runs between the two. The AOTInductor
packages are timed once more as deployed, each pair in ``--deployed-runs`` fresh processes holding nothing else: a
process's ratio moves by a few percent from one process to the next here, so their median and range are reported;
the same processes also time a byte-for-byte copy of the backbone's package against the backbone's (the control:
what the measurement reads when nothing differs, i.e. its bias and resolution).
What one forward of each package calls is counted in its generated code (kernels and library ops).
GFLOPs: ``torch.utils.flop_counter.FlopCounterMode`` per image (matrix products only). ``torch.inference_mode``,
fp32, the OpenMP runtime's own wait policy unless ``OMP_WAIT_POLICY`` is set (see below); onnxruntime without its
threads' busy-waiting after a run, which on 2 cores took the CPU from whichever variant was timed next.

Run it on an idle machine. The variants other than the plain module are built from their own load of the backbone,
not copied from another model: a deep copy of the bare backbone alone measured 1.02x its original here (where the
allocator puts the weights matters at this scale), which is not the adapters' cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

# What a user gets: OpenMP threads spin a while between parallel regions before they sleep. On cores that other
# processes share, a spinning thread keeps its partner off the CPU (DINOv2-S at batch 1 took 1,060 ms instead of
# 40 ms here with two threads under a load of 5): there, OMP_WAIT_POLICY=PASSIVE keeps the run usable, but every
# wake-up then costs tens of microseconds, which penalises many small operations (an adapter's) far more than a
# user's machine does (batch 1: fused 1.18x the backbone with PASSIVE, 1.06x without, on the same idle machine).
OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset (the runtime's default)")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BARE = "backbone (no adapter)"
AOT_FORM = "AOTInductor, any batch size (export_compiled)"


def fresh_backbone(config: str, args) -> torch.nn.Module:
    """A new copy of the backbone of ``config`` (``name[@pixels]``) with a 10-class head."""
    return common.load_model(config.split("@")[0], 10, args.sizes[config])[0].eval().to(args.device)


def mimi_model(config: str, sigma: float, args, *, tasks: int = 1, compact: bool = True):
    """The backbone with ``tasks`` MiMi adapters (``task0``, ...; seeds 0, 1, ...) pruned to B(σt); ``task0``
    active, eval mode."""
    from peft import get_peft_model

    from peft_mimi import MiMiConfig

    model, config_name = None, config
    for task in range(tasks):
        torch.manual_seed(task)
        config = MiMiConfig(init_compression=4.0, target_compression=sigma, init_weights=False,
                            **common.PAPER)  # the published rows' design
        if model is None:
            model = get_peft_model(fresh_backbone(config_name, args), config, adapter_name="task0")
        else:
            model.add_adapter(f"task{task}", config)
        model.base_model.set_adapter(f"task{task}")
        while model.base_model.num_rounds():
            model.base_model.prune_round(compact=compact)
    model.base_model.set_adapter("task0")
    return model.eval().to(args.device)


def build_variants(backbone: str, args, workdir: Path) -> tuple[dict[str, Callable], dict[str, dict]]:
    """``({label: fn(x) -> logits}, {label: {"adapter_params", "gflops", ...}})``; the second dict also holds the
    rows that are counted but not timed. The exported files (ONNX, AOTInductor packages) go to ``workdir``."""
    from peft import LoraConfig, get_peft_model

    from peft_mimi.export import export_compiled, to_plain_module

    bare = fresh_backbone(backbone, args)
    example = torch.randn(1, 3, args.pixels[backbone], args.pixels[backbone], device=args.device)
    two_tasks = mimi_model(backbone, args.sigma, args, tasks=2)
    params = two_tasks.base_model.live_params("task0")
    widths = two_tasks.base_model.adapter_widths("task0")
    alive = f"{sum(w > 0 for w in widths.values())}/{len(widths)} adapters"
    fused = mimi_model(backbone, args.sigma, args, tasks=2)  # the same adapters (same seeds), its own weights
    fused.fuse_for_inference()
    plain = to_plain_module(two_tasks)
    mimi = f"MiMi σt={args.sigma:g} ({alive})"
    fns: dict[str, Callable] = {
        BARE: lambda x: bare(pixel_values=x).logits,
        f"{mimi}, default": lambda x: two_tasks(pixel_values=x).logits,
        f"{mimi}, fuse_for_inference()": lambda x: fused(pixel_values=x).logits,
        f"{mimi}, plain module (export.to_plain_module)": lambda x: plain(pixel_values=x).logits,
        f"{mimi}, mixed-task batch (adapter_names, 2 tasks)": lambda x: two_tasks(
            pixel_values=x, adapter_names=[f"task{i % 2}" for i in range(len(x))]).logits,
    }
    counted = {BARE: (bare, 0), f"{mimi}, default": (two_tasks, params),
               f"{mimi}, fuse_for_inference()": (fused, params),
               f"{mimi}, plain module (export.to_plain_module)": (plain, params),
               f"{mimi}, mixed-task batch (adapter_names, 2 tasks)": (None, params)}
    # the forms that run outside eager PyTorch, each also for the bare backbone: the pair compares like with like
    forms = {}
    if args.device == "cpu":
        forms["ONNX (onnxruntime)"] = lambda m: onnx_runner(export_onnx_to(m, example, workdir), args.threads)
    packages = {}  # model -> its AOTInductor package (any batch size), for the deployed-process timing

    def compiled(model):
        packages[model] = export_compiled(model, example, workdir / f"{id(model)}-any.pt2")
        return torch._inductor.aoti_load_package(packages[model])

    aot = args.aot and args.device == "cpu"
    if aot:
        forms[AOT_FORM] = compiled
    if aot and not args.smoke:  # two more compilations per batch size: not for a smoke run
        forms["AOTInductor, compiled for each batch size (dynamic_batch=False)"] = lambda m: CompiledPerBatch(
            m, workdir)
    same_form = {}
    for form, make in forms.items():
        for label, model in ((f"{mimi}, {form}", two_tasks), (f"{BARE}, {form}", bare)):
            fns[label] = make(model)
            counted[label] = (None, params if model is two_tasks else 0)
        same_form[f"{mimi}, {form}"] = f"{BARE}, {form}"
    probe = fresh_backbone(backbone, args)
    rank = common.lora_rank_for_budget(probe, common.adapter_budget(probe, args.sigma))
    targets = [n for n, m in probe.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in common.TARGET_MODULES)]
    for merged in (False, True):
        torch.manual_seed(0)
        lora = get_peft_model(fresh_backbone(backbone, args),
                              LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
        lora_params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
        lora = (lora.merge_and_unload() if merged else lora).eval().to(args.device)
        label = f"LoRA r={rank} {'merged' if merged else 'unmerged'}"
        fns[label] = lambda x, m=lora: m(pixel_values=x).logits
        counted[label] = (lora, lora_params)
    if args.compile:
        mode = "" if args.compile_mode == "default" else f" (mode={args.compile_mode})"
        for label, model in ((f"{BARE}, torch.compile{mode}", bare), (f"{mimi}, fused, torch.compile{mode}", fused)):
            compiled = torch.compile(model, mode=args.compile_mode)
            fns[label] = lambda x, m=compiled: m(pixel_values=x).logits
            counted[label] = (None, params if model is fused else 0)
        same_form[f"{mimi}, fused, torch.compile{mode}"] = f"{BARE}, torch.compile{mode}"
    masked = mimi_model(backbone, args.sigma, args, compact=False)
    counted[f"MiMi σt={args.sigma:g} masked, not shrunk (not timed)"] = (masked, masked.base_model.live_params())
    torch.manual_seed(0)
    vanilla = mimi_model(backbone, 4.0, args)
    counted["Adapters σ=4, vanilla (not timed)"] = (vanilla, vanilla.base_model.live_params())
    rows = {label: {"adapter_params": p, "gflops": None if m is None else gflops_per_image(m, example)}
            for label, (m, p) in counted.items()}
    rows[BARE]["widths"] = widths
    for label, reference in same_form.items():
        rows[label]["same_form_as"] = reference
    if packages:
        # the control, a copy of the backbone's package under another name: loaded as a model of its own
        control = shutil.copyfile(packages[bare], workdir / "backbone-copy.pt2")
        rows[f"{mimi}, {AOT_FORM}"]["packages"] = [packages[two_tasks], control, packages[bare]]
        for label, model in ((f"{mimi}, {AOT_FORM}", two_tasks), (f"{BARE}, {AOT_FORM}", bare)):
            rows[label]["calls_per_forward"] = package_calls(packages[model])
    return fns, rows


def export_onnx_to(model: torch.nn.Module, example: torch.Tensor, workdir: Path) -> Path:
    from peft_mimi.export import export_onnx

    path = workdir / f"{id(model)}.onnx"
    export_onnx(model, example, path)
    return path


def package_calls(path: str) -> dict[str, int] | None:
    """What one forward of an AOTInductor package calls: ``{"generated kernels": n, "library ops": m}`` (Inductor's
    own loops, and the ATen/oneDNN functions it calls out to: the Linears, attention), counted in the package's
    generated C++ (its ``run_impl``); None if this torch lays out its packages otherwise."""
    with zipfile.ZipFile(path) as package:
        sources = [n for n in package.namelist() if n.endswith(".wrapper.cpp")]
        code = package.read(sources[0]).decode() if len(sources) == 1 else ""
    start, end = code.find("AOTInductorModel::run_impl("), code.find("// AOTInductorModel::run_impl")
    if start < 0 or end < start:
        return None
    body = code[start:end]
    return {"generated kernels": len(re.findall(r"^\s*cpp_fused_\w+\(", body, re.M)),
            "library ops": len(re.findall(r"\baoti_torch_cpu_\w+\(", body))}


class CompiledPerBatch:
    """``model`` compiled by AOTInductor for each batch size it is called with (``dynamic_batch=False``); the first
    call at a batch size compiles it (in `interleaved_times`' untimed warm-up calls)."""

    def __init__(self, model: torch.nn.Module, workdir: Path) -> None:
        self.model, self.workdir, self.packages = model, workdir, {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from peft_mimi.export import export_compiled

        if len(x) not in self.packages:
            path = export_compiled(self.model, x, self.workdir / f"{id(self)}-{len(x)}.pt2", dynamic_batch=False)
            self.packages[len(x)] = torch._inductor.aoti_load_package(path)
        return self.packages[len(x)](x)


def onnx_runner(path: Path, threads: int) -> Callable:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # no busy-waiting after a run: spinning threads would take the cores from the variant timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"pixel_values": x.numpy()})[0]


def _addmm_flop(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    """FLOPs of ``c.addmm_(a, b)``: those of the product ``a @ b``, as the counter counts ``addmm``."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def gflops_per_image(model: torch.nn.Module, x: torch.Tensor) -> float:
    # the fused layer accumulates W_up's product in place (addmm_), which the counter does not know by default
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flop})
    with torch.inference_mode(), counter:
        model(pixel_values=x[:1])
    return counter.get_total_flops() / 1e9


def interleaved_times(fns: dict[str, Callable], x: torch.Tensor, repeats: int, warmup: int = 2,
                      cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """``{label: [wall-clock seconds per repeat]}``: every repeat calls each fn once, in a random order (seeded by
    the repeat), after ``warmup`` untimed calls each. ``cpu``, if given, receives the process's CPU seconds (all
    threads) of the same calls: less sensitive than wall time to other processes taking the cores."""
    times: dict[str, list[float]] = {label: [] for label in fns}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # a GPU call returns before the work is done
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        for repeat in range(repeats):
            order = list(fns)
            random.Random(repeat).shuffle(order)
            for label in order:
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                fns[label](x)
                sync()
                times[label].append(time.perf_counter() - start)
                if cpu is not None:
                    cpu.setdefault(label, []).append(time.process_time() - start_cpu)
    return times


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over repeats of time / reference time in the same repeat."""
    return statistics.median(t / r for t, r in zip(times, reference))


def deployed_ratios(packages: list[str], batch: int, size: int, repeats: int, threads: int,
                    runs: int) -> list[list[float]]:
    """Each package's latency over the last one's (``packages``: ``.pt2`` paths, the reference last), median paired
    ratio, timed as a deployment runs them: in a fresh process holding nothing but torch and the packages; once per
    process, in ``runs`` processes one after the other (a process's ratio moves by a few percent from one to the
    next on this machine, where the memory it was given lands: the spread across processes is the honest error).
    Returns one list per package but the last: its ratio in each process."""
    command = [sys.executable, __file__, "--time-packages", *packages, "--batches", str(batch), "--package-pixels",
               str(size), "--repeats", str(repeats), "--threads", str(threads)]
    per_process = []
    for _ in range(runs):
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        per_process.append(json.loads(done.stdout.strip().splitlines()[-1])["ratios"])
    return [list(ratios) for ratios in zip(*per_process)]


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else "one process"


def time_packages(args) -> None:
    """``--time-packages A [B ...] REFERENCE``: print ``{"ratios": [A's time / REFERENCE's, ...]}`` (median paired
    ratios, interleaved repeats). The packages are loaded in a random order: none is always first in memory."""
    *timed, reference = args.time_packages
    order = list(args.time_packages)
    random.shuffle(order)
    runners = {path: torch._inductor.aoti_load_package(path) for path in order}
    side = args.package_pixels
    x = torch.randn(args.batches[0], 3, side, side, generator=torch.Generator().manual_seed(0))
    times = interleaved_times({path: runners[path] for path in args.time_packages}, x, args.repeats)
    print(json.dumps({"ratios": [paired_ratio(times[path], times[reference]) for path in timed],
                      "ms": {p: 1000 * statistics.median(t) for p, t in times.items()}}))


def bench_config(backbone: str, args) -> dict:
    # the exported files are hundreds of MB for a real backbone: removed when the configuration is done
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as workdir:
        return _bench_config(backbone, args, Path(workdir))


def _bench_config(backbone: str, args, workdir: Path) -> dict:
    fns, rows = build_variants(backbone, args, workdir)
    size = args.pixels[backbone]
    blocks = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(args.device)
        load_before = os.getloadavg()
        repeats = args.repeats if batch == 1 else max(3, args.repeats // 2)
        cpu: dict[str, list[float]] = {}
        times = interleaved_times(fns, x, repeats, cpu=cpu)
        blocks[str(batch)] = {"load_before": load_before, "load_after": os.getloadavg(), "repeats": repeats}
        for label, ts in times.items():
            rows[label].setdefault("latency_s", {})[str(batch)] = ts
            rows[label].setdefault("cpu_s", {})[str(batch)] = cpu[label]
            rows[label].setdefault("ratio", {})[str(batch)] = paired_ratio(ts, times[BARE])
            rows[label].setdefault("cpu_ratio", {})[str(batch)] = paired_ratio(cpu[label], cpu[BARE])
        for label, row in rows.items():
            if "same_form_as" in row:
                ratio = paired_ratio(times[label], times[row["same_form_as"]])
                row.setdefault("same_form_ratio", {})[str(batch)] = ratio
        # then each timed variant alone with its reference, alternating: no other model runs between the two
        for label in fns:
            reference = rows[label].get("same_form_as", BARE)
            if label in (BARE, reference) or label.startswith(BARE):
                continue
            pair = interleaved_times({label: fns[label], reference: fns[reference]}, x, repeats)
            rows[label].setdefault("pair_ratio", {})[str(batch)] = paired_ratio(pair[label], pair[reference])
        for row in rows.values():
            if "packages" in row:
                ratios, control = deployed_ratios(row["packages"], batch, size, repeats, args.threads,
                                                  args.deployed_runs)
                row.setdefault("deployed_ratios", {})[str(batch)] = ratios
                row.setdefault("deployed_ratio", {})[str(batch)] = statistics.median(ratios)
                row.setdefault("control_ratios", {})[str(batch)] = control
        print(f"[inference] {backbone} batch {batch} (load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}): "
              + ", ".join(f"{k}={1000 * statistics.median(v):.1f}ms" for k, v in times.items()), flush=True)
    for row in rows.values():
        row.pop("packages", None)  # files in workdir, removed after this
    return {"image_size": size, "backbone_params": common.backbone_params(fresh_backbone(backbone, args)),
            "blocks": blocks, "variants": rows}


def markdown(results: dict, args) -> str:
    where = (f"on {args.device_name} (each timed call ends with torch.cuda.synchronize(); "
             "CPU × counts the host thread, busy while it waits), " if args.device != "cpu" else "")
    lines = ["# Inference cost relative to the bare backbone", "",
             f"σt = {args.sigma:g} (MiMi's budget B(σt); LoRA at the rank closest to it), fp32, {where}"
             f"{args.threads} CPU thread(s), OMP_WAIT_POLICY {args.omp_wait_policy}, on a {os.cpu_count()}-core "
             "machine (the load averages say whether other jobs ran). Each repeat runs "
             "every variant once in a random order; ms = median over repeats; × backbone = median over repeats of "
             "the variant's time / the backbone's time in the same repeat (wall clock; CPU × is the same with the "
             "process's CPU time, all threads, which other processes disturb less). GFLOPs are counted matrix "
             "products per image (FlopCounterMode). Adapter params exclude the head.", ""]
    for config, res in results.items():
        base = res["variants"][BARE]
        header = ["variant", "adapter params", "GFLOPs/img", "Δ GFLOPs"]
        for b in args.batches:
            header += [f"ms @ batch {b}", f"× backbone @ {b}", f"CPU × @ {b}"]
        rows = []
        for label, v in res["variants"].items():
            flops = ["–", "–"] if v["gflops"] is None else [
                f"{v['gflops']:.4f}", f"{100 * (v['gflops'] / base['gflops'] - 1):+.2f}%"]
            row = [label, f"{v['adapter_params']:,}", *flops]
            for b in args.batches:
                if "latency_s" in v:
                    row += [f"{1000 * statistics.median(v['latency_s'][str(b)]):.2f}", f"{v['ratio'][str(b)]:.3f}",
                            f"{v['cpu_ratio'][str(b)]:.3f}"]
                else:
                    row += ["–", "–", "–"]
            rows.append(row)
        loads = "; ".join(f"batch {b}: {blk['repeats']} repeats, load {blk['load_before'][0]:.2f} → "
                          f"{blk['load_after'][0]:.2f}" for b, blk in res["blocks"].items())
        same = [f"{label}: " + ", ".join(f"{v['same_form_ratio'][str(b)]:.3f}× at batch {b}" for b in args.batches)
                for label, v in res["variants"].items() if "same_form_ratio" in v]
        lines += [f"## {config} ({res['backbone_params']:,} params, {res['image_size']} px)", "",
                  common.table(header, rows), "", f"1-minute load average before → after: {loads}.", ""]
        if same:
            lines += ["Against the backbone run the same way (median paired ratio): " + "; ".join(same) + ".", ""]
        pairs = [[label, *(f"{v['pair_ratio'][str(b)]:.3f}" for b in args.batches)]
                 for label, v in res["variants"].items() if "pair_ratio" in v]
        if pairs:
            lines += ["Each variant timed again alone with its reference (the bare backbone, or the backbone run the "
                      "same way for the ONNX, AOTInductor and torch.compile rows), the two alternating for as many "
                      "repeats; median paired ratio. Without the other models running in between, the caches and "
                      "the threads see only these two:", "",
                      common.table(["variant", *(f"× reference @ {b}" for b in args.batches)], pairs), ""]
        calls = [f"{label}: {v['calls_per_forward']['generated kernels']} generated kernels and "
                 f"{v['calls_per_forward']['library ops']} library ops" for label, v in res["variants"].items()
                 if v.get("calls_per_forward")]
        if calls:
            lines += ["What one forward of each AOTInductor package calls (counted in its generated C++: Inductor's "
                      "own loops, and the ATen/oneDNN functions it calls out to): " + "; ".join(calls) + ".", ""]
        deployed = [f"{label}: " + ", ".join(
            f"{v['deployed_ratio'][str(b)]:.3f}× at batch {b} ({spread(v['deployed_ratios'][str(b)])}; control "
            f"{statistics.median(v['control_ratios'][str(b)]):.3f}×, {spread(v['control_ratios'][str(b)])})"
            for b in args.batches) for label, v in res["variants"].items() if "deployed_ratio" in v]
        if deployed:
            lines += ["As deployed: the AOTInductor packages (MiMi's and the backbone's) timed the same way in a "
                      "fresh process that holds nothing else (torch alone, as a server loading the package), in "
                      f"{args.deployed_runs} such processes one after the other; the median of their ratios (lowest to "
                      "highest). The control is a copy of the backbone's package timed against the backbone's in the "
                      "same processes: nothing differs, so its ratio is the measurement's own bias and spread. "
                      + "; ".join(deployed) + ".", ""]
    if args.notes:
        lines += [args.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- profile
def profile(args) -> None:
    """Where one adapter's time goes: torch.profiler over whole forwards (batch 1) of the bare backbone, the default
    MiMi model and the fused one, interleaved timings of one adapted layer and of its parts, and the compiled forward
    split into generated kernels and library calls (:func:`compiled_breakdown`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    backbone = args.configs[0]
    pixels = args.pixels[backbone]
    bare = fresh_backbone(backbone, args)
    model = mimi_model(backbone, args.sigma, args)
    fused = mimi_model(backbone, args.sigma, args)
    fused.fuse_for_inference()
    x = torch.randn(1, 3, pixels, pixels)
    lines = ["# Where the time of a MiMi adapter goes", "",
             f"{backbone} at {pixels} px, MiMi σt={args.sigma:g} compacted, {args.threads} CPU thread(s), fp32, "
             f"OMP_WAIT_POLICY {args.omp_wait_policy}, "
             f"`torch.inference_mode`, 1-minute load average at the start {os.getloadavg()[0]:.2f}.", ""]
    with torch.inference_mode():
        for name, m in ((BARE, bare), ("MiMi, default", model), ("MiMi, fuse_for_inference()", fused)):
            for _ in range(3):
                m(pixel_values=x)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.repeats):
                    m(pixel_values=x)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            lines += [f"## torch.profiler, {name} ({args.repeats} forwards)", "", "```", table.strip(), "```", ""]
    lines += layer_breakdown(model, fused, bare, x, args)
    lines += compiled_breakdown(bare, model, pixels, args)
    lines += [f"Load average at the end: {os.getloadavg()[0]:.2f}.", ""]
    if args.notes:
        lines += [args.notes]
    common.write_results(args.out, "inference_profile", {"config": vars(args), "markdown": lines}, "\n".join(lines))


def compiled_breakdown(bare, model, pixels: int, args) -> list[str]:
    """Compiled as ``export_compiled`` compiles (Inductor, weights frozen), the time per forward spent in Inductor's
    generated kernels and in the library calls they make (oneDNN/MKL GEMMs, attention), backbone against MiMi, at
    batch 1 and 32: ``torch.profiler`` with Inductor's per-kernel records, the two models alternating for
    ``args.repeats`` profiled rounds of a few forwards each, medians over rounds."""
    from torch.profiler import profile as torch_profile

    from peft_mimi.export import to_plain_module

    models = {BARE: bare, "MiMi (export.to_plain_module)": to_plain_module(model)}
    rows = []
    with torch._inductor.config.patch({"freezing": True, "cpp.enable_kernel_profile": True}), torch.inference_mode():
        compiled = {name: torch.compile(m) for name, m in models.items()}
        for batch in (1, 32):
            x = torch.randn(batch, 3, pixels, pixels)
            calls = 20 if batch == 1 else 2
            for m in compiled.values():
                for _ in range(2):
                    m(pixel_values=x)
            per_round: dict[str, dict[str, list[float]]] = {n: {"generated": [], "library": []} for n in compiled}
            for repeat in range(args.repeats):
                for name in (list(compiled) if repeat % 2 == 0 else list(compiled)[::-1]):
                    with torch_profile() as prof:
                        for _ in range(calls):
                            compiled[name](pixel_values=x)
                    totals = {"generated": 0.0, "library": 0.0}
                    for event in prof.events():  # the calls made by the compiled graph itself
                        if event.cpu_parent is not None and "CompiledFxGraph" in event.cpu_parent.name:
                            kind = "generated" if event.name.startswith("graph_") else "library"
                            totals[kind] += event.cpu_time_total / 1000 / calls
                    for kind, ms in totals.items():
                        per_round[name][kind].append(ms)
            medians = {n: {k: statistics.median(v) for k, v in kinds.items()} for n, kinds in per_round.items()}
            base = medians[BARE]
            for name, kinds in medians.items():
                rows.append([name, str(batch)] + [f"{kinds[k]:.3f} ({kinds[k] - base[k]:+.3f})"
                                                  for k in ("generated", "library")])
    return ["## Compiled: generated kernels and library calls", "",
            "`torch.compile` with Inductor's `freezing` (as `export_compiled` compiles), Inductor's per-kernel "
            "profiling on; ms per forward (difference to the backbone), median of "
            f"{args.repeats} profiled rounds, the two models alternating. Generated kernels: Inductor's own loops (a "
            "narrow adapter is computed inside them); library calls: the GEMMs and attention they call out to.", "",
            common.table(["model", "batch", "generated kernels, ms", "library calls, ms"], rows), ""]


def layer_breakdown(model, fused, bare, x, args) -> list[str]:
    """Interleaved microbenchmarks of one adapted layer's forward and of each step inside it, for the widest adapter
    of each layer shape (e.g. the attention output, k = d, and the MLP's second Linear, k = 4d), at the layer's input
    of a batch of 1 and of 32 images; and the alternative of folding ``W_down`` into the Linear."""
    from peft_mimi.layer import MiMiLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, MiMiLayer) and m.live_width("task0")}
    widest = {}
    for name, layer in layers.items():
        key = layer.in_features
        if key not in widest or layer.live_width("task0") > widest[key][1].live_width("task0"):
            widest[key] = (name, layer)
    columns, results = [], []
    for name, layer in widest.values():
        captured = {}
        hook = layer.register_forward_pre_hook(lambda m, a, store=captured: store.setdefault("x", a[0]))
        with torch.inference_mode():
            model(pixel_values=x)
        hook.remove()
        for batch in (1, 32):
            h = captured["x"].repeat(batch, *([1] * (captured["x"].dim() - 1)))
            columns.append(f"{name.removeprefix('base_model.model.')} (k={layer.in_features}, d={layer.feature_size}, "
                           f"width {layer.live_width('task0')}), {tuple(h.shape)}")
            results.append(layer_step_times(layer, fused.get_submodule(name), h, args.repeats))
    steps = list(results[0])
    rows = [[step, *(f"{r[step]:.1f}" for r in results)] for step in steps]
    return ["## One adapted layer, step by step", "",
            f"µs per call, median of {args.repeats} interleaved repeats (each of many calls: one call of a few µs is "
            "below the timer's resolution). The wrapper row is what the default forward costs beyond the Linear and "
            "the steps below it: PEFT's bookkeeping (active adapters, disabled/merged checks) and four module calls.",
            "", common.table(["step", *columns], rows), ""]


def layer_step_times(layer, fused_layer, h: torch.Tensor, repeats: int) -> dict[str, float]:
    import torch.nn.functional as F

    base = layer.get_base_layer()
    down, up, act = layer.mimi_down["task0"], layer.mimi_up["task0"], layer.mimi_activation["task0"]
    d = layer.feature_size
    with torch.inference_mode():
        y = base(h)
        hidden = act(down(y))
        delta = up(hidden)
        folded = torch.cat([base.weight, down.weight @ base.weight])
        folded_bias = torch.cat([base.bias, down.weight @ base.bias])

    def fold_forward():  # the alternative: one (d + n) × k product gives y and W_down·y
        z = F.linear(h, folded, folded_bias)
        return z[..., :d] + F.linear(F.gelu(z[..., d:]), up.weight)

    steps = {
        "wrapped nn.Linear alone (what the bare backbone runs)": lambda: base(h),
        "MiMi layer, default forward": lambda: layer(h),
        "MiMi layer, fused (fuse_for_inference)": lambda: fused_layer(h),
        "alternative: W_down folded into the Linear, (d+n)×k": fold_forward,
        "step: dtype cast y.to(W_down.dtype) (no-op in fp32)": lambda: y.to(down.weight.dtype),
        "step: W_down, module call": lambda: down(y),
        "step: activation, module call (GELUActivation)": lambda: act(hidden),
        "step: W_up, module call": lambda: up(hidden),
        "step: residual add y + delta": lambda: y + delta,
        "step: W_down as F.linear": lambda: F.linear(y, down.weight),
        "step: activation as F.gelu": lambda: F.gelu(hidden),
    }
    calls = max(2, 20_000 // h.shape[:-1].numel())  # about 10 ms per timed repeat
    times = interleaved_times({label: (lambda _, fn=fn: [fn() for _ in range(calls)]) for label, fn in steps.items()},
                              h, repeats)
    us = {label: 1e6 * statistics.median(ts) / calls for label, ts in times.items()}
    module_steps = [label for label in us if label.startswith("step:") and "F." not in label]
    linear, default = us["wrapped nn.Linear alone (what the bare backbone runs)"], us["MiMi layer, default forward"]
    us["wrapper: default forward − Linear − the module steps"] = default - linear - sum(us[k] for k in module_steps)
    us["adapter overhead, default (default − Linear)"] = default - linear
    us["adapter overhead, fused (fused − Linear)"] = us["MiMi layer, fused (fuse_for_inference)"] - linear
    us["adapter overhead, folded alternative"] = us["alternative: W_down folded into the Linear, (d+n)×k"] - linear
    return us


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["dinov2-s14@112", "dinov2-s14@224", "fmnist-vit",
                                                          "fmnist-swin"],
                        help="backbone[@pixels]: a backbone at its native size or at that many pixels")
    parser.add_argument("--sigma", type=float, default=64.0)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20, help="repeats at batch 1 (half as many at larger ones)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) variants")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode for --compile (reduce-overhead: CUDA graphs, for a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, or a GPU (cuda, cuda:1): the ONNX and AOT rows are "
                                                        "CPU-only and left out there")
    parser.add_argument("--no-aot", dest="aot", action="store_false",
                        help="skip the AOTInductor rows (export.export_compiled: about a minute per model to compile)")
    parser.add_argument("--deployed-runs", type=int, default=5,
                        help="fresh processes that each time the AOTInductor packages (deployed ratio, control)")
    parser.add_argument("--profile", action="store_true", help="write inference_profile.md for the first config")
    parser.add_argument("--notes", default="")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--time-packages", nargs="+", metavar="PT2",
                        help="internal (the deployed-process timing): time AOTInductor packages, print each one's "
                             "ratio to the last")
    parser.add_argument("--package-pixels", type=int, default=112, help="with --time-packages: the image side")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.time_packages:
        if len(args.time_packages) < 2:
            parser.error("--time-packages needs at least two packages: those timed, then the reference")
        time_packages(args)
        return
    if args.smoke:
        args.configs, args.batches, args.repeats, args.deployed_runs = [common.SMOKE], [1, 4], 3, 2
    args.sizes = {c: int(c.split("@")[1]) if "@" in c else None for c in args.configs}
    args.omp_wait_policy = OMP_WAIT_POLICY
    args.device_name = "cpu" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    if args.profile:
        _resolve_pixels(args, args.configs[:1])
        profile(args)
        return
    results = {}
    for config in args.configs:
        try:
            _resolve_pixels(args, [config])
            results[config] = bench_config(config, args)
        except (OSError, FileNotFoundError, ImportError) as error:  # a backbone that cannot load is reported
            results[config] = {"error": f"{type(error).__name__}: {error}"}
            print(f"[inference] {config} skipped: {error}", flush=True)
        ok = {k: v for k, v in results.items() if "error" not in v}
        skipped = {k: v["error"] for k, v in results.items() if "error" in v}
        md = markdown(ok, args) + "".join(f"\n\nNot measured: {k} ({e})" for k, e in skipped.items())
        common.write_results(args.out, "inference", {"config": vars(args), "results": results}, md)


def _resolve_pixels(args, configs: list[str]) -> None:
    """``args.pixels[config]``: the image side each config runs at (its override, else the processor's)."""
    args.pixels = getattr(args, "pixels", {})
    for config in configs:
        name = config.split("@")[0]
        args.pixels[config] = args.sizes[config] or common.image_size_of(common.load_model(name, 10)[1])


if __name__ == "__main__":
    main()
