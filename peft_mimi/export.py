"""Deployment forms of a MiMi model: a plain module, a torch.export program, a compiled AOTInductor package and an
ONNX file.

    from peft_mimi.export import to_plain_module, export_program, export_compiled, export_onnx

    plain = to_plain_module(peft_model)                    # the transformers model with its adapters, no PEFT
    export_program(peft_model, example, "model.pt2")       # torch only:  torch.export.load("model.pt2").module()
    export_compiled(peft_model, example, "model.pt2")      # torch only:  torch._inductor.aoti_load_package(...)
    export_onnx(peft_model, example, "model.onnx")         # onnxruntime: session.run(None, {"pixel_values": x})

Every form holds the active adapter's live neurons, each adapted Linear and its adapter as one module
(`peft_mimi.layer.FusedMiMiLinear`), its own classification head, and nothing of the adapters that were removed:
those layers are their plain Linear again. The exported program and the ONNX
graph take ``pixel_values`` ``(batch, 3, H, W)`` at the example's height and width (any batch size) and return the
logits ``(batch, num_classes)``; loading them needs neither PEFT nor peft_mimi.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .layer import MiMiLayer
from .model import MiMiModel

__all__ = ["export_compiled", "export_onnx", "export_program", "to_plain_module"]

INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"


def to_plain_module(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """A copy of the base model of ``model`` (a `PeftModel` or `MiMiModel` with MiMi adapters) in eval mode, with
    each adapted Linear and ``adapter_names`` (default: the active adapters) as one `FusedMiMiLinear` (the plain
    Linear where they were removed) and each ``modules_to_save`` wrapper replaced by that adapter's copy
    (e.g. its classification head). Its forward and outputs are the base model's (e.g. ``.logits``); ``model`` is
    not changed. Raises ``ValueError`` for anything else, e.g. a model with adapters of another PEFT method."""
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, MiMiModel):
        raise ValueError(f"to_plain_module takes a PeftModel with MiMi adapters (or its MiMiModel), got "
                         f"{type(tuner).__name__}.")
    names = list(tuner.active_adapters if adapter_names is None else adapter_names)
    for name in names:
        tuner._adapter(name)  # an unknown name is a ValueError that lists the model's adapters
    plain = copy.deepcopy(tuner.model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, MiMiLayer):
            replacement = module.fused_module(names) or module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper):
            present = [n for n in names if n in module.modules_to_save]
            replacement = module.modules_to_save[present[0]] if present else module.original_module
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, replacement)
    return plain.eval().requires_grad_(False)


class _Logits(nn.Module):
    """``pixel_values -> logits`` of a Hugging Face image classifier: plain tensors in and out, for exporters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _logits_module(model: nn.Module) -> nn.Module:
    """A copy of ``model`` made plain: exporters run the forward, and some forwards change their module while traced
    (Swin stores its window size as a tensor under the ONNX tracer, after which torch.export fails on it)."""
    has_adapters = any(isinstance(m, BaseTunerLayer | ModulesToSaveWrapper) for m in model.modules())
    return _Logits(to_plain_module(model) if has_adapters else copy.deepcopy(model).eval()).eval()


def export_program(
    model: nn.Module, example: torch.Tensor, path: str | os.PathLike | None = None, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``pixel_values -> logits`` for ``model`` (a MiMi `PeftModel`, made plain
    with :func:`to_plain_module`, or a plain module from it), any batch size at ``example``'s image size
    (``dynamic_batch=False``: ``example``'s batch size only); saved to ``path`` (``.pt2``) when given. Load it with
    torch alone: ``torch.export.load(path).module()(pixel_values)``."""
    module = _logits_module(model)
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        if len(example) == 1:  # torch.export specialises a dimension of size 1 to a constant
            example = example.repeat(2, *([1] * (example.dim() - 1)))
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes, strict=False)
    if path is not None:
        torch.export.save(program, path)
    return program


def export_compiled(
    model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, dynamic_batch: bool = True,
    inductor_configs: dict | None = None,
) -> str:
    """The program of :func:`export_program` compiled ahead of time by AOTInductor into machine code for this
    machine (the device ``model`` is on), packaged at ``path`` (``.pt2``); returns the path. The fastest PyTorch form:
    no Python between operations, and a narrow adapter computed inside the kernels the backbone runs anyway, so a
    compacted MiMi model makes the same calls as its backbone (benchmarks/results/inference_*.md).
    The weights are frozen into the package (Inductor's ``freezing``: constants folded, and on a CPU the Linear
    weights pre-packed for oneDNN, which halves a ViT-S's latency on a 2-core CPU against compiling without it);
    ``inductor_configs`` adds to or overrides Inductor's settings (``torch._inductor.config`` names, e.g.
    ``{"max_autotune": True}``). ``dynamic_batch=False`` compiles for ``example``'s batch size only (measured no
    faster on a 2-core CPU, but it lets the compiler specialise). Load it with torch alone, where it was compiled or
    on the same kind of machine: ``torch._inductor.aoti_load_package(path)(pixel_values)`` returns the logits.
    Compiling needs a C++ compiler (and takes under a minute for a ViT-S on 2 CPU cores); running does not."""
    program = export_program(model, example, dynamic_batch=dynamic_batch)
    configs = {"freezing": True, **(inductor_configs or {})}
    with torch.no_grad():
        return torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path),
                                                        inductor_configs=configs)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = 17) -> None:
    """Write ``pixel_values -> logits`` of ``model`` (as for :func:`export_program`) to the ONNX file ``path``:
    input ``"pixel_values"`` (dynamic batch, ``example``'s image size), output ``"logits"``. Uses torch's
    TorchScript-based exporter (``dynamo=False``), which needs no package beyond torch and onnx."""
    module = _logits_module(model)
    with warnings.catch_warnings(), torch.no_grad():
        # transformers' shape checks are constants at a fixed image size: the tracer's warnings about them are noise
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
