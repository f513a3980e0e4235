"""`medlora eval`: answer records with golden outputs using the base model and each adapter (or re-score existing
results.jsonl files), then write metrics.json, report.md and report.html."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medlora.commands._common import (add_adapters_argument, add_generation_arguments, add_records_arguments,
                                      add_template_and_knowledge_arguments, generation_args, model_args, named_paths,
                                      read_records)
from medlora.config import ModelArgs, add_dataclass_args, str2bool
from medlora.errors import ConfigError
from medlora.io import claim_output

BASE_LABEL = "base"
BASE_KNOWLEDGE_LABEL = "base+knowledge"
RESULTS = "results.jsonl"
METRICS = "metrics.json"
log = logging.getLogger("medlora")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, ModelArgs, "model")
    models = parser.add_argument_group("models to compare")
    add_adapters_argument(models, "an adapter folder to evaluate besides the base model (repeatable); labelled by "
                                  "its folder name unless NAME= is given")
    models.add_argument("--results", nargs="+", default=[], metavar="[NAME=]FILE",
                        help="score existing results.jsonl files instead of generating; labelled by their parent "
                             "folder name unless NAME= is given")
    add_template_and_knowledge_arguments(models)
    models.add_argument("--base_knowledge", default=None, metavar="SOURCE",
                        help=f"also evaluate the base model prompted with facts from SOURCE (kb, cmekg, both, a file), "
                             f"labelled {BASE_KNOWLEDGE_LABEL!r}: knowledge without training")
    io = parser.add_argument_group("input and output")
    io.add_argument("--data", "--instruct_dir", "--data_path", dest="data", default=None,
                    help="records with golden outputs (any finetune data format; for a conversation, the last "
                         "assistant turn)")
    add_records_arguments(io)
    io.add_argument("--out", "--output_dir", dest="out", default="eval-out",
                    help="folder for metrics.json, the reports and <label>/results.jsonl")
    io.add_argument("--limit", type=int, default=0, help="evaluate only the first N records (default: all)")
    io.add_argument("--batch_size", type=int, default=8, help="records generated together (default: 8)")
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


def model_specs(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(adapters, results files) as (label, path) pairs; labels are checked to be distinct folder names."""
    adapters = named_paths(args.lora_weights, "--lora_weights")
    results = named_paths(args.results, "--results", default_name=lambda path: Path(path).resolve().parent.name)
    generating = bool(adapters) or "base_model" in vars(args) or not results or bool(args.base_knowledge)
    bases = [(BASE_LABEL, "")] + ([(BASE_KNOWLEDGE_LABEL, "")] if args.base_knowledge else [])
    labels = ([label for label, _ in bases] if generating else []) + [label for label, _ in adapters + results]
    for label in labels:
        if label in ("", ".", "..") or "/" in label or "\\" in label:
            raise ConfigError(f"model label {label!r} cannot be a folder name; choose one with NAME=PATH")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"two models are labelled {', '.join(duplicates)}; name them with NAME=PATH")
    if generating and not args.data:
        raise ConfigError("--data FILE (records with golden outputs) is needed to generate answers")
    if args.perplexity and not generating:
        raise ConfigError("--perplexity needs a model (--base_model / --lora_weights) and --data")
    return (bases + adapters if generating else []), results


def read_results(path: str, limit: int) -> list[dict]:
    from medlora.errors import DataError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"--results {path}: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: a result must be a JSON object (a results.jsonl row)")
            for name in ("instruction", "golden", "output"):
                if not isinstance(row.get(name), str):
                    state = "is missing" if name not in row else f"must be a string, got {type(row[name]).__name__}"
                    raise DataError(f"{path}, line {number}: field '{name}' {state} (a results.jsonl row written by "
                                    f"medlora infer/eval has instruction, golden and output)")
            rows.append(row)
    return rows[:limit] if limit > 0 else rows


def source_digest() -> str:
    """sha256 over medlora's Python files (paths and contents)."""
    import hashlib

    import medlora

    root = Path(medlora.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def answer_cache_file(margs, template, knowledge, records: list[dict], gen, batch_size: int) -> Path:
    """Where the base model's answers are kept for a later run that asks the same: the same base (name, config and
    weight files), dtype, template, knowledge content, records, generation settings, batch size, kind of batching,
    library versions and medlora's own code (a change to retrieval or prompt building changes the prompts while the
    rest stays the same; greedy answers on the same machine are then the same). In $MEDLORA_HOME/answers."""
    import hashlib

    import torch
    import transformers

    from medlora import __version__
    from medlora.modeling import resolve_model_path
    from medlora.registry import medlora_home

    folder = Path(resolve_model_path(margs.base_model))
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")) \
        if folder.is_dir() else []
    key = json.dumps({"base_model": margs.base_model, "weights": weights, "model_args": vars(margs),
                      "template": template.to_dict(), "system": template.system,
                      "knowledge": knowledge.sha256 if knowledge else None,
                      "records": records, "generation": gen.to_generate_kwargs(), "batch_size": batch_size,
                      "batching": "continuous" if gen.num_beams == 1 else "static",
                      "versions": [__version__, torch.__version__, transformers.__version__],
                      "code": source_digest()},
                     ensure_ascii=False, sort_keys=True, default=str)
    return medlora_home() / "answers" / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()[:32]}.jsonl"


