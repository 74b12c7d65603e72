"""Per-task storage: bytes of each method's saved per-task file against the parameters it holds, fp32 / bf16 / fp16.

    python benchmarks/bench_storage.py                       # -> results/storage.{md,json}
    python benchmarks/bench_storage.py --smoke --out /tmp/x  # tiny random ViT, seconds

PEFT methods (MiMi, vanilla adapters, LoRA) are saved with ``save_pretrained`` (``adapter_model.safetensors`` +
``adapter_config.json``), the 10-class head included (``modules_to_save``). The linear probe and BitFit save their
trained tensors (head; biases + head) with safetensors; full fine-tuning saves the whole model. Half precision:
the model is cast (``.to(dtype)``) before saving. MiMi is pruned to its budget from random initial weights
(``init_weights=False``): the widths differ from a trained run's, the number of live parameters does not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_variants(backbone: str, sigmas: list[float]):
    """``[(label, kind, model)]`` with ``kind`` 'peft' (save_pretrained), 'tensors' (trainable tensors) or 'full'."""
    from peft import LoraConfig, get_peft_model

    from peft_mimi import MiMiConfig

    def fresh():
        return common.load_model(backbone, 10)[0]

    out = []
    for sigma in sigmas:
        for compact in (True, False) if sigma == max(sigmas) else (True,):
            torch.manual_seed(0)
            model = get_peft_model(fresh(), MiMiConfig(target_compression=sigma, init_weights=False,
                                                       modules_to_save=["classifier"], **common.PAPER))
            while model.base_model.num_rounds():
                model.base_model.prune_round(compact=compact)
            out.append((f"MiMi σt={sigma:g} {'compacted' if compact else 'masked (compact=False)'}", "peft", model))
    for sigma in (4.0, max(sigmas)):
        torch.manual_seed(0)
        model = get_peft_model(fresh(), MiMiConfig(init_compression=sigma, target_compression=sigma,
                                                   init_weights=False, modules_to_save=["classifier"],
                                                   **common.PAPER))
        out.append((f"Adapters σ={sigma:g} (vanilla)", "peft", model))
    probe = fresh()
    for sigma in sigmas:
        rank = common.lora_rank_for_budget(probe, common.adapter_budget(probe, sigma))
        model = get_peft_model(fresh(), LoraConfig(r=rank, target_modules=common.TARGET_MODULES,
                                                   modules_to_save=["classifier"], init_lora_weights=False))
        out.append((f"LoRA r={rank} (≈B(σt={sigma:g}))", "peft", model))
    for kind in ("linear", "bitfit"):
        model = common.build(common.Method(kind, kind), fresh(), 0)
        out.append(({"linear": "Linear probe (head)", "bitfit": "BitFit (biases + head)"}[kind], "tensors", model))
    out.append(("Full fine-tuning (whole model)", "full", fresh()))
    return out


def save(kind: str, model: torch.nn.Module, directory: Path) -> Path:
    """Save one method's per-task file; returns the weights file."""
    if kind == "peft":
        model.save_pretrained(directory)
        return directory / "adapter_model.safetensors"
    if kind == "full":
        model.save_pretrained(directory)
        return directory / "model.safetensors"
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, directory / "model.safetensors")
    return directory / "model.safetensors"


def tensor_count(path: Path) -> tuple[int, int]:
    """``(number of values, bytes of tensor data)`` stored in a safetensors file."""
    values = data = 0
    with safe_open(path, "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            values += t.numel()
            data += t.numel() * t.element_size()
    return values, data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["fmnist-vit", "fmnist-swin", "dinov2-s14"])
    parser.add_argument("--sigmas", nargs="+", type=float, default=[16.0, 64.0])
    parser.add_argument("--notes", default="")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbones = [common.SMOKE]
    results: dict = {}
    md = ["# Per-task storage", "",
          "Bytes of the weights file each method needs per task (head for 10 classes included in every row) and of "
          "the whole saved directory (config JSON included), against the values stored in it. 'MB' = 10^6 bytes.",
          ""]
    for backbone in args.backbones:
        try:
            models = build_variants(backbone, args.sigmas)
        except (OSError, FileNotFoundError, ImportError) as error:
            results[backbone] = {"error": f"{type(error).__name__}: {error}"}
            md += [f"## {backbone}: not measured ({error})", ""]
            continue
        rows, raw = [], []
        for label, kind, model in models:
            entry = {"label": label, "kind": kind}
            for dname, dtype in DTYPES.items():
                with tempfile.TemporaryDirectory() as tmp:
                    weights = save(kind, model.to(dtype), Path(tmp) / "task")
                    values, data = tensor_count(weights)
                    directory = sum(p.stat().st_size for p in (Path(tmp) / "task").rglob("*") if p.is_file())
                    entry[dname] = {"stored_values": values, "tensor_bytes": data,
                                    "weights_file_bytes": weights.stat().st_size, "directory_bytes": directory}
            raw.append(entry)
            f32, b16 = entry["fp32"], entry["bf16"]
            rows.append([label, f"{f32['stored_values']:,}", f"{f32['weights_file_bytes']:,}",
                         f"{f32['directory_bytes']:,}", f"{b16['weights_file_bytes']:,}",
                         f"{entry['fp16']['weights_file_bytes']:,}",
                         f"{f32['weights_file_bytes'] / f32['stored_values']:.2f}"])
            print(f"[storage] {backbone} {label}: {f32['stored_values']} values, {f32['weights_file_bytes']} B fp32, "
                  f"{b16['weights_file_bytes']} B bf16", flush=True)
        results[backbone] = {"backbone_params": common.backbone_params(models[-1][2]), "variants": raw}
        md += [f"## {backbone} (backbone {results[backbone]['backbone_params']:,} params)", "",
               common.table(["method", "values stored", "weights B fp32", "dir B fp32", "weights B bf16",
                             "weights B fp16", "B/value fp32"], rows), ""]
        common.write_results(args.out, "storage", {"config": vars(args), "results": results},
                             "\n".join(md + ([args.notes] if args.notes else [])))
    common.write_results(args.out, "storage", {"config": vars(args), "results": results},
                         "\n".join(md + ([args.notes] if args.notes else [])))


if __name__ == "__main__":
    main()
