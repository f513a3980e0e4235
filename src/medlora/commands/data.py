"""`medlora data build`: turn the knowledge base into train/valid/test instruction records; `medlora data chat`:
into multi-turn conversations (ShareGPT format); `medlora data pairs`: preference pairs sampled from an adapter and
judged by the knowledge base (medlora.pairs), for `medlora finetune --stage dpo|kto`."""

from __future__ import annotations

import argparse

from medlora.commands._common import add_lora_weights_argument, add_out_argument, model_args
from medlora.config import ModelArgs, PairArgs, add_dataclass_args, build_dataclass
from medlora.io import claim_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="generate train.jsonl, valid.jsonl and test.jsonl")
    chat = sub.add_parser("chat", help="generate multi-turn conversations (ShareGPT): train.jsonl and test.jsonl")
    for action, out in ((build, "data/medqa"), (chat, "data/medchat")):
        add_out_argument(action, "output folder", out)
        action.add_argument("--seed", type=int, default=42, help="random seed (same seed, same files)")
        action.add_argument("--kb", default=None, help="knowledge-base YAML (default: the built-in one)")
        action.add_argument("--source", default="kb", choices=("kb", "cmekg", "both"),
                            help="kb: the curated knowledge base (default); cmekg: the CMeKG knowledge graph (needs "
                                 "pip install 'medlora[cmekg]'); both: the two, the curated entry winning a conflict")


    pairs = sub.add_parser("pairs", help="preference pairs: answers sampled from an adapter, judged by the knowledge "
                                         "base (chosen = best or golden, rejected = worst)")
    add_lora_weights_argument(pairs, "the adapter to sample from (e.g. runs/demo/adapter)", required=True)
    add_out_argument(pairs, "output JSONL", "data/pairs/pairs.jsonl")
    add_dataclass_args(pairs, ModelArgs, "model (the adapter's base)")
    add_dataclass_args(pairs, PairArgs, "sampling and judging")


def run(args: argparse.Namespace) -> int:
    if args.action == "pairs":
        return run_pairs(args)
    from medlora.databuild import build_dataset
    from medlora.databuild.conversations import build_chat_dataset

    claim_output("--out", args.out, {"--kb": args.kb})
    build = build_chat_dataset if args.action == "chat" else build_dataset
    counts = build(args.out, seed=args.seed, kb_path=args.kb, source=args.source)
    print("[medlora] " + ", ".join(f"{split}: {n} records" for split, n in counts.items()) + f" in {args.out}")
    return 0


def run_pairs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medlora.errors import ConfigError
    from medlora.modeling import preflight_adapter
    from medlora.pairs import KINDS, build_pairs

    settings = build_dataclass(PairArgs, vars(args))
    unknown = sorted(set(settings.kind_counts()) - set(KINDS))
    if unknown:
        raise ConfigError(f"--counts: unknown kind {unknown[0]!r} (kinds: {', '.join(KINDS)})")
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; give a file name (e.g. {args.out}/pairs.jsonl)")
    claim_output("--out", args.out, {"--lora_weights": args.lora_weights}, folder=False)
    margs = model_args(args)
    preflight_adapter(args.lora_weights, margs.base_model, margs.allow_pickle, margs.trust_remote_code)
    counts = build_pairs(args.lora_weights, args.out, margs, settings)
    print("[medlora] pairs: " + ", ".join(f"{kind} {c['pairs']}/{c['prompts']}" for kind, c in counts.items())
          + f" (kept/prompts) in {args.out}")
    return 0
