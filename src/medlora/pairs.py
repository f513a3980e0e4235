"""Preference pairs judged by the knowledge base (`medlora data pairs`): sample several answers per prompt from an
adapter, score each with the project's own judges, keep the best and the worst where they differ enough.

Prompts come from the data generator's training split only (never the exam, the real-question set or a test
split), in kinds that each have a judge:

    facts      a question about one attribute of a knowledge-base disease, its entry in the prompt:
               fact precision + recall against the entry, less for urgent advice to a textbook question
    missing    the same kind of question with no entry shown: an honest "no reliable facts" answer, or facts
               that hold (precision against the entry); invented ones cost
    emergency  the hand-written emergencies, crises and harm requests: the safe action (120/急诊, a crisis line,
               no dose), never telling the user to stay home
    unknown    a disease the knowledge base lacks: honest, with no invented list
    calm       the hand-written questions that need a doctor soon or are routine: no urgent advice
               (the over-triage the real-question set measures)

and every answer loses for a loop (a phrase five times in a row), no end (cut at the token limit), a leak of
another answer form and an echo of the question. Chosen = the best sample when the judges rank it above the golden
answer (and it reaches the kind's bar), else the golden answer; rejected = the worst sample; a pair is kept when
the two differ by `margin` or more.
Sampling is seeded: the same adapter, prompts and seed give the same file, byte for byte, on one machine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from medlora.config import ModelArgs, PairArgs, asdict
from medlora.databuild import build_tagged, load_sources
from medlora.databuild.patterns import ATTRIBUTE_PATTERNS
from medlora.eval.facts import fact_scores
from medlora.eval.judges import echoes, is_honest, is_safe, leaks, loops, urges
from medlora.io import atomic_write_jsonl, atomic_write_text

KINDS = ("facts", "missing", "emergency", "unknown", "calm")
# the generator's patterns behind each kind, and the safe action an emergency pattern asks for
# (missing: attribute questions and patients' own narratives, the prompts where an adapter without facts invents or
# sends the writer to the emergency room)
SOURCES = {"facts": tuple(ATTRIBUTE_PATTERNS),
           "missing": (*ATTRIBUTE_PATTERNS, "narrative", "patient_symptoms", "vignette"),
           "emergency": ("emergency", "crisis", "harm"), "unknown": ("unknown",), "calm": ("soon", "routine")}
SAFE_ACTION = {"emergency": "urgent", "crisis": "crisis", "harm": "refuse_dose"}
# the score a sample must reach to be chosen over the golden answer
GOOD = {"facts": 1.5, "missing": 1.0, "emergency": 1.5, "unknown": 1.5, "calm": 0.75}


def prompts(per_kind: int, seed: int = 42, counts: dict[str, int] | None = None) -> list[dict]:
    """`per_kind` training questions of each kind (`counts` of the kinds it names; distinct questions, a seeded
    draw), with their labels."""
    tagged = [r for r in build_tagged(load_sources("kb"), seed) if r["split"] == "train"]
    chosen = []
    for kind in KINDS:
        seen, pool = set(), []
        for record in tagged:
            if record["pattern"] in SOURCES[kind] and record["instruction"] not in seen:
                seen.add(record["instruction"])
                pool.append(record)
        wanted = (counts or {}).get(kind, per_kind)
        for record in random.Random(f"{seed}\x1fpairs\x1f{kind}").sample(pool, min(wanted, len(pool))):
            row = {"kind": kind, "instruction": record["instruction"], "input": record["input"],
                   "golden": record["output"], "pattern": record["pattern"]}
            if kind in ("facts", "missing"):
                row["disease"] = record["disease"]
                if record["pattern"] in ATTRIBUTE_PATTERNS:  # else the attribute the question asks (fact_scores)
                    row["attribute"] = ATTRIBUTE_PATTERNS[record["pattern"]]
            chosen.append(row)
    return chosen


def judge(row: dict, index=None) -> dict:
    """The judges' verdicts on one answer (`row`: the prompt's labels, `output`, `ended_by_eos`) and their `total`."""
    kind = row["kind"]
    answer = {**row, "output": row.get("output") or ""}
    output = answer["output"]
    verdict = {"loop": loops(output), "ended": bool(row.get("ended_by_eos", True)), "leaks": leaks(answer),
               "echo": echoes(answer)}
    total = -1.0 * verdict["loop"] - 0.5 * (not verdict["ended"]) - 0.5 * len(verdict["leaks"]) - 0.5 * verdict["echo"]
    if kind in ("facts", "missing"):
        facts = fact_scores(answer, index)
        verdict.update(facts)
        precision = facts.get("fact_precision")
        if kind == "facts":
            total += facts.get("fact_recall", 0.0) + (precision if precision is not None else 0.0)
        else:
            verdict["honest"] = is_honest({"output": output})
            total += 1.5 if verdict["honest"] else (2 * precision - 1 if precision is not None else -0.5)
        verdict["urges"] = urges(output)
        total -= (1.0 if kind == "facts" else 2.0) * verdict["urges"]
    elif kind == "emergency":
        verdict["safe"] = is_safe({"output": output, "safe_action": SAFE_ACTION[row["pattern"]]})
        total += 2.0 if verdict["safe"] else -2.0
    elif kind == "unknown":
        verdict["honest"] = is_honest({"output": output})
        total += 2.0 if verdict["honest"] else -1.0
    else:
        verdict["urges"] = urges(output)
        total += -2.0 if verdict["urges"] else 1.0
    verdict["total"] = round(total, 4)
    return verdict


def choose(row: dict, answers: list[dict], margin: float, index=None) -> dict | None:
    """The pair for one prompt from its sampled answers ({"text", "ended_by_eos"}), or None when the best and the
    worst do not differ by `margin`."""
    judged = sorted(((judge({**row, "output": a["text"], "ended_by_eos": a["ended_by_eos"]}, index), a["text"])
                     for a in answers), key=lambda item: item[0]["total"])
    worst, best = judged[0], judged[-1]
    golden = (judge({**row, "output": row["golden"], "ended_by_eos": True}, index), row["golden"])
    # a sample is chosen only when the judges rank it above the golden answer: where they cannot tell them apart, the
    # answer a person wrote is the one to imitate (the judges do not see nonsense that holds the right words)
    if best[0]["total"] < GOOD[row["kind"]] or best[0]["total"] <= golden[0]["total"]:
        best = golden
    if best[0]["total"] - worst[0]["total"] < margin or best[1].strip() == worst[1].strip():
        return None
    return {"instruction": row["instruction"], "input": row["input"], "chosen": best[1], "rejected": worst[1],
            "knowledge": row["knowledge"], "kind": row["kind"],
            "scores": {"chosen": best[0], "rejected": worst[0], "chosen_is_golden": best[1] == row["golden"]}}


def build_pairs(lora_weights: str, out: str | Path, base_model: str | ModelArgs = "gemma3-270m",
                args: PairArgs | None = None, echo=print) -> dict:
    """Sample, judge and write `out` (JSONL, TRL-compatible prompt fields plus `knowledge` and `scores`); returns
    counts per kind."""
    import torch

    from medlora.config import RECOMMENDED_DECODING, GenerationArgs
    from medlora.generate import Generator

    args = args or PairArgs()
    generator = Generator.load(base_model, lora_weights, merge=True)
    index = generator.knowledge
    rows = prompts(args.per_kind, args.seed, args.kind_counts())
    for row in rows:  # the facts the prompt shows: what retrieval finds, none for `missing` (as SFT's noise does)
        found = index.retrieve_turn(row["instruction"], row["input"]) if index is not None else None
        row["knowledge"] = None if found is None else "" if row["kind"] == "missing" else found.text()
    prompts_text = [generator.template.build_prompt(r["instruction"], r["input"], generator.tokenizer, (),
                                                    r["knowledge"]) for r in rows]
    gen = GenerationArgs(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                         top_p=args.top_p, top_k=0, frequency_penalty=RECOMMENDED_DECODING["frequency_penalty"])
    torch.manual_seed(args.seed)
    echo(f"[medlora] pairs: sampling {args.samples} answers to each of {len(rows)} prompts from {lora_weights}")
    answers = generator.generate([p for p in prompts_text for _ in range(args.samples)], gen,
                                 batch_size=args.max_batch_size, progress=True)
    pairs, counts = [], {kind: [0, 0] for kind in KINDS}
    for number, row in enumerate(rows):
        sampled = [{"text": a.text, "ended_by_eos": a.ended_by_eos}
                   for a in answers[number * args.samples:(number + 1) * args.samples]]
        pair = choose(row, sampled, args.margin)  # judged against the built-in knowledge base the prompts come from
        counts[row["kind"]][0] += 1
        if pair is not None:
            counts[row["kind"]][1] += 1
            pairs.append(pair if index is not None else {k: v for k, v in pair.items() if k != "knowledge"})
    atomic_write_jsonl(Path(out), pairs)
    summary = {kind: {"prompts": n, "pairs": kept} for kind, (n, kept) in counts.items()}
    atomic_write_text(Path(f"{out}.json"), json.dumps({"lora_weights": str(lora_weights), "args": asdict(args),
                                                       "counts": summary}, ensure_ascii=False, indent=2) + "\n")
    return summary
