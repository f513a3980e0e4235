"""Tokenisation of the training records: this checkout against another one (e.g. a worktree of an older commit),
side by side, best of 3 each, alternating. Prints seconds per run and whether the examples are identical.

    git worktree add /tmp/old dfc1c56
    python bench/tokenize_speed.py --other /tmp/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = """
import hashlib, json, sys, time
from medlora.data import load_records
from medlora.modeling import load_tokenizer
from medlora.templates import load_template
from medlora.tokenize import tokenize_records
tokenizer, records = load_tokenizer(sys.argv[1]), load_records(sys.argv[2])
template, best = load_template("med_template"), float("inf")
for _ in range(3):
    start = time.perf_counter()
    examples, _ = tokenize_records(records, template, tokenizer, cutoff_len=256)
    best = min(best, time.perf_counter() - start)
digest = hashlib.sha256(json.dumps(examples).encode()).hexdigest()
print(json.dumps({"seconds": best, "n": len(examples), "sha256": digest}))
"""


def run(src: str, model: str, data: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src, "MEDLORA_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER, model, data], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", required=True, help="the src/ folder of the checkout to compare with")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", default=str(REPO / "data" / "medqa" / "train.jsonl"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        other, ours = run(args.other, args.model, args.data), run(str(REPO / "src"), args.model, args.data)
        ratio = other["seconds"] / ours["seconds"]
        print(f"other {other['seconds']:.2f} s, this {ours['seconds']:.2f} s (ratio {ratio:.2f}), "
              f"{ours['n']} examples, identical: {other['sha256'] == ours['sha256']}")


if __name__ == "__main__":
    main()
