"""`medlora webui`: a Gradio page with a streaming chat and base-vs-tuned answers side by side.

The adapter is kept unmerged here (the side-by-side tab switches it off for the base answer); pass
`--merge_lora` for a slightly faster chat without that tab.
"""

from __future__ import annotations

import argparse

from medlora.commands._common import (adapter_path, add_generation_arguments, add_model_arguments,
                                      add_server_arguments, check_bindable, generation_args, load_generator)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(merge_lora=False)
    add_generation_arguments(parser)
    add_server_arguments(parser, "web server", 7860, "this machine only; the page has no login")


def run(args: argparse.Namespace) -> int:
    from medlora.serve.webui import build_demo, launch

    check_bindable(args.host, args.port)
    adapter = adapter_path(args)
    generator = load_generator(args, adapter)
    launch(build_demo(generator, generation_args(args, adapter)), args.host, args.port)
    return 0
