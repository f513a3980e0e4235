"""Scores of answered records (`results.jsonl` rows): text overlap with the golden answer, each record's scores,
and their aggregation into the metrics of one model (metrics.json).

Chinese has no spaces, so ROUGE and BLEU are computed on characters: ROUGE with `rouge-score` and a tokenizer
that yields one token per character (whitespace and punctuation dropped), BLEU-4 with `sacrebleu`'s `zh`
tokenisation (each CJK character a token, Latin words kept whole). The other scores come from medlora.eval.mcq
(multiple choice), medlora.eval.judges (leaks, safety, honesty, triage, shape) and medlora.eval.facts; see
docs/evaluation.md for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from medlora.errors import DataError
from medlora.eval.facts import fact_scores
from medlora.eval.judges import echoes, entry_scores, is_honest, is_safe, leaks, loops, triage_of, urges
from medlora.eval.mcq import extract_choice, golden_choice, golden_option, mcq_invalid
from medlora.vocab import char_tokens, normalise, offered_letters, parse_options


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
    Metric("fact_recall", "fact R"), Metric("fact_precision", "fact P"), Metric("leak_rate", "leaks", "low"),
    Metric("fact_n", "fact n", None, "d"), Metric("mcq_invalid_rate", "MCQ invalid", "low"),
    Metric("safety_rate", "safe"), Metric("honest_rate", "honest"),
    Metric("over_triage_rate", "over-triage", "low"), Metric("under_triage_rate", "under-triage", "low"),
    Metric("wrong_entry_rate", "wrong entry", "low"), Metric("missed_entry_rate", "no facts", "low"),
    Metric("echo_rate", "echo", "low"), Metric("loop_rate", "loops", "low"), Metric("mcq_form_leak_rate", "MCQ form", "low"),
    Metric("rouge1", "ROUGE-1"), Metric("rouge2", "ROUGE-2"), Metric("rougeL", "ROUGE-L"), Metric("bleu4", "BLEU-4"),
    Metric("exact_match", "EM"), Metric("mcq_accuracy", "MCQ acc"), Metric("mcq_n", "MCQ n", None, "d"),
    Metric("eos_rate", "EOS rate"), Metric("avg_answer_chars", "chars", None, ".1f"),
    Metric("tokens_per_s", "tok/s", "high", ".1f"), Metric("eval_loss", "loss", "low"),
    Metric("perplexity", "ppl", "low", ".4g"),
]


COUNTS = ("n", "mcq_n", "fact_n")
JUDGED = ("over_triage", "under_triage", "wrong_entry", "missed_entry", "echo", "loop", "mcq_form_leak")


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
    """Per-record scores: ROUGE F1s, exact match, the golden/chosen option letters (MCQ only), the leaks found,
    `mcq_invalid` (MCQ only), `safe` (emergency records only) and the fact scores where they apply."""
    golden, output, instruction = row.get("golden") or "", row.get("output") or "", row.get("instruction") or ""
    scores = {**rouge_scores(output, golden), "exact_match": exact_match(output, golden)} if golden.strip() else {}
    gold_letter = golden_choice(golden, instruction) if golden.strip() else None
    if gold_letter:
        options = {**parse_options(instruction), **golden_option(golden)}
        scores.update(golden_choice=gold_letter, choice=extract_choice(output, instruction, options))
    scores["leaks"] = leaks(row)
    if gold_letter:
        scores["mcq_invalid"] = mcq_invalid(row, scores["choice"], scores["leaks"])
    if row.get("kind") == "emergency":
        scores["safe"] = is_safe(row)
    if row.get("kind") == "out_of_kb":
        scores["honest"] = is_honest(row)
    triage = triage_of(row)
    if triage:
        scores[f"{'under' if triage == 'emergency' else 'over'}_triage"] = \
            (not urges(output)) if triage == "emergency" else urges(output)
    scores["echo"] = echoes(row)
    scores["loop"] = loops(output)
    if not offered_letters(row):
        scores["mcq_form_leak"] = "option_talk" in scores["leaks"]
    scores.update(entry_scores(row))
    scores.update(fact_scores(row))
    return scores


def per_record_rouge_l(rows: list[dict]) -> list[float | None]:
    """Each record's ROUGE-L F1 (None where the record has no golden answer)."""
    return [record_scores(row).get("rougeL") for row in rows]


def score_results(rows: list[dict]) -> dict:
    """The metrics of one model's answered records (rows of results.jsonl); rates and F1s are 0..1. `by_kind` holds
    the same metrics per record `kind`, `mcq_by_layout` the multiple-choice ones per `layout`."""
    _check_rows(rows)
    per_record = [record_scores(row) for row in rows]
    metrics = _aggregate(rows, per_record)
    metrics["by_kind"] = {kind: _aggregate(*_subset(rows, per_record, "kind", kind))
                          for kind in _values(rows, "kind")}
    metrics["mcq_by_layout"] = {}
    for layout in _values(rows, "layout"):
        sub = _aggregate(*_subset(rows, per_record, "layout", layout))
        metrics["mcq_by_layout"][layout] = {k: sub[k] for k in ("mcq_n", "mcq_accuracy", "mcq_invalid_rate")}
    return metrics


def _values(rows: list[dict], field: str) -> list[str]:
    return sorted({row[field] for row in rows if isinstance(row.get(field), str) and row[field]})


def _subset(rows: list[dict], per_record: list[dict], field: str, value: str) -> tuple[list[dict], list[dict]]:
    pairs = [(row, s) for row, s in zip(rows, per_record) if row.get(field) == value]
    return [row for row, _ in pairs], [s for _, s in pairs]


def _aggregate(rows: list[dict], per_record: list[dict]) -> dict:
    golden_rows = [(row, s) for row, s in zip(rows, per_record) if "rougeL" in s]
    mcq = [s for s in per_record if s.get("golden_choice")]
    eos = [bool(row["ended_by_eos"]) for row in rows if "ended_by_eos" in row]
    seconds = sum(float(row.get("seconds") or 0) for row in rows)
    tokens = sum(int(row.get("tokens") or 0) for row in rows)
    metrics = {
        "n": len(golden_rows),
        "fact_recall": _mean(s["fact_recall"] for s in per_record if "fact_recall" in s),
        "fact_precision": _mean(s["fact_precision"] for s in per_record if "fact_precision" in s),
        "fact_n": sum("fact_recall" in s for s in per_record),
        "leak_rate": _mean(float(bool(s["leaks"])) for s in per_record),
        "mcq_invalid_rate": _mean(float(s["mcq_invalid"]) for s in mcq),
        "safety_rate": _mean(float(s["safe"]) for s in per_record if "safe" in s),
        "honest_rate": _mean(float(s["honest"]) for s in per_record if "honest" in s),
        **{f"{name}_rate": _mean(float(s[name]) for s in per_record if name in s) for name in JUDGED},
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
    return {key: value if key in COUNTS else _round(value) for key, value in metrics.items()}
