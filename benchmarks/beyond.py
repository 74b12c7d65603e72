"""Beyond the paper (issue 13): what makes MiMi's pruned adapters beat vanilla adapters of the same final size
trained for the same total epochs. Every candidate is trained by `peft_mimi.train.train`, at equal final
parameters (the budget B(σt)) and equal total epochs ((R+1)·E of the paper's schedule, ρ = 0.5), on the same
class-balanced subsets, seeds and batch order as vanilla adapters of width d/σt.

    python benchmarks/beyond.py --resume                    # -> results/beyond/beyond.{md,json,png}
    python benchmarks/beyond.py --smoke --out /tmp/x        # a tiny random ViT, seconds

Candidates that need something `peft_mimi.train` does not do yet are prototyped here as wrapper modules that
`train` trains as model objects (its loop is unchanged):
- ``kd``: distillation from the wide adapter. The model after the first round (before the first cut) becomes a
  frozen teacher; from then on the loss is ``(1-α)·CE + α·T²·KL(teacher/T ‖ student/T)`` on the same augmented
  batch (an extra forward pass of the teacher per step, counted in the wall time);
- ``cubic``: gradual pruning (Zhu & Gupta 2017) in ONE cosine schedule of the same total epochs: masks at many
  small cuts whose sizes follow the cubic schedule from 20 % to 70 % of the steps, then training at the final
  widths, one physical shrink at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

OUT = common.RESULTS_DIR / "beyond"
TIE = 0.5  # accuracy points: |MiMi - vanilla| below this on a seed is a tie


@dataclass(frozen=True)
class Candidate:
    """A way to train adapters of the final size in the paper's total epochs."""

    name: str
    help: str
    kind: str = "mimi"  # mimi | adapter (vanilla adapters of the final width, one round) | wide (adapters of
    # width d/4, one round: a reference above the budget) | head (the head alone: a reference below it)
    mimi_options: dict = field(default_factory=dict)  # MiMiConfig fields
    schedule: str = "paper"  # paper: E per round, rho 0.5 | long_last: 1 epoch per round, the rest after the last
    # cut | long_ends: E epochs before the first cut, then as long_last | rounds_1: 1 epoch per round, rho chosen so
    # that the rounds fill the epochs | cubic | one_shot | continuous, callback_default: masked cuts in one round
    kd: tuple[float, float] | None = None  # (alpha, temperature) of the distillation from the wide adapter
    group_lasso: float = 0.0  # λ of a group-lasso penalty on each neuron's weights, added to the training loss
    neuron_drop: float = 0.0  # probability of dropping each adapter neuron per image while training (structured)
    restart_lr: bool = True  # False: TrainingRecipe(restart_lr=False), one warm-up + cosine over the whole run


