"""medlora vs the reference recipe, side by side on this machine. See docs/benchmarks.md.

    python bench/run.py --quick            # one JSON object per line (about 12 min on 2 idle cores)
    python bench/run.py --write docs/benchmarks.md   # the full run (medians of 3), rewrites the doc
    python bench/run.py --parts train --json out.json   # some parts only: their lines, raw figures in out.json

Every measurement runs in its own subprocess (clean peak RSS, no warm caches shared between the two), ours, the
reference and TRL's SFTTrainer (bench/trl_recipe.py, when `medlora[bench-trl]` is installed) alternating.
Workload: gemma3-270m, the first records of Huatuo's llama_data.json, micro-batch 4. Besides: the validation loss's
speed (bench/val_loss.py) and the tokens/s of a tuned adapter's answers against the base's.
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
    """One epoch over the first `n` records with medlora's defaults (impl "ours"), the same with --torch_compile
    ("compiled": its time includes compiling, from inductor's cache in MEDLORA_HOME after the first run), the
    reference recipe ("ref") or TRL's SFTTrainer ("trl").
    Ours only: `plain`, fp32 weights (the reference's numerics) with our loss, for checking that our loss path
    changes nothing; `grouped`, length-grouped batches (off by default: faster, but it moves the loss); `unsorted`,
    micro-batches in random order instead of sorted by length within each step (--sort_within_step false)."""
    from medlora.registry import prepare_builtin

    records = load_workload(n)
    if impl in ("ref", "trl"):
        from ref_recipe import ref_train
        from trl_recipe import trl_train

        result = (ref_train if impl == "ref" else trl_train)(
            str(prepare_builtin("gemma3-270m")), records, template(), out, SETTINGS["micro_batch_size"],
            SETTINGS["batch_size"], SETTINGS["learning_rate"], seed)
    else:
        from medlora.config import DataArgs, LoraArgs, ModelArgs, TrainArgs
        from medlora.train import finetune

        data_file = Path(f"{out}-train.jsonl")  # beside the output folder: finetune refuses one holding its data
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        res = finetune(ModelArgs(base_model="gemma3-270m", dtype="fp32" if plain else "auto"),
                       DataArgs(data_path=str(data_file), prompt_template=str(HUATUO / "med_template.json")),
                       LoraArgs(),
                       TrainArgs(output_dir=out, batch_size=SETTINGS["batch_size"], num_epochs=1,
                                 micro_batch_size=SETTINGS["micro_batch_size"], learning_rate=SETTINGS["learning_rate"],
                                 save_steps=10**9, logging_steps=10**9, report_to="none", seed=seed,
                                 group_by_length=grouped, sort_within_step=not unsorted,
                                 torch_compile=impl == "compiled"), echo=lambda *a: None)
        result = {"seconds": res.wall_seconds, "supervised_tokens": res.stats.n_supervised_tokens,
                  "train_loss": next((h["train_loss"] for h in res.log_history if "train_loss" in h), None)}
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


def worker_val_speed(n: int | None) -> dict:
    """bench/val_loss.py's comparison: medlora's validation loss against the Trainer's own loop."""
    from val_loss import compare

    return compare(n)


def worker_answers(adapter: str | None, n: int, continuous: bool = True) -> dict:
    """Tokens/s of greedy answers to the first `n` test records through medlora's Generator, with the demo
    evaluation's decoding and batch size: the base (no knowledge, as `medlora eval` runs it) or `adapter` (with
    the knowledge and template it was trained with); continuous batching (the default) or static batches."""
    from medlora.config import GenerationArgs
    from medlora.data import load_records
    from medlora.generate import Generator

    records = load_records(REPO / "data" / "medqa" / "test.jsonl")[:n]
    generator = Generator.load("gemma3-270m", adapter)
    gen = GenerationArgs(max_new_tokens=128, frequency_penalty=0.3)
    prompts = [generator.build_prompt(r["instruction"], r["input"]) for r in records]
    generator.generate(prompts[:2], GenerationArgs(max_new_tokens=4))  # warm-up
    start = time.perf_counter()
    answers = generator.generate(prompts, gen, batch_size=16, continuous=continuous)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "answers": n, "tokens": sum(a.n_tokens for a in answers),
            "ended_by_eos": sum(a.ended_by_eos for a in answers)}


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
           "peak": worker_peak, "val_speed": worker_val_speed, "answers": worker_answers}


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
    parser.add_argument("--quick", action="store_true",
                        help="small workload, one run each (about 12 min on 2 idle cores)")
    parser.add_argument("--runs", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--n-train", type=int, default=None,
                        help="training records (default 512, 32 with --quick; fewer for a dry run of the paths)")
    parser.add_argument("--write", default=None, help="write the markdown report here (its raw figures beside it)")
    parser.add_argument("--json", default=None, help="save the raw figures here (without --write)")
    parser.add_argument("--adapter", default=None,
                        help="the tuned adapter of tuned_vs_base_tokens_per_s (default: runs/demo/adapter if trained, "
                             "else the adapter this run's training part trains)")
    parser.add_argument("--loss-check", action="store_true",
                        help="validation loss of other seeds and variants (--variants): how far apart two equally "
                             "good runs land, and what each speed-up does to the loss")
    parser.add_argument("--variants", default="ours:1,ours:2,plain:42,grouped:42",
                        help="with --loss-check: IMPL:SEED runs, IMPL one of ours (medlora's defaults), plain (ours in "
                             "fp32), grouped (ours with length-grouped batches), unsorted (ours with random "
                             "micro-batches, the default before sort_within_step), compiled (ours with "
                             "--torch_compile), ref, trl")
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
    n_train = args.n_train or n_train
    if args.loss_check:
        loss_check(n_train, args.variants)
        return
    parts = [part for part in args.parts.split(",") if part]
    if set(parts) - set(PARTS):
        parser.error(f"--parts takes {', '.join(PARTS)}")
    if args.write and set(parts) != set(PARTS) and not args.reuse:
        parser.error("--write with only some --parts needs --reuse FILE for the others")
    earlier = json.loads(Path(args.reuse).read_text(encoding="utf-8")) if args.reuse else {}
    raw = Path(args.write).with_suffix(".json") if args.write else Path(args.json) if args.json else None
    results = measure(runs, n_train, n_infer, n_ref_infer, raw, parts, earlier, quick=args.quick,
                      adapter=args.adapter)
    for line in summary_lines(results):
        print(json.dumps(line))
    if args.write:
        from report import write_markdown

        write_markdown(Path(args.write), results, summary_lines(results), SETTINGS,
                       {"runs": runs, "n_train": n_train, "n_infer": n_infer, "n_ref_infer": n_ref_infer})


