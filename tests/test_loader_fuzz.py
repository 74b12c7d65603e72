"""Fuzzing the adapter loader: no adapter_config.json and no safetensors header can hurt the process that loads it.

Every mutated adapter is loaded with ``PeftModel.from_pretrained`` (or ``load_adapter``) in one long-lived child
process whose address space is capped (``RLIMIT_AS``: what it holds after a warm-up load plus 1 GiB), so that
imports are paid once. Each load must end in a clean exception that names the problem, or load when the mutation
is harmless: never a signal, a hang, a ``MemoryError`` or an allocation beyond the size of the adapter's files.

A mutation is a list of JSON operations (see :func:`write_mutated_adapter`): a case hypothesis finds is pasted as it
is into ``tests/fuzz_corpus/*.json`` and replayed by :func:`test_a_corpus_case_ends_as_recorded`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import shutil
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).parent / "fuzz_corpus"
CASE_SECONDS = 30  # a load takes well under a second; beyond this the child is deemed hung
HEADROOM_MB = 1024  # RLIMIT_AS above the warmed-up child's size
GROWTH_MB = 64  # the adapters are ~10 KB: a load that grows the child's peak RSS by this much allocated too much
BASES = ("plain", "rich")
VIAS = ("from_pretrained", "trainable", "load_adapter")
# The corpus names the tiny ViT's adapted modules as transformers 5 does; under transformers 4.x a recorded name
# stands for the module at the same place (block 0's attention and MLP outputs, then block 1's; in_this_transformers)
CORPUS_MODULES = ("vit.layers.0.attention.o_proj", "vit.layers.0.mlp.fc2", "vit.layers.1.attention.o_proj",
                  "vit.layers.1.mlp.fc2")
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


# ------------------------------------------------------------------------------------------------ adapters
def adapted_modules() -> tuple[str, ...]:
    """The tiny ViT's adapted modules, in this transformers' names, in the order of CORPUS_MODULES."""
    from conftest import make_model
    from peft import get_peft_model

    from peft_mimi import MiMiConfig

    config = MiMiConfig(design="paper", target_compression=16.0)
    return tuple(get_peft_model(make_model("vit"), config).base_model.adapter_widths())


WIDTH_MODULES = adapted_modules()


def in_this_transformers(case: dict) -> dict:
    """A corpus ``case`` with its module names, in ``ops`` and in ``expect`` (escaped or not), as this transformers
    names them."""
    text = json.dumps(case)
    for recorded, actual in zip(CORPUS_MODULES, WIDTH_MODULES, strict=True):
        escaped = json.dumps(re.escape(recorded))[1:-1], json.dumps(re.escape(actual))[1:-1]
        text = text.replace(*escaped).replace(recorded, actual)
    return json.loads(text)


def save_base_adapters(root: Path) -> dict[str, Path]:
    """Two tiny real MiMi adapters of a tiny random ViT, the paper's design: ``plain`` (4 adapters of width 8) and
    ``rich`` (biases, the classifier in ``modules_to_save``, one adapter removed (width 0), one with masked
    neurons)."""
    import torch
    from conftest import make_model
    from peft import get_peft_model

    from peft_mimi import MiMiConfig

    plain = get_peft_model(make_model("vit"), MiMiConfig(design="paper", target_compression=16.0))
    plain.save_pretrained(root / "plain")
    widths = dict(zip(WIDTH_MODULES, (0, 5, 8, 8)))
    rich = get_peft_model(make_model("vit"), MiMiConfig(design="paper", target_compression=16.0, adapter_bias=True,
                                                        modules_to_save=["classifier"], adapter_widths=widths))
    rich.base_model.model.get_submodule(WIDTH_MODULES[3]).mask_neurons("default", torch.tensor([True, False] * 4))
    rich.save_pretrained(root / "rich")
    return {"plain": root / "plain", "rich": root / "rich"}


def write_mutated_adapter(base: Path, ops: list[list], out: Path) -> Path:
    """Copy the adapter in ``base`` to ``out`` with the operations ``ops`` applied, in order, and return ``out``.

    Config: ``["config_set", key, value]``, ``["config_delete", key]``, ``["width_set", module, value]``,
    ``["width_delete", module]``, ``["config_nest", key, depth]`` (a list nested ``depth`` deep),
    ``["config_text", text]`` (the whole file), ``["config_truncate", n]`` (keep the first ``n`` bytes).
    Weights, tensors given by their index in the sorted names: ``["tensor_set", i, field, value]`` (field:
    ``dtype``, ``shape``, ``data_offsets``, any other key), ``["tensor_delete", i]``, ``["tensor_rename", i, name]``,
    ``["tensor_add", name, entry]``, ``["metadata_set", value]``; ``["relayout"]`` recomputes every ``data_offsets``
    from ``dtype`` and ``shape`` and sizes the data to match (a valid file with the new shapes; a tensor whose size
    changed is zero-filled); ``["header_length", n]`` writes ``n`` as the 8-byte header length,
    ``["header_text", text]`` replaces the header JSON, ``["data_resize", delta]`` cuts or extends the data.
    """
    config_text = (base / "adapter_config.json").read_text()
    config = json.loads(config_text)
    raw = (base / "adapter_model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    names = sorted(k for k in header if k != "__metadata__")
    header_text = header_length = None
    config_raw: bytes | None = None
    nests: dict[str, int] = {}
    for op, *args in ops:
        if op == "config_set":
            config[args[0]] = args[1]
        elif op == "config_delete":
            config.pop(args[0], None)
        elif op == "width_set":
            if isinstance(config.get("adapter_widths"), dict):
                config["adapter_widths"][args[0]] = args[1]
        elif op == "width_delete":
            if isinstance(config.get("adapter_widths"), dict):
                config["adapter_widths"].pop(args[0], None)
        elif op == "config_nest":
            nests[args[0]] = args[1]
            config[args[0]] = f"@nest:{args[0]}@"
        elif op == "config_text":
            config_raw = args[0].encode("utf-8", "surrogatepass")
        elif op == "config_truncate":
            config_raw = _config_bytes(config, nests)[: args[0]]
        elif op == "tensor_set":
            entry = header.get(names[args[0] % len(names)])
            if isinstance(entry, dict):
                entry[args[1]] = args[2]
        elif op == "tensor_delete":
            header.pop(names[args[0] % len(names)], None)
        elif op == "tensor_rename":
            old = names[args[0] % len(names)]
            if old in header:
                header[args[1]] = header.pop(old)
        elif op == "tensor_add":
            header[args[0]] = args[1]
        elif op == "metadata_set":
            header["__metadata__"] = args[0]
        elif op == "relayout":
            data = _relayout(header, data)
        elif op == "header_length":
            header_length = args[0]
        elif op == "header_text":
            header_text = args[0]
        elif op == "data_resize":
            data = data[: len(data) + args[0]] if args[0] < 0 else data + b"\x00" * args[0]
        else:
            raise ValueError(f"unknown mutation {op!r}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes(config_raw if config_raw is not None else _config_bytes(config, nests))
    header_bytes = (header_text if header_text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    prefix = struct.pack("<Q", len(header_bytes) if header_length is None else header_length % 2**64)
    (out / "adapter_model.safetensors").write_bytes(prefix + header_bytes + data)
    return out


def _config_bytes(config: dict, nests: dict[str, int]) -> bytes:
    text = json.dumps(config, indent=2, ensure_ascii=False)
    for key, depth in nests.items():
        text = text.replace(json.dumps(f"@nest:{key}@", ensure_ascii=False), "[" * depth + "]" * depth)
    return text.encode("utf-8", "surrogatepass")


def _relayout(header: dict, data: bytes) -> bytes:
    """Data laid out anew from each tensor's dtype and shape (tensors whose byte size is unchanged keep their
    bytes); a tensor whose dtype or shape is not valid keeps its data_offsets pointing past the end."""
    out, start = bytearray(), 0
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        if not isinstance(entry, dict):
            continue
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if not (isinstance(shape, list) and all(isinstance(n, int) and 0 <= n < 2**20 for n in shape)
                and dtype in DTYPE_SIZES):
            continue
        size = DTYPE_SIZES[dtype]
        for n in shape:
            size *= n
        if size > 1 << 20:
            continue
        offsets = entry.get("data_offsets")
        old = None
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            old = data[offsets[0] : offsets[1]] if 0 <= offsets[0] <= offsets[1] <= len(data) else None
        out += old if old is not None and len(old) == size else b"\x00" * size
        entry["data_offsets"] = [start, start + size]
        start += size
    return bytes(out)


# ----------------------------------------------------------------------------------------------- the child
class LoaderChild:
    """A child process that loads adapters on request, capped in memory; restarted after a crash or a hang."""

    def __init__(self, good_adapter: Path) -> None:
        self.good_adapter = good_adapter
        self.process: subprocess.Popen | None = None
        self.baseline_mb = 0.0

    def start(self) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.good_adapter)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=Path(__file__).parent,
        )
        ready = self._reply(timeout=300)
        assert ready and ready.get("ready"), f"the loader child did not start: {ready}"
        self.baseline_mb = ready["maxrss_mb"]

    def load(self, directory: Path, via: str) -> dict:
        """``{"outcome": "loaded"|"refused"|"crashed"|"hung", "type", "message", "growth_mb"}``."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps({"dir": str(directory), "via": via}).encode() + b"\n")
        self.process.stdin.flush()
        reply = self._reply(timeout=CASE_SECONDS)
        if reply is None:
            hung = self.process.poll() is None
            self.close()
            message = f"no reply in {CASE_SECONDS} s" if hung else f"exit status {self.process.returncode}"
            return {"outcome": "hung" if hung else "crashed", "type": None, "message": message, "growth_mb": 0.0}
        reply["growth_mb"] = reply.pop("maxrss_mb") - self.baseline_mb
        return reply

    def _reply(self, timeout: float) -> dict | None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return None
            line = self.process.stdout.readline()
            if not line:
                return None
            if line.startswith(b"@@"):
                return json.loads(line[2:])

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()


