"""`medlora <command>`: one entry point over thin command modules in `medlora.commands`.

Errors the user can cause are printed as one line (no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
import warnings
from contextlib import contextmanager

from medlora import __version__
from medlora.errors import MedloraError, TrainingError

COMMANDS = {
    "finetune": "fine-tune a LoRA adapter on instruction records",
    "infer": "answer every record of a file (or interactively) with a base model and an optional adapter",
    "eval": "score base and tuned models on records with golden answers, and write a report",
    "bench": "standard Chinese medical multiple-choice benchmarks (XMedBench-zh), base and adapters side by side",
    "chat": "streaming terminal chat with a model",
    "merge": "fold an adapter into its base and save a plain transformers model",
    "export": "write a tuned model as one GGUF file (llama.cpp, Ollama) with an Ollama Modelfile",
    "serve": "OpenAI-compatible HTTP API (chat/completions, completions, models)",
    "webui": "Gradio web page: streaming chat and base-vs-tuned side by side",
    "models": "list the built-in base models",
    "data": "build the built-in Chinese medical instruction data from the knowledge base",
}
MODEL_COMMANDS = ("finetune", "infer", "eval", "bench", "chat", "merge", "export", "serve", "webui")
# Packages of the optional extras (pyproject.toml), by the top-level module a missing one fails to import
OPTIONAL_EXTRAS = {"gradio": "web", "pyCMeKG": "cmekg", "sentencepiece": "gguf-export"}
# the options that name a command's output, for a message about it
OUTPUT_OPTIONS = ("output_dir", "out", "model_output_dir")
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
        module.add_arguments(command_parser)
        for leaf in _option_parsers(command_parser):
            leaf.add_argument("--config", default=None, metavar="RECIPE",
                              help="YAML file of this command's options (option: value); flags override it")
            # checked once the recipe is read (apply_recipe), so that a recipe can give them too
            leaf.medlora_required = [action for action in leaf._actions if action.required and action.option_strings]
            for action in leaf.medlora_required:
                action.required = False
        command_parser.set_defaults(run=module.run)
    return parser


def _actions(command_parser: argparse.ArgumentParser):
    """The command's actions (`data build`, `data pairs`, ...): its sub-parsers, or None."""
    return next((a for a in command_parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _option_parsers(command_parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that hold a command's options: its own, or each of its actions'."""
    actions = _actions(command_parser)
    return list(actions.choices.values()) if actions else [command_parser]


def _options_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the options `args` were read with (the command's, or its action's)."""
    command_parser = parser._subparsers._group_actions[0].choices[args.command]
    actions = _actions(command_parser)
    return actions.choices[getattr(args, actions.dest)] if actions else command_parser


def _command_module(name: str):
    try:
        return importlib.import_module(f"medlora.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"medlora.commands.{name}":
            return None
        raise


def apply_recipe(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """`args` with `--config RECIPE` read: the recipe's values become the command's defaults and `argv` is parsed
    again, so that flags still win; then the required options are checked, given by either. The one place a recipe
    is applied, for every command."""
    options = _options_parser(parser, args)
    if getattr(args, "config", None):
        from medlora.config import option_kinds, read_recipe

        command = options.prog.removeprefix(f"{parser.prog} ")
        options.set_defaults(**read_recipe(args.config, option_kinds(options), command))
        args = parser.parse_args(argv)
    missing = ["/".join(action.option_strings) for action in options.medlora_required
               if getattr(args, action.dest) in (None, [])]
    if missing:
        options.error(f"the following arguments are required: {', '.join(missing)} (as flags or in a --config recipe)")
    return args


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
        with terminate_as_interrupt():
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
    except Exception as exc:
        full = _disk_full(exc)
        if full is None:
            raise
        # every output is written to a temporary name and renamed once complete, so what was there is intact
        where = full or next((getattr(args, name) for name in OUTPUT_OPTIONS if getattr(args, name, None)), "")
        print(f"medlora {args.command}: error: no space left on the device while writing {where} (nothing "
              f"half-written was kept); free some space and run it again", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"\nmedlora {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        from medlora.io import release_outputs

        release_outputs()


@contextmanager
def terminate_as_interrupt():
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, as Ctrl-C does, so that every `finally` runs: staging folders,
    temporary files and child processes are cleaned up instead of left behind by a killed command. (finetune and
    serve install their own handlers over this one while they train or serve.)"""
    try:
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread (main() called from a thread): leave signals alone
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _disk_full(exc: BaseException) -> str | None:
    """The file being written when `exc` (or an exception it came from) is a full disk or quota ("" when unnamed);
    None when it is not one. torch and safetensors report it as their own errors, with the OS's text inside."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc.filename or ""
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            return ""
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
