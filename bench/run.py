"""medlora vs the reference recipe, side by side on this machine. See docs/benchmarks.md.

    python bench/run.py --quick            # < 10 min: one JSON object per line
    python bench/run.py --write docs/benchmarks.md   # the full run (medians of 3), rewrites the doc

Every measurement runs in its own subprocess (clean peak RSS, no warm caches shared between the two), ours and
the reference alternating. Workload: gemma3-270m, the first records of Huatuo's llama_data.json, micro-batch 4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HUATUO = Path(os.environ.get("MEDLORA_HUATUO_DIR") or REPO.parent / "shared" / "data" / "huatuo")
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

SETTINGS = {"model": "gemma3-270m", "micro_batch_size": 4, "batch_size": 16, "learning_rate": 3e-4,
            "cutoff_len": 256, "lora": "r=8 alpha=16 dropout=0.05 q_proj,v_proj", "max_new_tokens": 128}


# ---------------------------------------------------------------- workers (each runs in a fresh process)

def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """Peak GPU memory this process allocated through torch (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def load_workload(n: int, offset: int = 0) -> list[dict]:
    from medlora.data import load_records

    return load_records(HUATUO / "llama_data.json")[offset:offset + n]


def template():
    from medlora.templates import load_template

    return load_template(str(HUATUO / "med_template.json"))


def worker_train(impl: str, n: int, out: str, seed: int = 42, plain: bool = False, grouped: bool = False,
                 unsorted: bool = False) -> dict:
    """One epoch over the first `n` records with medlora's defaults (impl "ours") or the reference recipe ("ref").
    Ours only: `plain`, fp32 weights (the reference's numerics) with our loss, for checking that our loss path
    changes nothing; `grouped`, length-grouped batches (off by default: faster, but it moves the loss); `unsorted`,
    micro-batches in random order instead of sorted by length within each step (--sort_within_step false)."""
    from medlora.registry import prepare_builtin

    records = load_workload(n)
    if impl == "ref":
        from ref_recipe import ref_train

        result = ref_train(str(prepare_builtin("gemma3-270m")), records, template(), out,
                           SETTINGS["micro_batch_size"], SETTINGS["batch_size"], SETTINGS["learning_rate"], seed)
    else:
        from medlora.config import DataArgs, LoraArgs, ModelArgs, TrainArgs
        from medlora.train import finetune

        data_file = Path(out) / "train.jsonl"
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        res = finetune(ModelArgs(base_model="gemma3-270m", dtype="fp32" if plain else "auto"),
                       DataArgs(data_path=str(data_file), prompt_template=str(HUATUO / "med_template.json")),
                       LoraArgs(),
                       TrainArgs(output_dir=out, batch_size=SETTINGS["batch_size"], num_epochs=1,
                                 micro_batch_size=SETTINGS["micro_batch_size"], learning_rate=SETTINGS["learning_rate"],
                                 save_steps=10**9, logging_steps=10**9, report_to="none", seed=seed,
                                 group_by_length=grouped, sort_within_step=not unsorted), echo=lambda *a: None)
        result = {"seconds": res.wall_seconds, "supervised_tokens": res.stats.n_supervised_tokens}
    result.update(flops=train_flops(records), peak_rss_mb=peak_rss_mb(), peak_gpu_mb=peak_gpu_mb())
    return result


def train_flops(records) -> dict:
    """Useful model FLOPs of one LoRA epoch: forward + backward through activations (frozen weights get no weight
    gradient, so 2x forward), with the LM head counted only where a label is supervised."""
    from transformers import AutoConfig

    from medlora.modeling import load_tokenizer
    from medlora.registry import prepare_builtin
    from medlora.tokenize import tokenize_records

    config = AutoConfig.from_pretrained(prepare_builtin("gemma3-270m")).get_text_config()
    examples, stats = tokenize_records(records, template(), load_tokenizer("gemma3-270m"), cutoff_len=256)
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_token = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    tokens = sum(len(e["input_ids"]) for e in examples)
    attention = sum(layers * 2 * len(e["input_ids"]) ** 2 * q for e in examples)  # QK^T and AV, causal half
    forward = 2 * per_token * tokens + attention + 2 * config.vocab_size * h * stats.n_supervised_tokens
    return {"model_flops": 2 * forward, "tokens": tokens}


def worker_val_loss(adapter: str, n_val: int, offset: int) -> dict:
    """Mean supervised-token loss on held-out records, fp32, the plain HF loss: same judge for both adapters."""
    import torch

    from medlora.modeling import load_adapter, load_base_model, load_tokenizer
    from medlora.tokenize import tokenize_records
    from transformers import DataCollatorForSeq2Seq

    tokenizer = load_tokenizer("gemma3-270m")
    model = load_adapter(load_base_model("gemma3-270m", dtype="fp32"), adapter).eval()
    examples, stats = tokenize_records(load_workload(n_val, offset), template(), tokenizer, cutoff_len=256)
    collate = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=-100, padding=True)
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(examples), 8):
            batch = {k: v.to(model.device) for k, v in collate(examples[start:start + 8]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n
    return {"val_loss": total / stats.n_supervised_tokens}


def worker_infer(impl: str, n: int) -> dict:
    import torch

    records = load_workload(n, offset=1000)
    if impl == "ref":
        from transformers import AutoModelForCausalLM

        from medlora.modeling import default_device, load_tokenizer
        from medlora.registry import prepare_builtin
        from ref_recipe import ref_infer

        tokenizer = load_tokenizer("gemma3-270m")
        model = AutoModelForCausalLM.from_pretrained(prepare_builtin("gemma3-270m"), dtype=torch.float32)
        model = model.to(default_device()).eval()
        answers, seconds = ref_infer(model, tokenizer, template(), records, SETTINGS["max_new_tokens"])
    else:
        from medlora.config import GenerationArgs
        from medlora.generate import Generator

        generator = Generator.load("gemma3-270m", prompt_template=str(HUATUO / "med_template.json"))
        beams = 4 if impl == "ours-beam" else 1
        gen = GenerationArgs(max_new_tokens=SETTINGS["max_new_tokens"], num_beams=beams)
        prompts = [generator.build_prompt(r["instruction"], r["input"]) for r in records]
        start = time.perf_counter()
        answers = [a.text for a in generator.generate(prompts, gen, batch_size=16 if beams == 1 else 8)]
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "answers": n, "answer_chars": sum(len(a) for a in answers),
            "peak_rss_mb": peak_rss_mb()}


def worker_latency() -> dict:
    from medlora.config import GenerationArgs
    from medlora.generate import Generator

    generator = Generator.load("gemma3-270m", prompt_template=str(HUATUO / "med_template.json"))
    prompt = generator.build_prompt("糖尿病患者日常饮食应注意什么？")
    gen = GenerationArgs(max_new_tokens=64)
    list(generator.stream(prompt, GenerationArgs(max_new_tokens=4)))  # warm-up
    start = time.perf_counter()
    first, pieces = None, []
    for piece in generator.stream(prompt, gen):
        first = first or time.perf_counter() - start
        pieces.append(piece)
    total = time.perf_counter() - start
    n_tokens = len(generator.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"])
    return {"ttft_s": first, "tokens": n_tokens, "tokens_per_s": n_tokens / total}


def worker_peak() -> dict:
    """Measured bf16 matmul peak (GFLOPS) of the device the bench trains on: all CPU threads, or the GPU."""
    import torch

    from medlora.modeling import default_device

    device = default_device()
    size = 8192 if device == "cuda" else 2048
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a, b = (torch.randn(size, size, dtype=torch.bfloat16, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        sync()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = max(best, 10 * 2 * size ** 3 / (time.perf_counter() - start) / 1e9)
    return {"gflops": best, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


WORKERS = {"train": worker_train, "val_loss": worker_val_loss, "infer": worker_infer, "latency": worker_latency,
           "peak": worker_peak}


# ---------------------------------------------------------------- orchestration

def run_worker(name: str, **kwargs) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--kwargs", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"bench worker {name} {kwargs} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workload, one run each (< 10 min)")
    parser.add_argument("--runs", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--write", default=None, help="write the markdown report here")
    parser.add_argument("--loss-check", action="store_true",
                        help="validation loss of other seeds and variants (--variants): how far apart two equally "
                             "good runs land, and what each speed-up does to the loss")
    parser.add_argument("--variants", default="ours:1,ours:2,plain:42,grouped:42",
                        help="with --loss-check: IMPL:SEED runs, IMPL one of ours (medlora's defaults), plain (ours in "
                             "fp32), grouped (ours with length-grouped batches), unsorted (ours with random "
                             "micro-batches, the default before sort_within_step), ref")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"what to measure, a comma list of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--reuse", default=None,
                        help="raw figures (a benchmarks.json written earlier) to take the parts not measured from")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](**json.loads(args.kwargs))))
        return
    if not (HUATUO / "llama_data.json").is_file():
        print(f"bench skipped: {HUATUO / 'llama_data.json'} is absent (the shared Huatuo data is needed)")
        return
    runs = args.runs or (1 if args.quick else 3)
    n_train, n_infer, n_ref_infer = (32, 16, 4) if args.quick else (512, 64, 16)
    if args.loss_check:
        loss_check(n_train, args.variants)
        return
    parts = [part for part in args.parts.split(",") if part]
    if set(parts) - set(PARTS) or (set(parts) != set(PARTS) and not args.reuse):
        parser.error(f"--parts takes {', '.join(PARTS)}; measuring only some of them needs --reuse FILE")
    earlier = json.loads(Path(args.reuse).read_text(encoding="utf-8")) if args.reuse else {}
    raw = Path(args.write).with_suffix(".json") if args.write else None
    results = measure(runs, n_train, n_infer, n_ref_infer, raw, parts, earlier)
    for line in summary_lines(results):
        print(json.dumps(line))
    if args.write:
        from report import write_markdown

        write_markdown(Path(args.write), results, summary_lines(results), SETTINGS,
                       {"runs": runs, "n_train": n_train, "n_infer": n_infer, "n_ref_infer": n_ref_infer})


PARTS = ("train", "infer", "latency")


def measure(runs: int, n_train: int, n_infer: int, n_ref_infer: int, raw: Path | None = None,
            parts=PARTS, earlier: dict | None = None) -> dict:
    """Every worker's figures; with `raw`, they are also saved there after each worker, so a long run that stops
    half-way keeps what it measured. Parts not in `parts` are taken from `earlier` (an earlier run's raw figures);
    `measured` records the date of each part's figures."""
    today = time.strftime("%Y-%m-%d %H:%M")
    earlier = earlier or {}
    results = {"peak": run_worker("peak"), "train": {"ours": [], "ref": []}, "val": {},
               "infer": {"ours": [], "ref": [], "ours-beam": []}, "latency": [], "measured": {}}
    for part in PARTS:
        if part in parts:
            results["measured"][part] = today
        else:
            results[part] = earlier[part]
            results["measured"][part] = earlier.get("measured", {}).get(part, "an earlier run")
            if part == "train":
                results["val"] = earlier["val"]
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(runs):
            for impl in ("ref", "ours") if "train" in parts else ():
                out = f"{scratch}/{impl}-{run}"
                results["train"][impl].append(run_worker("train", impl=impl, n=n_train, out=out))
                if run == 0:
                    results["val"][impl] = run_worker("val_loss", adapter=out, n_val=64, offset=n_train)
                save_raw(results, raw)
            for impl, n in (("ref", n_ref_infer), ("ours", n_infer), ("ours-beam", n_infer)) if "infer" in parts else ():
                results["infer"][impl].append(run_worker("infer", impl=impl, n=n))
                save_raw(results, raw)
            if "latency" in parts:
                results["latency"].append(run_worker("latency"))
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version(), **versions()}
    save_raw(results, raw)
    return results


def loss_check(n_train: int, variants: str) -> None:
    """Validation loss of other seeds and numerics, to size what a seed alone moves (see --variants)."""
    with tempfile.TemporaryDirectory() as scratch:
        for variant in variants.split(","):
            impl, seed = variant.split(":")
            out = f"{scratch}/{impl}-{seed}"
            kwargs = {"impl": "ref"} if impl == "ref" else {"impl": "ours", "plain": impl == "plain",
                                                            "grouped": impl == "grouped",
                                                            "unsorted": impl == "unsorted"}
            train = run_worker("train", n=n_train, out=out, seed=int(seed), **kwargs)
            val = run_worker("val_loss", adapter=out, n_val=64, offset=n_train)
            print(json.dumps({"name": "val_loss", "variant": impl, "seed": int(seed), **val,
                              "train_seconds": train["seconds"]}), flush=True)


def save_raw(results: dict, raw: Path | None) -> None:
    from medlora.io import atomic_write_text

    if raw is not None:
        atomic_write_text(raw, json.dumps(results, indent=1) + "\n")


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "accelerate")}


