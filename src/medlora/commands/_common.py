"""Options and loading shared by the commands that run a model."""

from __future__ import annotations

import argparse

from medlora.config import GenerationArgs, ModelArgs, add_dataclass_args, build_dataclass, str2bool
from medlora.errors import ConfigError


def add_model_arguments(parser: argparse.ArgumentParser, adapters: str = "one") -> None:
    add_dataclass_args(parser, ModelArgs, "model")
    group = parser.add_argument_group("adapter and template")
    if adapters == "one":
        group.add_argument("--lora_weights", default=None, help="LoRA adapter folder (written by finetune)")
        group.add_argument("--use_lora", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                           help="use the adapter given by --lora_weights (default: when --lora_weights is given)")
    group.add_argument("--prompt_template", "--template", dest="prompt_template", default=None,
                       help="template name or JSON file (default: the adapter's, else med_template)")
    group.add_argument("--merge_lora", type=str2bool, nargs="?", const=True, default=True, metavar="BOOL",
                       help="merge the adapter into the base weights for faster inference (default: true)")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, GenerationArgs, "generation")


def generation_args(args: argparse.Namespace) -> GenerationArgs:
    return build_dataclass(GenerationArgs, vars(args))


def model_args(args: argparse.Namespace) -> ModelArgs:
    return build_dataclass(ModelArgs, vars(args))


def adapter_path(args: argparse.Namespace) -> str | None:
    """The adapter to load, honouring the seed's --use_lora flag."""
    if args.use_lora is False:
        return None
    if args.use_lora and not args.lora_weights:
        raise ConfigError("--use_lora needs --lora_weights DIR (the folder written by finetune)")
    return args.lora_weights


def load_generator(args: argparse.Namespace, lora_weights: str | None = None):
    from medlora.generate import Generator

    margs = model_args(args)
    return Generator.load(margs.base_model, lora_weights, args.prompt_template, margs.dtype, margs.load_8bit,
                          margs.load_4bit, margs.trust_remote_code, margs.allow_pickle, merge=args.merge_lora)
