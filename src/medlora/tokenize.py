"""Prompt building, label masking and truncation accounting for supervised fine-tuning.

Prompt and answer are tokenised separately and concatenated, so the mask boundary is exact and the model
sees at inference the same prompt tokens it saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass

from medlora.templates import Template

IGNORE_INDEX = -100


@dataclass
class TokenizeStats:
    """What happened to the records on their way to token ids; reported before training starts."""

    n_records: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_supervised_tokens: int = 0

    def summary(self) -> str:
        return (
            f"{self.n_records} records tokenised: {self.n_truncated} truncated at cutoff_len, "
            f"{self.n_dropped} dropped (no answer token left), {self.n_supervised_tokens} supervised tokens"
        )


def mask_prompt_labels(prompt_ids: list[int], answer_ids: list[int]) -> list[int]:
    """Labels for prompt + answer: the prompt is never a training target."""
    return [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)


def tokenize_records(
    records: list[dict],
    template: Template,
    tokenizer,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
) -> tuple[list[dict], TokenizeStats]:
    """Token ids, attention mask and labels for each record; records left with no target are dropped."""
    prompts = [template.build_prompt(r["instruction"], r["input"], tokenizer, knowledge=r.get("knowledge"))
               for r in records]
    # The prompt gets the tokenizer's usual specials (e.g. Gemma's <bos>); the answer none, then EOS.
    prompt_ids = tokenizer(prompts, add_special_tokens=not template.use_chat_template)["input_ids"]
    answer_ids = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos_token and tokenizer.eos_token_id is not None else []

    examples, stats = [], TokenizeStats(n_records=len(records))
    for prompt, answer in zip(prompt_ids, answer_ids):
        input_ids = prompt + answer + eos
        labels = list(input_ids) if train_on_inputs else mask_prompt_labels(prompt, answer + eos)
        if len(input_ids) > cutoff_len:
            stats.n_truncated += 1
            input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
        n_targets = sum(label != IGNORE_INDEX for label in labels[1:])
        if n_targets == 0:
            stats.n_dropped += 1
            continue
        stats.n_supervised_tokens += n_targets
        examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return examples, stats
