"""`medlora chat`: streaming multi-turn terminal chat."""

from __future__ import annotations

import argparse

from medlora.commands._common import (adapter_path, add_generation_arguments, add_model_arguments,
                                      generation_args, load_generator)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from medlora.chat import chat_loop, check_streamable

    adapter = adapter_path(args)
    gen = generation_args(args, adapter)
    check_streamable(gen)  # before minutes of model loading
    chat_loop(load_generator(args, adapter), gen)
    return 0
