"""MiMi with the Hugging Face Trainer: the pruning schedule runs from a callback.

    python examples/trainer_example.py [--backbone fmnist-vit] [--data digits] [--epochs 8]

The default schedule, as `peft_mimi.train` runs it: one cosine learning-rate schedule over the whole run (the
Trainer's ``lr_scheduler_type="cosine"``), the R pruning rounds early (one every epoch; ``num_train_epochs =
2·(R+1)`` is the paper's length, 8 for σt = 32 from σ0 = 4) and the rest of the run at the final widths; gradients
clipped at norm 5.0 (``max_grad_norm=5.0``; the Trainer's default is 1.0). The paper's recipe instead:
``MiMiPruningCallback.attach(trainer, restart_lr=True, epochs_per_round=2)`` (equal segments, the learning rate
restarted at every round).
"""

from __future__ import annotations

import argparse

import torch
import transformers
from peft import get_peft_model
from transformers import Trainer, TrainingArguments, set_seed

from peft_mimi import MiMiConfig, MiMiPruningCallback
from peft_mimi.backbones import load_backbone
from peft_mimi.data import ImageTransform, dataset_labels, load_image_dataset, make_collate_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="fmnist-vit")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--target-compression", type=float, default=32.0)
    parser.add_argument("--output-dir", default="outputs/trainer_example")
    args = parser.parse_args()

    data = load_image_dataset(args.data)
    names, id2label, label2id = dataset_labels(data)
    set_seed(0)  # the new head and W_down start the same in every run (the Trainer seeds only its own steps)
    backbone, processor = load_backbone(args.backbone, num_labels=len(names), id2label=id2label, label2id=label2id)
    model = get_peft_model(backbone, MiMiConfig(target_compression=args.target_compression,
                                                modules_to_save=["classifier"]))
    model.print_trainable_parameters()

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=64,
        learning_rate=2e-3,
        weight_decay=0.05,
        max_grad_norm=5.0,  # the paper's gradient clipping
        lr_scheduler_type="cosine",  # one warm-up + cosine over the whole run, continued across the cuts
        # a ratio: 10 % of the run (transformers 5 takes it as warmup_steps=0.1, 4.x only as warmup_ratio=0.1)
        **{"warmup_steps" if int(transformers.__version__.split(".")[0]) >= 5 else "warmup_ratio": 0.1},
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        data_collator=make_collate_fn(ImageTransform.from_processor(processor, train=True, flip=False),
                                      num_labels=len(names)),
    )
    callback = MiMiPruningCallback.attach(trainer)  # the pruning rounds, early in the run
    trainer.train()
    print(f"pruning rounds after steps {callback.prune_steps} of {trainer.state.max_steps}")

    model.eval()
    evaluate = make_collate_fn(ImageTransform.from_processor(processor, train=False), num_labels=len(names))
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data["test"]), 256):
            batch = evaluate([data["test"][i] for i in range(start, min(start + 256, len(data["test"])))])
            correct += (model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum().item()
    tuner = model.base_model
    print(f"test accuracy {correct / len(data['test']):.4f} with {tuner.live_params():,} adapter parameters "
          f"(budget {tuner.budget():,})")
    for name, width in tuner.adapter_widths().items():
        print(f"  {name:<50} width {width}")
    model.save_pretrained(f"{args.output_dir}/adapter")


if __name__ == "__main__":
    main()
