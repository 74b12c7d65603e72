"""Sanity floors for the benchmarks' accuracy tables: what a setting must beat before its number means anything.

A fine-tuned classifier that scores below a linear model on raw pixels, or below a linear probe on the frozen
backbone it started from, is under-trained (or broken), whatever its parameter budget. Two floors, both
multinomial logistic regression (lbfgs, standardised features, trained to convergence):

- :func:`pixel_floor`: on raw RGB pixels, each image resized to ``image_size`` x ``image_size`` and flattened.
- :func:`linear_probe`: on a frozen pretrained classifier's features, the input of its classification head.

Both choose the inverse regularisation ``C`` by stratified cross-validation on the training split only (the test
split is scored once, with the chosen ``C``), and both are deterministic for a given ``seed``.
:func:`logistic_probe` is the shared fit, usable on any precomputed features.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from peft_mimi.data import ImageTransform
from peft_mimi.evaluate import forward_kwargs as model_forward_kwargs
from peft_mimi.run import head_modules

__all__ = ["DEFAULT_CS", "linear_probe", "logistic_probe", "pixel_floor"]

DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
CV_FOLDS = 3
# lbfgs starts with this many iterations and doubles them until it stops before the limit
FIRST_MAX_ITER = 1000
LAST_MAX_ITER = 64000


def _sklearn() -> Any:
    """The ``sklearn`` package with the submodules used here imported, or an ``ImportError`` saying what to install."""
    try:
        import sklearn
        import sklearn.exceptions
        import sklearn.linear_model
        import sklearn.model_selection
        import sklearn.pipeline
        import sklearn.preprocessing
    except ImportError as err:
        raise ImportError('the accuracy floors need scikit-learn; install it with: pip install "peft-mimi[data]"'
                          ) from err
    return sklearn


def _fit_to_convergence(features: np.ndarray, labels: np.ndarray, C: float, seed: int) -> tuple[Any, int, int]:
    """``(fitted standardise+logistic pipeline, n_iter, max_iter)`` with ``n_iter < max_iter``: lbfgs is rerun
    with twice the iterations until it stops on its own tolerance."""
    sklearn = _sklearn()
    max_iter = FIRST_MAX_ITER
    while True:
        pipeline = sklearn.pipeline.make_pipeline(
            sklearn.preprocessing.StandardScaler(),
            sklearn.linear_model.LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed),
        )
        with warnings.catch_warnings():
            # a run that hits max_iter is retried with more iterations below, so its warning is noise
            warnings.simplefilter("ignore", sklearn.exceptions.ConvergenceWarning)
            pipeline.fit(features, labels)
        n_iter = int(np.max(pipeline[-1].n_iter_))
        if n_iter < max_iter:
            return pipeline, n_iter, max_iter
        if max_iter >= LAST_MAX_ITER:
            raise RuntimeError(f"logistic regression with C={C} did not converge in {max_iter} lbfgs iterations "
                               "on standardised features; use a smaller C")
        max_iter *= 2


def logistic_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit standardised multinomial logistic regression on ``(N, D)`` train features and score it on the test set.

    ``C`` is the value of ``Cs`` with the best mean accuracy over a stratified ``CV_FOLDS``-fold split of the
    training set (shuffled with ``seed``; ties go to the smaller ``C``); with a single value there is no
    cross-validation. The test set is used only for the final score. Returns ``{"accuracy", "C", "cv_accuracy"
    ({C: mean fold accuracy}, empty without cross-validation), "n_iter", "max_iter", "n_features", "n_train",
    "n_test"}``; ``n_iter < max_iter`` always (else ``RuntimeError``).
    """
    sklearn = _sklearn()
    train_features, test_features = np.asarray(train_features), np.asarray(test_features)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if train_features.ndim != 2 or test_features.shape[1:] != train_features.shape[1:]:
        raise ValueError(f"expected (N, D) train and test features of the same D, got {train_features.shape} and "
                         f"{test_features.shape}")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError(f"{len(train_features)} train / {len(test_features)} test feature rows but "
                         f"{len(train_labels)} / {len(test_labels)} labels")
    if len(Cs) == 0 or min(Cs) <= 0:
        raise ValueError(f"Cs must be one or more positive values, got {list(Cs)}")

    cv_accuracy: dict[float, float] = {}
    if len(Cs) > 1:
        folds = sklearn.model_selection.StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
        splits = list(folds.split(train_features, train_labels))
        for C in sorted(Cs):
            scores = [
                _fit_to_convergence(train_features[fit], train_labels[fit], C, seed)[0].score(
                    train_features[held], train_labels[held])
                for fit, held in splits
            ]
            cv_accuracy[float(C)] = float(np.mean(scores))
    best_C = max(cv_accuracy, key=lambda C: (cv_accuracy[C], -C)) if cv_accuracy else float(Cs[0])
    pipeline, n_iter, max_iter = _fit_to_convergence(train_features, train_labels, best_C, seed)
    return {
        "accuracy": float(pipeline.score(test_features, test_labels)),
        "C": best_C,
        "cv_accuracy": cv_accuracy,
        "n_iter": n_iter,
        "max_iter": max_iter,
        "n_features": int(train_features.shape[1]),
        "n_train": len(train_features),
        "n_test": len(test_features),
    }


