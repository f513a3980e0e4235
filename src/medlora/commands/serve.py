"""`medlora serve`: an OpenAI-compatible HTTP API over a base model and named LoRA adapters (docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import fields, replace

from medlora.commands._common import (add_models_arguments, add_server_arguments, check_bindable, model_args,
                                      named_paths, positive_int, prompt_args)
from medlora.config import GenerationArgs, add_fields
from medlora.errors import ConfigError
from medlora.serve import LOOPBACK

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_models_arguments(parser, "adapters and template",
                         "an adapter served as model NAME (repeatable); a bare DIR is named after its folder")
    server = add_server_arguments(parser, "server", 8000, "this machine only")
    server.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("MEDLORA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MEDLORA_API_KEY; unset: no key)")
    bounds = parser.add_argument_group("bounds")
    bounds.add_argument("--max_prompt_tokens", type=positive_int, default=None,
                        help="longest prompt accepted (default: 2048, or the model's context if smaller)")
    bounds.add_argument("--max_tokens_cap", type=positive_int, default=1024,
                        help="largest max_tokens accepted (default: 1024)")
    bounds.add_argument("--max_body_bytes", type=positive_int, default=1 << 20,
                        help="largest request body (default: 1 MiB)")
    bounds.add_argument("--max_batch_size", type=positive_int, default=8,
                        help="requests generated together (default: 8)")
    bounds.add_argument("--max_queue", type=positive_int, default=256, help="requests waiting before 503 (default: 256)")
    decoding = parser.add_argument_group("decoding (every greedy answer; a request sets the rest)")
    add_fields(decoding, GenerationArgs, skip=[f.name for f in fields(GenerationArgs) if f.name != "urgent_threshold"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from medlora import DISCLAIMER
    from medlora.serve.api import create_app
    from medlora.serve.engine import Engine, ServeSettings

    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key (or $MEDLORA_API_KEY) is empty, which would leave the server open: give a key, "
                          "or leave both unset to serve without one")
    if args.api_key is not None and not all("!" <= char <= "~" for char in args.api_key):
        raise ConfigError("--api-key (or $MEDLORA_API_KEY) holds a space or a character outside printable ASCII, which "
                          "no client can send in an Authorization header: every request would get 401")
    check_bindable(args.host, args.port)
    # checked before the model loads; the prompt bound then follows the model's context unless given
    settings = ServeSettings(api_key=args.api_key or None, max_prompt_tokens=args.max_prompt_tokens or 2048,
                             max_tokens_cap=args.max_tokens_cap, max_body_bytes=args.max_body_bytes,
                             urgent_threshold=getattr(args, "urgent_threshold", 0.0))
    engine = Engine.load(model_args(args), dict(named_paths(args.lora_weights, "--lora_weights")), prompt_args(args),
                         max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    if not args.max_prompt_tokens:
        settings = replace(settings, max_prompt_tokens=min(2048, engine.context_length or 2048))
    if args.host not in LOOPBACK and not settings.api_key:
        logger.warning("listening on %s without --api-key: anyone who can reach this port can use the models",
                       args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(DISCLAIMER, flush=True)
    print(f"[medlora] serving {', '.join(engine.model_names)} at http://{host}:{args.port}/v1 "
          f"(docs: http://{host}:{args.port}/docs)", flush=True)
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=5)
    return 0
