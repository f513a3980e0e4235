"""Multi-turn conversations from the knowledge base, in ShareGPT format: a first question names the disease, the
follow-ups only refer to it (它, 这个病), so answering them needs the earlier turns. Each answer states the entry's
facts in the phrasing tables' wordings. `medlora data chat` is the command; same seed, byte-identical files."""

from __future__ import annotations

import random
from pathlib import Path

from medlora.databuild.assemble import seeded_unit, split_of
from medlora.databuild.index import pick
from medlora.kb import load_sources
from medlora.databuild.patterns import attribute_answer
from medlora.databuild.phrasing import phrasing
from medlora.io import atomic_write_jsonl

REFERENCES = ("它", "这个病", "这种病")  # how a follow-up names the disease of the conversation
CONVERSATIONS_PER_DISEASE = 2
TURNS = (2, 3, 4)
TEST_SHARE = 0.1  # of the diseases: their conversations go to test.jsonl only
CHAT_SPLITS = ("train", "test")


def conversation(disease: dict, rng: random.Random) -> dict | None:
    """One ShareGPT record of 2-4 turns about `disease`, or None when it has fewer than two attributes to ask."""
    keys = [key for key in phrasing()["attributes"] if disease.get(key)]
    if len(keys) < 2:
        return None
    asked = rng.sample(keys, min(rng.choice(TURNS), len(keys)))
    turns = []
    for number, key in enumerate(asked):
        questions = phrasing()["attributes"][key]["questions"]
        name = disease["name"] if number == 0 else rng.choice(REFERENCES)
        turns += [{"from": "human", "value": pick(rng, questions, name=name)},
                  {"from": "gpt", "value": attribute_answer(disease, key, rng)}]
    return {"conversations": turns, "disease": disease["name"], "kind": "conversation"}


def build_conversations(diseases: list[dict], seed: int = 42) -> dict[str, list[dict]]:
    """Conversations by split; a disease's conversations all go to one split (by a seeded hash of its name)."""
    splits = {name: [] for name in CHAT_SPLITS}
    for disease in diseases:
        split = "test" if split_of(seeded_unit(seed, "chat", disease["name"]), TEST_SHARE, 0.0) == "test" else "train"
        for number in range(CONVERSATIONS_PER_DISEASE):
            made = conversation(disease, random.Random(f"{seed}\x1fchat\x1f{disease['name']}\x1f{number}"))
            if made is not None:
                splits[split].append(made)
    return splits


def build_chat_dataset(out_dir: str | Path, seed: int = 42, kb_path: str | Path | None = None,
                       source: str = "kb") -> dict[str, int]:
    """Write train.jsonl and test.jsonl (ShareGPT conversations) into `out_dir` atomically; the record counts."""
    splits = build_conversations(load_sources(source, kb_path), seed)
    for name, records in splits.items():
        atomic_write_jsonl(Path(out_dir) / f"{name}.jsonl", records)
    return {name: len(records) for name, records in splits.items()}
