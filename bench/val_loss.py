"""Validation-loss speed: medlora's `validation_loss` (sorted by length, 4,096-token batches, no autograd, bf16
autocast) against the Trainer's own evaluation loop (batches of 8 in data order), side by side on the demo's model
and validation split. See docs/benchmarks.md.

    python bench/val_loss.py             # gemma3-270m + LoRA (the demo recipe's), data/medqa/valid.jsonl
    python bench/val_loss.py --quick     # the first 64 records

Both are timed twice, alternating; the medians are compared and both losses printed (the Trainer averages its
per-batch means, medlora takes the mean over all supervised tokens, so the two values differ a little).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def compare(n: int | None = None, base_model: str = "gemma3-270m") -> dict:
    """Both paths on the first `n` validation records (all when None), alternating twice: median seconds and the
    last loss of each. bench/run.py's val_loss_speedup line is this measurement."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medlora.data import load_records
    from medlora.modeling import attach_lora, configure_threads, load_base_model, load_tokenizer
    from medlora.templates import load_template
    from medlora.tokenize import tokenize_records
    from medlora.fastloss import validation_loss
    from medlora.train import SupervisedLossTrainer

    configure_threads()
    records = load_records(REPO / "data" / "medqa" / "valid.jsonl")[:n]
    tokenizer = load_tokenizer(base_model, padding_side="right")
    examples, _ = tokenize_records(records, load_template("med_template"), tokenizer)
    dataset = Dataset.from_list(examples)
    model = attach_lora(load_base_model(base_model), 16, 32, 0.0, "all-linear")
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=-100, padding=True)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    with tempfile.TemporaryDirectory() as out:
        trainer = SupervisedLossTrainer(model=model, args=TrainingArguments(
            output_dir=out, per_device_eval_batch_size=8, bf16=bf16, use_cpu=not torch.cuda.is_available(),
            report_to="none", remove_unused_columns=False, label_names=["labels"], disable_tqdm=True),
            eval_dataset=dataset, data_collator=collator)
        times = {"trainer": [], "medlora": []}
        values = {}
        for _ in range(2):
            started = time.perf_counter()
            values["trainer"] = Trainer.evaluate(trainer)["eval_loss"]  # the Trainer's own loop
            times["trainer"].append(time.perf_counter() - started)
            started = time.perf_counter()
            values["medlora"] = validation_loss(model, dataset, collator, bf16=bf16)
            times["medlora"].append(time.perf_counter() - started)
    return {"n": len(records), "base_model": base_model, "bf16": bf16,
            "trainer_s": statistics.median(times["trainer"]), "medlora_s": statistics.median(times["medlora"]),
            "trainer_loss": values["trainer"], "medlora_loss": values["medlora"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first 64 validation records only")
    parser.add_argument("--base_model", default="gemma3-270m")
    args = parser.parse_args()
    r = compare(64 if args.quick else None, args.base_model)
    print(f"{r['n']} validation records, {r['base_model']}, bf16={r['bf16']}")
    print(f"Trainer's loop: {r['trainer_s']:.1f} s (loss {r['trainer_loss']:.4f}); medlora: {r['medlora_s']:.1f} s "
          f"(loss {r['medlora_loss']:.4f}); {r['trainer_s'] / r['medlora_s']:.2f}x")


if __name__ == "__main__":
    main()
