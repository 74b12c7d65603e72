"""Many tasks on one backbone: loading, switching, deleting and mixed-task batches (issue #8)."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from conftest import make_images, make_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_mimi import MiMiConfig
from peft_mimi.serving import (
    classify_mixed,
    head_sizes,
    load_task_adapters,
    parameter_bytes,
    read_task_labels,
)

# task name -> number of classes; "sparse" is pruned so that some of its adapters have width 0
TASKS = {"dense": 3, "wide": 5, "sparse": 2}


def task_model(family: str, num_classes: int, seed: int, widths: dict[str, int] | None = None) -> PeftModel:
    """The shared backbone (seed 0) with a fresh head of ``num_classes`` and random adapters and head."""
    base = make_model(family)
    torch.manual_seed(seed)
    base.classifier = torch.nn.Linear(base.classifier.in_features, num_classes)
    config = MiMiConfig(target_compression=16.0, init_weights=False, modules_to_save=["classifier"],
                        adapter_widths=widths)
    return get_peft_model(base, config).eval()


def sparse_widths(family: str) -> dict[str, int]:
    """Half of the adapted modules removed (width 0), the others at width 2."""
    names = list(task_model(family, 2, seed=0).base_model.adapter_widths())
    return {name: 0 if i % 2 else 2 for i, name in enumerate(names)}


def save_tasks(family: str, root, tasks: dict[str, int] = TASKS) -> tuple[dict, dict]:
    """Save one adapter per task; return ({task: dir}, {task: logits on make_images(6)} before saving)."""
    dirs, logits = {}, {}
    for seed, (task, num_classes) in enumerate(tasks.items(), start=1):
        widths = sparse_widths(family) if task == "sparse" else None
        model = task_model(family, num_classes, seed, widths)
        dirs[task] = root / task
        model.save_pretrained(dirs[task])
        with torch.no_grad():
            logits[task] = model(make_images(6)).logits
    return dirs, logits


def file_bytes(adapter_dir) -> int:
    """Bytes of an adapter's saved tensors plus its neuron masks (one bool per live neuron, kept in memory)."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    neurons = sum(t.shape[0] for k, t in tensors.items() if ".mimi_down." in k and k.endswith(".weight"))
    return sum(t.numel() * t.element_size() for t in tensors.values()) + neurons


