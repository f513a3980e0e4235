"""The evaluation runner: answer records with the base model and each adapter, keep the base model's answers for a
later run that asks the same, score every model's answers, and write what `medlora eval` writes.

    from medlora.eval import evaluate

    done = evaluate("tiny-qwen2", records, adapters={"tuned": "runs/mine"}, out="ev")
    done.metrics["tuned"]["fact_recall"], done.rows["base"][0]["output"]
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from medlora.config import GenerationArgs, ModelArgs, PromptArgs
from medlora.errors import ConfigError, MedloraError
from medlora.eval.metrics import score_results
from medlora.eval.results import RESULTS, answer_records, read_results

BASE_LABEL = "base"
BASE_KNOWLEDGE_LABEL = "base+knowledge"
METRICS_FILE = "metrics.json"
log = logging.getLogger("medlora")


@dataclass
class EvalSettings(PromptArgs):
    """How the models are prompted (PromptArgs, for every model; None: see `prompting`) and run: `medlora eval`'s
    options besides the models, records and decoding."""

    base_knowledge: str | None = None
    """also answer with the base model prompted with facts from this source, labelled base+knowledge"""
    max_batch_size: int = 8
    """records generated together"""
    perplexity: bool = False
    """also compute each model's loss and perplexity on the golden answers"""
    answer_cache: bool = True
    """reuse the base model's answers from an earlier run with the same model, data and settings"""

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ConfigError("--max_batch_size must be at least 1")


@dataclass
class Evaluation:
    """What `evaluate` returns: each model's results.jsonl rows and metrics by label (the models that answered
    first, then the rows given to score), and the files written."""

    rows: dict[str, list[dict]]
    metrics: dict[str, dict]
    files: list[Path] = field(default_factory=list)


def answering_models(adapters: list[tuple[str, str]], base_knowledge: str | None) -> list[tuple[str, str]]:
    """(label, adapter folder) of every model that answers, in order: the base ("": no adapter), the base with
    knowledge when asked, then the adapters."""
    return [(BASE_LABEL, "")] + ([(BASE_KNOWLEDGE_LABEL, "")] if base_knowledge else []) + list(adapters)


def check_labels(labels: list[str]) -> None:
    """Each label names a results folder: a folder name, given to one model only."""
    for label in labels:
        if label in ("", ".", "..") or "/" in label or "\\" in label:
            raise ConfigError(f"model label {label!r} cannot be a folder name; choose one with NAME=PATH")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"two models are labelled {', '.join(duplicates)}; name them with NAME=PATH")


def evaluate(model: ModelArgs | str | None, records: list[dict], adapters: dict[str, str] | None = None,
             settings: EvalSettings | None = None, generation: GenerationArgs | None = None, *,
             results: dict[str, list[dict]] | None = None, out: str | Path | None = None,
             train_dir: str | Path | None = None, source: str = "") -> Evaluation:
    """Answer `records` (with golden outputs) with the base model of `model` and each of `adapters` ({label:
    folder}), then score those answers and the `results` given ({label: results.jsonl rows answered earlier}).
    `model` None answers nothing. `generation` None: the decoding recorded with the first adapter that has one,
    else GenerationArgs' defaults. With `out`, writes what `medlora eval` writes there: <label>/results.jsonl of
    the models that answered, metrics.json, report.md and report.html (with `train_dir`'s loss curve; `source`
    names the records in the reports)."""
    settings = settings or EvalSettings()
    margs = ModelArgs(model) if isinstance(model, str) else model
    adapters = list((adapters or {}).items())
    models = answering_models(adapters, settings.base_knowledge) if margs is not None else []
    check_labels([label for label, _ in models] + list(results or {}))
    rows, extra, gen = {}, {}, None
    if models:
        from medlora.modeling import decoding_for

        gen = generation or decoding_for(*(path for _, path in adapters), margs.base_model)
        rows, extra = answer_all(margs, models, records, gen, settings)
    answered = list(rows)
    rows.update(results or {})
    metrics = {label: {**score_results(label_rows), **extra.get(label, {})} for label, label_rows in rows.items()}
    done = Evaluation(rows, metrics)
    if out is not None:
        done.files = write_outputs(Path(out), done, answered, train_dir, report_subtitle(source, gen))
    return done


def report_subtitle(source: str, gen: GenerationArgs | None) -> str:
    """Where the records come from and how the answers were generated, so that the figures can be reproduced."""
    parts = [f"records: {source}"] if source else []
    if gen is not None:
        parts.append("generation: " + ", ".join(f"{k} {v}" for k, v in gen.to_generate_kwargs().items()))
    return "; ".join(parts)


def write_outputs(out: Path, done: Evaluation, answered: list[str], train_dir, subtitle: str) -> list[Path]:
    """<label>/results.jsonl of the `answered` labels, metrics.json and the reports; returns the paths of the last."""
    from medlora.io import atomic_write_jsonl, atomic_write_text
    from medlora.eval.report import write_report

    for label in answered:
        atomic_write_jsonl(out / label / RESULTS, done.rows[label])
    atomic_write_text(out / METRICS_FILE, json.dumps(done.metrics, ensure_ascii=False, indent=2) + "\n")
    written = write_report(out, done.metrics, done.rows, train_dir, subtitle=subtitle)
    return [out / METRICS_FILE, *written.values()]


