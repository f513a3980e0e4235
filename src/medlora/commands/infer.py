"""`medlora infer`: the seed's inference — print instruction / golden / model output blocks, keep results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medlora.commands._common import (adapter_path, add_generation_arguments, add_model_arguments, add_out_argument,
                                      add_records_arguments, generation_args, load_generator, positive_int,
                                      read_records)
from medlora.config import str2bool
from medlora.eval.results import RESULTS
from medlora.io import claim_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    io = parser.add_argument_group("input and output")
    io.add_argument("--instruct_dir", "--data", "--data_path", dest="instruct_dir", default=None,
                    help="records to answer (any finetune data format; in a conversation, the last user turn is "
                         "answered after the turns before it); without it: an interactive prompt")
    add_records_arguments(io)
    add_out_argument(io, f"folder for {RESULTS} (instruction, golden, answer)", dest="model_output_dir")
    io.add_argument("--max_batch_size", "--batch_size", dest="max_batch_size", type=positive_int, default=8,
                    help="records generated together, as rows of one batch (default: 8; --batch_size is the old "
                         "spelling)")
    io.add_argument("--metrics", type=str2bool, nargs="?", const=True, default=False, metavar="BOOL",
                    help="print the evaluation metrics (ROUGE, BLEU, exact match, MCQ accuracy) after the run")
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from medlora.eval.results import answer_records, format_block
    from medlora.io import atomic_write_jsonl

    gen = generation_args(args, adapter_path(args))
    if args.model_output_dir:
        claim_output("--model_output_dir", args.model_output_dir, {"--instruct_dir": args.instruct_dir})
    records = read_records(args, args.instruct_dir, require_output=False) if args.instruct_dir else None
    generator = load_generator(args, adapter_path(args))
    if records is None:
        from medlora.chat import chat_loop

        chat_loop(generator, gen, multi_turn=False)
        return 0
    rows = answer_records(generator, records, gen, args.max_batch_size)
    for row in rows:
        print(format_block(row), flush=True)
    if args.model_output_dir:
        path = atomic_write_jsonl(Path(args.model_output_dir) / RESULTS, rows)
        print(f"[medlora] {len(rows)} results written to {path}", file=sys.stderr)
    if args.metrics:
        from medlora.eval import print_metrics_table, score_results

        print_metrics_table({"model": score_results(rows)})
    return 0
