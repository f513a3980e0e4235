"""`make demo`: the main job on the built-in defaults, offline, one command, no questions asked.

Prepares Gemma-3-270m, knowledge-tunes a LoRA adapter on the built-in medqa training split (recipe
`recipes/gemma3-270m-demo.yaml`, sized for a 2-core CPU: facts from the knowledge base in every prompt), then
evaluates the base model and the adapter on the real-question set (runs/demo/realq: 330 questions real patients
wrote, labelled for triage and knowledge-base entries; runs/demo/realq2: 200 more, triage only) and on the
independent exam (runs/demo/exam, the headline: fact-level scores, leaks, safety, honest answers, triage), where the
base model also answers prompted with the same facts (base+knowledge): seed-style answer blocks, the metrics tables
and a report for each. The generator's own test split is left to `medlora eval --data data/medqa/test.jsonl` (a check
that training took, not evidence).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medlora import DISCLAIMER
from medlora.cli import main as medlora
from medlora.config import RECOMMENDED_DECODING
from medlora.io import data_file_hashes

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "gemma3-270m-demo.yaml"
ADAPTER = REPO / "runs" / "demo" / "adapter"
REALQ = REPO / "data" / "realq" / "realq.jsonl"
REALQ_DIR = REPO / "runs" / "demo" / "realq"
# 200 more real questions, triage only, drawn after the training data's topics were chosen (data/realq2/README.md)
REALQ2 = REPO / "data" / "realq2" / "realq2.jsonl"
REALQ2_DIR = REPO / "runs" / "demo" / "realq2"
EXAM = REPO / "data" / "exam" / "exam.jsonl"
EXAM_DIR = REPO / "runs" / "demo" / "exam"
# The recommended decoding (config.RECOMMENDED_DECODING, as the adapter records it) for every model of the demo, the
# base included: greedy, with OpenAI's frequency penalty on the answer's own tokens: after 10 minutes of training the
# adapter still falls into list loops (`贫血、贫血、…`) on about 7% of the answers; a flat repetition penalty of 1.1
# freed few of them, a penalty growing with each repeat frees them all (measured on the demo adapter: README).
DECODING = [part for key, value in RECOMMENDED_DECODING.items() for part in (f"--{key}", str(value))]
# 32 rows decode together: a decode step reads every weight once (Gemma's 262k-row LM head is 62% of the bytes), so
# on a 2-core CPU a step of 32 rows costs 1.15-1.24x one of 16, and the exam's answers came 1.12-1.15x (tuned) and
# 1.28-1.34x (base) faster than with 16 (bench/eval_rows.py; docs/benchmarks.md, round five).
EVAL_ROWS = 32


def adapter_is_current(adapter: Path, recipe: Path) -> bool:
    """A finished adapter trained from this very recipe (so a second `make demo` need not train again)."""
    import yaml

    meta_file = adapter / "medlora.json"
    if not (adapter / "adapter_config.json").is_file() or not meta_file.is_file():
        return False
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    trained = {**meta.get("model_args", {}), **meta.get("data_args", {}), **meta.get("lora_args", {}),
               **meta.get("train_args", {})}
    wanted = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    if any(trained.get(key) != value for key, value in wanted.items()):
        return False
    # and from the very data (a rebuilt data/medqa must retrain); paths are as the recipe gives them, from the repo
    current = data_file_hashes(wanted.get("data_path"), wanted.get("val_data_path"), root=REPO)
    return bool(current) and meta.get("data_sha256") == current


def run(retrain: bool = False, limit: int | None = None) -> int:
    print(DISCLAIMER, flush=True)
    if retrain or not adapter_is_current(ADAPTER, RECIPE):
        print(f"[medlora] knowledge-tuning gemma3-270m with {RECIPE.relative_to(REPO)} (7 to 16 minutes on 2 CPU "
              f"cores, then 12 to 18 minutes of evaluation: less when the base model's answers are cached)", flush=True)
        code = medlora(["finetune", "--config", str(RECIPE)])
        if code:
            return code
    else:
        print(f"[medlora] {ADAPTER.relative_to(REPO)} is already trained from this recipe: reusing it "
              f"(make demo-retrain, or delete runs/demo, to train again)", flush=True)
    # the real patients' questions first, then the independent exam, whose tables are printed last
    for data, out in ((REALQ, REALQ_DIR), (REALQ2, REALQ2_DIR), (EXAM, EXAM_DIR)):
        print(f"[medlora] evaluating base and tuned on {data.relative_to(REPO)}", flush=True)
        args = ["eval", "--base_model", "gemma3-270m", "--lora_weights", f"tuned={ADAPTER}", "--data", str(data),
                "--out", str(out), "--train_dir", str(ADAPTER), "--max_batch_size", str(EVAL_ROWS), "--show", "5", *DECODING]
        if data == EXAM:  # knowledge without training, beside knowledge-tuning
            args += ["--base_knowledge", "kb"]
        code = medlora(args + (["--limit", str(limit)] if limit else []))
        if code:
            return code
    print(f"[medlora] reports: {EXAM_DIR / 'report.html'} (the exam), {REALQ_DIR / 'report.html'} (real questions); "
          f"each with report.md and metrics.json")
    return 0


PREFER_RECIPE = REPO / "recipes" / "gemma3-270m-dpo.yaml"
# 16 prompts of each of the five kinds, 4 samples each: sampling takes about 6 minutes of the 20 on 2 CPU cores
PAIRS = ["--per_kind", "16", "--samples", "4"]
PREFER_DIR = REPO / "runs" / "demo-prefer"


def run_prefer(limit: int | None = None) -> int:
    """`make demo-prefer`: pairs sampled from the demo's SFT adapter and judged by the knowledge base, DPO on that
    adapter (recipes/gemma3-270m-dpo.yaml), then the exam and the real questions answered by the DPO adapter and
    scored beside the SFT adapter's answers from `make demo` (same greedy decoding, so the same answers it would
    give again) and the base model's."""
    print(DISCLAIMER, flush=True)
    if not adapter_is_current(ADAPTER, RECIPE):
        print(f"[medlora] {ADAPTER.relative_to(REPO)} is missing or stale: training the SFT adapter first", flush=True)
        code = medlora(["finetune", "--config", str(RECIPE)])
        if code:
            return code
    pairs = PREFER_DIR / "pairs.jsonl"
    print(f"[medlora] building preference pairs from {ADAPTER.relative_to(REPO)} into {pairs.relative_to(REPO)}",
          flush=True)
    code = medlora(["data", "pairs", "--lora_weights", str(ADAPTER), "--out", str(pairs), *PAIRS])
    if code:
        return code
    code = medlora(["finetune", "--config", str(PREFER_RECIPE)])
    if code:
        return code
    for data, sft_dir, name in ((REALQ, REALQ_DIR, "realq"), (REALQ2, REALQ2_DIR, "realq2"), (EXAM, EXAM_DIR, "exam")):
        print(f"[medlora] evaluating the DPO adapter on {data.relative_to(REPO)}", flush=True)
        sft = sft_dir / "tuned" / "results.jsonl"
        code = medlora(["eval", "--base_model", "gemma3-270m", "--lora_weights", f"dpo={PREFER_DIR / 'adapter'}",
                        *(["--results", f"sft={sft}"] if sft.is_file() and not limit else []), "--data", str(data),
                        "--out", str(PREFER_DIR / name), "--max_batch_size", str(EVAL_ROWS), "--show", "5", *DECODING]
                       + (["--limit", str(limit)] if limit else []))
        if code:
            return code
    print(f"[medlora] reports: {PREFER_DIR / 'exam' / 'report.html'}, {PREFER_DIR / 'realq' / 'report.html'}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m medlora.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="train again even if runs/demo/adapter is current")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N records of the real-question set and the exam")
    parser.add_argument("--prefer", action="store_true",
                        help="the preference stage instead (make demo-prefer): pairs, DPO, SFT against DPO")
    args = parser.parse_args()
    sys.exit(run_prefer(args.limit) if args.prefer else run(args.retrain, args.limit))


if __name__ == "__main__":
    main()
