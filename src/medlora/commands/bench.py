"""`medlora bench`: standard Chinese medical multiple-choice benchmarks (XMedBench-zh, or files of the same shape) on a
base model and adapters side by side; writes metrics.json, report.md, report.html and <label>/results.jsonl, and
prints the table."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medlora.commands._common import (add_compared_models_arguments, add_generation_arguments, add_out_argument,
                                      model_args, named_paths, positive_int, prompt_args, set_option)
from medlora.config import GenerationArgs, build_dataclass
from medlora.errors import ConfigError
from medlora.eval.runner import BASE_KNOWLEDGE_LABEL
from medlora.io import claim_output

RESULTS = "results.jsonl"
log = logging.getLogger("medlora")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medlora.benchmarks import SCORINGS, SUITES, XMEDBENCH_ZH

    add_compared_models_arguments(parser, "score")
    sets = parser.add_argument_group("benchmarks")
    sets.add_argument("--benchmark", action="append", default=[], metavar="NAME|[NAME=]FILE",
                      help=f"repeatable: {', '.join(SUITES)} (all its subsets), one of its subsets "
                           f"({', '.join(XMEDBENCH_ZH)}), or a JSONL/JSON file of questions (question, options, answer "
                           f"letters) named by its stem or NAME= (default: xmedbench-zh)")
    sets.add_argument("--benchmark_dir", default=None, metavar="DIR",
                      help="where the subsets we may not commit are found, as <name>.jsonl or Apollo's zh.json "
                           "(default: data/benchmarks/local; see data/benchmarks/README.md)")
    sets.add_argument("--limit", type=int, default=0,
                      help="score a seeded sample of N questions per subset (default: all)")
    sets.add_argument("--seed", type=int, default=42, help="the sample's seed (default: 42)")
    sets.add_argument("--shots", type=int, default=0, metavar="K",
                      help="few-shot: K solved questions of each subset (drawn with --seed, never scored) before each "
                           "of its questions, as Apollo's evaluation shows 3 (default: 0, zero-shot)")
    sets.add_argument("--scoring", choices=SCORINGS, default="loglik",
                      help="loglik: the most likely option letter after the prompt (no parsing); generate: letters "
                           "parsed from a generated answer (default: loglik)")
    sets.add_argument("--max_batch_size", "--batch_size", dest="max_batch_size", type=positive_int, default=8,
                      help="questions run together, as rows of one batch (default: 8; --batch_size is the old "
                           "spelling)")
    add_out_argument(sets, "folder for metrics.json, report.md, report.html and <label>/results.jsonl", "bench-out")
    add_generation_arguments(parser)
    # fp32 unless asked: in bf16 a question's letter scores move by up to 0.1 nat with the questions that share its
    # padded batch (measured on gemma3-270m), which flips close choices; fp32 agrees with one question alone to 1e-4
    dtype = next(action for action in parser._actions if action.dest == "dtype")
    set_option(parser, "dtype", default="fp32",
               help=dtype.help.replace("(default: 'auto')", "(default here: 'fp32', so that a score does not depend on "
                                       "the batch; auto is about 4x faster on a bf16 CPU)"))


def model_labels(args: argparse.Namespace) -> list[tuple[str, str]]:
    adapters = named_paths(args.lora_weights, "--lora_weights")
    for label, _ in adapters:
        if label in ("", ".", "..", "base", BASE_KNOWLEDGE_LABEL) or "\\" in label:
            raise ConfigError(f"--lora_weights: {label!r} cannot label a model (base and base+knowledge are the base "
                              f"model's); choose one with NAME=DIR")
    return adapters


def run(args: argparse.Namespace) -> int:
    from medlora.benchmarks import load_subsets, render_html, render_report, run_models, summarise, table_lines
    from medlora.io import atomic_write_jsonl, atomic_write_text

    if args.limit < 0:
        raise ConfigError("--limit must be 0 (all) or more")
    claim_output("--out", args.out, {"--benchmark_dir": args.benchmark_dir})
    adapters = model_labels(args)
    # checked before any model
    subsets = load_subsets(args.benchmark, args.benchmark_dir, args.limit, args.seed, args.shots)
    # every model decodes alike (the benchmark's rule, not an adapter's recorded decoding): greedy unless flags say
    gen = build_dataclass(GenerationArgs, vars(args))
    rows_by_label, models = run_models(model_args(args), adapters, subsets, args.scoring, gen, args.max_batch_size,
                                       prompt_args(args), args.base_knowledge)
    out = Path(args.out)
    for label, rows in rows_by_label.items():
        atomic_write_jsonl(out / label / RESULTS, rows)
    metrics = {"benchmarks": args.benchmark or ["xmedbench-zh"], "scoring": args.scoring, "limit": args.limit,
               "seed": args.seed, "shots": args.shots,
               "generation": gen.to_generate_kwargs() if args.scoring == "generate" else None,
               "models": models, **summarise(subsets, rows_by_label, args.scoring)}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_report(metrics))
    atomic_write_text(out / "report.html", render_html(metrics, subsets, rows_by_label))
    print("\n".join(table_lines(metrics)))
    log.info("bench: wrote %s, report.md, report.html and <label>/%s", out / "metrics.json", RESULTS)
    return 0
