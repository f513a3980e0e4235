"""`medlora data build`: turn the knowledge base into train/valid/test instruction records."""

from __future__ import annotations

import argparse

from medlora.io import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="generate train.jsonl, valid.jsonl and test.jsonl")
    build.add_argument("--out", default="data/medqa", help="output folder (default: data/medqa)")
    build.add_argument("--seed", type=int, default=42, help="random seed (same seed, same files)")
    build.add_argument("--kb", default=None, help="knowledge-base YAML (default: the built-in one)")
    build.add_argument("--source", default="kb", choices=("kb", "cmekg", "both"),
                       help="kb: the curated knowledge base (default); cmekg: the CMeKG knowledge graph (needs "
                            "pip install 'medlora[cmekg]'); both: the two, the curated entry winning a conflict")


def run(args: argparse.Namespace) -> int:
    from medlora.databuild import build_dataset

    check_output_folder("--out", args.out)
    counts = build_dataset(args.out, seed=args.seed, kb_path=args.kb, source=args.source)
    print("[medlora] " + ", ".join(f"{split}: {n} records" for split, n in counts.items()) + f" in {args.out}")
    return 0