def _image_batches(dataset: datasets.Dataset, batch_size: int) -> Iterator[list[Any]]:
    for start in range(0, len(dataset), batch_size):
        yield dataset[start : start + batch_size]["image"]


def _labels(dataset: datasets.Dataset) -> np.ndarray:
    if "image" not in dataset.column_names or "label" not in dataset.column_names:
        raise ValueError(f"the dataset has columns {dataset.column_names}, expected 'image' and 'label'; "
                         "load it with peft_mimi.data.load_image_dataset to normalise it")
    return np.asarray(dataset["label"])


def pixel_floor(
    train: datasets.Dataset,
    test: datasets.Dataset,
    *,
    image_size: int = 32,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> dict[str, Any]:
    """Test accuracy of logistic regression on raw pixels: RGB in [0, 1], resized (bilinear, antialiased) to
    ``image_size`` x ``image_size`` and flattened to ``3 * image_size**2`` features.

    ``train``/``test`` have columns ``image`` and ``label``. Returns :func:`logistic_probe`'s dict plus
    ``"seconds"`` (wall time, decoding included).
    """
    start = time.perf_counter()
    labels = _labels(train), _labels(test)
    pixels = ImageTransform(image_size, mean=[0.0] * 3, std=[1.0] * 3, train=False)
    features = [
        np.concatenate([pixels(images).flatten(1).numpy() for images in _image_batches(split, 256)])
        for split in (train, test)
    ]
    result = logistic_probe(features[0], labels[0], features[1], labels[1], Cs=Cs, seed=seed)
    return {**result, "seconds": time.perf_counter() - start}


@torch.no_grad()
def _head_inputs(model: nn.Module, head: nn.Module, transform: ImageTransform, dataset: datasets.Dataset,
                 batch_size: int, forward_kwargs: Mapping[str, Any]) -> np.ndarray:
    """``(N, D)`` float32: what ``head`` receives when ``model`` classifies each image of ``dataset``."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach().float().cpu()))
    try:
        for images in _image_batches(dataset, batch_size):
            model(pixel_values=transform(images).to(device), **forward_kwargs)
    finally:
        hook.remove()
    return torch.cat(captured).flatten(1).numpy()


def linear_probe(
    model: nn.Module,
    processor: Any,
    train: datasets.Dataset,
    test: datasets.Dataset,
    *,
    batch_size: int = 64,
    forward_kwargs: Mapping[str, Any] | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> dict[str, Any]:
    """Test accuracy of logistic regression on the frozen features of an image classifier.

    The features are the input of ``model``'s classification head (``classifier``, ``head`` or ``fc``, as the
    trainer finds it), computed once per image in eval mode with ``processor``'s eval transform. Its head's
    weights play no part. ``forward_kwargs`` go to ``model``'s forward (default: what the trainer passes, e.g.
    ``{"interpolate_pos_encoding": True}`` when the images differ in size from the model's). ``model`` is left
    unchanged (its train/eval mode restored). Returns :func:`logistic_probe`'s dict plus ``"seconds"``.
    """
    start = time.perf_counter()
    labels = _labels(train), _labels(test)
    head = getattr(model, head_modules(model)[0])
    transform = ImageTransform.from_processor(processor, train=False)
    kwargs = dict(model_forward_kwargs(model, transform) if forward_kwargs is None else forward_kwargs)
    was_training = model.training
    model.eval()
    try:
        features = [_head_inputs(model, head, transform, split, batch_size, kwargs) for split in (train, test)]
    finally:
        model.train(was_training)
    result = logistic_probe(features[0], labels[0], features[1], labels[1], Cs=Cs, seed=seed)
    return {**result, "seconds": time.perf_counter() - start}
