"""Inference cost (paper Table 4): counted GFLOPs and measured CPU latency relative to the bare backbone.

    python benchmarks/bench_inference.py                       # -> results/inference.{md,json}
    python benchmarks/bench_inference.py --smoke --out /tmp/x  # tiny random ViT, seconds

Variants, on the same backbone in one process, timed round-robin (so that load from other processes hits all of
them alike): the bare backbone; MiMi pruned to the budget B(σt) and compacted; the same pruning only masked
(``prune_round(compact=False)``: full-size tensors); vanilla adapters at σ=4; LoRA at the rank whose size is
closest to B(σt), unmerged and merged (``merge_and_unload``). Pruning decisions come from the adapters' initial
random weights (``init_weights=False``), not from training: this measures what a given set of widths costs, and
the widths of a trained MiMi model differ (see allocation.json), but its parameter count is the same budget.
GFLOPs: ``torch.utils.flop_counter.FlopCounterMode`` per image (matrix products only; activations and additions
are not counted). Latency: median over repeats, batch 1 and 32, ``torch.inference_mode``, fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def variants(backbone: str, sigma: float, image_size: int | None) -> dict[str, tuple[torch.nn.Module, int]]:
    """``{label: (model in eval mode, adapter parameters)}``; every model has a fresh 10-class head."""
    from peft import LoraConfig, get_peft_model

    from peft_mimi import MiMiConfig

    def fresh():
        return common.load_model(backbone, 10, image_size)[0].eval()

    out = {"backbone (no adapter)": (fresh(), 0)}
    for compact in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(fresh(), MiMiConfig(init_compression=4.0, target_compression=sigma, init_weights=False))
        tuner = model.base_model
        while tuner.num_rounds():
            tuner.prune_round(compact=compact)
        alive = sum(w > 0 for w in tuner.adapter_widths().values())
        label = (f"MiMi σt={sigma:g} compacted ({alive}/{len(tuner.adapter_widths())} adapters left)" if compact
                 else f"MiMi σt={sigma:g} masked, not shrunk")
        out[label] = (model.eval(), tuner.live_params())
    torch.manual_seed(0)
    model = get_peft_model(fresh(), MiMiConfig(init_compression=4.0, target_compression=4.0, init_weights=False))
    out["Adapters σ=4 (vanilla)"] = (model.eval(), model.base_model.live_params())
    probe = fresh()
    rank = common.lora_rank_for_budget(probe, common.adapter_budget(probe, sigma))
    targets = [n for n, m in probe.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in common.TARGET_MODULES)]
    for merged in (False, True):
        torch.manual_seed(0)
        lora = get_peft_model(fresh(), LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                                  init_lora_weights=False))
        params = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
        if merged:
            lora = lora.merge_and_unload()
        out[f"LoRA r={rank} {'merged' if merged else 'unmerged'}"] = (lora.eval(), params)
    return out


def gflops_per_image(model: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(pixel_values=x[:1])
    return counter.get_total_flops() / 1e9


def bench_backbone(backbone: str, args) -> dict:
    models = variants(backbone, args.sigma, args.image_sizes.get(backbone))
    size = common.image_size_of(common.load_model(backbone, 10, args.image_sizes.get(backbone))[1])
    rows = {label: {"adapter_params": params, "gflops": gflops_per_image(m, torch.randn(1, 3, size, size)),
                    "latency_s": {}} for label, (m, params) in models.items()}
    for batch in args.batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {label: [] for label in models}
        with torch.inference_mode():
            for m, _ in models.values():  # warm-up
                for _ in range(2):
                    m(pixel_values=x)
            for _ in range(args.repeats):  # round-robin: the same background load hits every variant
                for label, (m, _) in models.items():
                    times[label] += common.timed(lambda m=m, x=x: m(pixel_values=x), repeats=1, warmup=0)
        for label in models:
            rows[label]["latency_s"][str(batch)] = times[label]
        print(f"[inference] {backbone} batch {batch}: " + ", ".join(
            f"{k}={1000 * statistics.median(v):.1f}ms" for k, v in times.items()), flush=True)
    return {"image_size": size, "backbone_params": common.backbone_params(models["backbone (no adapter)"][0]),
            "variants": rows}


def markdown(results: dict, args) -> str:
    lines = ["# Inference cost relative to the bare backbone", "",
             f"σt = {args.sigma:g} (MiMi's budget B(σt); LoRA at the rank closest to it), fp32, "
             f"{args.threads} CPU thread(s), median of {args.repeats} repeats, timed round-robin in one process "
             "on a shared 2-core machine. GFLOPs are counted matrix products per image (FlopCounterMode). "
             "Adapter params exclude the head.", ""]
    for backbone, res in results.items():
        base = res["variants"]["backbone (no adapter)"]
        header = ["variant", "adapter params", "GFLOPs/img", "Δ GFLOPs"]
        for b in args.batches:
            header += [f"ms @ batch {b}", f"× backbone @ {b}"]
        rows = []
        for label, v in res["variants"].items():
            delta = 100 * (v["gflops"] / base["gflops"] - 1)
            row = [label, f"{v['adapter_params']:,}", f"{v['gflops']:.4f}", f"{delta:+.2f}%"]
            for b in args.batches:
                med = statistics.median(v["latency_s"][str(b)])
                row += [f"{1000 * med:.2f}", f"{med / statistics.median(base['latency_s'][str(b)]):.3f}"]
            rows.append(row)
        lines += [f"## {backbone} ({res['backbone_params']:,} params, {res['image_size']} px)", "",
                  common.table(header, rows), ""]
    if args.notes:
        lines += [args.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["fmnist-vit", "fmnist-swin", "dinov2-s14"])
    parser.add_argument("--image-size", nargs="*", default=["dinov2-s14=56"],
                        help="per-backbone resolution overrides, name=pixels")
    parser.add_argument("--sigma", type=float, default=64.0)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--notes", default="")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.image_sizes = {k: int(v) for k, v in (item.split("=") for item in args.image_size)}
    if args.smoke:
        args.backbones, args.batches, args.repeats = [common.SMOKE], [1, 4], 3
    torch.set_num_threads(args.threads)
    results = {}
    for backbone in args.backbones:
        try:
            results[backbone] = bench_backbone(backbone, args)
        except (OSError, FileNotFoundError, ImportError) as error:  # a backbone that cannot load is reported
            results[backbone] = {"error": f"{type(error).__name__}: {error}"}
            print(f"[inference] {backbone} skipped: {error}", flush=True)
        ok = {k: v for k, v in results.items() if "error" not in v}
        skipped = {k: v["error"] for k, v in results.items() if "error" in v}
        md = markdown(ok, args) + "".join(f"\n\nNot measured: {k} ({e})" for k, e in skipped.items())
        common.write_results(args.out, "inference", {"config": {k: v for k, v in vars(args).items()},
                                                     "results": results}, md)


if __name__ == "__main__":
    main()
