"""Out-of-distribution check: base and tuned answer natural medical questions from another source (the first 500
records of Huatuo's llama_data.json), side by side, with the same decoding as `make demo`. See docs/benchmarks.md.

    python bench/ood.py                                   # the demo adapter, 500 records (about 25 min on 2 cores)
    python bench/ood.py --adapter runs/full/adapter --limit 100 --out runs/ood-full

The records carry no labels, so the fact-level scores find the disease and the attribute in each question
(docs/evaluation.md); most of these questions name diseases the knowledge base does not hold, so `fact_n` is small.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HUATUO = Path(os.environ.get("MEDLORA_HUATUO_DIR") or REPO.parent / "shared" / "data" / "huatuo")
sys.path.insert(0, str(REPO / "src"))

SHOWN = ("rougeL", "bleu4", "fact_recall", "fact_precision", "fact_n", "leak_rate", "eos_rate", "avg_answer_chars")


def main() -> int:
    from medlora.cli import main as medlora
    from medlora.demo import ADAPTER, DECODING

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(ADAPTER), help="the tuned adapter (default: the demo's)")
    parser.add_argument("--limit", type=int, default=500, help="the first N records of llama_data.json (500)")
    parser.add_argument("--out", default=str(REPO / "runs" / "ood"), help="the evaluation folder (runs/ood)")
    args = parser.parse_args()
    code = medlora(["eval", "--base_model", "gemma3-270m", "--lora_weights", f"tuned={args.adapter}",
                    "--data", str(HUATUO / "llama_data.json"), "--limit", str(args.limit), "--out", args.out,
                    "--batch_size", "16", "--show", "0", *DECODING])
    if code:
        return code
    metrics = json.loads((Path(args.out) / "metrics.json").read_text(encoding="utf-8"))
    print("| model | " + " | ".join(SHOWN) + " |")
    print("|---|" + "---:|" * len(SHOWN))
    for label, values in metrics.items():
        print(f"| {label} | " + " | ".join("-" if values.get(k) is None else str(values[k]) for k in SHOWN) + " |")
    base, tuned = metrics["base"]["rougeL"], metrics["tuned"]["rougeL"]
    print(f"tuned / base ROUGE-L: {tuned / base:.2f}x ({args.limit} records of llama_data.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