# --- answering -------------------------------------------------------------------------------------------------

def prompting(margs: ModelArgs, models: list[tuple[str, str]], settings: EvalSettings) -> dict[str, tuple]:
    """{label: (template, knowledge index or None)}. Knowledge: `settings.knowledge` for every model, else each
    adapter's own, none for the base and `settings.base_knowledge` for the base+knowledge row. Templates:
    `settings.prompt_template`, else each adapter's own; a base row gets that of the first adapter trained as it is
    prompted (with or without knowledge), so that the comparison is fair. Every knowledge source is loaded (and a
    bad one refused) before any model."""
    from medlora.loader import knowledge_for, template_for

    def source(label: str, adapter: str) -> str | None:
        if settings.knowledge:
            return settings.knowledge
        if label == BASE_KNOWLEDGE_LABEL:
            return settings.base_knowledge
        return None if adapter else "none"  # None: what the adapter records

    knowledge = {label: knowledge_for(source(label, adapter), adapter or None) for label, adapter in models}
    adapter_dirs = [path for _, path in models if path]
    with_knowledge = {adapter: knowledge[label] is not None for label, adapter in models if adapter}
    prompts = {}
    for label, adapter in models:
        alike = [adapter] if adapter else [p for p in adapter_dirs
                                           if with_knowledge[p] == (knowledge[label] is not None)]
        template = template_for(settings.prompt_template, *alike, margs.base_model,
                                knowledge=knowledge[label] is not None, system=settings.system)
        prompts[label] = (template, knowledge[label])
    return prompts


def answer_all(margs: ModelArgs, models: list[tuple[str, str]], records: list[dict], gen: GenerationArgs,
               settings: EvalSettings) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """({label: results rows}, {label: loss and perplexity} with `settings.perplexity`): `records` answered by the
    base model, then by each adapter merged into a fresh copy of the base (merged weights generate faster than an
    adapter on the side; the base loads in seconds). A base row reuses the answers of an earlier run that asked the
    same (`answer_cache_file`)."""
    from medlora.generate import Generator
    from medlora.io import atomic_write_jsonl
    from medlora.loader import load
    from medlora.modeling import preflight_adapter

    for path in (path for _, path in models if path):  # refuse a bad adapter before spending time on the base model
        preflight_adapter(path, margs.base_model, margs.allow_pickle, margs.trust_remote_code)
    prompts = prompting(margs, models, settings)
    rows_by_label, extra = {}, {}
    for label, adapter in models:
        template, knowledge = prompts[label]
        cache = None if adapter or settings.perplexity or not settings.answer_cache else \
            answer_cache_file(margs, template, knowledge, records, gen, settings.max_batch_size)
        if cache is not None and cache.is_file():
            log.info("eval: %s's answers are those of an earlier run with the same model, data and settings (%s)",
                     label, cache)
            rows_by_label[label] = read_results(str(cache))
            continue
        log.info("eval: answering %d records with %s", len(records), label)
        loaded = load(margs, {"default": adapter} if adapter else {}, PromptArgs(knowledge="none"), merge=True)
        generator = Generator(loaded.model, loaded.tokenizer, template, knowledge)
        rows_by_label[label] = answer_records(generator, records, gen, settings.max_batch_size)
        if cache is not None:
            atomic_write_jsonl(cache, rows_by_label[label])
        if settings.perplexity:
            extra[label] = perplexity(generator, with_facts(records, rows_by_label[label]))
        del loaded, generator
    return rows_by_label, extra


def with_facts(records: list[dict], rows: list[dict]) -> list[dict]:
    """The records with the facts their prompts had (as `answer_records` found them), to be tokenized again."""
    from medlora.knowledge import Retrieved

    return [{**r, "knowledge": Retrieved.from_dict(row["knowledge"]).text()} if "knowledge" in row else r
            for r, row in zip(records, rows)]


def perplexity(generator, records: list[dict], cutoff_len: int = 1024) -> dict:
    """{"eval_loss": mean supervised token loss on the golden answers (prompt masked), "perplexity": exp(loss)} of
    a medlora.generate.Generator's model, its prompts rendered by its template as training renders them."""
    import torch

    from medlora.fastloss import IGNORE_INDEX, validation_loss
    from medlora.tokenize import tokenize_records

    tokenizer = generator.tokenizer
    examples, _ = tokenize_records(list(records), generator.template, tokenizer, cutoff_len=cutoff_len)
    if not examples:
        raise MedloraError("perplexity: no record has a golden answer token left after tokenisation")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(batch: list[dict]) -> dict:
        """Padded on the right whatever the tokenizer's side (a Generator's pads on the left, for generation)."""
        width = max(len(e["input_ids"]) for e in batch)

        def padded(key, value):
            return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in batch])

        return {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
                "labels": padded("labels", IGNORE_INDEX)}

    loss = validation_loss(generator.model, examples, collate)
    return {"eval_loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 700)), 3)}


# --- the answer cache ------------------------------------------------------------------------------------------

def source_digest() -> str:
    """sha256 over medlora's Python files (paths and contents)."""
    import hashlib

    import medlora

    root = Path(medlora.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def answer_cache_file(margs: ModelArgs, template, knowledge, records: list[dict], gen: GenerationArgs,
                      batch_size: int) -> Path:
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
