"""Knowledge-tuning's training records: each record's retrieved facts as the `knowledge` text its prompt shows, with
some of them made irrelevant, partial or missing on purpose (docs/knowledge.md)."""

from __future__ import annotations

import random

from medlora.databuild.safety import honest_answer
from medlora.knowledge import KnowledgeIndex, Retrieved
from medlora.vocab import ATTRIBUTES, DEFAULT_KEYS, offered_letters


NOISE_KINDS = ("irrelevant", "partial", "missing")
# The share of training prompts whose red-flag lines (`急症信号：…`, kb/red_flags.yaml) are left out: the lines are
# words matched in the question and miss many ways of telling an emergency, so the model must also learn to see one
# without them; where they are shown, the answer is always the urgent one.
FLAG_DROPOUT = 0.5


def knowledge_for_training(records: list[dict], index: KnowledgeIndex, noise: float = 0.0, seed: int = 42
                           ) -> tuple[list[dict], dict[str, int]]:
    """Training records with the `knowledge` text the template shows, and how many got each kind of noise.

    With probability `noise`, a record is changed so that the model learns to use good facts and ignore bad ones
    (docs/knowledge.md): `irrelevant` adds another disease's entry (the answer stays); for a question about one
    attribute of a linked disease (not a multiple-choice one), `partial` shows that disease's other attributes
    instead of the asked one and `missing` shows no entry, and the answer becomes an honest "I have no reliable
    information" (the wordings of the data's unknown-disease answers) — only where the answer tells the asked facts (an
    answer written for another need, a narrative's, stays what it is) and the question shows no red flag (an
    emergency's answer is always the urgent one). A third of the noise goes to each kind. The red
    flags the question shows are left out of FLAG_DROPOUT of the prompts."""
    names = sorted(index.diseases)
    out, counts = [], {kind: 0 for kind in NOISE_KINDS}
    for number, record in enumerate(records):
        rng = random.Random(f"{seed}\x1fknowledge\x1f{number}")
        found = index.retrieve_turn(record["instruction"], record.get("input", ""), record.get("history") or ())
        facts, output, kind = found.facts, record["output"], None
        roll = rng.random()
        single = (found.attribute and found.facts and not offered_letters(record) and not found.flags
                  and _tells(index, output, found.diseases[0], found.attribute))
        if roll < noise / 3 and names:
            other = rng.choice(names)
            keys = dict.fromkeys(key for _, key, _ in found.facts) or DEFAULT_KEYS
            extra = index.facts([other], keys) if other not in found.diseases else []
            facts = extra + facts if rng.random() < 0.5 else facts + extra
            kind = "irrelevant" if extra else None
        elif roll < noise and single:
            disease = found.diseases[0]
            if roll < 2 * noise / 3:
                others = [key for key in ATTRIBUTES if key != found.attribute and index.items(disease, key)]
                facts, kind = index.facts([disease], others[:2]), "partial"
            else:
                facts, kind = [], "missing"
            output = honest_answer(disease, rng)
        if kind:
            counts[kind] += 1
        flags = found.flags if random.Random(f"{seed}\x1fflags\x1f{number}").random() >= FLAG_DROPOUT else []
        retrieved = Retrieved(found.diseases, found.attribute, facts, found.matches, flags)
        out.append({**record, "output": output, "knowledge": retrieved.text()})
    return out, counts


def _tells(index: KnowledgeIndex, answer: str, disease: str, attribute: str) -> bool:
    """Whether `answer` names one of the knowledge base's items for the disease's asked attribute: an answer made from
    those facts, which hiding them makes unanswerable."""
    return any(index.names(answer, item) for item in index.items(disease, attribute))
