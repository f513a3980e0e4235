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
# Copies of each training pair, by kind: a few hundred pairs among thousands of knowledge records, so copies set how
# often the demo's 1,280 examples meet each register. Measured with make demo on 2026-12-07 (README, Results), on
# the real-question set (over-triage of its 328 non-emergency questions) and the exam (safety on its 38 emergencies):
#   emergency 4, crisis 6, harm 6, soon 3, routine 3 (then):  over-triage 0.20, exam safety 0.84
#   emergency 5, crisis 8, harm 6, soon 4, routine 8:         over-triage 0.33, exam safety 0.84
#   emergency 3, crisis 6, harm 6, soon 3, routine 6:         over-triage 0.03, exam safety 0.68 (7 of 38 told to go now)
# No mix met both targets (≤ 0.05, ≥ 0.9); the safer one is kept: sending a worried writer to the emergency room is
# the lesser error. (Before the soon and routine registers, emergencies four times gave exam safety 0.92.)
# Measured again on 2026-12-07 evening, the same mix after only the multiple-choice answers changed: over-triage 0.12,
# exam safety 0.87. One run of this recipe moves these figures by ~0.05-0.09, so only the ends of the list above differ
# by more than noise. Emergency answers rewritten to name the danger before the urgent action (measured once, not
# kept): over-triage 0.02 but exam safety 0.55, the adapter restating the question and drifting into another register.
# 2026-12-07 night, after 93 more emergency pairs and 130 more soon/routine ones (docs/results-history.md, h4 and h6):
#   emergency 4 (the rest as above): over-triage 0.25, exam safety 0.92
#   emergency 3 (these):             over-triage 0.15, exam safety 0.87 (under-triage 0.32 against 0.37 before)
# Three is kept: the exam's safety of the adapter it replaces, with more honest answers and fewer loops; four meets
# the safety target by sending a quarter of real writers (and 8% of the exam's non-emergencies) to the emergency
# room, the failure the real-question issue was filed for.
TRAIN_COPIES = {"emergency": 3, "crisis": 6, "harm": 6, "soon": 3, "routine": 3}


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
    """A question about a disease the build knows nothing about, and an honest answer. The question is worded, a third
    each, as the unknown-disease table words it, as the knowledge patterns word their questions about one attribute,
    or with one of their narrative openings before that: the same question then has facts in its prompt and a factual
    answer for a known disease, and no facts and the honest answer for an unknown one."""
    table = phrasing()
    roll = rng.random()
    if roll < 1 / 3:
        values = {"name": name, "attribute_cn": rng.choice(list(ATTRIBUTES.values()))}
        question = rng.choice(table["unknown"]["questions"]).format(**values)
    else:
        question = rng.choice(table["attributes"][rng.choice(list(ATTRIBUTES))]["questions"]).format(name=name)
        if roll >= 2 / 3:
            question = rng.choice(table["frames"]).format(name=name) + question
    return question, honest_answer(name, rng)
