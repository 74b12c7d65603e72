"""The pruning arithmetic on hand-made numbers and weights (no model needed)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from peft_mimi.pruning import (
    budget_for_compression,
    importance_scores,
    initial_width,
    num_rounds,
    removal_order,
    select_neurons,
    total_params,
)


def test_initial_width_is_proportional_to_the_layer_and_never_zero():
    assert initial_width(384, 4.0) == 96
    assert initial_width(1536, 4.0) == 384
    assert initial_width(10, 32.0) == 1


def test_budget_is_what_uniform_adapters_would_hold():
    # two adapters of d=64 and one of d=128 at σt=16: widths 4, 4, 8 -> 2*64*4*2 + 2*128*8
    assert budget_for_compression([64, 64, 128], 16.0) == 2 * 64 * 4 * 2 + 2 * 128 * 8
    # with biases each neuron owns one more parameter and each adapter an up bias of d values
    assert budget_for_compression([64], 16.0, bias=True) == 4 * (2 * 64 + 1) + 64


def test_mimi_score_is_the_normalised_l1_norm_of_what_a_neuron_owns():
    down = torch.tensor([[1.0, -1.0], [0.0, 0.5], [2.0, 2.0]])  # width 3, d 2
    up = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.5, 0.0]])  # d 2, width 3
    scores = importance_scores("mimi", down, up)
    torch.testing.assert_close(scores, torch.tensor([4.0, 1.0, 5.0]) / 4)
    torch.testing.assert_close(importance_scores("l1", down, up), torch.tensor([4.0, 1.0, 5.0]))
    torch.testing.assert_close(importance_scores("down_l1", down, up), torch.tensor([2.0, 0.5, 4.0]) / 2)
    with_bias = importance_scores("mimi", down, up, torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(with_bias, torch.tensor([5.0, 1.0, 6.0]) / 5)


def test_gradient_score_needs_gradients_and_random_score_follows_its_generator():
    down, up = torch.ones(3, 2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="backward"):
        importance_scores("gradient", down, up)
    torch.testing.assert_close(importance_scores("gradient", down, up, grad_l1=torch.tensor([4.0, 0.0, 8.0])),
                               torch.tensor([1.0, 0.0, 2.0]))
    a = importance_scores("random", down, up, generator=torch.Generator().manual_seed(3))
    b = importance_scores("random", down, up, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown score"):
        importance_scores("magnitude", down, up)


def test_normalisation_makes_neurons_of_different_layers_comparable():
    # the same per-weight magnitude on a wide and a narrow layer gives the same MiMi score, not the same l1 score
    narrow = importance_scores("mimi", torch.full((1, 8), 0.1), torch.full((8, 1), 0.1))
    wide = importance_scores("mimi", torch.full((1, 64), 0.1), torch.full((64, 1), 0.1))
    torch.testing.assert_close(narrow, wide)
    assert importance_scores("l1", torch.full((1, 64), 0.1), torch.full((64, 1), 0.1)) > 7 * narrow


def test_global_and_local_selection_differ_when_one_layer_matters_more():
    # layer 0's neurons all score above layer 1's: global removes only from layer 1, local from both
    scores = [torch.tensor([5.0, 6.0, 7.0, 8.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    dims = [16, 16]
    glob = select_neurons(scores, dims, ratio=0.5, budget=0, selection="global")
    local = select_neurons(scores, dims, ratio=0.5, budget=0, selection="local")
    assert [k.tolist() for k in glob] == [[True] * 4, [False] * 4]
    assert [k.tolist() for k in local] == [[False, False, True, True], [False, False, True, True]]


def test_final_round_lands_on_the_budget_and_can_remove_a_whole_adapter():
    scores = [torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2, 0.3])]
    dims = [8, 4]
    budget = 2 * 2 * 8  # exactly the first adapter
    keep = select_neurons(scores, dims, ratio=0.5, budget=budget, final=True)
    assert [k.tolist() for k in keep] == [[True, True], [False, False, False]]
    assert total_params(dims, [int(k.sum()) for k in keep]) == budget


def test_a_normal_round_never_goes_below_the_budget():
    scores = [torch.arange(10, dtype=torch.float32)]
    keep = select_neurons(scores, [4], ratio=0.5, budget=8 * 8, selection="global")
    assert int(keep[0].sum()) == 8  # ratio would remove 5 but the budget (8 neurons) stops it at 2


def test_ties_are_broken_by_adapter_then_neuron_index():
    order = removal_order([torch.zeros(2), torch.zeros(2)], "global")
    assert order == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_number_of_rounds():
    assert num_rounds(1000, 1000, 0.5) == 0
    assert num_rounds(1000, 500, 0.5) == 1
    assert num_rounds(1000, 499, 0.5) == 2
    assert num_rounds(1024, 128, 0.5) == 3
    assert num_rounds(1000, 0, 0.5) == 10  # down to less than one parameter
    with pytest.raises(ValueError, match="ratio"):
        num_rounds(1000, 10, 1.0)


def _run_schedule(dims, widths, ratio, budget, selection, seed):
    """Run a whole schedule with random scores; returns the widths after each round."""
    gen = torch.Generator().manual_seed(seed)
    initial = total_params(dims, widths)
    rounds = num_rounds(initial, budget, ratio)
    history = []
    live = list(widths)
    for r in range(rounds):
        scores = [torch.rand(w, generator=gen) for w in live]
        keep = select_neurons(scores, dims, ratio=ratio, budget=budget, selection=selection, final=r == rounds - 1)
        live = [int(k.sum()) for k in keep]
        history.append(live)
    return rounds, history


schedule_cases = st.tuples(
    st.lists(st.sampled_from([8, 16, 32, 48]), min_size=1, max_size=6),
    st.data(),
    st.floats(min_value=0.1, max_value=0.9),
    st.sampled_from(["global", "local"]),
    st.integers(min_value=0, max_value=10_000),
)


@settings(max_examples=60, deadline=None)
@given(schedule_cases)
def test_property_rounds_land_on_the_budget_never_grow_and_are_deterministic(case):
    dims, data, ratio, selection, seed = case
    widths = [data.draw(st.integers(min_value=1, max_value=d // 2)) for d in dims]
    initial = total_params(dims, widths)
    budget = data.draw(st.integers(min_value=0, max_value=initial))
    rounds, history = _run_schedule(dims, widths, ratio, budget, selection, seed)
    final = history[-1] if history else widths
    final_params = total_params(dims, final)
    assert final_params <= budget
    # landing: no more removed than needed -> adding back the cheapest removed neuron would exceed the budget
    if rounds:
        before = history[-2] if len(history) > 1 else widths
        if final != before:
            cheapest = min(2 * d for d, a, b in zip(dims, before, final) if b < a)
            assert final_params + cheapest > budget
    previous = widths
    for live in history:
        assert all(n <= p for n, p in zip(live, previous))
        previous = live
    assert _run_schedule(dims, widths, ratio, budget, selection, seed) == (rounds, history)


def test_the_same_schedule_in_another_process():
    args = ([16, 32, 48, 8], [8, 16, 24, 4], 0.5, 300, "global", 7)
    here = _run_schedule(*args)
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_pruning import _run_schedule; "
        f"print(_run_schedule(*{args!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == repr(here)


def test_eq3_starts_near_one_over_four_root_d_so_wide_layers_look_less_important_at_first():
    torch.manual_seed(0)

    def at_init(d: int) -> float:
        down = nn.Linear(d, d // 4, bias=False).weight  # the adapter's W_down init: uniform ±1/√d
        return float(importance_scores("mimi", down, torch.zeros(d, d // 4)).mean())

    # before training has moved the weights, a d=512 layer looks 4x less important than a d=32 one
    assert at_init(32) / at_init(512) == pytest.approx(4.0, rel=0.1)
    assert at_init(512) == pytest.approx(1 / (4 * math.sqrt(512)), rel=0.1)


def test_only_the_papers_score_and_its_ablations_exist():
    down, up = torch.randn(3, 16), torch.randn(16, 3)
    for kind in ("relative", "taylor", "contribution"):  # experiments that lost (docs/method.md, section 5)
        with pytest.raises(ValueError, match=r"unknown score .*choose one of \('mimi', 'l1', 'down_l1', 'gradient', "
                                             r"'random'\)"):
            importance_scores(kind, down, up)
