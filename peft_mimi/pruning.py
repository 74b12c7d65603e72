"""The pruning arithmetic of MiMi: widths, budgets, round counts, importance scores and neuron selection.

Pure functions on numbers and tensors (docs/method.md, sections 2-4). Nothing here knows about modules: the layer
applies a selection, the tuner walks the model, the callback and the trainer decide *when*.

Conventions: an adapter on a layer of feature size ``d`` with ``width`` neurons owns ``W_down`` (width x d) and
``W_up`` (d x width). Neuron ``j`` owns row ``j`` of ``W_down``, column ``j`` of ``W_up`` and, with biases, the
``j``-th down bias; the up bias and the channel scaling (``d`` values each) live as long as the adapter has at least
one neuron.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# the paper's score (eq. 3) and the scores of its ablations
SCORES = ("mimi", "l1", "down_l1", "gradient", "random")
SELECTIONS = ("global", "local")


def initial_width(d: int, compression: float) -> int:
    """Width of an adapter on a feature size ``d`` at compression ``σ = d / n``: ``max(1, floor(d / σ))``."""
    return max(1, math.floor(d / compression))


def neuron_cost(d: int, bias: bool = False) -> int:
    """Number of parameters one neuron owns: its ``W_down`` row, its ``W_up`` column, its down bias."""
    return 2 * d + (1 if bias else 0)


def shared_params(d: int, bias: bool = False, scale: bool = False) -> int:
    """Parameters an adapter holds while it has any neuron, owned by none: the up bias and the channel scaling."""
    return d * (int(bias) + int(scale))


def adapter_params(d: int, width: int, bias: bool = False, scale: bool = False) -> int:
    """Parameters of one adapter of the given width (0 when the adapter has been removed)."""
    if width <= 0:
        return 0
    return width * neuron_cost(d, bias) + shared_params(d, bias, scale)


def total_params(dims: Sequence[int], widths: Sequence[int], bias: bool = False, scale: bool = False) -> int:
    """Parameters of a set of adapters with feature sizes ``dims`` and widths ``widths``."""
    return sum(adapter_params(d, w, bias, scale) for d, w in zip(dims, widths, strict=True))


def budget_for_compression(dims: Sequence[int], compression: float, bias: bool = False, scale: bool = False) -> int:
    """``B(σt)``: the parameters that uniform adapters of width ``floor(d / σt)`` (of the same design) would have."""
    return sum(adapter_params(d, initial_width(d, compression), bias, scale) for d in dims)


def num_rounds(initial: int, budget: int, ratio: float) -> int:
    """Pruning rounds needed to go from ``initial`` parameters to ``budget`` removing a fraction ``ratio``
    per round: the smallest ``R`` with ``initial * (1 - ratio)^R <= budget`` (0 when already within budget).

    The round count is planned on parameters so that it is known before training; the last round removes
    exactly what is left to remove (see :func:`select_neurons`).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"prune ratio must be in (0, 1), got {ratio}")
    if initial <= budget:
        return 0
    target = max(budget, 1)
    rounds, remaining = 0, float(initial)
    while remaining > target * (1 + 1e-9):
        remaining *= 1.0 - ratio
        rounds += 1
    return rounds