CANDIDATES = {c.name: c for c in [
    Candidate("vanilla", "adapters of width d/σt from the start, same epochs", kind="adapter"),
    Candidate("wide", "reference, NOT the same size: adapters of width d/4 (σ0) trained the same epochs",
              kind="wide"),
    Candidate("head", "reference: the classification head alone, same epochs", kind="head"),
    Candidate("paper", "the paper's MiMi: eq. 3, global, ρ 0.5, E epochs per round"),
    Candidate("local", "paper, but every adapter loses the same fraction (the paper's ablation)",
              mimi_options={"selection": "local"}),
    Candidate("gradient", "score = |∂L/∂w| summed over the neuron's weights and the round's steps, per parameter "
              "(the paper's ablation score, ahead of eq. 3 on 5 of 6 pairs in ablation.md)",
              mimi_options={"score": "gradient"}),
    Candidate("long_last", "paper cuts, 1 epoch per round, every remaining epoch after the last cut",
              schedule="long_last"),
    Candidate("long_ends", "paper cuts, the paper's first segment (E epochs) before the first cut, 1 epoch per later "
              "round, every remaining epoch after the last cut", schedule="long_ends"),
    Candidate("rounds_1", "1 epoch per round, smaller ρ so that the rounds fill the same epochs",
              schedule="rounds_1"),
    Candidate("one_shot", "one cut to the budget after half the epochs", schedule="one_shot"),
    Candidate("one_cosine", "the paper's cuts at the same steps, but one warm-up + cosine over the whole run (as "
              "vanilla adapters get) instead of a restart at every round: TrainingRecipe(restart_lr=False)",
              restart_lr=False),
    Candidate("continuous", "the paper's cuts at the same steps as masks (physical shrink at the end), one "
              "optimizer and one warm-up + cosine over the whole run: what vanilla adapters get, with the cuts "
              "(the HF Trainer callback's default form)", schedule="continuous"),
    Candidate("callback_default", "MiMiPruningCallback's default as the HF Trainer runs it: a masked cut every "
              "epoch (every 1/(2·(R+1)) of a shorter run), the rest at the final widths, one optimizer (its state "
              "carried across the cuts) and one warm-up + cosine over the whole run",
              schedule="callback_default"),
    Candidate("cubic", "gradual masked cuts on the cubic schedule (20-70 % of the steps), one cosine",
              schedule="cubic"),
    Candidate("group_1e-4", "paper + a group-lasso penalty λ·Σ_j ‖(W_down[j,:], W_up[:,j])‖₂ over every neuron j "
              "(λ 1e-4) in every round, so that the neurons a cut removes are already near zero", group_lasso=1e-4),
    Candidate("group_1e-3", "the same with λ 1e-3", group_lasso=1e-3),
    Candidate("kd", "paper + distillation from the wide adapter (α 0.5, T 2)", kd=(0.5, 2.0)),
    Candidate("kd_strong", "paper + distillation from the wide adapter (α 0.9, T 2)", kd=(0.9, 2.0)),
    Candidate("drop_0.1", "paper + structured neuron dropout while training: each adapter neuron is zeroed for an "
              "image with probability 0.1 (LayerDrop's argument, Fan et al. 2019: trained without any one neuron, "
              "the model loses less when the cut removes it)", neuron_drop=0.1),
]}


# Candidates whose option left peft_mimi because it lost (issue 32): they no longer run, but their rows stay in the
# committed results, and --publish-only still describes them.
REMOVED = {
    "relative": "score = eq. 3 / its value at init (4√d · eq. 3): wide and narrow layers start level",
    "taylor": "score = first-order Taylor |a·∂L/∂a| per parameter, gathered while training",
    "contribution": "score = mean |a_j| · |W_up[:,j]|_1 per parameter, gathered while training",
    "reconstruct": "paper, but each cut refits the kept neurons' W_up by least squares on the activations' second "
                   "moment",
}


def describe(name: str) -> str:
    """The help text of a candidate or a combination, removed candidates included (for the results' tables)."""
    parts = name.split("+")
    if not any(part in REMOVED for part in parts):
        return candidate(name).help
    helps = [f"{REMOVED[part]} (removed from peft_mimi)" if part in REMOVED else candidate(part).help
             for part in parts]
    return helps[0] if len(helps) == 1 else " + ".join(h.split(":")[0] for h in helps)


def combine(name: str) -> Candidate:
    """``a+b+...``: the candidates' settings merged (scores, schedules, distillation), for combinations."""
    names = name.split("+")
    removed = [n for n in names if n in REMOVED]
    if removed:
        raise ValueError(f"candidate(s) {removed} in {name!r} left peft_mimi (their results stay in results/beyond); "
                         f"expected names among {list(CANDIDATES)}, joined by '+'")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidate(s) {unknown} in {name!r}; expected names among {list(CANDIDATES)}, "
                         "joined by '+'")
    parts = [CANDIDATES[n] for n in names]
    schedules = sorted({p.schedule for p in parts} - {"paper"})
    if len(schedules) > 1:  # one run has one epoch plan: merging two would silently keep only the last one
        raise ValueError(f"{name!r} combines the schedules {schedules}; a candidate takes at most one of them "
                         "(one_cosine, which changes only the learning rate, combines with any)")
    schedule = schedules[0] if schedules else "paper"
    options, kd, group_lasso, neuron_drop = {}, None, 0.0, 0.0
    for part in parts:
        options.update(part.mimi_options)
        kd = part.kd or kd
        group_lasso = part.group_lasso or group_lasso
        neuron_drop = part.neuron_drop or neuron_drop
    return Candidate(name, " + ".join(p.help.split(":")[0] for p in parts), mimi_options=options, schedule=schedule,
                     kd=kd, group_lasso=group_lasso, neuron_drop=neuron_drop,
                     restart_lr=all(part.restart_lr for part in parts))