def generate_all(args, models: list[tuple[str, str]], records: list[dict]) -> tuple[dict, dict]:
    """Answer `records` with the base model, then with each adapter merged into a fresh copy of the base (merged
    weights generate faster than an adapter on the side; the base loads in seconds).

    Knowledge: `--knowledge` for every model, else each adapter's own, none for the base and `--base_knowledge` for
    the base+knowledge row. Templates: `--prompt_template`, else each adapter's own; a base row gets that of the
    first adapter trained as it is prompted (with or without knowledge), so that the comparison is fair."""
    from medlora.commands.infer import answer_records
    from medlora.evaluate import perplexity
    from medlora.generate import Generator
    from medlora.io import atomic_write_jsonl
    from medlora.knowledge import Retrieved
    from medlora.loader import knowledge_for, template_for
    from medlora.modeling import preflight_adapter

    margs = model_args(args)
    gen = generation_args(args, *(path for _, path in models if path), args.base_model)
    adapter_dirs = [path for _, path in models if path]
    for path in adapter_dirs:  # refuse a bad adapter before spending time on the base model
        preflight_adapter(path, margs.base_model, margs.allow_pickle, margs.trust_remote_code)
    def source(label: str, adapter: str) -> str | None:
        if args.knowledge:
            return args.knowledge
        if label == BASE_KNOWLEDGE_LABEL:
            return args.base_knowledge
        return None if adapter else "none"  # None: what the adapter records

    # every source is loaded (and a bad one refused) before any model
    knowledge = {label: knowledge_for(source(label, adapter), adapter or None) for label, adapter in models}
    with_knowledge = {adapter: knowledge[label] is not None for label, adapter in models if adapter}
    rows_by_label, extra = {}, {}
    for label, adapter in models:
        alike = [adapter] if adapter else [p for p in adapter_dirs
                                           if with_knowledge[p] == (knowledge[label] is not None)]
        template = template_for(args.prompt_template, *alike, margs.base_model, knowledge=knowledge[label] is not None,
                                system=args.system)
        cache = None if adapter or args.perplexity or not args.answer_cache else \
            answer_cache_file(margs, template, knowledge[label], records, gen, args.batch_size)
        if cache is not None and cache.is_file():
            log.info("eval: %s's answers are those of an earlier run with the same model, data and settings (%s)",
                     label, cache)
            rows_by_label[label] = read_results(str(cache), 0)
            continue
        log.info("eval: answering %d records with %s", len(records), label)
        loaded = Generator.load(margs.base_model, adapter or None, None, margs.dtype, margs.load_8bit,
                                margs.load_4bit, margs.trust_remote_code, margs.allow_pickle, merge=True,
                                knowledge="none")
        generator = Generator(loaded.model, loaded.tokenizer, template, knowledge[label])
        rows_by_label[label] = answer_records(generator, records, gen, args.batch_size)
        if cache is not None:
            atomic_write_jsonl(cache, rows_by_label[label])
        if args.perplexity:  # the golden answers after the same prompts, facts included (as answer_records found them)
            scored = [{**r, "knowledge": Retrieved.from_dict(row["knowledge"]).text()} if "knowledge" in row else r
                      for r, row in zip(records, rows_by_label[label])]
            extra[label] = perplexity(generator, None, None, scored, batch_size=args.batch_size)
        del loaded, generator
    return rows_by_label, extra


def run(args: argparse.Namespace) -> int:
    from medlora.commands.infer import format_block
    from medlora.evaluate import print_metrics_table, score_results
    from medlora.io import atomic_write_jsonl, atomic_write_text
    from medlora.report import read_loss_log, write_report

    if args.limit < 0 or args.show < 0 or args.batch_size < 1:
        raise ConfigError("--limit and --show must be ≥ 0 and --batch_size ≥ 1")
    claim_output("--out", args.out, {"--data": args.data})
    models, result_files = model_specs(args)
    if args.train_dir:
        read_loss_log(args.train_dir)  # fail before generating, not after
    out = Path(args.out)
    rows_by_label, extra = {}, {}
    if models:
        records = read_records(args, args.data, require_output=True)
        records = records[:args.limit] if args.limit else records
        rows_by_label, extra = generate_all(args, models, records)
        for label, rows in rows_by_label.items():
            atomic_write_jsonl(out / label / RESULTS, rows)
    for label, path in result_files:
        rows_by_label[label] = read_results(path, args.limit)

    metrics = {label: {**score_results(rows), **extra.get(label, {})} for label, rows in rows_by_label.items()}
    for label, rows in rows_by_label.items():
        if args.show and rows:
            print(f"===== {label} =====")
            for row in rows[:args.show]:
                print(format_block(row), flush=True)
    atomic_write_text(out / METRICS, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    source = args.data or ", ".join(path for _, path in result_files)
    subtitle = f"records: {source}"
    if models:  # how the answers were generated, so that the figures can be reproduced
        gen = generation_args(args, *(path for _, path in models if path), args.base_model)
        subtitle += "; generation: " + ", ".join(f"{k} {v}" for k, v in gen.to_generate_kwargs().items())
    written = write_report(out, metrics, rows_by_label, args.train_dir, subtitle=subtitle)
    print_metrics_table(metrics)
    log.info("eval: wrote %s", ", ".join(str(p) for p in [out / METRICS, *written.values()]))
    return 0
