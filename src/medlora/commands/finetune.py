"""`medlora finetune`: train a LoRA adapter, by supervised fine-tuning (`--stage sft`, the default) or on preference
pairs (`--stage dpo|kto`, medlora.prefer). Options come from defaults < `--config recipe.yaml` < flags (the recipe is
read for every command by medlora.config.read_recipe)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medlora.config import (DataArgs, LoraArgs, ModelArgs, PreferenceArgs, TrainArgs, add_dataclass_args,
                            build_dataclass, option_kinds, read_recipe)
from medlora.errors import ConfigError
from medlora.io import claim_output

OPTION_CLASSES = (ModelArgs, DataArgs, LoraArgs, TrainArgs, PreferenceArgs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for cls, title in zip(OPTION_CLASSES, ("model", "data", "lora", "training", "preference stage")):
        add_dataclass_args(parser, cls, title)


def load_recipe(path: str) -> dict:
    """A recipe file's options for finetune, each checked against its option names and types."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return read_recipe(path, option_kinds(parser), "finetune")


def resolve_options(args: argparse.Namespace) -> dict:
    """The options in `args`: defaults < recipe (applied by medlora.cli.apply_recipe) < command-line flags; only
    flags given, or set by the recipe, are in `args`."""
    return {k: v for k, v in vars(args).items() if k not in ("run", "command", "config")}


def build_options(values: dict):
    try:
        return tuple(build_dataclass(cls, values) for cls in OPTION_CLASSES)
    except TypeError as exc:
        raise ConfigError(f"invalid option value: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from medlora.resilience import EXIT_INTERRUPTED
    from medlora.train import finetune, is_main_process

    model, data, lora, train, pref = build_options(resolve_options(args))
    claim_output("--output_dir", train.output_dir, {"--data_path": data.data_path,
                                                    "--val_data_path": data.val_data_path})
    if pref.stage == "sft":
        result = finetune(model, data, lora, train)
    else:
        from medlora.prefer import prefer

        result = prefer(model, data, lora, train, pref)
    if not is_main_process():
        return 0
    if result.interrupted:
        print(f"[medlora] stopped on request; checkpoint saved in {train.output_dir}. "
              f"Resume with --resume_from_checkpoint auto")
        return EXIT_INTERRUPTED
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"[medlora] adapter saved in {Path(result.adapter_dir).resolve()}")
    print(f"[medlora] final train loss {fmt(result.train_loss)}, validation loss {fmt(result.eval_loss)}, "
          f"wall time {result.wall_seconds:.1f} s, {result.tokens_per_second:.1f} supervised tokens/s")
    return 0
