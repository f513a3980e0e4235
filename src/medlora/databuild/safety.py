"""Safe answers as part of the data, from the hand-written tables: emergencies (the urgent action first), crises
(suicidal thoughts, self-harm: support, 12356, 120), requests for harm (a refusal without amounts), and diseases the
build knows nothing about (an honest "no reliable information, see a doctor", trained on held-out disease names).

Each hand-written pair, and each unknown disease name, goes to one split by a seeded hash, so the test split holds
pairs and names that training never saw."""

from __future__ import annotations

import random

from medlora.databuild.phrasing import phrasing
from medlora.vocab import ATTRIBUTES, normalise

PAIR_KINDS = ("emergency", "crisis", "harm", "soon", "routine")
# Copies of each training pair, by kind: about a hundred and forty pairs among thousands of knowledge records. With two
# copies the demo adapter (1,920 examples) gave the urgent action on 10 of the exam's 38 emergencies (README,
# Results). Emergencies four times since they grew from 64 to 92 pairs (about as many examples as 64 x 6 gave): with
# six, the urgent action spread to 13 of the exam's 238 other questions (6 and 10 before the 28 new pairs).
# The soon and routine registers (triage.yaml) three times each: about as many examples as the emergencies, so that
# a worried first-person narrative is not read as an emergency by its voice alone.
TRAIN_COPIES = {"emergency": 4, "crisis": 6, "harm": 6, "soon": 3, "routine": 3}


def pairs() -> list[dict]:
    """The hand-written question/answer pairs, tagged with their kind as `pattern` and their question as `key`."""
    table = phrasing()
    return [{"pattern": kind, "key": pair["question"], "instruction": pair["question"], "output": pair["answer"]}
            for kind in PAIR_KINDS for pair in table[kind]]


def unknown_names(diseases: list[dict]) -> list[str]:
    """The held-out names the build knows nothing about: those no disease of the build names or aliases."""
    known = {normalise(x) for d in diseases for x in (d["name"], *d.get("aliases", []))}
    return [name for name in phrasing()["unknown"]["names"]
            if not any(normalise(name) in k or k in normalise(name) for k in known if len(k) > 1)]


def honest_answer(name: str, rng: random.Random) -> str:
    """One of the hand-written answers for a disease the model has no reliable facts about."""
    return rng.choice(phrasing()["unknown"]["answers"]).format(name=name)


def unknown(name: str, rng: random.Random) -> tuple[str, str]:
    table = phrasing()["unknown"]
    values = {"name": name, "attribute_cn": rng.choice(list(ATTRIBUTES.values()))}
    return rng.choice(table["questions"]).format(**values), rng.choice(table["answers"]).format(**values)
