"""`medlora export --format gguf`: one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it."""

from __future__ import annotations

import argparse

from medlora.commands._common import (add_lora_weights_argument, add_out_argument, add_prompt_arguments, model_args,
                                      set_option)
from medlora.config import ModelArgs, add_dataclass_args
from medlora.gguf_export import OUTTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    # the weights are converted as they are (--outtype), in full precision: no --dtype or 8-/4-bit loading
    add_dataclass_args(parser, ModelArgs, "model", skip=("dtype", "load_8bit", "load_4bit"))
    set_option(parser, "base_model", default=None,
               help="the adapter's base (built-in name, local folder or cached hub name), or a merged folder "
                    "(`medlora merge`) or model folder to convert as it is")
    files = parser.add_argument_group("adapter, template and output")
    add_lora_weights_argument(files, "LoRA adapter folder to merge into --base_model first")
    add_prompt_arguments(files, only=("prompt_template",))
    add_out_argument(files, "the GGUF file to write (FILE.gguf; FILE.Modelfile beside it)", required=True)
    files.add_argument("--outtype", default="f16", choices=OUTTYPES,
                       help="tensor type: f16 (default), bf16, or q8_0 (8-bit, half the size)")
    files.add_argument("--overwrite", action="store_true", help="replace an existing FILE.gguf / FILE.Modelfile")


def run(args: argparse.Namespace) -> int:
    from medlora.gguf_export import export_gguf
    from medlora.io import claim_output

    margs = model_args(args)
    claim_output("--out", args.out, {"--base_model": margs.base_model, "--lora_weights": args.lora_weights},
                 folder=False)
    report = export_gguf(margs.base_model, args.out, args.lora_weights, args.outtype, args.overwrite,
                         args.prompt_template, trust_remote_code=margs.trust_remote_code,
                         allow_pickle=margs.allow_pickle)
    print(f"[medlora] {report.summary()}")
    return 0
