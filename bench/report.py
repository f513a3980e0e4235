"""Markdown for docs/benchmarks.md from bench/run.py's measurements."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def _spread(values) -> str:
    values = list(values)
    return f"{_fmt(min(values))} / {_fmt(statistics.median(values))} / {_fmt(max(values))}"


def _dates(results: dict) -> list[str]:
    """A line saying when each part was measured, when the parts come from different runs (--parts/--reuse)."""
    measured = results.get("measured", {})
    if len(set(measured.values())) <= 1:
        return []
    return ["Parts measured in different runs (`--parts`, `--reuse`): "
            + "; ".join(f"{part} {when}" for part, when in measured.items()) + ".", ""]


def write_markdown(path: Path, results: dict, lines: list[dict], settings: dict, workload: dict) -> None:
    train, infer = results["train"], results["infer"]
    rows = [
        ("training, supervised tokens/s", [r["supervised_tokens"] / r["seconds"] for r in train["ours"]],
         [r["supervised_tokens"] / r["seconds"] for r in train["ref"]]),
        ("training, peak RSS (MB)", [r["peak_rss_mb"] for r in train["ours"]], [r["peak_rss_mb"] for r in train["ref"]]),
        ("inference, answers/s: ours greedy batched vs ref beam-4 per record",
         [r["answers"] / r["seconds"] for r in infer["ours"]], [r["answers"] / r["seconds"] for r in infer["ref"]]),
        ("inference, answers/s: ours beam-4 batched vs ref beam-4 per record",
         [r["answers"] / r["seconds"] for r in infer["ours-beam"]], [r["answers"] / r["seconds"] for r in infer["ref"]]),
    ]
    out = [
        "# Benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `python bench/run.py {' '.join(sys.argv[1:])}` "
        f"(`make bench` runs the full workload: 512 training records, 3 runs).",
        "",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpu_count']} CPU cores, Python "
        f"{results['machine']['python']}, torch {results['machine']['torch']}, transformers "
        f"{results['machine']['transformers']}, peft {results['machine']['peft']}. Measured bf16 matmul peak: "
        f"{results['peak']['gflops']:.0f} GFLOPS.",
        "",
        f"Workload: {settings['model']}, the first {workload['n_train']} records of Huatuo's `llama_data.json` "
        f"(Huatuo's med_template), micro-batch {settings['micro_batch_size']}, global batch {settings['batch_size']}, "
        f"lr {settings['learning_rate']}, cutoff_len {settings['cutoff_len']}, LoRA {settings['lora']}, one epoch "
        f"(the same records, so the same supervised tokens, for both). Inference: {workload['n_infer']} records for ours, "
        f"{workload['n_ref_infer']} for the reference's per-record loop (answers/s is per record), "
        f"max_new_tokens {settings['max_new_tokens']}. {workload['runs']} run(s) each, alternating.",
        "",
        *_dates(results),
        "| measure | ours min / median / max | reference min / median / max | ratio (medians) |",
        "|---|---|---|---|",
    ]
    for name, ours, ref in rows:
        out.append(f"| {name} | {_spread(ours)} | {_spread(ref)} | {statistics.median(ours) / statistics.median(ref):.2f}× |")
    by_name = {line["name"]: line for line in lines}
    out += [
        "",
        f"Validation loss after the same supervised tokens (64 held-out records, fp32, plain loss): ours "
        f"{by_name['train_val_loss']['ours']:.4f}, reference {by_name['train_val_loss']['reference']:.4f}.",
        "",
        f"Model FLOPs utilisation during our training: {by_name['mfu']['ours']:.0f} GFLOPS of useful model FLOPs "
        f"= {100 * by_name['mfu']['ratio']:.0f}% of the measured bf16 peak ({by_name['mfu']['reference']:.0f} GFLOPS).",
        "",
        f"Interactive latency (one streamed answer, 64 new tokens): time to first token "
        f"{by_name['latency_ttft']['ours']:.2f} s, {by_name['latency_stream']['ours']:.1f} tokens/s.",
        *_hand_written("benchmarks-targets.md"),
        "",
        "Raw lines (`bench/run.py` output):",
        "",
        "```",
        *[json.dumps(line) for line in lines],
        "```",
    ]
    out += _hand_written("benchmarks-extra.md")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def _hand_written(name: str) -> list[str]:
    """A hand-written part of the page (docs/NAME: the analysis against the targets, other benchmarks), if any."""
    page = REPO / "docs" / name
    return ["", page.read_text(encoding="utf-8").rstrip()] if page.is_file() else []
