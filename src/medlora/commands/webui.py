"""`medlora webui`: a Gradio page with a streaming chat and base-vs-tuned answers side by side.

The adapter is kept unmerged here (the side-by-side tab switches it off for the base answer); pass
`--merge_lora` for a slightly faster chat without that tab.
"""

from __future__ import annotations

import argparse

from medlora.commands._common import (adapter_path, add_generation_arguments, add_model_arguments,
                                      generation_args, load_generator)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(merge_lora=False)
    add_generation_arguments(parser)
    server = parser.add_argument_group("web server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; the page has no login)")
    server.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")


def run(args: argparse.Namespace) -> int:
    from medlora.serve.webui import build_demo, launch

    generator = load_generator(args, adapter_path(args))
    launch(build_demo(generator, generation_args(args)), args.host, args.port)
    return 0