def serve(good_adapter: str) -> None:
    """The child's loop: one JSON request per stdin line, one ``@@``-prefixed JSON reply per request on stdout."""
    import warnings

    warnings.simplefilter("ignore")
    import torch
    from conftest import make_model
    from peft import PeftModel

    import peft_mimi  # noqa: F401  (registers MiMi with PEFT)

    def maxrss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def reply(**fields) -> None:
        sys.stdout.write("@@" + json.dumps(fields) + "\n")
        sys.stdout.flush()

    torch.set_num_threads(1)
    PeftModel.from_pretrained(make_model("vit"), good_adapter)  # warm up every code path once
    size = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    limit = size + HEADROOM_MB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    reply(ready=True, maxrss_mb=maxrss_mb())
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["via"] == "load_adapter":
                model = PeftModel.from_pretrained(make_model("vit"), good_adapter)
                model.load_adapter(request["dir"], adapter_name="other")
            else:
                PeftModel.from_pretrained(make_model("vit"), request["dir"],
                                          is_trainable=request["via"] == "trainable")
        except BaseException as error:  # noqa: BLE001  (the parent judges every exception)
            frame = traceback.extract_tb(error.__traceback__)[-1]
            reply(outcome="refused", type=type(error).__name__, value_error=isinstance(error, ValueError),
                  where=f"{Path(frame.filename).name}:{frame.name}", message=str(error)[:2000],
                  mimi=_is_mimi_config(Path(request["dir"])), maxrss_mb=maxrss_mb())
        else:
            reply(outcome="loaded", type=None, message="", maxrss_mb=maxrss_mb())