PARTS = ("train", "infer", "latency", "val_speed", "answers")
DEMO_ADAPTER = REPO / "runs" / "demo" / "adapter"


def trl_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def measure(runs: int, n_train: int, n_infer: int, n_ref_infer: int, raw: Path | None = None,
            parts=PARTS, earlier: dict | None = None, quick: bool = False, adapter: str | None = None) -> dict:
    """Every worker's figures; with `raw`, they are also saved there after each worker, so a long run that stops
    half-way keeps what it measured. Parts not in `parts` are taken from `earlier` (an earlier run's raw figures)
    where it has them; `measured` records the date of each part's figures."""
    today = time.strftime("%Y-%m-%d %H:%M")
    earlier = earlier or {}
    trainers = ("ref", "ours", "compiled", "trl") if trl_installed() else ("ref", "ours", "compiled")
    results = {"peak": run_worker("peak"), "train": {impl: [] for impl in trainers}, "val": {},
               "infer": {"ours": [], "ref": [], "ours-beam": []}, "latency": [], "val_speed": [],
               "answers": {"base": [], "tuned": [], "tuned-static": []}, "measured": {},
               "settings": {"n_train": n_train, "runs": runs}}
    for part in PARTS:
        if part in parts:
            results["measured"][part] = today
        elif part in earlier:
            results[part] = earlier[part]
            results["measured"][part] = earlier.get("measured", {}).get(part, "an earlier run")
            if part == "train":
                results["val"] = earlier["val"]
    if "answers" in parts:
        adapter = adapter or (str(DEMO_ADAPTER) if (DEMO_ADAPTER / "adapter_config.json").is_file() else None)
        results["answers"]["adapter"] = adapter
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(runs):
            for impl in trainers if "train" in parts else ():
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
            if "val_speed" in parts:
                results["val_speed"].append(run_worker("val_speed", n=64 if quick else None))
                save_raw(results, raw)
            if "answers" in parts:
                if not results["answers"]["adapter"] and "train" in parts:
                    results["answers"]["adapter"] = f"{scratch}/ours-0"  # the adapter this run trained
                if results["answers"]["adapter"]:
                    tuned = results["answers"]["adapter"]
                    for model, path, continuous in (("base", None, True), ("tuned", tuned, True),
                                                    ("tuned-static", tuned, False)):
                        results["answers"][model].append(run_worker("answers", adapter=path, n=32 if quick else 64,
                                                                    continuous=continuous))
                save_raw(results, raw)
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
            kwargs = {"impl": impl} if impl in ("ref", "trl", "compiled") else {
                "impl": "ours", "plain": impl == "plain", "grouped": impl == "grouped", "unsorted": impl == "unsorted"}
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

    from trl_recipe import trl_version

    return {**{name: version(name) for name in ("torch", "transformers", "peft", "accelerate")},
            "trl": trl_version()}


def summary_lines(results: dict) -> list[dict]:
    """One line per measure; a measure whose part was not measured (nor reused) is a line with `skipped`."""
    lines = []
    for name, build in LINES:
        try:
            lines.append({"name": name, **build(results)})
        except (KeyError, IndexError, statistics.StatisticsError, TypeError):
            why = SKIPPED.get(name, "not measured in this run")
            if name == "train_vs_trl" and trl_installed():
                why = "TRL's figures are not in this run's training part"
            lines.append({"name": name, "skipped": why})
    return lines


def _per_second(rows: list[dict], amount: str) -> float:
    return statistics.median(r[amount] / r["seconds"] for r in rows)


