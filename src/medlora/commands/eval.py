"""`medlora eval`: answer records with golden outputs using the base model and each adapter (or re-score existing
results.jsonl files), then write metrics.json, report.md and report.html. The work is medlora.eval's `evaluate`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medlora.commands._common import (add_compared_models_arguments, add_generation_arguments, add_out_argument,
                                      add_records_arguments, generation_args, model_args, named_paths, positive_int,
                                      prompt_args, read_records)
from medlora.config import asdict, str2bool
from medlora.errors import ConfigError
from medlora.io import claim_output

log = logging.getLogger("medlora")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models = add_compared_models_arguments(parser, "evaluate")
    models.add_argument("--results", nargs="+", default=[], metavar="[NAME=]FILE",
                        help="score existing results.jsonl files instead of generating; labelled by their parent "
                             "folder name unless NAME= is given")
    io = parser.add_argument_group("input and output")
    io.add_argument("--data", "--instruct_dir", "--data_path", dest="data", default=None,
                    help="records with golden outputs (any finetune data format; for a conversation, the last "
                         "assistant turn)")
    add_records_arguments(io)
    add_out_argument(io, "folder for metrics.json, the reports and <label>/results.jsonl", "eval-out")
    io.add_argument("--limit", type=int, default=0, help="evaluate only the first N records (default: all)")
    io.add_argument("--max_batch_size", "--batch_size", dest="max_batch_size", type=positive_int, default=8,
                    help="records generated together, as rows of one batch (default: 8; --batch_size is the old "
                         "spelling)")
    io.add_argument("--perplexity", type=str2bool, nargs="?", const=True, default=False, metavar="BOOL",
                    help="also compute each model's loss and perplexity on the golden answers")
    io.add_argument("--train_dir", default=None,
                    help="a finetune output folder: its loss_log.jsonl is plotted into the report")
    io.add_argument("--answer_cache", type=str2bool, nargs="?", const=True, default=True, metavar="BOOL",
                    help="reuse the base model's answers from an earlier run with the same model, data and settings "
                         "(kept in $MEDLORA_HOME/answers; default: true)")
    io.add_argument("--show", type=int, default=5, help="records printed per model, seed-style (default: 5)")
    add_generation_arguments(parser)
    parser.set_defaults(max_new_tokens=128)


def model_specs(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[tuple[str, str]], bool]:
    """(adapters, results files) as (label, path) pairs, and whether models answer (the base always among them);
    labels are checked to be distinct folder names."""
    from medlora.eval.runner import answering_models, check_labels

    adapters = named_paths(args.lora_weights, "--lora_weights")
    results = named_paths(args.results, "--results", default_name=lambda path: Path(path).resolve().parent.name)
    generating = bool(adapters) or "base_model" in vars(args) or not results or bool(args.base_knowledge)
    models = answering_models(adapters, args.base_knowledge) if generating else []
    check_labels([label for label, _ in models + results])
    if generating and not args.data:
        raise ConfigError("--data FILE (records with golden outputs) is needed to generate answers")
    if args.perplexity and not generating:
        raise ConfigError("--perplexity needs a model (--base_model / --lora_weights) and --data")
    return adapters, results, generating


def run(args: argparse.Namespace) -> int:
    from medlora.eval import EvalSettings, evaluate, print_metrics_table, read_results
    from medlora.eval.results import format_block
    from medlora.eval.report import read_loss_log

    if args.limit < 0 or args.show < 0:
        raise ConfigError("--limit and --show must be ≥ 0")
    settings = EvalSettings(**asdict(prompt_args(args)), base_knowledge=args.base_knowledge,
                            max_batch_size=args.max_batch_size, perplexity=args.perplexity,
                            answer_cache=args.answer_cache)
    claim_output("--out", args.out, {"--data": args.data})
    adapters, result_files, generating = model_specs(args)
    if args.train_dir:
        read_loss_log(args.train_dir)  # fail before generating, not after
    records = read_records(args, args.data, require_output=True) if generating else []
    records = records[:args.limit] if args.limit else records
    results = {label: read_results(path, args.limit) for label, path in result_files}
    margs = model_args(args) if generating else None
    gen = generation_args(args, *(path for _, path in adapters)) if generating else None
    done = evaluate(margs, records, dict(adapters), settings, gen, results=results, out=args.out,
                    train_dir=args.train_dir, source=args.data or ", ".join(path for _, path in result_files))
    for label, rows in done.rows.items():
        if args.show and rows:
            print(f"===== {label} =====")
            for row in rows[:args.show]:
                print(format_block(row), flush=True)
    print_metrics_table(done.metrics)
    log.info("eval: wrote %s", ", ".join(str(p) for p in done.files))
    return 0
