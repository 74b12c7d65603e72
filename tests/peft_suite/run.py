"""Run PEFT's own custom-model tests with MiMi rows added: ``python tests/peft_suite/run.py [pytest options]``.

Downloads the sdist of the installed peft version from the package index (it ships PEFT's ``tests/``), unpacks
its tests into ``build/peft-suite/peft-<version>/tests/``, installs what they import beyond our dependencies
(diffusers), puts `mimi_rows.py` there as their ``conftest.py`` and runs ``test_custom_models.py`` with PEFT's
own pytest settings (less coverage), keeping only the tests that run a MiMi config. Exits with pytest's status;
nothing of PEFT is kept in this repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE.parents[1] / "build" / "peft-suite"
# What PEFT's test helpers import beyond peft_mimi's own dependencies (testing_common imports diffusers); not
# PEFT's whole `test` extra, which pins dev tools such as ruff
TEST_REQUIREMENTS = {"diffusers": "diffusers"}  # module: requirement


def install_test_requirements() -> None:
    missing = [requirement for module, requirement in TEST_REQUIREMENTS.items() if find_spec(module) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)


def peft_tests(peft_version: str) -> Path:
    """PEFT's ``tests/`` folder of the given release, downloaded and unpacked under ``build/`` once."""
    root = BUILD / f"peft-{peft_version}"
    tests = root / "tests"
    if not (tests / "test_custom_models.py").is_file():
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", str(BUILD), f"peft=={peft_version}"],
            check=True,
        )
        (sdist,) = BUILD.glob(f"peft-{peft_version}.tar.gz")
        prefix = f"peft-{peft_version}/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith((prefix + "tests/", prefix + "pyproject"))]
            archive.extractall(BUILD, members=members, filter="data")
        if not (tests / "test_custom_models.py").is_file():
            sys.exit(f"{sdist.name} has no tests/test_custom_models.py: no PEFT suite to run for peft {peft_version}.")
    # PEFT's test modules import each other relatively (`from .testing_common import ...`): a package
    (tests / "__init__.py").touch()
    shutil.copyfile(HERE / "mimi_rows.py", tests / "conftest.py")
    return tests


def main(pytest_args: list[str]) -> int:
    install_test_requirements()
    tests = peft_tests(version("peft"))
    command = [
        sys.executable, "-m", "pytest", str(tests / "test_custom_models.py"),
        "-o", "addopts=--durations=5",  # PEFT's addopts without --cov (pytest-cov is not a dependency of ours)
        "-p", "no:cacheprovider",
        *pytest_args,
    ]
    print("+", " ".join(command), flush=True)
    return subprocess.call(command, cwd=tests.parent)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
