"""The documentation runs: every fenced code block of README.md and docs/*.md is executed or checked.

- ``python`` blocks run, page by page: a page's blocks in order, in one namespace, in a fresh directory. The objects
  the text calls *yours* come from :func:`doc_objects` (tiny random ViTs, a few random images, a one-step loop), so a
  page runs in seconds; everything else (the built-in ``fmnist-vit`` backbone, the ``digits`` dataset) is real.
- ``bash`` blocks: ``peft-mimi ...`` lines run in-process, in order, with small data (``--max_train_samples``);
  ``accelerate launch ... -m peft_mimi.cli ...`` is checked by accelerate's own parser and ours; ``make``
  targets, ``pip install`` extras and ``python <script>`` paths must exist. Any other command fails the test until
  a check is added here.
- A block that cannot run here is marked on the line before it, with the reason:
  ``<!-- docs-test: skip (needs a GPU) -->`` (not run at all) or ``<!-- docs-test: parse-only (needs the Hub) -->``
  (``peft-mimi`` lines parsed, not run).
- ``docs/config_reference.md``'s tables are generated from the dataclass fields' help texts;
  ``python tests/test_docs.py`` rewrites them after a field changes.
- Relative links in the README, docs and benchmark reports point at files that exist.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED_PAGES = [*PAGES, ROOT / "benchmarks" / "REPORT.md", ROOT / "benchmarks" / "README.md",
                ROOT / "benchmarks" / "results" / "README.md"]
CONFIG_REFERENCE = ROOT / "docs" / "config_reference.md"
README_MAX_LINES = 150

FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARK = re.compile(r"<!-- docs-test: (?P<kind>skip|parse-only) \((?P<reason>needs [^)]+)\) -->")
LANGUAGES = ("python", "bash", "text", "json")
SMALL_TRAIN = ["--max_train_samples", "64", "--max_eval_samples", "64"]


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mark: str | None  # "skip", "parse-only" or None
    reason: str | None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` with their markers (the last non-empty line before a fence)."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = [line for line in text[:match.start()].splitlines() if line.strip()]
        mark = MARK.search(before[-1]) if before else None
        if before and "docs-test" in before[-1] and mark is None:
            raise AssertionError(f"{page.name}: malformed marker {before[-1]!r}; write "
                                 "<!-- docs-test: skip (needs ...) --> or <!-- docs-test: parse-only (needs ...) -->")
        found.append(Block(page, text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2),
                           mark and mark["kind"], mark and mark["reason"]))
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in code_blocks(page)]


# ----------------------------------------------------------------------------------------------------------------
# The objects the text calls yours


def doc_objects() -> dict[str, object]:
    """Names a page may use without defining them: ``vit``, ``fresh_vit``, ``my_vit`` (tiny random
    ``ViTForImageClassification``s with 10 labels, the same weights), ``train_data`` / ``eval_data`` (a few
    random 32 px images as Trainer examples), ``x`` (a batch of 4 images), ``example`` (one image) and
    ``train_one_segment(model)`` (two AdamW steps on random images)."""
    import torch
    from conftest import IMAGE_SIZE, make_model

    def images(n: int, seed: int) -> list[dict]:
        generator = torch.Generator().manual_seed(seed)
        return [{"pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator), "labels": i % 10}
                for i in range(n)]

    def train_one_segment(model, steps: int = 2) -> None:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for batch in (images(8, seed=step) for step in range(steps)):
            loss = model(pixel_values=torch.stack([b["pixel_values"] for b in batch]),
                         labels=torch.tensor([b["labels"] for b in batch])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    return {
        "vit": make_model("vit", num_labels=10), "fresh_vit": make_model("vit", num_labels=10),
        "my_vit": make_model("vit", num_labels=10), "train_data": images(16, seed=100),
        "eval_data": images(16, seed=101), "x": torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE),
        "example": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), "train_one_segment": train_one_segment,
    }


# ----------------------------------------------------------------------------------------------------------------
# Shell lines


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, split as the shell would."""
    joined = re.sub(r"\\\n", " ", code)
    return [tokens for line in joined.splitlines() if (tokens := shlex.split(line, comments=True))]


def _strip_environment(tokens: list[str]) -> list[str]:
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        tokens = tokens[1:]
    return tokens


