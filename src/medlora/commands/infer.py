"""`medlora infer`: the seed's inference — print instruction / golden / model output blocks, keep results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medlora.commands._common import (adapter_path, add_generation_arguments, add_model_arguments,
                                      add_records_arguments, generation_args, load_generator, positive_int,
                                      read_records)
from medlora.config import str2bool
from medlora.io import claim_output

RESULTS = "results.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    io = parser.add_argument_group("input and output")
    io.add_argument("--instruct_dir", "--data", "--data_path", dest="instruct_dir", default=None,
                    help="records to answer (any finetune data format; in a conversation, the last user turn is "
                         "answered after the turns before it); without it: an interactive prompt")
    add_records_arguments(io)
    io.add_argument("--model_output_dir", "--out", "--output_dir", dest="model_output_dir", default=None,
                    help=f"folder for {RESULTS} (instruction, golden, answer)")
    io.add_argument("--batch_size", type=positive_int, default=8, help="records generated together (default: 8)")
    io.add_argument("--metrics", type=str2bool, nargs="?", const=True, default=False, metavar="BOOL",
                    help="print the evaluation metrics (ROUGE, BLEU, exact match, MCQ accuracy) after the run")
    add_generation_arguments(parser)


def format_block(row: dict) -> str:
    """The seed's printed block for one record (with a ###history### block for a conversation's earlier turns,
    and a ###knowledge### block when the prompt had facts)."""
    lines = []
    if row.get("history"):
        lines += ["###history###", *(f"用户: {user}\n助手: {reply}" for user, reply in row["history"])]
    lines += ["###Instruction###", row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")]
    if row.get("knowledge") is not None:
        from medlora.knowledge import Retrieved
        from medlora.templates import NO_KNOWLEDGE

        found = Retrieved.from_dict(row["knowledge"])
        lines += ["###knowledge###", found.text() or NO_KNOWLEDGE, *([f"（匹配：{found.why()}）"] if found.matches else [])]
    if row.get("golden"):
        lines += ["###golden output###", row["golden"]]
    lines += ["###model output###", row["output"]]
    return "\n".join(lines) + "\n"


def answer_records(generator, records: list[dict], gen, batch_size: int) -> list[dict]:
    """results.jsonl rows: the record (its labels such as `kind` too), its golden and model output, timing, and
    with knowledge on, the entries retrieved for it."""
    from medlora.data import META_FIELDS
    from medlora.turns import Turn

    prompts, found = zip(*(generator.prepare(Turn.of(r)) for r in records)) if records else ((), ())
    answers = generator.generate(prompts, gen, batch_size=batch_size, progress=True)
    return [
        {"instruction": r["instruction"], "input": r["input"], "golden": r["output"], "output": a.text,
         **{name: r[name] for name in ("history", "system") if name in r},
         "tokens": a.n_tokens, "seconds": round(a.seconds, 4), "ended_by_eos": a.ended_by_eos,
         **{name: r[name] for name in META_FIELDS if name in r},
         **({"knowledge": f.to_dict()} if f is not None else {})}
        for r, a, f in zip(records, answers, found)
    ]


def run(args: argparse.Namespace) -> int:
    from medlora.io import atomic_write_jsonl

    gen = generation_args(args, adapter_path(args), args.base_model)
    if args.model_output_dir:
        claim_output("--model_output_dir", args.model_output_dir, {"--instruct_dir": args.instruct_dir})
    records = read_records(args, args.instruct_dir, require_output=False) if args.instruct_dir else None
    generator = load_generator(args, adapter_path(args))
    if records is None:
        from medlora.chat import chat_loop

        chat_loop(generator, gen, multi_turn=False)
        return 0
    rows = answer_records(generator, records, gen, args.batch_size)
    for row in rows:
        print(format_block(row), flush=True)
    if args.model_output_dir:
        path = atomic_write_jsonl(Path(args.model_output_dir) / RESULTS, rows)
        print(f"[medlora] {len(rows)} results written to {path}", file=sys.stderr)
    if args.metrics:
        from medlora.evaluate import print_metrics_table, score_results

        print_metrics_table({"model": score_results(rows)})
    return 0
