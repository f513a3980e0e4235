"""Knowledge retrieval: how well it links (data/linking, data/realq, the exam) and how fast (questions per second of
`KnowledgeIndex.retrieve` on one core, against a naive baseline run side by side: every name and alias scored by
rapidfuzz for every question). See docs/benchmarks.md and docs/knowledge.md ("Retrieval").

    python bench/retrieval.py                 # the curated knowledge base
    python bench/retrieval.py --source both   # + CMeKG (needs the cmekg extra)
    python bench/retrieval.py --quality-only  # the link scores only

Link scores (data/linking, by kind): precision = shown entries that are in `entries` or `acceptable`; recall =
labelled `entries` shown; for questions labelled none, the share that retrieve nothing; for narratives, entries
shown as the patient's disease (not as a possibility) and wrong possibilities. Speed questions: the exam's 276 and
the first 2,000 of Huatuo's llama_data.json (natural questions from another source); the median of 3 timed passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HUATUO = Path(os.environ.get("MEDLORA_HUATUO_DIR") or REPO.parent / "shared" / "data" / "huatuo")
sys.path.insert(0, str(REPO / "src"))


def questions() -> list[str]:
    exam = [json.loads(line)["instruction"] for line in (REPO / "data" / "exam" / "exam.jsonl").open(encoding="utf-8")]
    with (HUATUO / "llama_data.json").open(encoding="utf-8") as handle:
        huatuo = [json.loads(next(handle))["instruction"] for _ in range(2000)]
    return exam + huatuo


def naive(index, question: str) -> list[str]:
    """The baseline: score every name and alias against the question with rapidfuzz, keep those at 100."""
    from rapidfuzz import fuzz, process

    from medlora.vocab import normalise

    found = process.extract(normalise(question), list(index._names), scorer=fuzz.partial_ratio, score_cutoff=100,
                            limit=None)
    return sorted({name for form, _, _ in found for name in index._names[form][1]})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def names(value) -> list[str]:
    return [n for n in (value if isinstance(value, list) else str(value or "").split("、")) if n and n != "none"]


def link_scores(index, rows: list[dict]) -> dict:
    """Link precision and recall, none-retrieves-nothing, and for narratives what is shown as certain or possible."""
    shown = tp = labelled = hit = nones = empty = certain = possible = wrong_possible = 0
    for row in rows:
        found = index.retrieve(row["question"])
        entries, allowed = set(names(row["entries"])), set(names(row["entries"])) | set(names(row.get("acceptable")))
        shown += len(found.diseases)
        tp += sum(d in allowed for d in found.diseases)
        labelled += len(entries)
        hit += len(entries & set(found.diseases))
        if not entries:
            nones += 1
            empty += not found.diseases
        for match in found.matches:
            if match.possible:
                possible += 1
                wrong_possible += match.disease not in allowed
            else:
                certain += 1
    return {"n": len(rows), "precision": round(tp / shown, 3) if shown else None,
            "recall": round(hit / labelled, 3) if labelled else None,
            "none_empty": round(empty / nones, 3) if nones else None, "shown_certain": certain,
            "shown_possible": possible, "wrong_possible": wrong_possible}


def quality(index) -> dict:
    """Link scores on the linking set by kind (and over the kinds that name a disease), on the real-question set, and
    the exam's labelled questions that retrieve nothing."""
    linking = read_jsonl(REPO / "data" / "linking" / "linking.jsonl")
    kinds = sorted({row["kind"] for row in linking})
    out = {kind: link_scores(index, [r for r in linking if r["kind"] == kind]) for kind in kinds}
    named = [r for r in linking if r["kind"] not in ("narrative", "none")]
    out["names_a_disease"] = link_scores(index, named)
    realq = [{**r, "question": r["instruction"]} for r in read_jsonl(REPO / "data" / "realq" / "realq.jsonl")]
    out["realq"] = link_scores(index, realq)
    exam = [r for r in read_jsonl(REPO / "data" / "exam" / "exam.jsonl") if r.get("disease")]
    out["exam_no_facts"] = round(sum(not index.retrieve(r["instruction"]).diseases for r in exam) / len(exam), 3)
    return out


def rate(fn, qs: list[str]) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for q in qs:
            fn(q)
        times.append(time.perf_counter() - start)
    return len(qs) / statistics.median(times)


def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from medlora.knowledge import KnowledgeIndex

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="kb", help="kb (default), cmekg or both")
    parser.add_argument("--quality-only", action="store_true", help="the link scores only, no timing")
    args = parser.parse_args()
    start = time.perf_counter()
    index = KnowledgeIndex.load(args.source)
    built = time.perf_counter() - start
    for name, scores in quality(index).items():
        print(json.dumps({"source": args.source, "set": name, **(scores if isinstance(scores, dict)
                                                                   else {"share": scores})}, ensure_ascii=False))
    if args.quality_only:
        return 0
    qs = questions()
    ours, baseline = rate(index.retrieve, qs), rate(lambda q: naive(index, q), qs)
    linked = sum(bool(index.retrieve(q).diseases) for q in qs)
    print(json.dumps({"source": args.source, "diseases": len(index.diseases), "index_seconds": round(built, 2),
                      "questions": len(qs), "linked": linked, "retrieve_per_s": round(ours),
                      "naive_per_s": round(baseline), "ratio": round(ours / baseline, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
