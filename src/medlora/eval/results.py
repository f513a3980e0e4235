"""`results.jsonl` rows: one answered record each, written by `medlora infer` and `medlora eval` and scored by
medlora.eval.metrics. Made here from a model's answers, read back (checked), and printed as the seed's blocks."""

from __future__ import annotations

from pathlib import Path

from medlora.errors import DataError

RESULTS = "results.jsonl"


def answer_records(generator, records: list[dict], gen, batch_size: int) -> list[dict]:
    """results.jsonl rows: the record (its labels such as `kind` too), its golden and model output, timing, and
    with knowledge on, the entries retrieved for it. `generator` is a medlora.generate.Generator."""
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


def read_results(path: str, limit: int = 0) -> list[dict]:
    """The rows of a results.jsonl file (the first `limit`, all when 0); a row that is not an object with string
    `instruction`, `golden` and `output` is refused naming its line."""
    from medlora.data import read_rows

    rows = []  # every row is checked, also past `limit`
    for where, row in read_rows(Path(path)):
        if not isinstance(row, dict):
            raise DataError(f"{path}, {where}: a result must be a JSON object (a results.jsonl row)")
        for name in ("instruction", "golden", "output"):
            if not isinstance(row.get(name), str):
                state = "is missing" if name not in row else f"must be a string, got {type(row[name]).__name__}"
                raise DataError(f"{path}, {where}: field '{name}' {state} (a results.jsonl row written by "
                                f"medlora infer/eval has instruction, golden and output)")
        rows.append(row)
    return rows[:limit] if limit > 0 else rows


def format_block(row: dict) -> str:
    """The seed's printed block for one row (with a ###history### block for a conversation's earlier turns, and a
    ###knowledge### block when the prompt had facts)."""
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