def test_every_image_of_a_mixed_batch_gets_its_own_adapters_and_head(family, tmp_path):
    dirs, trained = save_tasks(family, tmp_path)
    x = make_images(6)
    with torch.no_grad():
        base_logits = make_model(family)(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "missing adapter keys" for removed adapters
        model = load_task_adapters(make_model(family), {"sparse": dirs["sparse"], **dirs})  # first: from_pretrained
    assert 0 in model.base_model.adapter_widths("sparse").values()
    assert head_sizes(model) == {"__base__": 3, **TASKS}
    alone = {}
    for task in TASKS:
        model.set_adapter(task)
        alone[task] = model(x).logits
        torch.testing.assert_close(alone[task], trained[task])

    names = ["wide", "dense", "sparse", "__base__", "sparse", "wide"]
    logits = model(pixel_values=x, adapter_names=names).logits
    assert logits.shape == (6, 5)  # the widest head; narrower heads are padded with -inf
    predictions = classify_mixed(model, x, names)
    exact = dict(rtol=0, atol=1e-6)  # equal up to float rounding: a sub-batch's matmuls may round differently
    for i, (name, prediction) in enumerate(zip(names, predictions)):
        expected = base_logits[i] if name == "__base__" else alone[name][i]
        torch.testing.assert_close(prediction.logits, expected, **exact)
        torch.testing.assert_close(logits[i, : len(expected)], expected, **exact)
        assert torch.isneginf(logits[i, len(expected):]).all()
        assert prediction.task == name and prediction.class_id == int(expected.argmax())
        assert prediction.score == pytest.approx(float(expected.softmax(-1).max()))


def test_predictions_carry_the_tasks_class_names(tmp_path):
    dirs, _ = save_tasks("vit", tmp_path, {"faces": 2, "digits": 3})
    (dirs["faces"] / "mimi_run.json").write_text('{"labels": ["non-face", "face"]}')
    labels = read_task_labels(dirs)
    assert labels == {"faces": ["non-face", "face"]}
    model = load_task_adapters(make_model("vit"), dirs)
    predictions = classify_mixed(model, make_images(3), ["faces", "digits", "faces"], labels=labels)
    assert [p.label in ("non-face", "face") for p in predictions] == [True, False, True]
    assert predictions[1].label == str(predictions[1].class_id)


def test_an_adapter_with_another_number_of_classes_loads_alone_at_its_own_size(tmp_path):
    dirs, trained = save_tasks("vit", tmp_path, {"wide": 5})
    model = PeftModel.from_pretrained(make_model("vit", num_labels=3), dirs["wide"])
    torch.testing.assert_close(model(make_images(6)).logits, trained["wide"])


def test_low_cpu_mem_usage_loading_gives_the_same_model(tmp_path):
    dirs, trained = save_tasks("vit", tmp_path)
    model = load_task_adapters(make_model("vit"), {"sparse": dirs["sparse"], **dirs}, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in model.parameters())
    names = ["wide", "dense", "sparse"] * 2
    logits = model(pixel_values=make_images(6), adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(logits[i, : TASKS[name]], trained[name][i], rtol=0, atol=1e-6)


def test_an_adapter_for_another_backbone_width_is_refused(tmp_path):
    get_peft_model(make_model("vit", hidden_size=48), MiMiConfig(target_compression=16.0,
                                                                  modules_to_save=["classifier"])).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="(another|a different) backbone"):
        PeftModel.from_pretrained(make_model("vit"), tmp_path)


def test_switching_and_training_one_adapter_leaves_the_others_untouched(tmp_path):
    dirs, trained = save_tasks("vit", tmp_path)
    model = load_task_adapters(make_model("vit"), dirs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = make_images(6)
    for task in ("wide", "sparse", "dense", "wide"):
        model.set_adapter(task)
        torch.testing.assert_close(model(x).logits, trained[task])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # train "wide" one step: only its own adapters and head move
    model.train()
    model.set_requires_grad("wide", True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the base config still says 3 labels, so the loss is computed here, from the 5-class head's logits
    torch.nn.functional.cross_entropy(model(x).logits, torch.tensor([0, 1, 2, 3, 4, 0])).backward()
    torch.optim.SGD(trainable, lr=1.0).step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("wide" in n.split(".") for n in changed), changed  # e.g. mimi_scale.wide, ...up.wide.bias
    mixed = model(pixel_values=x, adapter_names=["dense", "sparse", "dense", "sparse", "dense", "sparse"]).logits
    for i, task in enumerate(["dense", "sparse"] * 3):
        torch.testing.assert_close(mixed[i, : TASKS[task]], trained[task][i])


def test_deleting_an_adapter_frees_it(tmp_path):
    dirs, trained = save_tasks("vit", tmp_path)
    model = load_task_adapters(make_model("vit"), dirs)
    wrapper = model.base_model.model.classifier
    head = wrapper.modules_to_save["wide"].weight
    adapter = next(p for n, p in model.named_parameters() if ".mimi_down.wide." in n)
    refs = [weakref.ref(head), weakref.ref(adapter)]
    del head, adapter
    size = parameter_bytes(model)

    model.delete_adapter("wide")
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert not any(".wide." in n for n, _ in model.state_dict().items())
    assert size - parameter_bytes(model) == file_bytes(dirs["wide"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['wide'\].*\['dense', 'sparse'\]"):
        model(pixel_values=make_images(2), adapter_names=["wide", "dense"])
    logits = model(pixel_values=make_images(6), adapter_names=["sparse", "dense"] * 3).logits
    assert logits.shape == (6, 3)  # the widest remaining head
    for i, task in enumerate(["sparse", "dense"] * 3):
        torch.testing.assert_close(logits[i, : TASKS[task]], trained[task][i])


def test_twenty_adapters_grow_memory_by_their_own_size(tmp_path):
    dirs = {}
    for i in range(20):
        model = task_model("vit", num_classes=2 + i % 7, seed=i)
        for _ in range(i % 3):  # various widths: 0, 1 or 2 pruning rounds
            model.base_model.prune_round()
        dirs[f"task{i}"] = tmp_path / f"task{i}"
        model.save_pretrained(dirs[f"task{i}"])

    base = make_model("vit")
    backbone = parameter_bytes(base)
    model = load_task_adapters(base, dict(list(dirs.items())[:1]))
    growth = [parameter_bytes(model) - backbone]
    for task, path in list(dirs.items())[1:]:
        model.load_adapter(path, adapter_name=task)
        growth.append(parameter_bytes(model) - backbone)
    expected = [sum(file_bytes(path) for path in list(dirs.values())[: n + 1]) for n in range(20)]
    assert growth == expected
    assert growth[-1] < 0.1 * 20 * backbone  # a tenth of what twenty fine-tuned copies of the backbone hold

    names = [f"task{i % 20}" for i in range(40)]
    logits = model.eval()(pixel_values=make_images(40), adapter_names=names).logits
    assert logits.shape == (40, 8)


def test_removed_adapters_cost_nothing_in_a_mixed_batch(tmp_path):
    widths = {name: 0 for name in sparse_widths("vit")}
    model = task_model("vit", 3, seed=1, widths=widths)
    model.save_pretrained(tmp_path / "gone")
    dirs, _ = save_tasks("vit", tmp_path, {"dense": 3})
    model = load_task_adapters(make_model("vit"), {"gone": tmp_path / "gone", **dirs})
    calls = []
    for module in model.modules():
        if hasattr(module, "mimi_down"):
            for down in module.mimi_down.values():
                down.register_forward_hook(lambda *_: calls.append(1))
    model(pixel_values=make_images(4), adapter_names=["gone", "__base__", "gone", "gone"])
    assert calls == []
    model(pixel_values=make_images(4), adapter_names=["gone", "dense", "gone", "gone"])
    assert len(calls) == len(model.base_model.adapter_widths("dense"))  # each layer once, for the one image


def test_bad_adapter_names_are_refused(tmp_path):
    dirs, _ = save_tasks("vit", tmp_path, {"dense": 3, "wide": 5})
    model = load_task_adapters(make_model("vit"), dirs)
    x = make_images(3)
    with pytest.raises(ValueError, match="3 names for a batch of 2 images"):
        model(pixel_values=x[:2], adapter_names=["dense", "wide", "dense"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['dogs'\]; this model has \['dense', 'wide'\]"):
        model(pixel_values=x, adapter_names=["dense", "dogs", "wide"])
    with pytest.raises(ValueError, match="list of adapter names"):
        model(pixel_values=x, adapter_names="dense")
    model.train()
    with pytest.raises(ValueError, match="model.eval()"):
        model(pixel_values=x, adapter_names=["dense", "wide", "dense"])
    model.eval()
    layer = next(m for m in model.modules() if hasattr(m, "mimi_down"))
    with pytest.raises(ValueError, match="one adapter name per image"):
        layer(torch.randn(5, 4, layer.in_features), adapter_names=["dense", "wide"])
    with pytest.raises(ValueError, match="reserved"):
        load_task_adapters(make_model("vit"), {"__base__": dirs["dense"]})
    with pytest.raises(ValueError, match="not a saved adapter"):
        load_task_adapters(make_model("vit"), {"cats": tmp_path})
