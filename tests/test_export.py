"""Inference forms of a MiMi model (issue #16): adapters fused into the Linears they adapt, a plain module without
PEFT, a torch.export program loadable with torch alone, and ONNX run by onnxruntime."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from conftest import make_images, make_model
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

from peft_mimi import MiMiConfig
from peft_mimi.export import export_compiled, export_onnx, export_program, to_plain_module
from peft_mimi.layer import (
    COMPILED_FUSED_MAX_WIDTH,
    COMPILED_PRODUCT_SUM_MAX_WIDTH,
    FusedMiMiLinear,
    MiMiLayer,
)


def adapted_model(family: str = "vit", num_classes: int = 5, seed: int = 1, adapter_name: str = "default"):
    """A tiny backbone with a fresh head of ``num_classes``, random MiMi adapters of the paper's design (plain, on the
    attention and MLP outputs; σ0 = 4: widths 8 on 32 features, 16 on 64): the first adapted module removed (width
    0), the next one's neurons half masked, the rest whole."""
    base = make_model(family)
    torch.manual_seed(seed)
    base.classifier = torch.nn.Linear(base.classifier.in_features, num_classes)
    config = MiMiConfig(design="paper", init_compression=4.0, target_compression=8.0, init_weights=False,
                        modules_to_save=["classifier"])
    model = get_peft_model(base, config, adapter_name=adapter_name)
    layers = [m for m in model.modules() if isinstance(m, MiMiLayer)]
    layers[0].keep_neurons(adapter_name, torch.zeros(layers[0].physical_width(adapter_name), dtype=torch.bool))
    masked = layers[1].physical_width(adapter_name)
    layers[1].mask_neurons(adapter_name, torch.arange(masked) % 2 == 0)
    return model.eval()


def logits(model, images: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=images, **kwargs).logits


def test_fused_model_gives_the_same_logits_and_removed_adapters_become_plain_linears(family):
    model = adapted_model(family)
    images = make_images(3)
    expected = logits(model, images)
    with model.disable_adapter():
        assert (logits(model, images) - expected).abs().max() > 1e-3  # the adapters matter
    model.fuse_for_inference()
    torch.testing.assert_close(logits(model, images), expected, atol=1e-5, rtol=1e-5)
    widths = model.base_model.adapter_widths()
    plain = to_plain_module(model)
    for name, width in widths.items():
        module = plain.get_submodule(name.removeprefix("base_model.model."))
        if width == 0:
            assert type(module) is torch.nn.Linear
        else:
            assert isinstance(module, FusedMiMiLinear) and module.width == width
    layers = [m for m in model.modules() if isinstance(m, MiMiLayer)]
    assert widths[next(iter(widths))] == 0 and layers[1].live_width("default") < layers[1].physical_width("default")
    model.unfuse()
    torch.testing.assert_close(logits(model, images), expected)


def fused_layers(model) -> list[MiMiLayer]:
    return [m for m in model.modules() if isinstance(m, MiMiLayer) and m.fused_adapters]


@pytest.mark.parametrize("activation", ["silu", "identity"])
def test_fused_adapters_with_biases_and_other_activations_give_the_same_logits(activation):
    model = get_peft_model(make_model(), MiMiConfig(target_compression=8.0, init_weights=False, adapter_bias=True,
                                                    activation=activation)).eval()
    torch.manual_seed(2)
    for layer in (m for m in model.modules() if isinstance(m, MiMiLayer)):
        torch.nn.init.normal_(layer.mimi_down["default"].bias)
        torch.nn.init.normal_(layer.mimi_up["default"].bias)
    images = make_images(3)
    expected = logits(model, images)
    plain = to_plain_module(model)
    model.fuse_for_inference()
    torch.testing.assert_close(logits(model, images), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(plain, images), expected, atol=1e-5, rtol=1e-5)


def test_fusion_refuses_training_and_pruning_until_unfused():
    model = adapted_model()
    model.fuse_for_inference()
    images = make_images(2)
    with pytest.raises(RuntimeError, match=r"unfuse\(\) before pruning"):
        model.base_model.prune_round()
    with pytest.raises(RuntimeError, match=r"unfuse\(\) before training"):
        model.train()(pixel_values=images)
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        model.fuse_for_inference(["nope"])
    assert fused_layers(model)
    model.unfuse()
    assert not fused_layers(model)
    loss = model(pixel_values=images).logits.sum()  # still in train mode: training works again
    loss.backward()
    down = next(m for m in model.modules() if isinstance(m, MiMiLayer) and "default" in m.mimi_down)
    assert down.mimi_down["default"].weight.grad is not None
    model.base_model.prune_round()