def _is_mimi_config(directory: Path) -> bool:
    """Whether PEFT gets as far as knowing that ``directory`` holds a MiMi adapter (a JSON object with
    ``"peft_type": "MIMI"``); before that, errors are PEFT's own."""
    try:
        config = json.loads((directory / "adapter_config.json").read_bytes())
    except (ValueError, RecursionError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == "MIMI"


# ---------------------------------------------------------------------------------------- the property
ALLOCATION = re.compile(r"can't allocate|DefaultCPUAllocator|out of memory|bad_alloc|Storage size calculation "
                        r"overflowed|Overflow when unpacking")
# Refusals of a MiMi adapter that are not (yet) a ValueError but still name the problem: (type, where raised, why)
KNOWN_ENDINGS = (
    ("KeyError", "save_and_load.py:set_peft_model_state_dict", "PEFT: a head tensor missing from the file, named"),
    ("RuntimeError", "module.py:load_state_dict", "torch: a head tensor of another shape, named with both shapes"),
)


def problems_with(outcome: dict) -> list[str]:
    """Why ``outcome`` is not a clean end: a crash, a hang, an allocation failure, a large allocation, or a refusal
    of a MiMi adapter that is neither a ValueError nor one of the ``KNOWN_ENDINGS`` (PEFT's own reading of
    ``adapter_config.json``, before it knows the adapter is MiMi's, may end in its own exceptions)."""
    problems = []
    if outcome["outcome"] in ("crashed", "hung"):
        problems.append(f"the loader {outcome['outcome']} ({outcome['message']})")
    if outcome["outcome"] == "refused":
        if outcome["type"] == "MemoryError" or ALLOCATION.search(outcome["message"]):
            problems.append(f"allocation failure: {outcome['type']}: {outcome['message'][:300]}")
        elif outcome["mimi"] and not outcome["value_error"] and not any(
            outcome["type"] == kind and outcome["where"] == where for kind, where, _ in KNOWN_ENDINGS
        ):
            problems.append(f"unclean refusal {outcome['type']} at {outcome['where']}: {outcome['message'][:300]}")
    if outcome["growth_mb"] > GROWTH_MB:
        problems.append(f"the load grew the peak RSS by {outcome['growth_mb']:.0f} MB")
    return problems


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    return save_base_adapters(tmp_path_factory.mktemp("fuzz-bases"))


@pytest.fixture(scope="module")
def loader(bases):
    child = LoaderChild(bases["plain"])
    child.start()
    yield child
    child.close()


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-cases")


def load_case(loader: LoaderChild, bases: dict[str, Path], cases: Path, case: dict) -> dict:
    directory = cases / "case"
    shutil.rmtree(directory, ignore_errors=True)
    write_mutated_adapter(bases[case.get("base", "plain")], case["ops"], directory)
    return loader.load(directory, case.get("via", "from_pretrained"))


# ---------------------------------------------------------------------------------------------- strategies
CONFIG_KEYS = ("activation", "adapter_bias", "adapter_widths", "auto_mapping", "base_model_name_or_path",
               "channel_scaling", "drop_path", "exclude_modules", "inference_mode", "init_compression",
               "init_weights", "modules_to_save", "peft_type", "peft_version", "prune_ratio", "reconstruct", "revision",
               "rounds_done", "score", "seed", "selection", "target_compression", "target_modules", "target_params",
               "task_type")
EDGE_NUMBERS = (0, 1, -1, 8, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**9, 10**12, 10**100, 0.5, 1e-300,
                -1e308)
NUMBERS = st.one_of(st.sampled_from(EDGE_NUMBERS), st.integers(-(2**65), 2**65),
                    st.floats(allow_nan=True, allow_infinity=True))
TEXT = st.text(max_size=12)
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=6)
CONFIG_OPS = st.one_of(
    st.tuples(st.just("config_set"), st.sampled_from(CONFIG_KEYS) | TEXT, JSON),
    st.tuples(st.just("config_delete"), st.sampled_from(CONFIG_KEYS)),
    st.tuples(st.just("width_set"), st.sampled_from(WIDTH_MODULES) | TEXT, NUMBERS | JSON),
    st.tuples(st.just("width_delete"), st.sampled_from(WIDTH_MODULES)),
    st.tuples(st.just("config_nest"), st.sampled_from(CONFIG_KEYS), st.integers(1, 100_000)),
    st.tuples(st.just("config_truncate"), st.integers(0, 1200)),
    st.tuples(st.just("config_text"), st.text(max_size=40)),
).map(list)

