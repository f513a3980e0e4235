"""Options shared by the commands, each declared once (here, or as a medlora.config dataclass), and the loading of
the commands that run a model."""

from __future__ import annotations

import argparse
import socket
from dataclasses import fields
from pathlib import Path

from medlora.config import (GenerationArgs, ModelArgs, PromptArgs, add_dataclass_args, add_fields, build_dataclass,
                            str2bool)
from medlora.errors import ConfigError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options of the commands that run one model with an optional adapter (infer, chat, webui)."""
    add_dataclass_args(parser, ModelArgs, "model")
    group = parser.add_argument_group("adapter and template")
    add_lora_weights_argument(group)
    group.add_argument("--use_lora", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                       help="use the adapter given by --lora_weights (default: when --lora_weights is given)")
    add_prompt_arguments(group)
    group.add_argument("--merge_lora", type=str2bool, nargs="?", const=True, default=True, metavar="BOOL",
                       help="merge the adapter into the base weights for faster inference (default: true)")


def add_models_arguments(parser: argparse.ArgumentParser, title: str, adapters_help: str):
    """The model options of the commands that run a base with several adapters (eval, bench: side by side; serve:
    each a model); returns the argument group for more options of that kind."""
    add_dataclass_args(parser, ModelArgs, "model")
    models = parser.add_argument_group(title)
    add_lora_weights_argument(models, adapters_help, many=True)
    add_prompt_arguments(models)
    return models


def add_compared_models_arguments(parser: argparse.ArgumentParser, verb: str):
    """The model options of the commands that compare a base with adapters side by side (eval, bench)."""
    from medlora.eval.runner import BASE_KNOWLEDGE_LABEL

    models = add_models_arguments(parser, "models to compare", f"an adapter folder to {verb} besides the base model "
                                  f"(repeatable); labelled by its folder name unless NAME= is given")
    models.add_argument("--base_knowledge", default=None, metavar="SOURCE",
                        help=f"also {verb} the base model prompted with facts from SOURCE (kb, cmekg, both, a file), "
                             f"labelled {BASE_KNOWLEDGE_LABEL!r}: knowledge without training")
    return models


def add_prompt_arguments(group, only=None) -> None:
    """--prompt_template, --knowledge and --system (PromptArgs; `only` these) in `group`, as every command that runs
    a model takes them; read with `prompt_args`."""
    add_fields(group, PromptArgs, skip=() if only is None else set(PromptArgs.__dataclass_fields__) - set(only))


def add_lora_weights_argument(group, help: str = "LoRA adapter folder (written by finetune)", many: bool = False,
                              required: bool = False) -> None:
    """`--lora_weights`, as every command declares it: one adapter folder, or with `many` a repeatable `[NAME=]DIR`
    (read with `named_paths`). finetune's preference stage takes its own (PreferenceArgs.lora_weights)."""
    if many:
        group.add_argument("--lora_weights", action="append", default=[], metavar="[NAME=]DIR", help=help)
    else:
        group.add_argument("--lora_weights", default=None, required=required, metavar="DIR", help=help)


def add_out_argument(group, help: str, default: str | None = None, required: bool = False, dest: str = "out") -> None:
    """The output option, as every command but finetune declares it (finetune's TrainArgs.output_dir takes `--out`
    too): `--out`, also spelt `--output_dir`; a `dest` of another name (infer's `model_output_dir`, also its recipe
    key) is a spelling too, the first."""
    names = ["--out", "--output_dir"]
    if dest not in ("out", "output_dir"):
        names.insert(0, f"--{dest}")
    shown = f" (default: {default})" if default else ""
    group.add_argument(*names, dest=dest, default=default, required=required, help=f"{help}{shown}")


def set_option(parser: argparse.ArgumentParser, dest: str, **changes) -> None:
    """Change an option a dataclass declared, for one command (its default, help, choices, required): merge needs a
    base model and writes fp32 by default, export's base may be a merged folder."""
    action = next(action for action in parser._actions if action.dest == dest)
    for name, value in changes.items():
        setattr(action, name, value)


