"""Evaluation metrics over answered records (`results.jsonl` rows) and the terminal table.

Chinese has no spaces, so ROUGE and BLEU are computed on characters: ROUGE with `rouge-score` and a tokenizer
that yields one token per character (whitespace and punctuation dropped), BLEU-4 with `sacrebleu`'s `zh`
tokenisation (each CJK character a token, Latin words kept whole). Multiple-choice answers are reduced to an
option letter A-E by `extract_choice`; see docs/evaluation.md for the rules.
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
from dataclasses import dataclass

from medlora.errors import DataError

LETTERS = "ABCDE"
_LETTER = rf"[{LETTERS}]"
_NOT_WORD = r"(?![A-Za-z0-9])"  # the letter stands alone: "B项" yes, "B12" or "Beta" no
_OPEN = r"[(（\[【]"
_CLOSE = r"[)）\]】]"
_MARK = r"[.．、:：)）\]】]"  # what follows an option letter in "A. 肝硬化", "B、", "C）"


# --- text normalisation and tokens --------------------------------------------------------------------------

def _is_punct_or_space(char: str) -> bool:
    return char.isspace() or unicodedata.category(char)[0] in "PZ"


def char_tokens(text: str) -> list[str]:
    """One token per character after NFKC and lower-casing; whitespace and punctuation (Chinese and ASCII) dropped."""
    return [c for c in unicodedata.normalize("NFKC", text or "").lower() if not _is_punct_or_space(c)]


def normalise(text: str) -> str:
    """The text exact match compares: NFKC (full-width → half-width), lower case, no whitespace or punctuation."""
    return "".join(char_tokens(text))


class CharTokenizer:
    """The tokenizer object `rouge_score.RougeScorer` takes: `tokenize(text) -> list[str]`."""

    def tokenize(self, text: str) -> list[str]:
        return char_tokens(text)


# --- ROUGE, BLEU, exact match -----------------------------------------------------------------------------

_scorer = None


def rouge_scores(pred: str, ref: str) -> dict[str, float]:
    """Character-level ROUGE-1, ROUGE-2 and ROUGE-L F1 (0..1) of one answer against its reference."""
    global _scorer
    if _scorer is None:
        from rouge_score.rouge_scorer import RougeScorer

        _scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CharTokenizer())
    scores = _scorer.score(ref, pred)  # rouge-score takes (target, prediction)
    return {name: score.fmeasure for name, score in scores.items()}


def bleu4(preds: list[str], refs: list[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, `zh` tokenisation), scaled to 0..1."""
    from sacrebleu.metrics import BLEU

    if not preds:
        return 0.0
    return min(BLEU(tokenize="zh").corpus_score(list(preds), [list(refs)]).score / 100, 1.0)


def exact_match(pred: str, ref: str) -> bool:
    return normalise(pred) == normalise(ref)


# --- multiple choice ---------------------------------------------------------------------------------------

_OPTION = re.compile(rf"(?:^|(?<=\s)|(?<={_OPEN}))({_LETTER})\s*{_MARK}\s*(.+?)"
                     rf"(?=\s+{_OPEN}?{_LETTER}\s*{_MARK}|\s*$|\s*\n)", re.M)

# Tried in order; the first pattern that matches decides (and within it, the first hit).
_CHOICE_PATTERNS = [re.compile(p) for p in [
    # the answer is A / Answer: (B) / option C
    rf"(?i:answer|option)\s*(?i:is)?\s*[:：]?\s*{_OPEN}?\s*({_LETTER}){_NOT_WORD}",
    # 答案: A / 答案：B / 正确答案是C / 正确选项为 D / 答案应为（E）
    rf"(?:正确)?(?:答案|选项)\s*(?:应该|应)?\s*(?:是|为|选)?\s*[:：]?\s*{_OPEN}?\s*({_LETTER}){_NOT_WORD}",
    # 故选E / 应选 B / 选择C / 我选B
    rf"选(?:择)?\s*[:：]?\s*{_OPEN}?\s*({_LETTER}){_NOT_WORD}",
    # an answer that starts with its letter: "C", "A. 肝硬化", "(D) …", "B、…"
    rf"^\s*{_OPEN}?\s*({_LETTER})\s*(?:{_MARK}|\s|$)",
    # B项 / C选项
    rf"(?<![A-Za-z])({_LETTER})\s*(?:选)?项",
    # (D) anywhere
    rf"{_OPEN}\s*({_LETTER})\s*{_CLOSE}",
    # 我认为是 C / 应该是B
    rf"是\s*({_LETTER}){_NOT_WORD}",
]]


# A restated option list, `选项: 妇科(A)、儿科(B)、…。` (the built-in data's answers begin with one): it names every
# letter, so it chooses none; an answer cut off inside or right after it must not count as choosing (A).
_RESTATED = re.compile(rf"选项\s*[:：]\s*(?:[^、,，。\n]+?{_OPEN}{_LETTER}{_CLOSE}\s*[、,，]?\s*){{2,}}[。.]?")