def test_fused_model_still_serves_mixed_batches_disabled_adapters_and_other_dtypes():
    model = adapted_model()
    model.add_adapter("other", MiMiConfig(target_compression=8.0, init_weights=False, modules_to_save=["classifier"]))
    model.set_adapter("default")
    model.eval()
    images = make_images(4)
    names = ["default", "other", "__base__", "other"]
    mixed, with_default = logits(model, images, adapter_names=names), logits(model, images)
    with model.disable_adapter():
        bare = logits(model, images)
    model.fuse_for_inference()
    torch.testing.assert_close(logits(model, images, adapter_names=names), mixed)
    torch.testing.assert_close(logits(model, images), with_default, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, images), bare)
    model.double()  # the fused copy follows .to() / .double() like the module's own tensors
    torch.testing.assert_close(logits(model, images.double()).float(), with_default, atol=1e-5, rtol=1e-5)


def test_adding_switching_or_deleting_adapters_undoes_the_fusion():
    model = adapted_model()
    images = make_images(2)
    for change in (lambda: model.add_adapter("other", MiMiConfig(design="paper", init_weights=False)),  # same layers
                   lambda: model.set_adapter("other"), lambda: model.delete_adapter("default")):
        model.fuse_for_inference()
        with pytest.warns(UserWarning, match="undoes fuse_for_inference"):
            change()
        assert not fused_layers(model)
    assert model.active_adapters == ["other"] and list(model.peft_config) == ["other"]
    expected = logits(model, images)
    model.fuse_for_inference()
    torch.testing.assert_close(logits(model, images), expected, atol=1e-5, rtol=1e-5)