def parse_peft_mimi(argv: list[str]) -> None:
    """Fail unless the ``peft-mimi`` parser accepts ``argv`` (``train``: the dataclass parser, every flag known)."""
    from peft_mimi.cli import build_parser, train_parser

    asks_help = bool({"-h", "--help"} & set(argv))
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            if argv[:1] == ["train"]:
                train_parser().parse_args_into_dataclasses(args=argv[1:])
            else:
                build_parser().parse_args(argv)
        except SystemExit as exit_:
            if not (asks_help and exit_.code == 0 and "usage:" in out.getvalue()):
                raise AssertionError(f"peft-mimi {shlex.join(argv)}: {err.getvalue().strip()}") from None


def run_peft_mimi(argv: list[str]) -> None:
    """Run ``peft-mimi argv`` in this process with small data; fail on a non-zero exit code."""
    from peft_mimi.cli import main

    small = SMALL_TRAIN if argv[:1] == ["train"] else ["--max-eval-samples", "64"] if argv[:1] == ["eval"] else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main([*argv, *small])
    assert code == 0, f"peft-mimi {shlex.join(argv)} exited {code}:\n{out.getvalue()[-2000:]}"


def _extras() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return set(config["options.extras_require"])


def check_command(tokens: list[str], run: bool) -> None:
    """Check (or, for ``peft-mimi`` with ``run``, run) one command of a bash block."""
    tokens = _strip_environment(tokens)
    program, args = tokens[0], tokens[1:]
    if program == "peft-mimi" or tokens[:3] == ["python", "-m", "peft_mimi.cli"]:
        argv = args if program == "peft-mimi" else tokens[3:]
        parse_peft_mimi(argv)
        if run and not {"-h", "--help"} & set(argv):
            run_peft_mimi(argv)
    elif program == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        assert args[:1] == ["launch"] and "-m" in args, f"only `accelerate launch -m peft_mimi.cli` is known: {tokens}"
        launch = launch_command_parser().parse_args(args[1:])
        assert launch.module and launch.training_script == "peft_mimi.cli", tokens
        parse_peft_mimi(launch.training_script_args)
    elif program == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        assert set(args) <= targets, f"make {args}: not targets of the Makefile ({sorted(targets)})"
    elif program == "pip":
        assert args[:1] == ["install"], tokens
        for spec in args[1:]:
            extras = re.fullmatch(r"[\w.-]+\[([\w,]+)\]", spec)
            if extras:
                assert set(extras[1].split(",")) <= _extras(), f"{spec}: setup.cfg has the extras {_extras()}"
    elif program == "python":
        script = ROOT / args[0]
        assert args[0].endswith(".py") and script.is_file(), f"python {args[0]}: no such script in the repository"
    else:
        raise AssertionError(f"`{shlex.join(tokens)}`: tests/test_docs.py has no check for {program!r}; add one, "
                             "or mark the block <!-- docs-test: skip (needs ...) -->")


# ----------------------------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_of_the_page_runs(page, tmp_path, monkeypatch):
    blocks = code_blocks(page)
    for block in blocks:
        assert block.lang in LANGUAGES, f"{block}: name the block's language, one of {LANGUAGES}"
        assert block.mark != "parse-only" or block.lang == "bash", f"{block}: parse-only is for bash blocks"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    python = [b for b in blocks if b.lang == "python" and b.mark != "skip"]
    if python:
        source = "\n".join(f"# --- {b}\n{b.code}" for b in python)
        namespace = {"__name__": "__docs__", **doc_objects()}
        exec(compile(source, str(page), "exec"), namespace)  # noqa: S102 - the documentation's own examples
    for block in blocks:
        if block.lang == "bash" and block.mark != "skip":
            for tokens in shell_commands(block.code):
                check_command(tokens, run=block.mark is None)


def test_the_documentation_runs_most_of_its_code():
    blocks = [b for b in all_blocks() if b.lang in ("python", "bash")]
    skipped = [b for b in blocks if b.mark == "skip"]
    assert len(blocks) >= 20, "the pages lost their examples"
    assert len(skipped) <= len(blocks) // 4, f"more than a quarter of the code blocks are skipped: {skipped}"