def parse_options(text: str) -> dict[str, str]:
    """Options listed as `A. …` (or `A、…`, `(A) …`), one a line or several on one line: {letter: text}."""
    text = unicodedata.normalize("NFKC", text or "")
    options = {}
    for letter, body in _OPTION.findall(text):
        options.setdefault(letter, body.strip())
    return options if len(options) >= 2 else {}


def _choice_by_option_text(answer: str, options: dict[str, str]) -> str | None:
    """The single option whose text the answer names (a longer option text wins over one it contains)."""
    said = normalise(answer)
    named = {letter: normalise(body) for letter, body in options.items() if normalise(body) and normalise(body) in said}
    named = {k: v for k, v in named.items() if not any(v != w and v in w for w in named.values())}
    return next(iter(named)) if len(named) == 1 else None


def extract_choice(answer: str, instruction: str = "", options: dict[str, str] | None = None) -> str | None:
    """The option letter (A-E) a free-text answer chooses, or None when it names none (or several)."""
    text = _RESTATED.sub(" ", unicodedata.normalize("NFKC", answer or "")).strip()
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1)
    options = {**parse_options(instruction), **(options or {})}
    return _choice_by_option_text(text, options) if options else None


def golden_option(golden: str) -> dict[str, str]:
    """{letter: text} when the golden answer is written as one option, e.g. `C. 肝硬化`."""
    text = unicodedata.normalize("NFKC", golden or "")
    match = re.match(rf"\s*{_OPEN}?\s*({_LETTER})\s*{_MARK}\s*(?![a-z])(\S.*)", text)  # not "E. coli"
    return {match.group(1): match.group(2).splitlines()[0].strip()} if match else {}


def golden_choice(golden: str, instruction: str = "") -> str | None:
    """The golden option letter: `C`, `(C)`, `答案: C\\n解析: …`, `C. 肝硬化`; or, when the instruction lists options,
    the option the golden answer names. None for a record that is not multiple choice."""
    text = unicodedata.normalize("NFKC", golden or "").strip()
    strict = [rf"^{_OPEN}?\s*({_LETTER})\s*{_CLOSE}?\s*[.．、]?$",
              rf"^(?:正确)?答案\s*(?:是|为)?\s*[:：]?\s*{_OPEN}?\s*({_LETTER}){_NOT_WORD}"]
    for pattern in strict:
        match = re.match(pattern, text)
        if match:
            return match.group(1)
    option = golden_option(text)
    if option:
        return next(iter(option))
    return extract_choice(text, instruction) if parse_options(instruction) else None


# --- scoring results.jsonl rows ------------------------------------------------------------------------------

@dataclass
class Metric:
    """One column of the metrics table: its key in metrics.json, its header, and which way is better."""

    key: str
    header: str
    better: str | None = "high"  # "high", "low", or None (no best value)
    fmt: str = ".3f"  # how the terminal and the reports show it


METRICS = [
    Metric("n", "n", None, "d"),
    Metric("rouge1", "ROUGE-1"), Metric("rouge2", "ROUGE-2"), Metric("rougeL", "ROUGE-L"), Metric("bleu4", "BLEU-4"),
    Metric("exact_match", "EM"), Metric("mcq_accuracy", "MCQ acc"), Metric("mcq_n", "MCQ n", None, "d"),
    Metric("eos_rate", "EOS rate"), Metric("avg_answer_chars", "chars", None, ".1f"),
    Metric("tokens_per_s", "tok/s", "high", ".1f"), Metric("eval_loss", "loss", "low"),
    Metric("perplexity", "ppl", "low", ".4g"),
]


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _round(value):
    return None if value is None else round(float(value), 4)


def _check_rows(rows: list[dict]) -> None:
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "output" not in row or "instruction" not in row:
            raise DataError(f"result {i}: expected an object with 'instruction', 'golden' and 'output' "
                            f"(a results.jsonl row written by medlora infer/eval)")


def record_scores(row: dict) -> dict:
    """Per-record scores: ROUGE F1s, exact match, and the golden/chosen option letters (None when not MCQ)."""
    golden, output, instruction = row.get("golden") or "", row.get("output") or "", row.get("instruction") or ""
    scores = {**rouge_scores(output, golden), "exact_match": exact_match(output, golden)} if golden.strip() else {}
    gold_letter = golden_choice(golden, instruction) if golden.strip() else None
    if gold_letter:
        options = {**parse_options(instruction), **golden_option(golden)}
        scores.update(golden_choice=gold_letter, choice=extract_choice(output, instruction, options))
    return scores


