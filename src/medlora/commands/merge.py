"""`medlora merge`: fold an adapter into its base and save a plain transformers model folder."""

from __future__ import annotations

import argparse

from medlora.export import MERGE_DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base_model", required=True, help="built-in name, local folder or cached hub name")
    parser.add_argument("--lora_weights", required=True, help="LoRA adapter folder (written by finetune)")
    parser.add_argument("--out", "--output_dir", dest="out", required=True,
                        help="folder for the merged model (replaced only once complete)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(MERGE_DTYPES),
                        help="weights dtype of the merged model (default: fp32)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model folder")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="allow loading a pickled adapter_model.bin (can run arbitrary code)")


def run(args: argparse.Namespace) -> int:
    from medlora.export import merge_adapter
    from medlora.io import claim_output

    claim_output("--out", args.out, {"--base_model": args.base_model, "--lora_weights": args.lora_weights})
    report = merge_adapter(args.base_model, args.lora_weights, args.out, args.dtype,
                           trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    print(f"[medlora] {report.summary()}")
    return 0
