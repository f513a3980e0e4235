"""`medlora data build`: turn the knowledge base into train/valid/test instruction records; `medlora data chat`:
into multi-turn conversations (ShareGPT format)."""

from __future__ import annotations

import argparse

from medlora.io import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="generate train.jsonl, valid.jsonl and test.jsonl")
    chat = sub.add_parser("chat", help="generate multi-turn conversations (ShareGPT): train.jsonl and test.jsonl")
    for action, out in ((build, "data/medqa"), (chat, "data/medchat")):
        action.add_argument("--out", default=out, help=f"output folder (default: {out})")
        action.add_argument("--seed", type=int, default=42, help="random seed (same seed, same files)")
        action.add_argument("--kb", default=None, help="knowledge-base YAML (default: the built-in one)")
        action.add_argument("--source", default="kb", choices=("kb", "cmekg", "both"),
                            help="kb: the curated knowledge base (default); cmekg: the CMeKG knowledge graph (needs "
                                 "pip install 'medlora[cmekg]'); both: the two, the curated entry winning a conflict")


def run(args: argparse.Namespace) -> int:
    from medlora.databuild import build_dataset
    from medlora.databuild.conversations import build_chat_dataset

    check_output_folder("--out", args.out)
    build = build_chat_dataset if args.action == "chat" else build_dataset
    counts = build(args.out, seed=args.seed, kb_path=args.kb, source=args.source)
    print("[medlora] " + ", ".join(f"{split}: {n} records" for split, n in counts.items()) + f" in {args.out}")
    return 0