SMALL_SIZES = st.sampled_from((0, 1, 4, 5, 8, 16, 31, 32, 33, 64))
SHAPES = st.one_of(st.lists(SMALL_SIZES, max_size=3),
                   st.lists(st.sampled_from(EDGE_NUMBERS) | st.integers(), max_size=5),
                   JSON)
DTYPES = st.sampled_from((*DTYPE_SIZES, "F4", "F6_E2M3", "F8_E8M0", "C64", "f32", "")) | TEXT
TENSOR = st.integers(0, 31)  # an index into the sorted tensor names (modulo their number)
PART_NAMES = ("mimi_down.weight", "mimi_up.weight", "mimi_down.bias", "mimi_up.bias", "mimi_mask",
              "mimi_down.default.weight", "mimi_side.weight", "mimi_down", "lora_A.weight", "classifier.weight")
NAMES = st.one_of(
    st.tuples(st.sampled_from(("base_model.model.", "", "base_model.", "model.")),
              st.sampled_from((*WIDTH_MODULES, WIDTH_MODULES[1].replace(".0.", ".2."), "classifier", "vit", "")) | TEXT,
              st.sampled_from((".", "")), st.sampled_from(PART_NAMES)).map("".join),
    TEXT,
)
ENTRIES = st.fixed_dictionaries({"dtype": DTYPES, "shape": SHAPES, "data_offsets": st.lists(st.integers(0, 9000),
                                                                                            max_size=3)}) | JSON
