"""`medlora merge`: fold an adapter into its base and save a plain transformers model folder."""

from __future__ import annotations

import argparse

from medlora.commands._common import add_lora_weights_argument, add_out_argument, model_args, set_option
from medlora.config import ModelArgs, add_dataclass_args
from medlora.export import MERGE_DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, ModelArgs, "model", skip=("load_8bit", "load_4bit"))  # merged in full precision
    set_option(parser, "base_model", default=None, required=True,
               help="the adapter's base: built-in name (see `medlora models`), local folder or cached hub name")
    set_option(parser, "dtype", default="fp32", choices=sorted(MERGE_DTYPES),
               help="weights dtype of the merged model (default: fp32)")
    files = parser.add_argument_group("adapter and output")
    add_lora_weights_argument(files, required=True)
    add_out_argument(files, "folder for the merged model (replaced only once complete)", required=True)


def run(args: argparse.Namespace) -> int:
    from medlora.export import merge_adapter
    from medlora.io import claim_output

    margs = model_args(args)
    claim_output("--out", args.out, {"--base_model": margs.base_model, "--lora_weights": args.lora_weights})
    report = merge_adapter(margs.base_model, args.lora_weights, args.out, margs.dtype,
                           trust_remote_code=margs.trust_remote_code, allow_pickle=margs.allow_pickle)
    print(f"[medlora] {report.summary()}")
    return 0
