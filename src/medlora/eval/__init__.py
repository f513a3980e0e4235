"""Evaluation: answer records with golden outputs, score the answers, compare models.

    from medlora.eval import evaluate

    done = evaluate("tiny-qwen2", records, adapters={"tuned": "runs/mine"})
    print(done.metrics["tuned"]["rougeL"])

The modules, from the bottom: `mcq` (the option letter an answer chooses), `judges` (leaks, safety, honesty,
triage, retrieved entries, echo, loops), `facts` (fact-level scores against the knowledge base), `metrics` (ROUGE,
BLEU, exact match, each record's scores and their aggregation), `tables` (the metrics as tables), `report`
(report.md, report.html, the loss curve); above them, `results` (results.jsonl rows) and `runner` (models answering,
the answer cache, perplexity, `evaluate`).
"""

from medlora.eval.metrics import METRICS, Metric, record_scores, score_results
from medlora.eval.results import answer_records, read_results
from medlora.eval.runner import EvalSettings, Evaluation, evaluate, perplexity
from medlora.eval.tables import print_metrics_table

__all__ = ["METRICS", "EvalSettings", "Evaluation", "Metric", "answer_records", "evaluate", "perplexity",
           "print_metrics_table", "read_results", "record_scores", "score_results"]