def summary_lines(results: dict) -> list[dict]:
    train = results["train"]
    tps = {impl: [r["supervised_tokens"] / r["seconds"] for r in train[impl]] for impl in train}
    rss = {impl: [r["peak_rss_mb"] for r in train[impl]] for impl in train}
    aps = {impl: [r["answers"] / r["seconds"] for r in results["infer"][impl]] for impl in results["infer"]}
    mfu = [r["flops"]["model_flops"] / r["seconds"] / 1e9 for r in train["ours"]]
    med = statistics.median
    return [
        {"name": "train_throughput", "ours": med(tps["ours"]), "reference": med(tps["ref"]),
         "unit": "supervised tokens/s", "ratio": med(tps["ours"]) / med(tps["ref"])},
        {"name": "train_peak_rss", "ours": med(rss["ours"]), "reference": med(rss["ref"]), "unit": "MB",
         "ratio": med(rss["ours"]) / med(rss["ref"])},
        {"name": "train_val_loss", "ours": results["val"]["ours"]["val_loss"],
         "reference": results["val"]["ref"]["val_loss"], "unit": "nats/token (fp32, held-out)",
         "ratio": results["val"]["ours"]["val_loss"] / results["val"]["ref"]["val_loss"]},
        {"name": "infer_batch_throughput", "ours": med(aps["ours"]), "reference": med(aps["ref"]),
         "unit": "answers/s (greedy batched vs per-record beam 4)", "ratio": med(aps["ours"]) / med(aps["ref"])},
        {"name": "infer_beam_batched", "ours": med(aps["ours-beam"]), "reference": med(aps["ref"]),
         "unit": "answers/s (beam 4 batched vs per-record beam 4)", "ratio": med(aps["ours-beam"]) / med(aps["ref"])},
        {"name": "mfu", "ours": med(mfu), "reference": results["peak"]["gflops"], "unit": "GFLOPS (model / bf16 peak)",
         "ratio": med(mfu) / results["peak"]["gflops"]},
        {"name": "latency_ttft", "ours": med(r["ttft_s"] for r in results["latency"]), "reference": None,
         "unit": "s", "ratio": None},
        {"name": "latency_stream", "ours": med(r["tokens_per_s"] for r in results["latency"]), "reference": None,
         "unit": "tokens/s", "ratio": None},
    ]


if __name__ == "__main__":
    main()
