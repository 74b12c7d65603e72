"""The model card (``README.md``) of a trained MiMi adapter: what was pruned to what, how well it did, how to load it.

:func:`model_card` reads everything structural (widths, feature sizes, budget, rounds, settings) from the MiMi
model itself, so the card cannot disagree with the weights saved next to it; the caller adds what only the
training loop knows (the dataset and the per-round metrics).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .backbones import BUILTIN_BACKBONES
from .model import MiMiModel
from .pruning import adapter_params
from .schedule import standard_error

PAPER = "https://arxiv.org/abs/2311.03873"
# A Hub model id: "name" or "owner/name" (letters, digits, '-', '_', '.'), as the Hub accepts in `base_model`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_model_id(name: str | None) -> bool:
    """True when ``name`` can only be a Hub model id: right shape, not a local path, not a built-in backbone.

    The Hub rejects a card whose ``base_model`` is not a model id, so local paths and built-in names stay out of
    the front matter (they are still named in the text).
    """
    if not name or name in BUILTIN_BACKBONES or not _HUB_ID.match(name):
        return False
    return not Path(name).expanduser().exists()


def _tuner(model: nn.Module) -> MiMiModel:
    tuner = model if isinstance(model, MiMiModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, MiMiModel):
        raise TypeError(f"model_card needs a PEFT model with a MiMi adapter, got {type(model).__name__}.")
    return tuner


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"adapter": live adapter parameters, "head": parameters of modules_to_save, "base": frozen backbone}``.

    Adapter parameters count live neurons only; ``base`` leaves out the adapters and the trained copies of the
    head (PEFT keeps the original head too, counted in ``base``)."""
    head = base = 0
    for name, param in model.named_parameters():
        if ".mimi_" in name:
            continue
        if ".modules_to_save." in name:
            head += param.numel()
        else:
            base += param.numel()
    return {"adapter": _tuner(model).live_params(), "head": head, "base": base}