def importance_scores(
    kind: str,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_bias: torch.Tensor | None = None,
    *,
    grad_l1: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Importance of each neuron of one adapter, shape ``(width,)``, float32; higher = more important.

    - ``"mimi"`` (the paper's eq. 3): ``(|W_down[j,:]|_1 + |W_up[:,j]|_1 (+ |b_j|)) / (2d (+1))``
    - ``"l1"``: the same numerator without the normalisation (ablation)
    - ``"down_l1"``: ``|W_down[j,:]|_1 / d`` (ablation: no look-ahead)
    - ``"gradient"``: ``grad_l1[j] / (2d)`` where ``grad_l1`` is the accumulated L1 norm of the neuron's
      weight gradients (ablation)
    - ``"random"``: uniform noise from ``generator`` (ablation)

    ``down_weight`` is ``(width, d)``, ``up_weight`` is ``(d, width)``.
    """
    width, d = down_weight.shape
    if up_weight.shape != (d, width):
        raise ValueError(f"W_up must have shape {(d, width)} to match W_down {tuple(down_weight.shape)}, "
                         f"got {tuple(up_weight.shape)}")
    down = down_weight.detach().float().abs()
    up = up_weight.detach().float().abs()
    if kind in ("mimi", "l1"):
        owned = down.sum(dim=1) + up.sum(dim=0)
        count = 2 * d
        if down_bias is not None:
            owned = owned + down_bias.detach().float().abs()
            count += 1
        return owned / count if kind == "mimi" else owned
    if kind == "down_l1":
        return down.sum(dim=1) / d
    if kind == "gradient":
        if grad_l1 is None:
            raise ValueError(
                "score='gradient' needs accumulated gradients: run at least one backward pass between rounds"
            )
        return grad_l1.detach().float().to(down.device) / (2 * d)
    if kind == "random":
        return torch.rand(width, generator=generator).to(down.device)
    raise ValueError(f"unknown score {kind!r}; choose one of {SCORES}")


def removal_order(scores: Sequence[torch.Tensor], selection: str) -> list[tuple[int, int]]:
    """Order in which neurons are removed: a list of ``(adapter index, neuron index)``, first = removed first.

    ``global`` ranks all neurons of all adapters together by score. ``local`` ranks each neuron by its relative
    rank inside its own adapter (rank / width), so every adapter loses the same fraction. Ties are broken by
    adapter index, then neuron index, so the order is deterministic.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTIONS}")
    keys, owners = [], []
    for a, s in enumerate(scores):
        s = s.detach().float().cpu()
        if selection == "global":
            keys.append(s)
        else:
            ranks = torch.empty(len(s))
            ranks[torch.argsort(s, stable=True)] = torch.arange(len(s), dtype=torch.float32)
            keys.append((ranks + 1) / max(len(s), 1))
        owners.extend((a, j) for j in range(len(s)))
    if not owners:
        return []
    order = torch.argsort(torch.cat(keys), stable=True).tolist()
    return [owners[i] for i in order]


def select_neurons(
    scores: Sequence[torch.Tensor],
    dims: Sequence[int],
    *,
    ratio: float,
    budget: int,
    selection: str = "global",
    final: bool = False,
    bias: bool = False,
    scale: bool = False,
) -> list[torch.Tensor]:
    """One pruning round. Returns, per adapter, a bool mask over its live neurons (True = keep).

    ``scores[i]`` holds the scores of the live neurons of adapter ``i`` (feature size ``dims[i]``). A normal
    round removes the lowest fraction ``ratio`` of the live neurons (``global``: ranked across all adapters;
    ``local``: ``floor(ratio * width)`` from each adapter). It never goes below ``budget``: it stops as soon as
    the live parameters are within the budget. The ``final`` round keeps removing in the same order until the
    live parameters are ``<= budget``, so the schedule always lands on the budget. Removing an adapter's last neuron
    also frees its shared parameters (``bias``: the up bias; ``scale``: the channel scaling).
    """
    widths = [len(s) for s in scores]
    keep = [torch.ones(w, dtype=torch.bool) for w in widths]
    order = removal_order(scores, selection)
    if final:
        candidates = order
    elif selection == "global":
        candidates = order[: math.floor(ratio * sum(widths))]
    else:
        quota = [math.floor(ratio * w) for w in widths]
        ranks = [torch.argsort(torch.argsort(s.detach().float().cpu(), stable=True)) for s in scores]
        candidates = [(a, j) for a, j in order if ranks[a][j] < quota[a]]
    live = list(widths)
    remaining = total_params(dims, live, bias, scale)

    def cost(a: int) -> int:  # what one neuron of adapter a holds, with live[a] counted without it
        return neuron_cost(dims[a], bias) + (shared_params(dims[a], bias, scale) if live[a] == 0 else 0)

    removed = []
    for a, j in candidates:
        if remaining <= budget:
            break
        keep[a][j] = False
        live[a] -= 1
        remaining -= cost(a)
        removed.append((a, j))
    if final:
        # The greedy pass may overshoot when neurons differ in cost (2d): give back the most important removed
        # neurons that still fit, so the result lands as close to the budget as the neuron sizes allow.
        for a, j in reversed(removed):
            if remaining + cost(a) <= budget:
                remaining += cost(a)
                keep[a][j] = True
                live[a] += 1
    return keep


def budget_search(sizes: Sequence[int], accuracies: Sequence[float], tolerance: float) -> int:
    """Budget search, the paper's alternative stop rule: which of the rounds trained so far to keep.

    ``sizes[r]`` and ``accuracies[r]`` are the adapter parameters and the validation accuracy (a fraction in
    [0, 1]) after round ``r``'s training; ``tolerance`` is in accuracy points (1.0 = 0.01). A round is *within
    tolerance* when its accuracy is at most ``tolerance`` points below the best accuracy of all rounds so far.
    Returns the smallest round within tolerance (ties: the more accurate, then the later). Rounds are compared as
    they are, so a later round that beats the best moves the bar up for all of them; when sizes never grow (pruning
    only removes), adding a round leaves the choice where it was or moves it to the new round.
    """
    if len(sizes) != len(accuracies) or not sizes:
        raise ValueError(f"budget_search needs one size per accuracy and at least one round, got {len(sizes)} sizes "
                         f"and {len(accuracies)} accuracies")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance must be a number of accuracy points >= 0, got {tolerance!r}")
    if not all(0.0 <= a <= 1.0 for a in accuracies):  # also refuses NaN (an empty validation split)
        raise ValueError(f"validation accuracies must be fractions in [0, 1], got {list(accuracies)}")
    best = max(accuracies)
    # in points, with a margin for the rounding of fractions such as 0.85 - 0.01
    within = [r for r, accuracy in enumerate(accuracies) if (best - accuracy) * 100 <= tolerance + 1e-9]
    return min(within, key=lambda r: (sizes[r], -accuracies[r], -r))
