"""The metrics as tables: which tables, which columns, the best value of each, and the terminal rendering (the
reports of medlora.eval.report draw the same tables)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from medlora.eval.metrics import METRICS, Metric


@dataclass
class Section:
    """One table of the evaluation: its title, its rows ({row label: metrics}) and columns, and whether the best
    value of each column is marked (not in the breakdowns, whose rows are different record sets)."""

    title: str
    rows: dict[str, dict]
    keys: tuple[str, ...]
    mark_best: bool = True

    @property
    def columns(self) -> list[Metric]:
        by_key = {m.key: m for m in METRICS}
        return [by_key[k] for k in self.keys if any(r.get(k) is not None for r in self.rows.values())]


EXAM_KEYS = ("fact_recall", "fact_precision", "fact_n", "leak_rate", "mcq_accuracy", "mcq_invalid_rate", "mcq_n",
             "safety_rate", "honest_rate", "eos_rate")
TRIAGE_KEYS = ("n", "over_triage_rate", "under_triage_rate", "wrong_entry_rate", "missed_entry_rate", "echo_rate",
               "loop_rate", "mcq_form_leak_rate", "eos_rate")
TEXT_KEYS = ("n", "rouge1", "rouge2", "rougeL", "bleu4", "exact_match", "avg_answer_chars", "tokens_per_s",
             "eval_loss", "perplexity")


def sections(metrics_by_label: dict[str, dict]) -> list[Section]:
    """The tables, headline first: fact-level scores, the same per record kind, multiple choice per layout, then
    text overlap and speed."""
    def breakdown(field: str) -> dict[str, dict]:
        """`label · kind` rows, each kind's models together (a stable sort keeps the models' order)."""
        rows = [(name, label, sub) for label, m in metrics_by_label.items()
                for name, sub in (m.get(field) or {}).items()]
        return {f"{label} · {name}": sub for name, label, sub in sorted(rows, key=lambda row: row[0])}

    kinds, layouts = breakdown("by_kind"), breakdown("mcq_by_layout")
    tables = [Section("Fact-level scores, leaks and safety", metrics_by_label, EXAM_KEYS)]
    if kinds:
        tables.append(Section("By kind of question", kinds, ("n", *EXAM_KEYS, "rougeL"), mark_best=False))
    tables.append(Section("Triage, linking and the answer's shape", metrics_by_label, TRIAGE_KEYS))
    if layouts:
        tables.append(Section("Multiple choice by layout", layouts, ("mcq_n", "mcq_accuracy", "mcq_invalid_rate"),
                              mark_best=False))
    tables.append(Section("Text overlap and speed", metrics_by_label, TEXT_KEYS))
    return tables


def best_labels(metrics_by_label: dict[str, dict], columns: list[Metric] | None = None) -> dict[str, set[str]]:
    """For each metric with a direction: the labels holding its best value (only where 2+ models differ)."""
    best = {}
    for metric in columns or METRICS:
        values = {label: m.get(metric.key) for label, m in metrics_by_label.items() if m.get(metric.key) is not None}
        if metric.better is None or len(set(values.values())) < 2:
            continue
        target = (max if metric.better == "high" else min)(values.values())
        best[metric.key] = {label for label, v in values.items() if v == target}
    return best


def format_value(value, metric: Metric) -> str:
    return "-" if value is None else format(value, metric.fmt)


def table_cells(metrics_by_label: dict[str, dict]):
    """For each non-empty table of `sections`: (title, columns, rows), rows as (label, [(text, is_best), …])."""
    for section in sections(metrics_by_label):
        columns = section.columns
        if not columns:
            continue
        best = best_labels(section.rows, columns) if section.mark_best else {}
        rows = [(label, [(format_value(metrics.get(m.key), m), label in best.get(m.key, ())) for m in columns])
                for label, metrics in section.rows.items()]
        yield section.title + (" (best marked)" if best else ""), columns, rows


def print_metrics_table(metrics_by_label: dict[str, dict], file=None) -> None:
    """Aligned tables (see `sections`), one row per model; the best value of each column is bold and starred."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    file = file or sys.stdout
    console = Console(file=file, width=None if file.isatty() else 160)
    for title, columns, rows in table_cells(metrics_by_label):
        table = Table(title=title, title_justify="left")
        table.add_column("model", style="bold")
        for metric in columns:
            table.add_column(metric.header, justify="right")
        for label, cells in rows:
            table.add_row(escape(label), *(f"[bold green]{text}*[/]" if best else text for text, best in cells))
        console.print(table)