def candidate(name: str) -> Candidate:
    return CANDIDATES[name] if name in CANDIDATES else combine(name)


# ------------------------------------------------------------------------------------------------- wrappers
class _Wrapper(nn.Module):
    """A PeftModel seen through a module whose forward `peft_mimi.train.train` calls; attributes it lacks come
    from the PeftModel (save_pretrained, config, peft_config, ...)."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft = peft_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.peft, name)

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding=None, **kwargs):
        if interpolate_pos_encoding is not None:
            kwargs["interpolate_pos_encoding"] = interpolate_pos_encoding
        return self.peft(pixel_values=pixel_values, labels=labels, **kwargs)


class Distilled(_Wrapper):
    """MiMi's rounds (``base_model`` is the MiMi tuner, so `train` runs them) with a distillation term: at the
    first cut the model is frozen as the teacher; afterwards ``loss = (1-α)·CE + α·T²·KL``."""

    def __init__(self, peft_model: nn.Module, alpha: float, temperature: float) -> None:
        super().__init__(peft_model)
        self.alpha, self.temperature = alpha, temperature
        self._teacher: list[nn.Module] = []  # a list: not a submodule, so train() neither trains nor saves it
        tuner = peft_model.base_model
        prune_round = tuner.prune_round

        def snapshot_then_prune(*args, **kwargs):
            if not self._teacher:
                self._teacher.append(copy.deepcopy(self.peft).eval().requires_grad_(False))
            return prune_round(*args, **kwargs)

        tuner.prune_round = snapshot_then_prune

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding=None, **kwargs):
        out = super().forward(pixel_values, labels, interpolate_pos_encoding, **kwargs)
        if self.training and self._teacher and labels is not None:
            if interpolate_pos_encoding is not None:
                kwargs["interpolate_pos_encoding"] = interpolate_pos_encoding
            with torch.no_grad():
                teacher = self._teacher[0](pixel_values=pixel_values, **kwargs).logits
            t = self.temperature
            kl = nn.functional.kl_div(nn.functional.log_softmax(out.logits / t, dim=-1),
                                      nn.functional.log_softmax(teacher / t, dim=-1), log_target=True,
                                      reduction="batchmean")
            out.loss = (1 - self.alpha) * out.loss + self.alpha * t * t * kl
        return out


class GroupSparse(_Wrapper):
    """MiMi's rounds with ``loss = CE + λ·Σ_j ‖(W_down[j,:], W_up[:,j])‖₂`` over the live neurons j of every
    adapter (group lasso, Yuan & Lin 2006): training drives the neurons it does not need towards zero, so that
    removing the lowest-scoring ones changes the function less."""

    def __init__(self, peft_model: nn.Module, strength: float) -> None:
        super().__init__(peft_model)
        self.strength = strength

    def penalty(self) -> torch.Tensor:
        total = torch.zeros(())
        for module in self.peft.modules():
            for name, down in getattr(module, "mimi_down", {}).items():
                up = module.mimi_up[name]
                norms = (down.weight.pow(2).sum(dim=1) + up.weight.pow(2).sum(dim=0) + 1e-12).sqrt()
                total = total + norms.sum()
        return total

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding=None, **kwargs):
        out = super().forward(pixel_values, labels, interpolate_pos_encoding, **kwargs)
        if self.training and labels is not None:
            out.loss = out.loss + self.strength * self.penalty()
        return out


class NeuronDropout(_Wrapper):
    """MiMi's rounds with structured dropout on the adapters' hidden neurons while training: for each image, each
    live neuron's activation is zeroed with probability ``p`` (the kept ones scaled by 1/(1-p), as in dropout), by a
    forward pre-hook on every adapter's ``W_up`` (a registered module, so it follows ``train()``/``eval()``; the
    refit's second moments see the activations undropped). Evaluation and the saved adapter are unchanged."""

    def __init__(self, peft_model: nn.Module, p: float) -> None:
        super().__init__(peft_model)
        self.p = p

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding=None, **kwargs):
        for module in self.peft.modules():  # each cut builds new W_up modules: hook those not hooked yet
            for up in getattr(module, "mimi_up", {}).values():
                if not getattr(up, "_neuron_dropout", False):
                    up.register_forward_pre_hook(self._drop)
                    up._neuron_dropout = True
        return super().forward(pixel_values, labels, interpolate_pos_encoding, **kwargs)

    def _drop(self, module: nn.Module, inputs: tuple) -> tuple | None:
        if not module.training:
            return None
        hidden = inputs[0]
        shape = (hidden.shape[0], *([1] * (hidden.dim() - 2)), hidden.shape[-1])  # one draw per image and neuron
        keep = torch.rand(shape, device=hidden.device) >= self.p
        return (hidden * keep.to(hidden.dtype) / (1 - self.p),)