def named_paths(specs: list[str], flag: str, default_name=lambda path: Path(path.rstrip("/")).name
                ) -> list[tuple[str, str]]:
    """`NAME=PATH` specs (a plain PATH is named by `default_name`, a path whose whole text exists keeps its `=`) as
    (name, path) pairs; an empty name or path, or a name given twice, is refused. The one parser of `--lora_weights`
    and `--results` lists."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and name and "/" not in name and not Path(spec).exists()):
            name, path = default_name(spec), spec
        if not name or not path:
            raise ConfigError(f"{flag} {spec!r}: expected NAME=PATH or PATH")
        if name in (other for other, _ in pairs):
            raise ConfigError(f"{flag}: the name {name!r} is given twice; name them with NAME=PATH")
        pairs.append((name, path))
    return pairs


def add_records_arguments(group) -> None:
    """--columns and --data_format, as every command that reads records declares them (finetune: from DataArgs)."""
    from medlora.config import DataArgs

    defaults = {f.name: f for f in fields(DataArgs)}
    for name in ("columns", "data_format"):
        spec = defaults[name]
        group.add_argument(f"--{name}", default=spec.default, choices=spec.metadata.get("choices"),
                           help=f"{spec.metadata['help']} (default: {spec.default!r})")


def read_records(args: argparse.Namespace, source: str, require_output: bool) -> list[dict]:
    from medlora.data import load_records

    return load_records(source, require_output=require_output, columns=args.columns or None,
                        data_format=args.data_format)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, GenerationArgs, "generation")


def generation_args(args: argparse.Namespace, *adapters) -> GenerationArgs:
    """Decoding settings: GenerationArgs' defaults < the decoding recorded with the first of `adapters`, else with the
    base model (a merged model; modeling.recorded_decoding) < the flags given (only given flags are in `args`)."""
    from medlora.modeling import decoding_for

    return decoding_for(*adapters, model_args(args).base_model, **vars(args))


def model_args(args: argparse.Namespace) -> ModelArgs:
    return build_dataclass(ModelArgs, vars(args))


def prompt_args(args: argparse.Namespace) -> PromptArgs:
    return build_dataclass(PromptArgs, vars(args))


def adapter_path(args: argparse.Namespace) -> str | None:
    """The adapter to load, honouring the seed's --use_lora flag."""
    if args.use_lora is False:
        return None
    if args.use_lora and not args.lora_weights:
        raise ConfigError("--use_lora needs --lora_weights DIR (the folder written by finetune)")
    return args.lora_weights


def load_generator(args: argparse.Namespace, lora_weights: str | None = None):
    from medlora.generate import Generator

    return Generator.load(model_args(args), lora_weights, prompt_args(args), merge=args.merge_lora)


def _whole_number(value: str, low: int, high: float, expected: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


def positive_int(value: str) -> int:
    """argparse type of counts such as --batch_size: 1 or more."""
    return _whole_number(value, 1, float("inf"), "a whole number of at least 1")


def port_number(value: str) -> int:
    """argparse type of --port: 1 to 65535."""
    return _whole_number(value, 1, 65535, "a port number from 1 to 65535")


def add_server_arguments(parser: argparse.ArgumentParser, title: str, port: int, host_help: str):
    """--host (loopback by default) and --port, in an argument group that is returned for more server options."""
    server = parser.add_argument_group(title)
    server.add_argument("--host", default="127.0.0.1", help=f"address to bind (default: 127.0.0.1, {host_help})")
    server.add_argument("--port", type=port_number, default=port, help=f"port (default: {port})")
    return server


def check_bindable(host: str, port: int) -> None:
    """Refuse an address that cannot be served (port taken, host not on this machine) before any weights load."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no obstacle
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot serve on {host}:{port} ({reason}); pass another --port or --host") from None