def test_adapters_active_together_fuse_as_one_wider_adapter():
    model = adapted_model()
    model.add_adapter("other", MiMiConfig(target_compression=8.0, init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    images = make_images(2)
    expected = logits(model, images)
    model.base_model.fuse_for_inference()
    torch.testing.assert_close(logits(model, images), expected, atol=1e-5, rtol=1e-5)
    layer = [m for m in model.modules() if isinstance(m, MiMiLayer)][-1]
    assert layer._fused.width == layer.live_width("default") + layer.live_width("other")


@pytest.mark.parametrize("first_has_bias", [True, False])
def test_adapters_with_and_without_biases_fuse_together(first_has_bias):
    base = make_model("vit")
    model = get_peft_model(base, MiMiConfig(target_compression=8.0, init_weights=False, adapter_bias=first_has_bias))
    model.add_adapter("other", MiMiConfig(target_compression=8.0, init_weights=False, adapter_bias=not first_has_bias))
    with torch.no_grad():  # biases start at zero: give them values that change the output
        for name, parameter in model.named_parameters():
            if ".mimi_" in name and name.endswith(".bias"):
                parameter.normal_()
    model.base_model.set_adapter(["default", "other"])
    model.eval()
    images = make_images(2)
    expected = logits(model, images)
    model.base_model.fuse_for_inference()
    torch.testing.assert_close(logits(model, images), expected, atol=1e-5, rtol=1e-5)


def test_plain_module_has_nothing_of_peft_and_leaves_the_peft_model_alone():
    model = adapted_model(num_classes=7)
    images = make_images(3)
    expected = logits(model, images)
    plain = to_plain_module(model)
    assert not any(isinstance(m, BaseTunerLayer | ModulesToSaveWrapper) for m in plain.modules())
    assert plain.classifier.out_features == 7 and not plain.training
    torch.testing.assert_close(logits(plain, images), expected, atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, MiMiLayer) for m in model.modules())  # the PEFT model keeps its adapters
    torch.testing.assert_close(logits(model, images), expected)
    with pytest.raises(ValueError, match="PeftModel with MiMi adapters"):
        to_plain_module(make_model())


def test_fused_and_plain_models_compile_to_one_graph_with_the_same_logits():
    model = adapted_model("dinov2")
    images = make_images(2)
    expected = logits(model, images)
    model.fuse_for_inference()
    for module in (model, to_plain_module(model)):
        torch._dynamo.reset()
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(logits(compiled, images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [5, COMPILED_FUSED_MAX_WIDTH + 4, COMPILED_PRODUCT_SUM_MAX_WIDTH + 8])
def test_a_compiled_fused_layer_computes_what_the_eager_one_does(width):
    """Compiled, a narrow adapter is products and sums, a wider one computes W_down·y so and W_up as a GEMM, the
    widest are two GEMMs: all as eager."""
    torch.manual_seed(0)
    d, k = 48, 24
    layer = FusedMiMiLinear(torch.randn(d, k), torch.randn(d), torch.randn(width, d) / 7, torch.randn(width),
                            torch.randn(d, width) / 7, torch.randn(d), "gelu")
    x = torch.randn(2, 9, k)
    with torch.no_grad():
        expected = layer(x)
        torch._dynamo.reset()
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert got.shape == (2, 9, d)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_narrow_adapter_exports_without_a_matrix_product_of_its_own():
    """What lets Inductor fuse a narrow adapter into the code around it: the exported graph holds the Linear's product
    and no other, and the activations are stored once (an as_strided view) rather than recomputed per output."""
    torch.manual_seed(0)
    layer = FusedMiMiLinear(torch.randn(16, 8), torch.randn(16), torch.randn(3, 16), torch.randn(3),
                            torch.randn(16, 3), torch.randn(16), "gelu")
    with torch.no_grad():
        program = torch.export.export(layer, (torch.randn(2, 5, 8),), strict=False)
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    products = [op for op in ops if any(name in op for name in ("mm", "linear", "matmul"))]
    assert products == ["aten.linear.default"], ops
    assert "aten.as_strided.default" in ops
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("export", "load"), [
    (export_program, "torch.export.load(path).module()"),
    (export_compiled, "torch._inductor.aoti_load_package(path)"),  # AOTInductor: compiled code, any batch size
], ids=["program", "compiled"])
def test_exported_forms_run_with_torch_alone(export, load, tmp_path):
    model = adapted_model("dinov2")
    images = make_images(5)
    export(model, make_images(2), tmp_path / "model.pt2")
    torch.save({"images": images, "logits": logits(model, images)}, tmp_path / "expected.pt")
    check = textwrap.dedent(f"""
        import sys
        for blocked in ("peft_mimi", "peft", "transformers"):
            sys.modules[blocked] = None  # importing any of them now fails
        import torch
        path = {str(tmp_path / "model.pt2")!r}
        module = {load}
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(module(expected["images"]), expected["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module(expected["images"][:1]), expected["logits"][:1], atol=1e-5, rtol=1e-5)
        print("ok", type(module).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]


def _onnx_op_counts(path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_onnx_matches_pytorch_and_holds_only_live_adapters(family, tmp_path):
    import onnxruntime

    model = adapted_model(family)
    images = make_images(5)
    export_onnx(model, make_images(2), tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"pixel_values": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), logits(model, images), atol=1e-4, rtol=1e-4)
    # two more matrix products (W_down, W_up) per adapter with live neurons, none for a removed one
    bare = make_model(family)
    bare.classifier = torch.nn.Linear(bare.classifier.in_features, 5)
    export_onnx(bare, make_images(2), tmp_path / "bare.onnx")
    live = sum(width > 0 for width in model.base_model.adapter_widths().values())
    products = [_onnx_op_counts(p)["MatMul"] + _onnx_op_counts(p)["Gemm"] for p in (tmp_path / "model.onnx",
                                                                                      tmp_path / "bare.onnx")]
    assert live == len(model.base_model.adapter_widths()) - 1
    assert products[0] - products[1] == 2 * live


def test_cli_exports_a_saved_adapter_to_onnx_a_program_and_a_compiled_package(backbone, tmp_path):
    import onnxruntime

    from peft_mimi.cli import main
    from peft_mimi.evaluate import load_adapter

    base = make_model("vit", num_labels=10)
    model = get_peft_model(base, MiMiConfig(target_compression=8.0, init_weights=False,
                                            modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "m.onnx"), "--model", backbone]) == 0
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "m.pt2"), "--model", backbone]) == 0
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "m.zip"), "--model", backbone]) == 2
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "c.onnx"), "--model", backbone,
                 "--compiled"]) == 2  # an AOTInductor package is a .pt2
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "c.pt2"), "--model", backbone,
                 "--compiled"]) == 0
    # as a module too (`accelerate launch -m peft_mimi.cli ...` runs it that way): every subcommand is defined by then
    ran = subprocess.run([sys.executable, "-m", "peft_mimi.cli", "export", str(tmp_path / "adapter"),
                          str(tmp_path / "m2.onnx"), "--model", backbone], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert (tmp_path / "m2.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    loaded, _ = load_adapter(tmp_path / "adapter", model=backbone)
    images = make_images(3)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"pixel_values": images.numpy()})[0]),
                               logits(loaded, images), atol=1e-4, rtol=1e-4)
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    torch.testing.assert_close(program(images), logits(loaded, images), atol=1e-5, rtol=1e-5)
    compiled = torch._inductor.aoti_load_package(str(tmp_path / "c.pt2"))
    torch.testing.assert_close(compiled(images), logits(loaded, images), atol=1e-5, rtol=1e-5)


def test_exporting_leaves_the_users_model_as_it_was(tmp_path):
    # Swin's forward stores its window size as a tensor while the ONNX tracer runs it; exporting the model itself
    # left it that way, and torch.export then failed on the same model. Every exporter works on a copy.
    model = make_model("swin").eval()
    attributes = lambda: {n: {k: repr(v) for k, v in vars(m).items() if not k.startswith("_")}  # noqa: E731
                          for n, m in model.named_modules()}
    before = attributes()
    export_onnx(model, make_images(1), tmp_path / "model.onnx")
    assert attributes() == before
    export_program(model, make_images(1))
