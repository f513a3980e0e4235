"""Knowledge retrieval speed: questions per second of `KnowledgeIndex.retrieve` on one core, against a naive
baseline run side by side (every name and alias scored by rapidfuzz for every question). See docs/benchmarks.md.

    python bench/retrieval.py                 # the curated knowledge base
    python bench/retrieval.py --source both   # + CMeKG (needs the cmekg extra)

Questions: the exam's 276 and the first 2,000 of Huatuo's llama_data.json (natural questions from another source);
the median of 3 timed passes over all of them.
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

    from medlora.evaluate import normalise

    found = process.extract(normalise(question), index._by_length, scorer=fuzz.partial_ratio, score_cutoff=100,
                            limit=None)
    return sorted({index._names[form] for form, _, _ in found})


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
    args = parser.parse_args()
    start = time.perf_counter()
    index = KnowledgeIndex.load(args.source)
    built = time.perf_counter() - start
    qs = questions()
    ours, baseline = rate(index.retrieve, qs), rate(lambda q: naive(index, q), qs)
    linked = sum(bool(index.retrieve(q).diseases) for q in qs)
    print(json.dumps({"source": args.source, "diseases": len(index.diseases), "index_seconds": round(built, 2),
                      "questions": len(qs), "linked": linked, "retrieve_per_s": round(ours),
                      "naive_per_s": round(baseline), "ratio": round(ours / baseline, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