def saved_round(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The row of ``history`` (one per round, as ``peft_mimi.train`` writes them) whose adapter was saved: the
    budget search's finish of the round it kept (the last row) or, in a run that ended without one, the round it
    chose so far (``chosen_round`` of the last row); else the last round; None for no rows."""
    if not history:
        return None
    if history[-1].get("finish"):
        return history[-1]
    chosen = history[-1].get("chosen_round")
    return next((row for row in history if row.get("round") == chosen), history[-1]) if chosen is not None \
        else history[-1]


def searched_rounds(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of ``history`` that the budget search compared: every round, without its finish's row."""
    return [row for row in history if not row.get("finish")]


def _noise(row: Mapping[str, Any]) -> str:
    """``" on N images, standard error E points"`` for a row with a validation split of known size."""
    images = row.get("validation_images")
    return (f" on {images} images, standard error {standard_error(row['validation_accuracy'], images):.1f} points"
            if images else "")


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


def _format_metric(value: Any, key: str = "") -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if key == "seconds" else f"{value:.4f}"
    return "" if value is None else str(value)


def model_card(
    model: nn.Module,
    *,
    dataset: str | None = None,
    history: Sequence[Mapping[str, Any]] = (),
    base_model: str | None = None,
    repo_id: str | None = None,
    num_labels: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> str:
    """The text of a ``README.md`` for the MiMi adapter of ``model`` (a PEFT model whose adapter is MiMi).

    Front matter: ``library_name: peft``, ``tags`` (mimi, peft, image-classification, ...), ``base_model`` when it
    is a Hub id (see :func:`is_hub_model_id`), the dataset and the
    final accuracy as ``model-index`` results. Body: base model, budget, rounds, parameter counts, the metrics of
    every round (``history``: dicts with ``round``, ``epoch``, ``live_params``, ``accuracy``, ``loss``,
    ``seconds``, and with a validation split ``validation_accuracy`` and the budget search's ``chosen_round``; the
    accuracy reported is the saved round's, see :func:`saved_round`), a per-layer widths table, the training
    ``settings`` and how to load the adapter (from ``repo_id`` when given). Reads the model only; mutates nothing.
    """
    tuner = _tuner(model)
    config = tuner.peft_config[tuner.active_adapters[0]]
    base_model = base_model or config.base_model_name_or_path or "the base model"
    widths, dims = tuner.adapter_widths(), tuner.feature_sizes()
    counts = parameter_counts(model)
    budget, rounds = tuner.budget(), config.rounds_done
    saved = saved_round(history)
    accuracy = saved.get("accuracy") if saved else None
    search = saved.get("chosen_round") is not None if saved else False
    searched = searched_rounds(history)
    kept = next((row for row in searched if row["round"] == saved["round"]), saved) if search else None

    target = (f"σt = {config.effective_target_compression:g}" if config.target_params is None
              else f"{config.target_params:,} parameters")
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model if is_hub_model_id(base_model) else None,
        tags=["mimi", "peft", "image-classification", "adapter", "pruning", "vision-transformer"],
        pipeline_tag="image-classification",
        datasets=[dataset] if dataset and "/" in dataset and is_hub_model_id(dataset) else None,
        metrics=["accuracy"] if accuracy is not None else None,
        model_name=f"mimi-{Path(str(base_model)).name}" if accuracy is not None else None,
        eval_results=[
            EvalResult(task_type="image-classification", dataset_type=dataset or "unknown",
                       dataset_name=dataset or "unknown", dataset_split="test", metric_type="accuracy",
                       metric_value=float(accuracy))
        ] if accuracy is not None else None,
    )

    lines = [
        f"# MiMi adapter for `{base_model}`" + (f" on `{dataset}`" if dataset else ""),
        "",
        f'A [MiMi]({PAPER}) ("Mini but Mighty", WACV 2024) adapter, trained with '
        f"`peft_mimi` as a Hugging Face PEFT method. Bottleneck adapters on the outputs of {len(widths)} Linear "
        "layers (by default the attention output and the MLP output of every block) started with width `d / σ0` "
        "and were pruned neuron by neuron, "
        f"with {config.selection} selection and the `{config.score}` score, down to a budget of {budget:,} adapter "
        "parameters; the adapters (and the classification head) were trained again after every pruning round, "
        "the last one included.",
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_model}` ({counts['base']:,} parameters, frozen) |",
        f"| dataset | `{dataset}` |" if dataset else None,
        f"| test accuracy | {accuracy:.4f} |" if accuracy is not None else None,
        f"| adapter design | {_design(config)} |",
        f"| start width | d / σ0, σ0 = {config.init_compression:g} |",
        f"| budget | {target}: {budget:,} adapter parameters |",
        f"| pruning rounds | {rounds} (ρ = {config.prune_ratio:g}, {config.selection} selection, "
        f"score `{config.score}`) |",
        f"| adapter parameters | {counts['adapter']:,} ({_percent(counts['adapter'], counts['base'])} of the base) |",
        f"| head parameters | {counts['head']:,} |",
        f"| adapters kept | {sum(w > 0 for w in widths.values())} of {len(widths)} |",
        f"| budget search | tolerance {config.budget_tolerance:g} accuracy points on a validation split of the "
        f"training images: kept round {saved['round']} of the {len(searched)} trained alike (validation accuracy "
        f"{kept['validation_accuracy']:.4f}{_noise(kept)}, best {max(r['validation_accuracy'] for r in searched):.4f})"
        + (f", then finished it with {saved['epoch'] - searched[-1]['epoch']} more epochs"
           if saved.get("finish") else "")
        + "; the budget above is the floor it could go to |" if search and config.budget_tolerance is not None
        else None,
    ]
    lines = [line for line in lines if line is not None]
    if history:
        columns = ["round", "epoch", "live_params", "accuracy", "loss", "seconds"]
        if any(row.get("validation_accuracy") is not None for row in history):
            columns.insert(4, "validation_accuracy")
        names = {"epoch": "epochs", "live_params": "adapter params", "accuracy": "test accuracy",
                 "validation_accuracy": "validation accuracy", "loss": "train loss"}
        lines += ["", "## Metrics per round", "",
                  "Round r trains at the widths left by r pruning rounds; accuracy is measured after its training."
                  + (" The budget search trains the rounds alike, keeps one on validation accuracy only, then "
                     "trains the kept round's adapter on (the row marked finished) and saves it (**saved**)."
                     if saved.get("finish") else " The saved adapter is the round marked **saved**, chosen on "
                     "validation accuracy only." if search else ""),
                  "", "| " + " | ".join(names.get(key, key) for key in columns) + " |",
                  "|" + "---:|" * len(columns)]
        for row in history:
            cells = [_format_metric(row.get(key), key) for key in columns]
            if row.get("finish"):
                cells[0] += " finished"
            if search and row is saved:
                cells[0] += " **saved**"
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Adapter widths", "", "Width 0: the adapter was removed and costs nothing.", "",
              "| module | d | width | parameters |", "|---|---:|---:|---:|"]
    for name, width in widths.items():
        params = adapter_params(dims[name], width, **config.param_terms)
        lines.append(f"| `{name}` | {dims[name]} | {width} | {params:,} |")
    lines.append(f"| **total** | | {sum(widths.values())} | {counts['adapter']:,} |")

    source = repo_id or "path/to/adapter"
    labels = f", num_labels={num_labels}" if num_labels else ""
    lines += [
        "", "## How to load", "",
        "```python",
        "import peft_mimi  # registers the MiMi method with PEFT",
        "from peft import PeftModel",
        "from peft_mimi.backbones import load_backbone",
        "",
        f'base, image_processor = load_backbone("{base_model}"{labels})',
        f'model = PeftModel.from_pretrained(base, "{source}")',
        "```",
        "",
        "Or from the command line: `peft-mimi eval ADAPTER --data DATASET` and `peft-mimi info ADAPTER`.",
    ]
    if settings:
        lines += ["", "## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | `{value}` |" for key, value in settings.items() if value is not None]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _design(config) -> str:
    """The adapter's design in words: its activation and the options that change the adapter."""
    parts = [f"`{config.activation}` activation", "biases" if config.adapter_bias else "no biases"]
    if config.channel_scaling:
        parts.append("learned channel scaling (folded into W_up for inference)")
    if config.init_weights == "houlsby":
        parts.append("Houlsby initialisation")
    if config.drop_path:
        parts.append(f"stochastic depth {config.drop_path:g} in training")
    return ", ".join(parts)
