"""Answer speed against the number of rows decoded together: the exam answered by the base model (no facts) and by
the demo adapter (facts in every prompt), continuous batching with 16 and with 32 rows, side by side, then the cost
of one decode step by rows. What `make demo`'s evaluation batch size rests on. See docs/benchmarks.md.

    python bench/eval_rows.py                    # data/exam/exam.jsonl, runs/demo/adapter, 16 vs 32 rows
    python bench/eval_rows.py --limit 96 --rows 16 32 64

Greedy, 128 new tokens, frequency penalty 0.3 (the demo's decoding). Tokens/s counts answer tokens over the wall
time of the whole call, prefill included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def answer_speed(generator, records: list[dict], rows: int) -> dict:
    from medlora.config import GenerationArgs

    prompts = [generator.build_prompt(r["instruction"], r.get("input", ""),
                                      retrieved=generator.lookup(r["instruction"])) for r in records]
    started = time.perf_counter()
    answers = generator.generate(prompts, GenerationArgs(max_new_tokens=128, frequency_penalty=0.3), batch_size=rows)
    seconds = time.perf_counter() - started
    tokens = sum(a.n_tokens for a in answers)
    return {"rows": rows, "seconds": round(seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def step_ms(model, rows: int, width: int, repeats: int = 15) -> float:
    """Median milliseconds of one decode step for `rows` rows over a cache of `width` columns."""
    import torch
    from transformers import DynamicCache

    mask = torch.ones(rows, width, dtype=torch.long)
    with torch.inference_mode():
        cache = model(input_ids=torch.randint(100, 20000, (rows, width)), attention_mask=mask,
                      past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1).past_key_values
        last, times = torch.randint(100, 20000, (rows, 1)), []
        for _ in range(repeats):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=-1)
            started = time.perf_counter()
            model(input_ids=last, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                  past_key_values=cache, use_cache=True, cache_position=torch.tensor([mask.shape[1] - 1]),
                  logits_to_keep=1)
            times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "exam" / "exam.jsonl"))
    parser.add_argument("--adapter", default=str(REPO / "runs" / "demo" / "adapter"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args()
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        print(f"bench/eval_rows.py: no adapter in {args.adapter}: run make demo first", file=sys.stderr)
        return 2
    from medlora.generate import Generator
    from medlora.modeling import configure_threads

    configure_threads()
    lines = Path(args.data).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line][:args.limit]
    results = {}
    for label, adapter in (("base", None), ("tuned", args.adapter)):
        generator = Generator.load("gemma3-270m", adapter)
        results[label] = [answer_speed(generator, records, rows) for rows in args.rows]
        for line in results[label]:
            print(f"{label:5s} rows {line['rows']:3d}: {line['tokens_per_s']:6.1f} answer tokens/s "
                  f"({line['tokens']} tokens, {line['seconds']} s)", flush=True)
        first = results[label][0]["tokens_per_s"]
        for line in results[label][1:]:
            print(f"{label:5s} rows {line['rows']} vs {args.rows[0]}: {line['tokens_per_s'] / first:.2f}x", flush=True)
    model = generator.model
    for rows in (1, *args.rows):
        print(f"decode step, {rows:3d} rows, 200-column cache: {step_ms(model, rows, 200)} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
