"""`medlora <command>`: one entry point over thin command modules in `medlora.commands`.

Errors the user can cause are printed as one line (no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from medlora import __version__
from medlora.errors import MedloraError, TrainingError

COMMANDS = {
    "finetune": "fine-tune a LoRA adapter on instruction records",
    "infer": "answer every record of a file (or interactively) with a base model and an optional adapter",
    "eval": "score base and tuned models on records with golden answers, and write a report",
    "chat": "streaming terminal chat with a model",
    "merge": "fold an adapter into its base and save a plain transformers model",
    "export": "write a tuned model as one GGUF file (llama.cpp, Ollama) with an Ollama Modelfile",
    "serve": "OpenAI-compatible HTTP API (chat/completions, completions, models)",
    "webui": "Gradio web page: streaming chat and base-vs-tuned side by side",
    "models": "list the built-in base models",
    "data": "build the built-in Chinese medical instruction data from the knowledge base",
}
MODEL_COMMANDS = ("finetune", "infer", "eval", "chat", "merge", "export", "serve", "webui")
# Packages of the optional extras (pyproject.toml), by the top-level module a missing one fails to import
OPTIONAL_EXTRAS = {"gradio": "web", "pyCMeKG": "cmekg", "sentencepiece": "gguf-export"}
EXIT_USER_ERROR = 2
EXIT_TRAINING_ERROR = 1


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medlora", description="LoRA fine-tuning of small open LLMs into a Chinese medical assistant. "
        "Research use only; not medical advice.")
    parser.add_argument("--version", action="version", version=f"medlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        if only and name != only:
            continue
        module = _command_module(name)
        if module is None:
            continue
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.add_argument("--config", default=None, metavar="RECIPE",
                                    help="YAML file of this command's options (option: value); flags override it")
        module.add_arguments(command_parser)
        command_parser.set_defaults(run=module.run)
    return parser


def _command_module(name: str):
    try:
        return importlib.import_module(f"medlora.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"medlora.commands.{name}":
            return None
        raise


def apply_recipe(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """`args` with `--config RECIPE` read: the recipe's values become the command's defaults and `argv` is parsed
    again, so that flags still win. The one place a recipe is applied, for every command."""
    if not getattr(args, "config", None):
        return args
    from medlora.config import option_kinds, read_recipe

    command_parser = parser._subparsers._group_actions[0].choices[args.command]
    command_parser.set_defaults(**read_recipe(args.config, option_kinds(command_parser), args.command))
    return parser.parse_args(argv)


def setup_logging() -> None:
    # medlora's own progress at INFO; other libraries only from WARNING (matplotlib's font cache, httpx's requests...)
    logging.basicConfig(level=logging.WARNING, format="[medlora] %(message)s", stream=sys.stderr)
    logging.getLogger("medlora").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        args = apply_recipe(parser, args, argv)
        if args.command in MODEL_COMMANDS:
            from medlora.modeling import configure_threads

            configure_threads()
        return args.run(args) or 0
    except TrainingError as exc:
        print(f"medlora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_TRAINING_ERROR
    except MedloraError as exc:
        print(f"medlora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in OPTIONAL_EXTRAS:
            raise
        extra = OPTIONAL_EXTRAS[top]
        print(f"medlora {args.command}: error: this needs the optional package {top} (the '{extra}' extra): "
              f"pip install 'medlora[{extra}]'", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"\nmedlora {args.command}: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