def _ratio_line(ours: float, reference: float, unit: str, **extra) -> dict:
    return {"ours": ours, "reference": reference, "unit": unit, "ratio": ours / reference, **extra}


def _train_vs_trl(results: dict) -> dict:
    train, val = results["train"], results["val"]
    return _ratio_line(_per_second(train["ours"], "supervised_tokens"), _per_second(train["trl"], "supervised_tokens"),
                       f"supervised tokens/s (TRL {train['trl'][0].get('trl')} SFTTrainer, padding-free, bf16)",
                       train_loss={"ours": train["ours"][0].get("train_loss"), "trl": train["trl"][0]["train_loss"]},
                       val_loss={"ours": val["ours"]["val_loss"], "trl": val["trl"]["val_loss"]})


def _val_speed(results: dict) -> dict:
    rows = results["val_speed"]
    ours, trainer = _med(rows, "medlora_s"), _med(rows, "trainer_s")
    return {"ours": ours, "reference": trainer, "unit": f"s for {rows[0]['n']} validation records (ours vs the "
            f"Trainer's loop; ratio = speed-up)", "ratio": trainer / ours,
            "losses": {"ours": rows[0]["medlora_loss"], "trainer": rows[0]["trainer_loss"]}}


def _answers(results: dict) -> dict:
    answers = results["answers"]
    return _ratio_line(_per_second(answers["tuned"], "tokens"), _per_second(answers["base"], "tokens"),
                       f"answer tokens/s (tuned vs base, {answers['tuned'][0]['answers']} test records, greedy, "
                       f"batch 16, continuous batching)", adapter=answers["adapter"])


def _continuous(results: dict) -> dict:
    answers = results["answers"]
    return _ratio_line(_per_second(answers["tuned"], "tokens"), _per_second(answers["tuned-static"], "tokens"),
                       f"answer tokens/s of the tuned adapter (continuous vs static batches of 16, "
                       f"{answers['tuned'][0]['answers']} test records, greedy)", adapter=answers["adapter"])


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


LINES = [
    ("train_throughput", lambda r: _ratio_line(_per_second(r["train"]["ours"], "supervised_tokens"),
                                               _per_second(r["train"]["ref"], "supervised_tokens"),
                                               "supervised tokens/s")),
    ("train_peak_rss", lambda r: _ratio_line(_med(r["train"]["ours"], "peak_rss_mb"), _med(r["train"]["ref"], "peak_rss_mb"),
                                             "MB")),
    ("train_peak_gpu", lambda r: _ratio_line(_med(r["train"]["ours"], "peak_gpu_mb"), _med(r["train"]["ref"], "peak_gpu_mb"),
                                             "MB (torch.cuda.max_memory_allocated)")),
    ("train_val_loss", lambda r: _ratio_line(r["val"]["ours"]["val_loss"], r["val"]["ref"]["val_loss"],
                                             "nats/token (fp32, held-out)")),
    ("train_vs_trl", _train_vs_trl),
    ("train_compiled", lambda r: _ratio_line(
        _per_second(r["train"]["compiled"], "supervised_tokens"), _per_second(r["train"]["ours"], "supervised_tokens"),
        "supervised tokens/s (ours with --torch_compile, compiling included, vs ours)",
        val_loss={"compiled": r["val"]["compiled"]["val_loss"], "ours": r["val"]["ours"]["val_loss"]})),
    ("infer_batch_throughput", lambda r: _ratio_line(_per_second(r["infer"]["ours"], "answers"),
                                                     _per_second(r["infer"]["ref"], "answers"),
                                                     "answers/s (greedy batched vs per-record beam 4)")),
    ("infer_beam_batched", lambda r: _ratio_line(_per_second(r["infer"]["ours-beam"], "answers"),
                                                 _per_second(r["infer"]["ref"], "answers"),
                                                 "answers/s (beam 4 batched vs per-record beam 4)")),
    ("mfu", lambda r: _ratio_line(statistics.median(x["flops"]["model_flops"] / x["seconds"] / 1e9
                                                    for x in r["train"]["ours"]), r["peak"]["gflops"],
                                  "GFLOPS (model / bf16 peak)")),
    ("latency_ttft", lambda r: {"ours": _med(r["latency"], "ttft_s"), "reference": None, "unit": "s", "ratio": None}),
    ("latency_stream", lambda r: {"ours": _med(r["latency"], "tokens_per_s"), "reference": None, "unit": "tokens/s",
                                  "ratio": None}),
    ("val_loss_speedup", _val_speed),
    ("tuned_vs_base_tokens_per_s", _answers),
    ("continuous_vs_static", _continuous),
]
NO_ADAPTER = "no adapter: train one (make demo) or measure the training part in the same run"
SKIPPED = {
    "train_vs_trl": "TRL is not installed (the baseline is optional): pip install -e '.[bench-trl]' torch==2.13.0",
    "train_peak_gpu": "no CUDA device",
    "tuned_vs_base_tokens_per_s": NO_ADAPTER,
    "continuous_vs_static": NO_ADAPTER,
}


if __name__ == "__main__":
    main()