HEADER_OPS = st.one_of(
    st.tuples(st.just("tensor_set"), TENSOR, st.just("dtype"), DTYPES),
    st.tuples(st.just("tensor_set"), TENSOR, st.just("shape"), SHAPES),
    st.tuples(st.just("tensor_set"), TENSOR, st.just("data_offsets"), st.lists(NUMBERS, max_size=3) | JSON),
    st.tuples(st.just("tensor_set"), TENSOR, TEXT, JSON),
    st.tuples(st.just("tensor_delete"), TENSOR),
    st.tuples(st.just("tensor_rename"), TENSOR, NAMES),
    st.tuples(st.just("tensor_add"), NAMES, ENTRIES),
    st.tuples(st.just("metadata_set"), JSON),
).map(list)
RAW_OPS = st.one_of(
    st.tuples(st.just("header_length"), st.sampled_from(EDGE_NUMBERS[:10]) | st.integers(0, 2**64 - 1)),
    st.tuples(st.just("header_text"), st.text(max_size=40)),
    st.tuples(st.just("data_resize"), st.integers(-9000, 9000)),
).map(list)
# most header mutations are followed by a relayout, so that the file is valid safetensors and what is tested is
# the agreement of names, dtypes and shapes with each other and with adapter_config.json
HEADER_MUTATIONS = st.one_of(
    st.lists(HEADER_OPS, min_size=1, max_size=3).map(lambda ops: [*ops, ["relayout"]]),
    st.lists(HEADER_OPS | RAW_OPS, min_size=1, max_size=3),
)
# 5-25 ms per case (most mutations are refused at the header): 3 x 1000 examples take about a minute
# CI replays the same examples every run (derandomize), so that a pass or a failure is reproducible; set
# MIMI_FUZZ_RANDOM=1 (and MIMI_FUZZ_EXAMPLES) to explore new cases, and add what fails to tests/fuzz_corpus/.
FUZZ = settings(max_examples=int(os.environ.get("MIMI_FUZZ_EXAMPLES", "1000")), deadline=None,
                derandomize=os.environ.get("MIMI_FUZZ_RANDOM") != "1", database=None,
                suppress_health_check=list(HealthCheck))


def assert_clean(outcome: dict, case: dict) -> None:
    problems = problems_with(outcome)
    assert not problems, f"{problems}; replay with tests/fuzz_corpus/<name>.json = {json.dumps(case)}"


@FUZZ
@given(base=st.sampled_from(BASES), via=st.sampled_from(VIAS), ops=st.lists(CONFIG_OPS, min_size=1, max_size=4))
def test_a_mutated_config_is_refused_cleanly_or_loads(loader, bases, cases, base, via, ops):
    case = {"base": base, "via": via, "ops": ops}
    assert_clean(load_case(loader, bases, cases, case), case)


@FUZZ
@given(base=st.sampled_from(BASES), via=st.sampled_from(VIAS), ops=HEADER_MUTATIONS)
def test_a_mutated_weights_header_is_refused_cleanly_or_loads(loader, bases, cases, base, via, ops):
    case = {"base": base, "via": via, "ops": ops}
    assert_clean(load_case(loader, bases, cases, case), case)


@FUZZ
@given(base=st.sampled_from(BASES), via=st.sampled_from(VIAS), config_ops=st.lists(CONFIG_OPS, max_size=2),
       header_ops=HEADER_MUTATIONS)
def test_a_config_and_header_mutated_together_is_refused_cleanly_or_loads(loader, bases, cases, base, via,
                                                                            config_ops, header_ops):
    case = {"base": base, "via": via, "ops": config_ops + header_ops}
    assert_clean(load_case(loader, bases, cases, case), case)


def corpus_cases() -> list:
    """The corpus files; a case whose fix is a call still to be added elsewhere (its ``needs``) is expected to fail
    until then, strictly, so that the marker goes when the call lands."""
    params = []
    for path in sorted(CORPUS.glob("*.json")):
        needs = json.loads(path.read_text()).get("needs")
        marks = [pytest.mark.xfail(strict=True, reason=f"needs {needs}")] if needs else []
        params.append(pytest.param(path, marks=marks, id=path.stem))
    return params


@pytest.mark.parametrize("path", corpus_cases())
def test_a_corpus_case_ends_as_recorded(loader, bases, cases, path):
    """Each file in tests/fuzz_corpus is a case that once crashed, over-allocated or ended in an exception that did not
    name the problem: ``bug`` says what it did, ``expect`` is ``"loaded"`` or a regex its refusal must match."""
    case = in_this_transformers(json.loads(path.read_text()))
    outcome = load_case(loader, bases, cases, case)
    assert_clean(outcome, case)
    if case["expect"] == "loaded":
        assert outcome["outcome"] == "loaded", outcome
    else:
        assert outcome["outcome"] == "refused" and re.search(case["expect"], outcome["message"], re.DOTALL), outcome


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2])
