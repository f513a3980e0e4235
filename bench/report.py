"""Markdown for docs/benchmarks.md from bench/run.py's measurements; `python bench/report.py --gpu FILE` prints the
rows of a GPU run (bench/gpu/compare.sh's JSON), which `--write` also puts in the page when docs/benchmarks-gpu.json
holds one."""

from __future__ import annotations

import argparse
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
        *_peer_lines(by_name),
        *_gpu_section(REPO / "docs" / "benchmarks-gpu.json"),
        "",
        "Raw lines (`bench/run.py` output):",
        "",
        "```",
        *[json.dumps(line) for line in lines],
        "```",
    ]
    out += ["", HAND_WRITTEN, *_hand_written(path)]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def _peer_lines(by_name: dict) -> list[str]:
    """The lines beside the reference: TRL's SFTTrainer, the validation loss's speed, the tuned model's answers."""
    out = []
    trl = by_name.get("train_vs_trl", {})
    if "ratio" in trl:
        out += ["", f"Against TRL's SFTTrainer on the same workload in the same run ({trl['unit']}): ours "
                f"{_fmt(trl['ours'])} vs {_fmt(trl['reference'])} supervised tokens/s, **{trl['ratio']:.2f}×**; "
                f"training loss ours {trl['train_loss']['ours']:.4f}, TRL {trl['train_loss']['trl']:.4f}; held-out "
                f"loss ours {trl['val_loss']['ours']:.4f}, TRL {trl['val_loss']['trl']:.4f}."]
    compiled = by_name.get("train_compiled", {})
    if "ratio" in compiled:
        out += ["", f"With `--torch_compile` ({compiled['unit']}): {_fmt(compiled['ours'])} vs "
                f"{_fmt(compiled['reference'])} supervised tokens/s, **{compiled['ratio']:.2f}×**; held-out loss "
                f"compiled {compiled['val_loss']['compiled']:.4f}, ours {compiled['val_loss']['ours']:.4f}."]
    val = by_name.get("val_loss_speedup", {})
    if "ratio" in val:
        out += ["", f"Validation loss ({val['unit']}): ours {val['ours']:.1f} s, the Trainer's loop "
                f"{val['reference']:.1f} s, **{val['ratio']:.2f}×**."]
    answers = by_name.get("tuned_vs_base_tokens_per_s", {})
    if "ratio" in answers:
        out += ["", f"Answer speed ({answers['unit']}): tuned {answers['ours']:.1f}, base {answers['reference']:.1f} "
                f"tokens/s, **{answers['ratio']:.2f}×**."]
    return out


def gpu_rows(results: dict) -> list[str]:
    """Markdown for one GPU run of bench/gpu/compare.sh: ours (bf16) against the reference (fp16), same card."""
    train, val, gpu = results["train"], results.get("val", {}), results.get("gpu", {})
    rows = [("training, supervised tokens/s", [r["supervised_tokens"] / r["seconds"] for r in train["ours"]],
             [r["supervised_tokens"] / r["seconds"] for r in train["ref"]]),
            ("training, peak GPU memory (MB, torch allocated)", [r["peak_gpu_mb"] for r in train["ours"]],
             [r["peak_gpu_mb"] for r in train["ref"]]),
            ("training, peak RSS (MB)", [r["peak_rss_mb"] for r in train["ours"]],
             [r["peak_rss_mb"] for r in train["ref"]])]
    if "trl" in train:
        rows.append(("training, supervised tokens/s: ours vs TRL's SFTTrainer",
                     [r["supervised_tokens"] / r["seconds"] for r in train["ours"]],
                     [r["supervised_tokens"] / r["seconds"] for r in train["trl"]]))
    machine = results.get("machine", {})
    out = [f"On {gpu.get('name') or results['peak'].get('device')} ({results['measured'].get('train', '?')}): "
           f"`bash bench/gpu/compare.sh`, ours bf16 against the reference recipe (plain Trainer; fp16 on CUDA, "
           f"fp32 on a CPU), "
           f"{results.get('settings', {}).get('n_train', '?')} Huatuo records, {len(train['ours'])} run(s) each, "
           f"alternating; torch {machine.get('torch')}, transformers {machine.get('transformers')}, peft "
           f"{machine.get('peft')}; {gpu.get('weights', 'real')} weights"
           + (" (random: the speeds and memory are the real model's, the losses are not)"
              if gpu.get("weights") == "random" else "") + f". bf16 matmul peak {results['peak']['gflops']:,.0f} "
           f"GFLOPS.", "",
           "| measure | ours min / median / max | reference min / median / max | ratio (medians) |",
           "|---|---|---|---|"]
    for name, ours, ref in rows:
        if None in ours or None in ref or not ours or not ref:
            continue
        out.append(f"| {name} | {_spread(ours)} | {_spread(ref)} | "
                   f"{statistics.median(ours) / statistics.median(ref):.2f}× |")
    if "ours" in val and "ref" in val:
        out += ["", f"Validation loss after the same supervised tokens (64 held-out records, fp32): ours "
                f"{val['ours']['val_loss']:.4f}, reference {val['ref']['val_loss']:.4f}"
                + (f", TRL {val['trl']['val_loss']:.4f}" if "trl" in val else "") + "."]
    return out


def _gpu_section(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return ["", "### On a GPU (`bench/gpu/compare.sh`)", "", *gpu_rows(json.loads(path.read_text(encoding="utf-8")))]


HAND_WRITTEN = "<!-- bench/run.py --write rewrites the page above this line; everything below it is written by hand. -->"


def _hand_written(path: Path) -> list[str]:
    """The page's hand-written part (the analysis against the targets, the other benchmarks): what follows the
    HAND_WRITTEN line of the page as it is, kept as written."""
    page = path.read_text(encoding="utf-8") if path.is_file() else ""
    _, found, kept = page.partition(HAND_WRITTEN)
    return ["", kept.strip()] if found and kept.strip() else []


def main() -> None:
    parser = argparse.ArgumentParser(description="print docs rows from a bench JSON")
    parser.add_argument("--gpu", required=True, help="the JSON a GPU run of bench/gpu/compare.sh wrote")
    args = parser.parse_args()
    print("\n".join(gpu_rows(json.loads(Path(args.gpu).read_text(encoding="utf-8")))))


if __name__ == "__main__":
    main()
