"""`peft_mimi.schedule`: MiMi's schedule as numbers, pinned to what `peft_mimi.train` and `MiMiPruningCallback`
computed before they shared this module (the values below were recorded with that code: same segments, same cut
steps, same learning rates, same budget-search choices)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from peft_mimi import schedule
from peft_mimi.recipe import TrainingRecipe
from peft_mimi.train import build_optimizer


def test_segments_one_epoch_per_cut_and_the_rest_of_the_papers_epochs_at_the_final_widths():
    assert [schedule.segment_epochs(r) for r in (0, 1, 2, 4, 7)] == [[1], [1, 3], [1, 1, 4], [1, 1, 1, 1, 6],
                                                                      [1] * 7 + [9]]
    assert schedule.segment_epochs(4, epochs_per_round=2) == [2] * 5  # the paper's equal segments
    assert schedule.segment_epochs(2, epochs_per_round=3) == [3, 3, 3]  # never shorter than a round
    assert schedule.segment_epochs(4, final_epochs=2) == [1, 1, 1, 1, 2]
    assert schedule.segment_epochs(2, epochs_per_round=2, final_epochs=5) == [2, 2, 5]
    assert schedule.segment_epochs(0, epochs_per_round=2, final_epochs=5) == [5]  # no rounds: the last segment
    # the budget search: every round alike, then the finish of the kept one (the rest of 2·(R+1), at least E)
    assert schedule.segment_epochs(4, finish=True) == [1, 1, 1, 1, 1, 5]
    assert schedule.segment_epochs(2, epochs_per_round=2, finish=True) == [2, 2, 2, 2]
    assert schedule.segment_epochs(2, final_epochs=7, finish=True) == [1, 1, 1, 7]
    assert TrainingRecipe().segment_epochs(0, finish=True) == [1, 1]
    assert TrainingRecipe(epochs_per_round=2, restart_lr=True).segment_epochs(7) == [2] * 8


@pytest.mark.parametrize(("segment", "runs"), [
    ({}, [((100, 10, 4), [10, 20, 30, 40]), ((300, 30, 4), [10, 20, 30, 40]), ((50, 5, 4), [5, 10, 15, 20]),
          ((48, 6, 2), [8, 16]), ((37, 3, 2), [6, 12]), ((120, 12, 1), [10]), ((10, 1, 0), []),
          ((64, 4, 3), [8, 16, 24])]),
    ({"epochs_per_round": 2}, [((100, 10, 4), [20, 40, 60, 80]), ((48, 6, 2), [16, 32]), ((120, 12, 1), [20]),
                               ((50, 5, 4), None), ((37, 3, 2), None), ((64, 4, 3), None)]),
    ({"epochs_per_round": 1.5}, [((100, 10, 4), [15, 30, 45, 60]), ((48, 6, 2), [12, 24]), ((37, 3, 2), [18, 36]),
                                 ((50, 5, 4), None)]),
    ({"steps_per_round": 7}, [((50, 5, 4), [7, 14, 21, 28]), ((37, 3, 2), [7, 14]), ((10, 1, 0), [])]),
])
def test_cut_steps_are_those_the_callback_planned(segment, runs):
    for (max_steps, epochs, rounds), cuts in runs:
        if cuts is None:  # no step left after the last cut
            with pytest.raises(ValueError, match="Train longer"):
                schedule.cut_steps(max_steps, epochs, rounds, **segment)
        else:
            assert schedule.cut_steps(max_steps, epochs, rounds, **segment) == cuts


def test_the_standard_error_of_a_validation_reading_is_in_points():
    assert schedule.standard_error(0.8, 100) == pytest.approx(4.0)
    assert schedule.standard_error(0.5, 2500) == pytest.approx(1.0)  # a 1-point tolerance needs thousands of images
    assert schedule.standard_error(1.0, 10) == 0.0


def test_the_budget_search_plans_one_more_segment_end_where_its_finish_starts():
    # 8 epochs of 4 steps, R = 3: cuts after epochs 1-3, the last round's epoch ends at step 16, the finish trains 16
    assert schedule.cut_steps(32, 8, 3, finish=True) == [4, 8, 12, 16]
    assert schedule.cut_steps(32, 8, 0, finish=True) == [4]  # no pruning: one epoch, then the finish
    assert schedule.cut_steps(50, 5, 4, steps_per_round=7, finish=True) == [7, 14, 21, 28, 35]
    with pytest.raises(ValueError, match="training after the search's last round.*Train longer"):
        schedule.cut_steps(48, 6, 2, epochs_per_round=4, finish=True)  # 3 rounds of 32 steps do not fit in 48


# the learning rate (peak 1) of every optimizer step of peft_mimi.train, recorded before the schedule moved here:
# (epochs of each segment, optimizer steps per epoch, restart_lr, warmup_ratio) -> rates
TRAIN_RATES = {
    ((1, 1, 4), 3, False, 0.1): [
        0.0, 1.0, 0.991487, 0.966236, 0.925109, 0.869504, 0.801317, 0.722869, 0.636831, 0.546134, 0.453866, 0.363169,
        0.277131, 0.198683, 0.130496, 0.074891, 0.033764, 0.008513],
    ((1, 1, 4), 3, True, 0.1): [
        1.0, 0.75, 0.25, 1.0, 0.75, 0.25, 0.0, 1.0, 0.979746, 0.920627, 0.82743, 0.707708, 0.571157, 0.428843,
        0.292292, 0.17257, 0.079373, 0.020254],
    ((2, 2, 2), 5, False, 0.25): [
        0.0, 0.142857, 0.285714, 0.428571, 0.571429, 0.714286, 0.857143, 1.0, 0.995343, 0.981459, 0.958606, 0.92721,
        0.887856, 0.841277, 0.78834, 0.730033, 0.66744, 0.601728, 0.534121, 0.465879, 0.398272, 0.33256, 0.269967,
        0.21166, 0.158723, 0.112144, 0.07279, 0.041394, 0.018541, 0.004657],
}


@pytest.mark.parametrize("setting", list(TRAIN_RATES))
def test_the_training_loops_learning_rates_are_unchanged(setting):
    """As `peft_mimi.train` builds them: a new optimizer per segment, its scheduler started at the segment's first
    step of one schedule over the whole run (restarted at every cut with restart_lr)."""
    epochs, steps_per_epoch, restart_lr, warmup_ratio = setting
    starts = [steps_per_epoch * sum(epochs[:r]) for r in range(len(epochs) + 1)]
    factor = functools.partial(schedule.lr_factor, warmup_ratio=warmup_ratio,
                               boundaries=schedule.lr_boundaries(starts[1:-1], starts[-1], restart_lr))
    model, rates = torch.nn.Linear(2, 2), []
    for r in range(len(epochs)):
        optimizer = build_optimizer(model, lr=1.0, weight_decay=0.05)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=starts[r] - 1)
        for _ in range(starts[r + 1] - starts[r]):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert rates == pytest.approx(TRAIN_RATES[setting], abs=1e-6)


def test_every_segment_is_transformers_cosine_with_warm_up():
    boundaries = (0, 16, 32, 48)  # cuts after steps 16 and 32 of 48: three segments of 16 steps
    factors = [schedule.lr_factor(step, boundaries, warmup_ratio=0.25) for step in range(48)]
    one_round = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1.0), 4, 16).lr_lambdas[0]
    assert factors == [one_round(k) for k in range(16)] * 3  # bit for bit
    # segments of different lengths get warm-ups of their own length; without warm-up a restart is the peak
    assert [schedule.lr_factor(s, (0, 10, 30), 0.2) for s in (10, 13, 14)] == [0.0, 0.75, 1.0]
    assert schedule.lr_factor(10, (0, 10, 30), 0.0) == 1.0
    assert schedule.lr_factor(30, (0, 10, 30), 0.0) == 0.0  # past the end


def test_lr_boundaries_restart_at_the_cuts_or_run_once():
    assert schedule.lr_boundaries([4, 8], 12, restart_lr=True) == (0, 4, 8, 12)
    assert schedule.lr_boundaries([4, 8], 12, restart_lr=False) == (0, 12)
    for cuts in ([8, 4], [4, 12]):
        with pytest.raises(ValueError, match="increasing steps strictly between 0 and 12"):
            schedule.lr_boundaries(cuts, 12, restart_lr=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        schedule.check_warmup_ratio(1.0)


def test_budget_search_keeps_the_smallest_round_within_tolerance_of_the_best():
    search = schedule.BudgetSearch(tolerance=2.0)
    moved = [search.record(size, accuracy) for size, accuracy in
             [(2048, 0.5), (1024, 0.6), (512, 0.3), (256, 0.585)]]
    assert moved == [True, True, False, True] and search.chosen == 3  # 0.585 is within 2 points of 0.6
    assert search.sizes == [2048, 1024, 512, 256] and search.accuracies == [0.5, 0.6, 0.3, 0.585]
    strict = schedule.BudgetSearch(tolerance=1.0)
    assert [strict.record(s, a) for s, a in [(2048, 0.5), (1024, 0.6), (512, 0.3), (256, 0.585)]] == [
        True, True, False, False]
    assert strict.chosen == 1  # the callback's and the loop's choice on these numbers
