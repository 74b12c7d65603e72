"""MiMi rows for PEFT's own custom-model tests (``tests/test_custom_models.py`` of the installed peft's sdist).

`run.py` copies this file next to PEFT's tests as their ``conftest.py``. It imports PEFT's test module before
pytest collects it, appends MiMi rows to the lists that PEFT parametrises its tests with, skips the merge tests
for MiMi exactly where PEFT skips them for its other methods without merging (Lily, OSF, ShadowPEFT: the same
``_skip_if_merging_not_supported``), and keeps only the collected tests that run a MiMi config.

Not a test file of this project: ``pytest tests`` never loads it (it is neither a conftest nor ``test_*.py`` here).
"""

from __future__ import annotations

import pytest

import peft_mimi  # noqa: F401  (registers the PEFT method "MIMI")
from peft_mimi import MiMiConfig

from . import test_custom_models, testing_common

# PEFT's custom `MLP`: lin0 is Linear(10, 20), lin1 is Linear(20, 2). At σ0 = 4 the adapters start 5 and 1
# neurons wide; σt = 8 is a budget below that, so every row is a config that prunes. Every row is MiMi's default
# design (Adapter+'s adapter) with PEFT's convention for a fresh adapter, identity at the start (init_weights=True:
# W_up and the biases at zero; the design's own start, "houlsby", is near the base model, not at it), which
# PEFT's tests switch off where they need an adapter that changes the output.
BUDGET = {"target_compression": 8.0}
IDENTITY = {"init_weights": True}
FRESH = {**BUDGET, **IDENTITY}

# (test name, model id, config class, config kwargs): the layout of PEFT's TEST_CASES.
TEST_CASES = [
    ("Vanilla MLP 1 MiMi", "MLP", MiMiConfig, {"target_modules": ["lin0"], **FRESH}),
    ("Vanilla MLP 2 MiMi regex", "MLP", MiMiConfig, {"target_modules": "lin0", **FRESH}),
    ("Vanilla MLP 3 MiMi two modules", "MLP", MiMiConfig, {"target_modules": ["lin0", "lin1"], **FRESH}),
    (
        "Vanilla MLP 4 MiMi modules_to_save",
        "MLP",
        MiMiConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **FRESH},
    ),
    (
        "Vanilla MLP 5 MiMi local selection",
        "MLP",
        MiMiConfig,
        {"target_modules": ["lin0", "lin1"], "selection": "local", **FRESH},
    ),
    (
        "Vanilla MLP 6 MiMi parameter budget, biases",
        "MLP",
        MiMiConfig,
        {"target_modules": ["lin0", "lin1"], "target_params": 40, "adapter_bias": True, "activation": "relu",
         **IDENTITY},
    ),
    # an adapter that has already been pruned, as saved: its recorded widths (lin1's adapter removed) and rounds
    (
        "Vanilla MLP 7 MiMi pruned widths",
        "MLP",
        MiMiConfig,
        {"target_modules": ["lin0", "lin1"], "adapter_widths": {"lin0": 2, "lin1": 0}, "rounds_done": 2, **FRESH},
    ),
    (
        "MLP_LayerNorm MiMi pruned widths, modules_to_save",
        "MLP_LayerNorm",
        MiMiConfig,
        {
            "target_modules": ["lin0"],
            "modules_to_save": ["layernorm1", "lin1"],
            "adapter_widths": {"lin0": 3},
            "rounds_done": 1,
            **FRESH,
        },
    ),
]

# (test name, tuner method, config class, kwargs of the 1st adapter, kwargs of the 2nd): on PEFT's `MLP`
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "MiMi Same",
        "mimi",
        MiMiConfig,
        {"target_modules": ["lin0"], "init_weights": False, **BUDGET},
        {"target_modules": ["lin0"], "init_weights": False, **BUDGET},
    ),
    (
        "MiMi Different",
        "mimi",
        MiMiConfig,
        {"target_modules": ["lin0"], "init_weights": False, **BUDGET},
        {"target_modules": ["lin1"], "init_weights": False, **BUDGET},
    ),
]

# (test name, 1st config, 2nd config): mixed-task batches, ``model(X, adapter_names=[...])``
MIXED_ADAPTER_TEST_CASES = [
    (
        "MiMi mixed adapter",
        MiMiConfig(target_modules=["lin0"], init_weights=False, **BUDGET),
        MiMiConfig(target_modules=["lin0"], init_compression=2.0, init_weights=False, **BUDGET),
    ),
]


def _add_rows() -> None:
    test_custom_models.TEST_CASES.extend(TEST_CASES)
    test_custom_models.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES.extend(MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)
    test_custom_models.MIXED_ADAPTER_TEST_CASES.extend(MIXED_ADAPTER_TEST_CASES)
    # PEFT derives this list from TEST_CASES when its module is imported, which has happened by now
    classes = test_custom_models.ALL_PEFT_CONFIG_CLASSES
    classes.append(MiMiConfig)
    classes.sort(key=lambda cls: cls.__name__)


MERGE_SKIP_REASON = "MiMi does not support merging adapters (W_up·act(W_down·y) is non-linear), skipping this test."

# Tests that merge but do not call `_skip_if_merging_not_supported`, because PEFT parametrises them with mergeable
# methods only; MiMi rows skip them for the same reason.
MERGING_TESTS = {"test_mixed_adapter_batches_merged_raises"}


def _skip_merging_for_mimi(skip_if_merging_not_supported):
    def skip(model_id, config_cls, config_kwargs):
        if issubclass(config_cls, MiMiConfig):
            pytest.skip(MERGE_SKIP_REASON)
        skip_if_merging_not_supported(model_id, config_cls, config_kwargs)

    return skip


def _patch_merge_skips() -> None:
    # test_custom_models imported the function by name, testing_common's tester methods look it up in their module
    skip = _skip_merging_for_mimi(testing_common._skip_if_merging_not_supported)
    testing_common._skip_if_merging_not_supported = skip
    test_custom_models._skip_if_merging_not_supported = skip


def _runs_mimi(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(value is MiMiConfig or isinstance(value, MiMiConfig) for value in callspec.params.values())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep only the tests parametrised with a MiMi row: PEFT's rows for other methods are PEFT's to run."""
    selected = [item for item in items if _runs_mimi(item)]
    deselected = [item for item in items if not _runs_mimi(item)]
    for item in selected:
        if item.originalname in MERGING_TESTS:
            item.add_marker(pytest.mark.skip(reason=MERGE_SKIP_REASON))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected


_add_rows()
_patch_merge_skips()
