"""Does llama.cpp answer as medlora does? The demo adapter exported with `medlora export --format gguf`, run in a real
llama.cpp (llama-cpp-python built from its PyPI sdist: `make llamacpp`), against `medlora infer`'s answers.

    make bench-llamacpp                     # = python bench/llamacpp_agreement.py (about 10 min on 2 cores)
    python bench/llamacpp_agreement.py --adapter runs/plain/adapter --n 50

Both get the same prompt text (built by medlora's Generator, with the facts the adapter's knowledge retrieves),
greedy decoding, the same max_new_tokens and no penalties; an answer agrees when the two texts are identical after
medlora's own cut at the template's stop markers. medlora answers in two dtypes: `auto` (what `medlora infer` uses:
bf16 on a CPU with native bf16) and `fp32`; the f16 file's weights are closer to fp32 than bf16 is, and medlora's
bf16 and fp32 answers differ from each other too (printed as the last line). Also counted: prompts that llama.cpp's
tokenizer splits into exactly the token ids transformers gives. Figures: docs/usage-after-training.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def default_adapter() -> Path:
    demo = REPO / "runs" / "demo" / "adapter"
    return demo if (demo / "adapter_config.json").is_file() else REPO / "runs" / "plain" / "adapter"


def read_records(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line, _ in zip(handle, range(n))]


def medlora_answers(base_model: str, adapter: Path, records: list[dict], max_new_tokens: int, dtype: str):
    """The prompts and answers of `medlora infer` (its Generator, greedy, no penalties), and the prompts' token ids."""
    from medlora.config import GenerationArgs
    from medlora.generate import Generator

    generator = Generator.load(base_model, str(adapter), dtype=dtype)
    found = [generator.lookup(r["instruction"], r.get("input", "")) for r in records]
    prompts = [generator.build_prompt(r["instruction"], r.get("input", ""), retrieved=f)
               for r, f in zip(records, found)]
    started = time.perf_counter()
    answers = generator.generate(prompts, GenerationArgs(max_new_tokens=max_new_tokens), batch_size=8)
    seconds = time.perf_counter() - started
    ids = [generator.tokenizer(p, add_special_tokens=generator.template.add_special_tokens)["input_ids"]
           for p in prompts]
    return generator.template, prompts, [a.text for a in answers], ids, seconds


def llamacpp_answers(gguf: Path, template, prompts: list[str], max_new_tokens: int, threads: int):
    """llama.cpp's greedy answers to the same prompt texts, cut as medlora cuts its own, and its token ids."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, seed=0, verbose=False)
    answers, ids = [], []
    started = time.perf_counter()
    for prompt in prompts:
        out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0,
                                    min_p=0.0, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
                                    stop=template.stop_strings or None)
        answers.append(template.extract_response(out["choices"][0]["text"]))
        ids.append(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    seconds = time.perf_counter() - started
    del llm
    return answers, ids, seconds


def export(base_model: str, adapter: Path, out: Path, outtype: str, reuse: bool) -> float:
    from medlora.gguf_export import export_gguf

    if reuse and out.is_file() and out.stat().st_mtime > (adapter / "adapter_model.safetensors").stat().st_mtime:
        return 0.0
    report = export_gguf(base_model, out, lora_weights=str(adapter), outtype=outtype, overwrite=True)
    print(f"[bench] {report.summary()}", file=sys.stderr)
    return report.seconds


def agreement(adapter: Path, base_model: str = "gemma3-270m", data: Path = REPO / "data" / "medqa" / "test.jsonl",
              n: int = 20, max_new_tokens: int = 128, outtypes=("f16", "q8_0"), dtypes=("auto",),
              out_dir: Path = REPO / "runs" / "llamacpp", threads: int = 2, reuse: bool = True) -> dict:
    """{"outtypes": {outtype: {"agree": k, "n": n, "same_tokens": t, ...}}, "rows": [...]} against each medlora
    dtype (the first one is the reference the figure is reported against)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(data, n)
    result = {"adapter": str(adapter), "base_model": base_model, "data": str(data), "n": len(records),
              "max_new_tokens": max_new_tokens, "reference": {}, "outtypes": {}}
    references = {}
    for dtype in dtypes:
        template, prompts, answers, hf_ids, seconds = medlora_answers(base_model, adapter, records, max_new_tokens,
                                                                      dtype)
        references[dtype] = answers
        result["reference"][dtype] = {"seconds": round(seconds, 1)}
    rows = [{"instruction": r["instruction"], **{f"medlora_{d}": references[d][i] for d in dtypes}}
            for i, r in enumerate(records)]
    for dtype in dtypes[1:]:  # medlora against itself in another dtype: how much rounding alone moves greedy answers
        result["reference"][dtype][f"agree_vs_{dtypes[0]}"] = sum(
            a == b for a, b in zip(references[dtype], references[dtypes[0]]))
    for outtype in outtypes:
        gguf = out_dir / f"{adapter.parent.name}-{outtype}.gguf"
        export_seconds = export(base_model, adapter, gguf, outtype, reuse)
        answers, ll_ids, seconds = llamacpp_answers(gguf, template, prompts, max_new_tokens, threads)
        figures = {"file_mib": round(gguf.stat().st_size / 2**20, 1), "export_seconds": round(export_seconds, 1),
                   "answer_seconds": round(seconds, 1),
                   "same_tokens": sum(a == b for a, b in zip(hf_ids, ll_ids))}
        for dtype in dtypes:
            figures[f"agree_vs_{dtype}"] = sum(a == b for a, b in zip(answers, references[dtype]))
        result["outtypes"][outtype] = figures
        for row, answer in zip(rows, answers):
            row[f"llamacpp_{outtype}"] = answer
    (out_dir / "agreement.json").write_text(json.dumps({**result, "rows": rows}, ensure_ascii=False, indent=1),
                                            encoding="utf-8")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=default_adapter(),
                        help="adapter to export (default: runs/demo/adapter, else runs/plain/adapter)")
    parser.add_argument("--base_model", default="gemma3-270m")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "medqa" / "test.jsonl")
    parser.add_argument("--n", type=int, default=20, help="the first N records (20)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--outtypes", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--dtypes", nargs="+", default=["auto", "fp32"],
                        help="medlora's dtypes to compare with (auto: what `medlora infer` uses, bf16 on a CPU "
                             "with native bf16)")
    parser.add_argument("--out_dir", type=Path, default=REPO / "runs" / "llamacpp",
                        help="where the GGUF files and agreement.json go (files newer than the adapter are reused)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = agreement(args.adapter, args.base_model, args.data, args.n, args.max_new_tokens, args.outtypes,
                       args.dtypes, args.out_dir, args.threads)
    n = result["n"]
    print(f"{args.adapter} on {args.base_model}, the first {n} records of {args.data.name}, greedy, "
          f"max_new_tokens {args.max_new_tokens}")
    print("| GGUF | " + " | ".join(f"identical answers vs medlora {d}" for d in args.dtypes)
          + " | identical prompt tokens | file MiB | llama.cpp s |")
    print("|---|" + "---:|" * (len(args.dtypes) + 3))
    for outtype, f in result["outtypes"].items():
        print(f"| {outtype} | " + " | ".join(f"{f[f'agree_vs_{d}']}/{n}" for d in args.dtypes)
              + f" | {f['same_tokens']}/{n} | {f['file_mib']} | {f['answer_seconds']} |")
    for dtype in args.dtypes[1:]:
        same = result["reference"][dtype][f"agree_vs_{args.dtypes[0]}"]
        print(f"(medlora {dtype} vs medlora {args.dtypes[0]}, no llama.cpp: {same}/{n} identical answers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
