"""The preference stage's step on a CPU: TRL's fused LM head over every position (as TRL runs it on a CPU) against
answer positions only (`medlora.prefer.answers_only_on_cpu`, what `medlora finetune --stage dpo` does), side by
side on the demo's model. See docs/benchmarks.md.

    python bench/prefer_step.py                 # gemma3-270m + a LoRA (the DPO recipe's), 8 pairs of the demo's data
    python bench/prefer_step.py --quick         # tiny-qwen2: checks the script, measures nothing of interest

One forward + backward of the DPO loss on the same batch, timed twice each, alternating; the medians are compared,
and the two losses printed (they must be equal: only where the head is evaluated changes).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def pairs(n: int) -> list[dict]:
    """`n` pairs from the demo's training questions: the golden answer chosen, another question's answer rejected."""
    from medlora.data import load_records

    records = load_records(REPO / "data" / "medqa" / "train.jsonl")[:n + 1]
    return [{**r, "rejected": records[i + 1]["output"]} for i, r in enumerate(records[:n])]


def compare(base_model: str, n: int = 8, cutoff_len: int = 384) -> dict:
    from medlora.config import PreferenceArgs, TrainArgs
    from medlora.modeling import attach_lora, configure_threads, load_base_model, load_tokenizer
    from medlora.prefer import _config, _dataset, _trainer_class, answers_only_on_cpu
    from medlora.templates import load_template
    from medlora.tokenize import tokenize_pairs

    configure_threads()
    tokenizer = load_tokenizer(base_model, padding_side="right")
    examples, _ = tokenize_pairs(pairs(n), load_template("med_template"), tokenizer, cutoff_len)
    model = attach_lora(load_base_model(base_model, "bf16" if base_model != "tiny-qwen2" else "fp32"),
                        16, 32, 0.0, "all-linear")
    with tempfile.TemporaryDirectory() as out:
        args = TrainArgs(output_dir=out, batch_size=n, micro_batch_size=n, max_steps=1, report_to="none")
        config = _config(PreferenceArgs(stage="dpo"), args, cutoff_len, base_model != "tiny-qwen2", False)
        with answers_only_on_cpu():
            trainer = _trainer_class("dpo")(model=model, args=config, train_dataset=_dataset(examples, "dpo"),
                                            processing_class=tokenizer)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

        def step(patched: bool) -> tuple[float, float]:
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            with answers_only_on_cpu() if patched else contextlib.nullcontext():
                loss = trainer.compute_loss(model, batch)
                loss.backward()
            return time.perf_counter() - started, loss.item()

        step(True)  # warm-up (allocations, first-call costs)
        times = {False: [], True: []}
        losses = {}
        for _ in range(2):
            for patched in (False, True):
                seconds, losses[patched] = step(patched)
                times[patched].append(seconds)
    every, answers = statistics.median(times[False]), statistics.median(times[True])
    return {"model": base_model, "pairs": n, "tokens": max(len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in examples),
            "every_position_s": round(every, 2), "answers_only_s": round(answers, 2),
            "speedup": round(every / answers, 2), "loss_every": round(losses[False], 6),
            "loss_answers": round(losses[True], 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-qwen2 instead of gemma3-270m")
    args = parser.parse_args()
    print(compare("tiny-qwen2" if args.quick else "gemma3-270m"))


if __name__ == "__main__":
    main()
