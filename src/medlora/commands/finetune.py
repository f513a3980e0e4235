"""`medlora finetune`: train a LoRA adapter. Options come from defaults < `--config recipe.yaml` < flags."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from medlora.config import (DataArgs, LoraArgs, ModelArgs, TrainArgs, add_dataclass_args, build_dataclass,
                            known_option_names, str2bool)
from medlora.errors import ConfigError

OPTION_CLASSES = (ModelArgs, DataArgs, LoraArgs, TrainArgs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML recipe of the same options; flags override it")
    for cls, title in zip(OPTION_CLASSES, ("model", "data", "lora", "training")):
        add_dataclass_args(parser, cls, title)


def _recipe_loader():
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        """safe_load without aliases: `*a` repeated through nested anchors grows a few bytes into gigabytes."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a recipe")
            return super().compose_node(parent, index)

    return RecipeLoader


def load_recipe(path: str) -> dict:
    """A recipe file's options, each checked against the known option names."""
    import yaml

    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"--config {path}: is a folder, not a recipe file")
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        values = yaml.load(file.read_text(encoding="utf-8"), Loader=_recipe_loader()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of option: value")
    known = known_option_names(*OPTION_CLASSES)
    for key in values:
        if key not in known:
            raise ConfigError(f"{path}: unknown option {_excerpt(key)} (known: see `medlora finetune --help`)")
    kinds = {f.name: type(f.default) for cls in OPTION_CLASSES for f in fields(cls)}
    return {key: _as_option_type(path, key, value, kinds[key]) for key, value in values.items()}


def _as_option_type(path: str, key: str, value, kind: type):
    """Convert as the command line would: YAML reads `3e-4` as a string, and an empty value as null."""
    if value is None and kind is str:
        return ""
    if isinstance(value, (dict, list)) or value is None or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{path}: option {key!r} must be {kind.__name__}, got {_excerpt(value)}")
    try:
        if kind is bool:
            return str2bool(str(value))
        return kind(str(value)) if kind is int else kind(value)  # int("8.5") fails where int(8.5) truncates
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"{path}: option {key!r} must be {kind.__name__}, got {_excerpt(value)}") from None


def _excerpt(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def resolve_options(args: argparse.Namespace) -> dict:
    """defaults < recipe < command-line flags (only flags actually given are in `args`)."""
    given = {k: v for k, v in vars(args).items() if k not in ("run", "command", "config")}
    recipe = load_recipe(args.config) if args.config else {}
    return {**recipe, **given}


def build_options(values: dict):
    try:
        return tuple(build_dataclass(cls, values) for cls in OPTION_CLASSES)
    except TypeError as exc:
        raise ConfigError(f"invalid option value: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from medlora.resilience import EXIT_INTERRUPTED
    from medlora.train import finetune, is_main_process

    model, data, lora, train = build_options(resolve_options(args))
    result = finetune(model, data, lora, train)
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