def per_record_rouge_l(rows: list[dict]) -> list[float | None]:
    """Each record's ROUGE-L F1 (None where the record has no golden answer)."""
    return [record_scores(row).get("rougeL") for row in rows]


def score_results(rows: list[dict]) -> dict:
    """The metrics of one model's answered records (rows of results.jsonl); rates and F1s are 0..1."""
    _check_rows(rows)
    per_record = [record_scores(row) for row in rows]
    golden_rows = [(row, s) for row, s in zip(rows, per_record) if "rougeL" in s]
    mcq = [s for s in per_record if s.get("golden_choice")]
    eos = [bool(row["ended_by_eos"]) for row in rows if "ended_by_eos" in row]
    seconds = sum(float(row.get("seconds") or 0) for row in rows)
    tokens = sum(int(row.get("tokens") or 0) for row in rows)
    metrics = {
        "n": len(golden_rows),
        "rouge1": _mean(s["rouge1"] for _, s in golden_rows),
        "rouge2": _mean(s["rouge2"] for _, s in golden_rows),
        "rougeL": _mean(s["rougeL"] for _, s in golden_rows),
        "bleu4": bleu4([r["output"] or "" for r, _ in golden_rows], [r["golden"] for r, _ in golden_rows])
        if golden_rows else None,
        "exact_match": _mean(float(s["exact_match"]) for _, s in golden_rows),
        "mcq_accuracy": _mean(float(s["choice"] == s["golden_choice"]) for s in mcq),
        "mcq_n": len(mcq),
        "eos_rate": _mean(float(e) for e in eos),
        "avg_answer_chars": _mean(len(row.get("output") or "") for row in rows),
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
    }
    return {key: value if key in ("n", "mcq_n") else _round(value) for key, value in metrics.items()}


# --- perplexity ----------------------------------------------------------------------------------------------

def perplexity(generator_or_model, tokenizer, template, records: list[dict], batch_size: int = 8,
               cutoff_len: int = 1024) -> dict:
    """{"eval_loss": mean supervised token loss on the golden answers (prompt masked), "perplexity": exp(loss)}.

    `generator_or_model` is a `Generator` (then `tokenizer` and `template` may be None: its own are used) or a model.
    """
    import torch

    from medlora.errors import MedloraError
    from medlora.fastloss import IGNORE_INDEX, supervised_loss
    from medlora.tokenize import tokenize_records

    model = getattr(generator_or_model, "model", generator_or_model)
    tokenizer = tokenizer or generator_or_model.tokenizer
    template = template or generator_or_model.template
    examples, _ = tokenize_records(list(records), template, tokenizer, cutoff_len=cutoff_len)
    if not examples:
        raise MedloraError("perplexity: no record has a golden answer token left after tokenisation")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            width = max(len(e["input_ids"]) for e in batch)

            def padded(key, value):
                return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in batch], device=device)

            inputs = {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
                      "labels": padded("labels", IGNORE_INDEX)}
            loss_sum, n = supervised_loss(model, inputs)
            total, count = total + float(loss_sum), count + n
    model.train(was_training)
    loss = total / count
    return {"eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 700)), 3)}


# --- terminal table ------------------------------------------------------------------------------------------

def best_labels(metrics_by_label: dict[str, dict]) -> dict[str, set[str]]:
    """For each metric with a direction: the labels holding its best value (only where 2+ models differ)."""
    best = {}
    for metric in METRICS:
        values = {label: m.get(metric.key) for label, m in metrics_by_label.items() if m.get(metric.key) is not None}
        if metric.better is None or len(set(values.values())) < 2:
            continue
        target = (max if metric.better == "high" else min)(values.values())
        best[metric.key] = {label for label, v in values.items() if v == target}
    return best


def shown_metrics(metrics_by_label: dict[str, dict]) -> list[Metric]:
    """The columns worth showing: those some model has a value for."""
    return [m for m in METRICS if any(mm.get(m.key) is not None for mm in metrics_by_label.values())]


def format_value(value, metric: Metric) -> str:
    return "-" if value is None else format(value, metric.fmt)


def print_metrics_table(metrics_by_label: dict[str, dict], file=None) -> None:
    """An aligned table, one row per model; the best value of each column is bold and starred."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    file = file or sys.stdout
    console = Console(file=file, width=None if file.isatty() else 160)
    columns = shown_metrics(metrics_by_label)
    best = best_labels(metrics_by_label)
    table = Table(title="evaluation" + (" (* = best)" if best else ""), title_justify="left")
    table.add_column("model", style="bold")
    for metric in columns:
        table.add_column(metric.header, justify="right")
    for label, metrics in metrics_by_label.items():
        cells = []
        for metric in columns:
            text = format_value(metrics.get(metric.key), metric)
            cells.append(f"[bold green]{text}*[/]" if label in best.get(metric.key, ()) else text)
        table.add_row(escape(label), *cells)
    console.print(table)