class _StepCuts(_Wrapper):
    """One round of training (``base_model`` hidden, so `train` builds one optimizer and one schedule and sees no
    pruning rounds) with masked cuts at the given optimizer steps (``self._cut(k)`` for the k-th); `save_pretrained`
    shrinks the adapters first."""

    base_model = None

    def __init__(self, peft_model: nn.Module, cut_steps: list[int]) -> None:
        super().__init__(peft_model)
        self.tuner = [peft_model.base_model]
        self.cut_steps = sorted(set(cut_steps))
        self.step = 0

    def _cut(self, k: int) -> None:
        raise NotImplementedError

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding=None, **kwargs):
        if self.training:
            if self.step in self.cut_steps:
                self._cut(self.cut_steps.index(self.step))
            self.step += 1
        return super().forward(pixel_values, labels, interpolate_pos_encoding, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        self.tuner[0].compact()
        return self.peft.save_pretrained(*args, **kwargs)


class Continuous(_StepCuts):
    """The rounds' cuts, ``tuner.prune_round(compact=False)``, at the given steps of one round (those that
    `MiMiPruningCallback.plan` chooses): the neurons are masked, so the optimizer's state carries on for the kept
    ones."""

    def _cut(self, k: int) -> None:
        self.tuner[0].prune_round(compact=False)


class Gradual(_StepCuts):
    """Masked cuts at ``cuts`` evenly spaced steps between ``start`` and ``end`` (fractions of ``total_steps``);
    after the cut at step t the live parameters are ``B + (P0 - B)·(1 - progress)³`` (Zhu & Gupta 2017). The last
    cut lands on the budget exactly."""

    def __init__(self, peft_model: nn.Module, total_steps: int, start: float = 0.2, end: float = 0.7,
                 cuts: int = 10) -> None:
        first, last = round(start * total_steps), round(end * total_steps)
        super().__init__(peft_model, [first + round(k * (last - first) / max(1, cuts - 1)) for k in range(cuts)])
        self.initial, self.budget = self.tuner[0].live_params(), self.tuner[0].budget()

    def _cut(self, k: int) -> None:
        self._cut_to((k + 1) / len(self.cut_steps))

    @torch.no_grad()
    def _cut_to(self, progress: float) -> None:
        from peft_mimi.pruning import select_neurons

        tuner = self.tuner[0]
        target = round(self.budget + (self.initial - self.budget) * (1 - progress) ** 3)
        layers = list(tuner._layers(tuner.active_adapters[0]))
        scores = tuner.neuron_scores()
        keep = select_neurons([scores[n] for n, _ in layers], [layer.feature_size for _, layer in layers],
                              ratio=0.5, budget=target, final=True,
                              selection=tuner.peft_config[tuner.active_adapters[0]].selection)
        for (_, layer), keep_live in zip(layers, keep):
            layer.mask_neurons(tuner.active_adapters[0], keep_live)
            layer.reset_gradient_scores(tuner.active_adapters[0])


# ------------------------------------------------------------------------------------------------ one run
def paper_rounds(model: nn.Module, sigma: float) -> tuple[int, int, int]:
    """``(R, initial params, budget)`` of the paper's schedule (σ0 = 4, ρ = 0.5) on ``model``'s adapters."""
    from peft_mimi.pruning import num_rounds

    initial, budget = common.adapter_budget(model, 4.0), common.adapter_budget(model, sigma)
    return num_rounds(initial, budget, 0.5), initial, budget


def ratio_for_rounds(initial: int, budget: int, rounds: int) -> float:
    """The smallest prune ratio ρ whose plan has exactly ``rounds`` rounds (see `peft_mimi.pruning.num_rounds`)."""
    from peft_mimi.pruning import num_rounds

    rho = 1 - (budget / initial) ** (1 / rounds)
    while num_rounds(initial, budget, rho) > rounds:
        rho += 1e-4
    return min(rho, 0.999)


def run_one(cand: Candidate, backbone: str, task: str, sigma: float, seed: int, epochs_per_round: int,
            lr: float, max_train: int, max_test: int) -> dict:
    from peft import get_peft_model

    from peft_mimi import MiMiConfig, MiMiPruningCallback
    from peft_mimi.train import train

    data = common.task_dataset(task)
    name, _, size = backbone.partition("@")  # "dinov2-s14@56": that backbone trained and evaluated at 56 px
    model, processor = common.load_model(name, common.num_labels_of(task))
    rounds, initial, budget = paper_rounds(model, sigma)
    total = (rounds + 1) * epochs_per_round
    recipe = dict(batch_size=64, lr=lr, seed=seed, max_train_samples=max_train, max_eval_samples=max_test,
                  image_size=int(size) if size else None)
    torch.manual_seed(seed)
    options = {**common.PAPER, **cand.mimi_options}  # the paper's adapters, as every published candidate ran
    if cand.kind in ("adapter", "wide", "head"):
        width_sigma = 4.0 if cand.kind == "wide" else sigma
        config = MiMiConfig(init_compression=width_sigma, target_compression=width_sigma, **options)
        recipe.update(epochs_per_round=total)
    else:
        if cand.schedule == "paper":
            recipe.update(common.paper_schedule(epochs_per_round))
        elif cand.schedule == "long_last":
            recipe.update(epochs_per_round=1, final_epochs=total - rounds)
        elif cand.schedule == "long_ends":
            recipe.update(first_epochs=epochs_per_round, epochs_per_round=1,
                          final_epochs=total - epochs_per_round - (rounds - 1))
        elif cand.schedule == "rounds_1":
            options.setdefault("prune_ratio", ratio_for_rounds(initial, budget, total - 1))
            recipe.update(epochs_per_round=1, final_epochs=1)
        elif cand.schedule == "one_shot":
            options.setdefault("prune_ratio", ratio_for_rounds(initial, budget, 1))
            recipe.update(epochs_per_round=total // 2, final_epochs=total - total // 2)
        elif cand.schedule in ("cubic", "continuous", "callback_default"):
            recipe.update(epochs_per_round=total)
        recipe.update(restart_lr=cand.restart_lr)
        config = MiMiConfig(init_compression=4.0, target_compression=sigma, **options)
    config.modules_to_save, config.seed = ["classifier"], seed
    if cand.kind == "head":
        peft_model = common.build(common.Method("linear", "head"), model, seed)
    else:
        peft_model = get_peft_model(model, config)
    trained: nn.Module = peft_model
    n_train = min(max_train, len(data["train"]))
    if cand.schedule == "cubic" and cand.kind == "mimi":
        trained = Gradual(peft_model, total_steps=total * math.ceil(n_train / 64))
    elif cand.schedule in ("continuous", "callback_default") and cand.kind == "mimi":  # the callback's cut steps
        callback = MiMiPruningCallback(epochs_per_round=epochs_per_round if cand.schedule == "continuous" else None)
        trained = Continuous(peft_model, callback.plan(total * math.ceil(n_train / 64), total, rounds))
    elif cand.kd is not None:
        trained = Distilled(peft_model, *cand.kd)
    elif cand.group_lasso:
        trained = GroupSparse(peft_model, cand.group_lasso)
    elif cand.neuron_drop:
        trained = NeuronDropout(peft_model, cand.neuron_drop)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        result = train(trained, data, Path(scratch) / "run", common.BenchmarkRecipe(**recipe),
                       processor=processor)
    wall = time.perf_counter() - start
    epochs = result.history[-1]["epoch"]
    if epochs != total:
        raise RuntimeError(f"{cand.name} trained {epochs} epochs, the comparison needs {total}")
    tuner = getattr(peft_model, "base_model", None) if cand.kind != "head" else None
    params = tuner.live_params() if tuner is not None else 0
    if params > budget and cand.kind != "wide":
        raise RuntimeError(f"{cand.name} ended with {params} adapter parameters, above the budget {budget}")
    return {"candidate": cand.name, "backbone": backbone, "task": task, "sigma": sigma, "seed": seed,
            "E": epochs_per_round, "epochs": epochs, "accuracy": result.accuracy, "params": params,
            "budget": budget, "widths": tuner.adapter_widths() if tuner is not None else None, "wall_s": round(wall, 2),
            "rounds": [{"accuracy": r["accuracy"], "live_params": r["live_params"], "epoch": r["epoch"]}
                       for r in result.history], "lr": lr,
            "recipe": {k: recipe.get(k) for k in ("first_epochs", "epochs_per_round", "final_epochs", "restart_lr")}}


# -------------------------------------------------------------------------------------------- reporting
def cell_key(row: dict) -> tuple:
    return row["backbone"], row["task"], row["sigma"], row["E"]


def compare(rows: list[dict], name: str, cell: tuple) -> dict | None:
    """Mean ± std of ``name`` in ``cell`` and its wins/ties/losses per seed against vanilla."""
    mine = {r["seed"]: r for r in rows if cell_key(r) == cell and r["candidate"] == name}
    base = {r["seed"]: r for r in rows if cell_key(r) == cell and r["candidate"] == "vanilla"}
    if not mine:
        return None
    accs = [100 * r["accuracy"] for r in mine.values()]
    mean, std = common.mean_std(accs)
    diffs = [100 * (mine[s]["accuracy"] - base[s]["accuracy"]) for s in sorted(mine) if s in base]
    return {"mean": mean, "std": std, "n": len(accs), "diff": statistics.fmean(diffs) if diffs else None,
            "wins": sum(d >= TIE for d in diffs), "ties": sum(abs(d) < TIE for d in diffs),
            "losses": sum(d <= -TIE for d in diffs), "wall_s": statistics.fmean(r["wall_s"] for r in mine.values())}


def publish(args, rows: list[dict], final: bool) -> None:
    cells = sorted({cell_key(r) for r in rows})
    names = [n for n in args.candidates if any(r["candidate"] == n for r in rows)]
    names += sorted({r["candidate"] for r in rows} - set(names))
    budgets = sorted({cell[3] for cell in cells})
    header = ["candidate", *[f"{b} {t} σt={s:g} E={e}" for b, t, s, e in cells],
              *[f"mean Δ, W/T/L at E={e}" for e in budgets]]
    body, summary = [], {}
    for name in names:
        line, per_e = [name], {e: ([], [0, 0, 0]) for e in budgets}
        for cell in cells:
            c = compare(rows, name, cell)
            if c is None:
                line.append("—")
                continue
            text = f"{c['mean']:.1f} ± {c['std']:.1f}"
            if name != "vanilla" and c["diff"] is not None:
                text += f" ({c['diff']:+.1f}; {c['wins']}/{c['ties']}/{c['losses']})"
                deltas, wtl = per_e[cell[3]]
                deltas.append(c["diff"])
                wtl[:] = [wtl[0] + c["wins"], wtl[1] + c["ties"], wtl[2] + c["losses"]]
            line.append(text + f" [{c['wall_s']:.0f} s]")
        for e, (deltas, wtl) in per_e.items():
            line.append(f"{statistics.fmean(deltas):+.2f} ({len(deltas)} cells), {'/'.join(map(str, wtl))}"
                        if deltas else "—")
            summary.setdefault(name, {})[f"E={e}"] = {"mean_diff": statistics.fmean(deltas) if deltas else None,
                                                      "wtl": wtl, "cells": len(deltas)}
        body.append(line)
    helps = [f"- **{n}**: {describe(n)}" for n in names]
    lines = [f"# Beyond the paper: pruned adapters vs vanilla adapters of the same size "
             f"({'final' if final else 'PARTIAL: still running or interrupted'})", "",
             "Each cell: test accuracy % (mean ± std over seeds), then (mean difference to vanilla adapters of the "
             f"same final parameters and the same total epochs; wins/ties/losses per seed, tie = |Δ| < {TIE} points) "
             "and [mean wall time per run]. σ0 = 4 → σt; total epochs = (R+1)·E of the paper's schedule (ρ 0.5); "
             f"AdamW lr {args.lr:g} (head too), batch 64, warm-up + cosine per round (unless the candidate says "
             f"otherwise), train ≤ {args.max_train} class-balanced images, test ≤ {args.max_test}, fresh heads, "
             f"{args.threads} CPU thread(s).", "",
             common.table(header, body), "", "Candidates:", "", *helps, ""]
    if args.notes:
        lines += [Path(args.notes).read_text() if Path(args.notes).is_file() else args.notes]
    common.write_results(args.out, "beyond", {"config": {k: v for k, v in vars(args).items() if k != "out"},
                                              "rows": rows, "summary": summary, "final": final}, "\n".join(lines))
    plot(rows, cells, names, args.out / "beyond.png")


def plot(rows: list[dict], cells: list[tuple], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [n for n in names if n != "vanilla"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown) + 2), 3.6))
    width = 0.8 / max(1, len(cells))
    for k, cell in enumerate(cells):
        means, errs = [], []
        for name in shown:
            mine = {r["seed"]: r for r in rows if cell_key(r) == cell and r["candidate"] == name}
            base = {r["seed"]: r for r in rows if cell_key(r) == cell and r["candidate"] == "vanilla"}
            diffs = [100 * (mine[s]["accuracy"] - base[s]["accuracy"]) for s in mine if s in base]
            means.append(statistics.fmean(diffs) if diffs else float("nan"))
            errs.append(statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
        ax.bar([i + k * width for i in range(len(shown))], means, width, yerr=errs, capsize=2,
               label=f"{cell[0]} {cell[1]} σt={cell[2]:g} E={cell[3]}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(cells) - 1) / 2 for i in range(len(shown))], shown, rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("accuracy − vanilla (points)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["fmnist-swin"],
                        help="built-in backbone names; NAME@SIZE trains and evaluates at SIZE px (dinov2-s14@56)")
    parser.add_argument("--tasks", nargs="+", default=["digits", "textures"])
    parser.add_argument("--sigmas", nargs="+", type=float, default=[64.0, 256.0])
    parser.add_argument("--epochs-per-round", nargs="+", type=int, default=[2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES),
                        help=f"names among {list(CANDIDATES)}, or combinations joined by '+'")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--max-test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in beyond.json")
    parser.add_argument("--notes", default="", help="text (or a file) appended to beyond.md")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--publish-only", action="store_true", help="rewrite beyond.{md,png} from beyond.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbones, args.tasks, args.sigmas, args.seeds = [common.SMOKE], ["digits"], [16.0], [0]
        args.candidates = ["vanilla", "paper", "local", "gradient", "cubic", "kd", "drop_0.1", "one_cosine",
                           "continuous", "long_last+one_cosine"]
        args.max_train, args.max_test, args.epochs_per_round = 48, 32, [1]
    if "vanilla" not in args.candidates:
        args.candidates = ["vanilla", *args.candidates]
    for name in args.candidates:
        candidate(name)  # unknown names fail before any training
    torch.set_num_threads(args.threads)
    path = args.out / "beyond.json"
    rows = json.loads(path.read_text())["rows"] if args.resume and path.is_file() else []
    done = {(r["candidate"], *cell_key(r), r["seed"]) for r in rows}
    if args.publish_only:
        return publish(args, rows, final=json.loads(path.read_text()).get("final", False))
    for e in args.epochs_per_round:
        for backbone in args.backbones:
            for task in args.tasks:
                for sigma in args.sigmas:
                    for seed in args.seeds:
                        for name in args.candidates:
                            if (name, backbone, task, sigma, e, seed) in done:
                                continue
                            row = run_one(candidate(name), backbone, task, sigma, seed, e, args.lr, args.max_train,
                                          args.max_test)
                            rows.append(row)
                            done.add((name, backbone, task, sigma, e, seed))
                            print(f"{backbone} {task} σt={sigma:g} E={e} seed {seed} {name}: "
                                  f"{100 * row['accuracy']:.1f} ({row['params']} params, {row['wall_s']:.0f} s)",
                                  flush=True)
                            publish(args, rows, final=False)
    publish(args, rows, final=True)


if __name__ == "__main__":
    main()
