"""Sanity floors (benchmarks/floors.py): logistic regression on raw pixels and on a frozen backbone's features."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from peft_mimi.backbones import load_backbone
from peft_mimi.data import load_image_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from floors import linear_probe, logistic_probe, pixel_floor  # noqa: E402 (benchmarks/ is not a package)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """One BLAS thread, as conftest sets one torch thread: two pytest workers share two cores, and lbfgs' matrix
    products slow down several-fold when both workers run several BLAS threads each."""
    with threadpool_limits(limits=1):
        yield


def _without_time(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "seconds"}


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


@pytest.fixture(scope="module")
def digits_subset(digits):
    """The first 300 train / 200 test digits (every class has 27-35 / 15-24 of them)."""
    return digits["train"].select(range(300)), digits["test"].select(range(200))


@pytest.fixture(scope="module")
def fmnist_vit():
    return load_backbone("fmnist-vit", num_labels=10)


def test_pixel_floor_on_digits_is_high_and_converged(digits):
    floor = pixel_floor(digits["train"], digits["test"])  # measured: 0.955, C=0.01 by cross-validation, 4.5 s

    assert floor["accuracy"] > 0.9
    assert floor["n_iter"] < floor["max_iter"]
    assert floor["C"] in floor["cv_accuracy"]
    assert (floor["n_train"], floor["n_test"], floor["n_features"]) == (1438, 359, 3 * 32 * 32)
    assert floor["seconds"] > 0


def test_pixel_floor_is_deterministic_for_a_seed(digits_subset):
    train, test = digits_subset

    first, second = pixel_floor(train, test, image_size=8, seed=3), pixel_floor(train, test, image_size=8, seed=3)

    assert _without_time(first) == _without_time(second)
    assert first["n_features"] == 3 * 8 * 8


def test_linear_probe_of_fmnist_vit_on_digits_is_well_above_chance(fmnist_vit, digits_subset):
    model, processor = fmnist_vit
    model.train()

    probe = linear_probe(model, processor, *digits_subset)  # measured: 0.835, C=10 (chance: 0.1)

    assert probe["accuracy"] > 0.5
    assert probe["n_iter"] < probe["max_iter"]
    assert probe["n_features"] == model.config.hidden_size  # the classifier's input: the final [CLS] token
    assert model.training  # its mode is restored ...
    assert not model.classifier._forward_hooks  # ... and its feature hook removed


def test_linear_probe_chooses_C_on_the_training_set_only(fmnist_vit, digits_subset):
    model, processor = fmnist_vit
    train, test = digits_subset
    shuffled = np.random.default_rng(0).permutation(test["label"]).tolist()
    test_with_wrong_labels = test.remove_columns("label").add_column("label", shuffled)

    honest = linear_probe(model, processor, train, test)
    misled = linear_probe(model, processor, train, test_with_wrong_labels)

    assert (misled["C"], misled["cv_accuracy"], misled["n_iter"]) == (honest["C"], honest["cv_accuracy"],
                                                                      honest["n_iter"])
    assert misled["accuracy"] < 0.3 < honest["accuracy"]  # the test labels did reach the score


def test_logistic_probe_without_cross_validation_uses_the_given_C():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 4))
    labels = (features[:, 0] > 0).astype(int)

    probe = logistic_probe(features[:40], labels[:40], features[40:], labels[40:], Cs=[0.5])

    assert (probe["C"], probe["cv_accuracy"]) == (0.5, {})
    assert probe["accuracy"] > 0.8


@pytest.mark.parametrize(
    ("train_shape", "test_shape", "Cs", "message"),
    [
        ((10, 4), (5, 3), [1.0], "same D"),
        ((10,), (5,), [1.0], r"\(N, D\)"),
        ((10, 4), (5, 4), [], "Cs"),
        ((10, 4), (5, 4), [0.0, 1.0], "positive"),
    ],
)
def test_logistic_probe_rejects_bad_inputs(train_shape, test_shape, Cs, message):
    with pytest.raises(ValueError, match=message):
        logistic_probe(np.zeros(train_shape), np.zeros(train_shape[0]), np.zeros(test_shape), np.zeros(test_shape[0]),
                       Cs=Cs)
