"""`medlora export --format gguf`: one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it."""

from __future__ import annotations

import argparse

from medlora.gguf_export import OUTTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    parser.add_argument("--base_model", default=None,
                        help="the adapter's base (built-in name, local folder or cached hub name), or a merged "
                             "folder (`medlora merge`) or model folder to convert as it is")
    parser.add_argument("--lora_weights", default=None, help="LoRA adapter folder to merge into --base_model first")
    parser.add_argument("--out", required=True, help="the GGUF file to write (FILE.gguf; FILE.Modelfile beside it)")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES,
                        help="tensor type: f16 (default), bf16, or q8_0 (8-bit, half the size)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE.gguf / FILE.Modelfile")
    parser.add_argument("--prompt_template", "--template", dest="prompt_template", default=None,
                        help="template written into the file (default: the one the adapter/merged model records, "
                             "else med_template)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model folder")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="allow loading a pickled adapter_model.bin (can run arbitrary code)")


def run(args: argparse.Namespace) -> int:
    from medlora.gguf_export import export_gguf
    from medlora.io import claim_output

    claim_output("--out", args.out, {"--base_model": args.base_model, "--lora_weights": args.lora_weights},
                 folder=False)
    report = export_gguf(args.base_model, args.out, args.lora_weights, args.outtype, args.overwrite,
                         args.prompt_template, trust_remote_code=args.trust_remote_code,
                         allow_pickle=args.allow_pickle)
    print(f"[medlora] {report.summary()}")
    return 0