def test_readme_is_a_product_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make demo" in text and "make test" in text and "## Results" in text
    # tools/newcomer.sh runs the README's first `peft-mimi train` line as written: it must be a default run on a
    # built-in backbone and dataset, offline
    from peft_mimi.backbones import BUILTIN_BACKBONES
    from peft_mimi.data import BUILTIN_DATASETS

    line = re.search(r"peft-mimi train [^#`\n]*", text)[0]
    args = shlex.split(line)[2:]
    options = dict(zip(args[::2], args[1::2]))
    assert options["--model"] in BUILTIN_BACKBONES and options["--model"] != "dinov2-s14", line
    assert options["--data"] in BUILTIN_DATASETS and options["--data"] != "fashion_mnist", line
    assert set(options) <= {"--model", "--data", "--output-dir", "--target-compression"}, f"not a default run: {line}"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        path = target.split("#")[0]
        if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_every_results_file_is_in_the_index():
    results = ROOT / "benchmarks" / "results"
    index = (results / "README.md").read_text()
    entries = [p for p in [*results.iterdir(), *(results / "archive").iterdir()] if p.name != "README.md"]
    missing = [str(p.relative_to(results)) for p in entries if p.name.split(".")[0] not in index]
    assert not missing, f"benchmarks/results/README.md does not list {missing}"


# ----------------------------------------------------------------------------------------------------------------
# The config reference

BEGIN, END = "<!-- generated by tests/test_docs.py: begin -->", "<!-- generated by tests/test_docs.py: end -->"


def _own_fields(cls, base=None) -> list[dataclasses.Field]:
    inherited = {f.name for f in dataclasses.fields(base)} if base else set()
    return [f for f in dataclasses.fields(cls) if f.name not in inherited and not f.name.startswith("_")]


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    return "required"


def _annotation(cls, name: str) -> str:
    # the class's own annotation, as written: HfArgumentParser replaces Field.type by the evaluated type in place
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}):
            written = vars(klass)["__annotations__"][name]
            return written if isinstance(written, str) else getattr(written, "__name__", repr(written))
    return "?"


def _table(cls, fields: list[dataclasses.Field]) -> str:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        help_text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        assert help_text, f"field {f.name} has no metadata['help']"
        kind = _annotation(cls, f.name).replace("typing.", "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{kind}` | {_default(f)} | {help_text} |")
    return "\n".join(rows)


def render_config_reference() -> str:
    """The generated part of docs/config_reference.md: MiMiConfig's own fields and TrainingRecipe's."""
    from peft.config import PeftConfig

    from peft_mimi import MiMiConfig
    from peft_mimi.train import TrainingRecipe

    return "\n".join([
        BEGIN, "", "### `MiMiConfig`", "", _table(MiMiConfig, _own_fields(MiMiConfig, PeftConfig)), "",
        "### `TrainingRecipe`", "", _table(TrainingRecipe, _own_fields(TrainingRecipe)), "", END])


def test_config_reference_matches_the_dataclasses():
    text = CONFIG_REFERENCE.read_text()
    assert BEGIN in text and END in text
    current = text[text.index(BEGIN):text.index(END) + len(END)]
    assert current == render_config_reference(), (
        "docs/config_reference.md is out of date with MiMiConfig / TrainingRecipe: run `python tests/test_docs.py`")


def test_every_config_field_is_in_the_args_block():
    from peft.config import PeftConfig

    from peft_mimi import MiMiConfig

    doc = MiMiConfig.__doc__ or ""
    if "Args:" not in doc:
        pytest.skip("MiMiConfig has no Args: block yet")
    args = doc[doc.index("Args:"):]
    missing = [f.name for f in _own_fields(MiMiConfig, PeftConfig) if not re.search(rf"^\s+{f.name} \(", args, re.M)]
    assert not missing, f"MiMiConfig's Args: block does not describe {missing}"


if __name__ == "__main__":  # regenerate docs/config_reference.md's tables
    sys.path.insert(0, str(Path(__file__).parent))
    text = CONFIG_REFERENCE.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    CONFIG_REFERENCE.write_text(text[:start] + render_config_reference() + text[end:])
    print(f"rewrote {CONFIG_REFERENCE.relative_to(ROOT)}")
