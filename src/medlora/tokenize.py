"""Prompt building, label masking and truncation accounting for supervised fine-tuning.

Prompt and answer are tokenised separately and concatenated, so the mask boundary is exact and the model
sees at inference the same prompt tokens it saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medlora.templates import Template

IGNORE_INDEX = -100


@dataclass
class TokenizeStats:
    """What happened to the records on their way to token ids; reported before training starts."""

    n_records: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_supervised_tokens: int = 0
    n_conversations: int = 0  # records with earlier turns
    n_turns_cut: int = 0  # earlier (user, assistant) turns left out so that the newest ones fit cutoff_len
    data_sha256: dict = field(default_factory=dict)  # {file read: sha256 of the bytes read}

    def summary(self) -> str:
        turns = (f", {self.n_conversations} multi-turn ({self.n_turns_cut} oldest turn(s) left out to fit "
                 f"cutoff_len)" if self.n_conversations else "")
        return (
            f"{self.n_records} records tokenised{turns}: {self.n_truncated} truncated at cutoff_len, "
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
    train_on_last_turn_only: bool = False,
) -> tuple[list[dict], TokenizeStats]:
    """Token ids, attention mask and labels for each record; records left with no target are dropped.

    A record is rendered by `template.render` (its `history` of earlier turns and its `system` text included) and
    each piece is tokenised on its own, so the boundary between prompt and answer is exact. Labels cover every
    answer piece (the assistant's turns, each with its turn end), or the last one only. A conversation longer than
    `cutoff_len` loses its oldest turns first; a single turn that is still too long is cut at the end.
    """
    examples, stats = [], TokenizeStats(n_records=len(records))
    rendered = [_pieces(r, template, tokenizer, add_eos_token) for r in records]
    for record, pieces in zip(records, _tokenize_pieces(rendered, template, tokenizer)):
        history = list(record.get("history") or ())
        stats.n_conversations += bool(history)
        if sum(map(len, pieces)) > cutoff_len and history:
            def tokenized(kept: list) -> list[list[int]]:
                return _tokenize_pieces([_pieces({**record, "history": kept}, template, tokenizer, add_eos_token)],
                                        template, tokenizer)[0]

            cut = oldest_turns_to_drop(history, lambda kept: sum(map(len, tokenized(kept))) <= cutoff_len)
            stats.n_turns_cut += cut
            pieces = tokenized(history[cut:])
        input_ids, labels = [], []
        last_answer = len(pieces) - 1
        for index, ids in enumerate(pieces):
            supervised = train_on_inputs or (index % 2 == 1 and (index == last_answer or not train_on_last_turn_only))
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
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


def oldest_turns_to_drop(history: list, fits) -> int:
    """The fewest oldest turns of `history` to leave out so that `fits(history[cut:])` (all of them when even
    none fits), by binary search: dropping one turn at a time and rendering again was quadratic (2,000 turns took
    30 s, 10,000 more than two minutes). `fits` is monotone: fewer turns never make a longer prompt."""
    low, high = 0, len(history)
    while low < high:
        middle = (low + high) // 2
        if fits(history[middle:]):
            high = middle
        else:
            low = middle + 1
    return low


def _pieces(record: dict, template: Template, tokenizer, add_eos_token: bool) -> list[str]:
    pieces = template.render(record["instruction"], record["input"], tokenizer, record.get("history") or (),
                             record.get("knowledge"), record.get("system"), answer=record["output"])
    end = template.turn_end(tokenizer)
    if not add_eos_token and end and pieces[-1].endswith(end):
        pieces[-1] = pieces[-1][:-len(end)]
    return pieces


def _tokenize_pieces(rendered: list[list[str]], template: Template, tokenizer) -> list[list[list[int]]]:
    """Token ids of every piece; the first piece of each record gets the tokenizer's special tokens when the
    template asks for them. Two batched tokenizer calls for all records."""
    firsts = tokenizer([pieces[0] for pieces in rendered], add_special_tokens=template.add_special_tokens)["input_ids"]
    rest = [piece for pieces in rendered for piece in pieces[1:]]
    rest_ids = iter(tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else [])
    return [[first, *(next(rest_ids) for _ in pieces[1:])] for first, pieces in zip(firsts, rendered)]


def tokenize_pairs(records: list[dict], template: Template, tokenizer, cutoff_len: int = 256
                   ) -> tuple[list[dict], TokenizeStats]:
    """`prompt_ids`, `chosen_ids` and `rejected_ids` of preference pairs (records whose `output` is the chosen
    answer and `rejected` the other), rendered and tokenised exactly as supervised fine-tuning renders a record,
    so that a preference stage sees the prompts its SFT adapter was trained on. A pair longer than `cutoff_len`
    loses its oldest turns first, then the answers' ends; a pair with no answer token left is dropped."""
    examples, stats = [], TokenizeStats(n_records=len(records))
    for record in records:
        history = list(record.get("history") or ())
        stats.n_conversations += bool(history)

        def tokenized(kept: list) -> tuple[list[list[int]], list[list[int]], list[int], int]:
            turn = {**record, "history": kept}
            chosen, rejected = _tokenize_pieces([_pieces(turn, template, tokenizer, True),
                                                 _pieces({**turn, "output": record["rejected"]}, template, tokenizer,
                                                         True)], template, tokenizer)
            prompt_ids = [token for ids in chosen[:-1] for token in ids]
            return chosen, rejected, prompt_ids, len(prompt_ids) + max(len(chosen[-1]), len(rejected[-1]))

        chosen, rejected, prompt_ids, longest = tokenized(history)
        if longest > cutoff_len and history:
            cut = oldest_turns_to_drop(history, lambda kept: tokenized(kept)[3] <= cutoff_len)
            stats.n_turns_cut += cut
            chosen, rejected, prompt_ids, longest = tokenized(history[cut:])
        room = cutoff_len - len(prompt_ids)
        if room < 1:
            stats.n_dropped += 1
            continue
        stats.n_truncated += longest > cutoff_len
        chosen_ids, rejected_ids = chosen[-1][:room], rejected[-1][:room]
        stats.n_supervised_tokens += len(chosen_ids) + len(rejected_ids)
        examples.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return examples, stats
