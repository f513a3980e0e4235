"""Multiple-choice patterns, in the layouts people paste: 4 or 5 options, on the question's line or one a line,
`A.` / `A、` / `A．` markers, stems with a `（ ）` blank.

The answer gives the letter first, then the fact that makes it right, on one line (`答案: B。水痘属于儿科的诊疗范围，
故选此项。`), as Chinese exam keys are written. The letter comes right after `答案:`, where `medlora bench`'s loglik
scoring reads it, within the first few tokens of any budget. (Until 2026-12-07 the answer restated every option,
stated the fact, copied the chosen option out and ended with the letter; the adapter trained so was unparseable in
39% of its benchmark answers at 64 new tokens: docs/results-history.md.)
"""

from __future__ import annotations

import random

from medlora.databuild.index import (GENERIC_CAUSES, GENERIC_SYMPTOMS, Index, any_overlap, distinct, join, overlap,
                                     pick, shown, specific)
from medlora.databuild.phrasing import phrasing

LETTERS = "ABCDE"
MARKERS = ("{}. ", "{}、", "{}．")


def layout(rng: random.Random, stem: str, options: list[str]) -> str:
    """The question with its options inline or one a line, with one of the usual letter markers."""
    marker = rng.choice(MARKERS)
    listed = [marker.format(letter) + option for letter, option in zip(LETTERS, options)]
    return f"{stem} {' '.join(listed)}" if rng.random() < 0.4 else f"{stem}\n" + "\n".join(listed)


def answer(why: str, options: list[str], chosen: str) -> str:
    letter = LETTERS[options.index(chosen)]
    return f"答案: {letter}。{why}" if why else f"答案: {letter}"


def make(rng: random.Random, stem: str, correct: str, distractors: list[str], why: str) -> tuple[str, str]:
    """A question of 4 or 5 options (the correct one at a random letter) and its answer."""
    n = rng.choice((4, 5))
    options = list(distractors[:n - 1])
    options.insert(rng.randrange(n), correct)
    return layout(rng, stem, options), answer(why, options, correct)


def _true_of(d: dict) -> list[str]:
    """Everything the knowledge base says of `d`: no distractor may overlap it."""
    keys = ("symptoms", "causes", "drugs", "treatments", "examinations", "complications", "prevention")
    return [d["name"], *[x for key in keys for x in d.get(key, [])]]


def _forward(key: str):
    """Which of these is `d`'s symptom / drug / cause / examination / complication: the options are items of other
    diseases (of other departments), none overlapping anything the knowledge base says of `d`."""

    def build(ix: Index, d: dict, rng: random.Random):
        items = d.get(key) or []
        if key == "symptoms":
            items = specific(shown(d), GENERIC_SYMPTOMS) or shown(d)
        elif key == "causes":
            items = specific(items, GENERIC_CAUSES) or items
        if not items:
            return None
        correct = rng.choice(items)
        others = [o for o in ix.others(d) if o.get("department") != d.get("department")]
        if key in ("symptoms", "causes"):
            pool = [x for o in others for x in ix.specific_unique(o, key)]
        else:
            pool = [x for o in others for x in o.get(key, []) if len(ix.users(key, x)) <= 2]
        distractors = distinct(rng, pool, 4, _true_of(d))
        if distractors is None:
            return None
        table = phrasing()["mcq"]
        why = pick(rng, table["explanations"][key], name=d["name"], answer=correct)
        return make(rng, pick(rng, table[key], name=d["name"]), correct, distractors, why)

    return build


def _department(ix, d, rng):
    dept = d.get("department")
    if not dept:
        return None

    def fits(k: str) -> bool:
        return not overlap(k, dept) and k[:2] != dept[:2]

    same_chapter = ix.chapter_departments.get(d.get("icd10_chapter"), set())
    distractors = (distinct(rng, [k for k in ix.departments if fits(k) and k not in same_chapter], 4, [dept])
                   or distinct(rng, [k for k in ix.departments if fits(k)], 4, [dept]))
    if distractors is None:
        return None
    table = phrasing()["mcq"]
    why = pick(rng, table["explanations"]["department"], name=d["name"], answer=dept)
    return make(rng, pick(rng, table["department"], name=d["name"]), dept, distractors, why)


def _disease_by_symptom(ix, d, rng):
    """Which disease has these symptoms: the options are diseases of other departments without them."""
    candidates = specific(shown(d), GENERIC_SYMPTOMS)
    if len(candidates) < 2:
        candidates = shown(d)
    if not candidates:
        return None
    cited = [candidates[i] for i in sorted(rng.sample(range(len(candidates)), min(2, len(candidates))))]
    pool = [o["name"] for o in ix.others(d)
            if o.get("department") != d.get("department") and not any_overlap(cited, o.get("symptoms", []))]
    distractors = distinct(rng, pool, 4, [d["name"]])
    if distractors is None:
        return None
    stem = pick(rng, ["患者出现{s}，最可能患的是下列哪种疾病？", "下列哪种疾病的常见症状包括{s}？",
                      "以{s}为典型表现的疾病是（ ）"], s=join(cited))
    return make(rng, stem, d["name"], distractors, f"{join(cited)}是{d['name']}的常见症状。")


def _disease_by_drug(ix, d, rng):
    if not d.get("drugs"):
        return None
    drug = rng.choice(d["drugs"])
    pool = [o["name"] for o in ix.others(d) if o.get("department") != d.get("department")
            and not any_overlap([drug], o.get("drugs", [])) and not any(drug in t for t in o.get("treatments", []))]
    distractors = distinct(rng, pool, 4, [d["name"]])
    if distractors is None:
        return None
    stem = pick(rng, ["药物{x}常用于治疗下列哪种疾病？", "下列哪种疾病常用{x}治疗？", "{x}可用于治疗（ ）"], x=drug)
    return make(rng, stem, d["name"], distractors, f"{drug}是治疗{d['name']}的常用药物。")


def lookup(ix, d, rng):
    """Training-only drill of the answer's copy steps: which letter holds a given option text. The options are this
    disease's name or department among others of the same kind; no medical knowledge is asked."""
    kind = rng.choice(["name", "department"])
    pool = [o["name"] for o in ix.others(d)] if kind == "name" else [k for k in ix.departments if k != d["department"]]
    distractors = distinct(rng, pool, 4, [d[kind]])
    if distractors is None:
        return None
    stem = pick(rng, ["下列选项中，哪一项是“{x}”？", "“{x}”是下列哪个选项？", "请找出“{x}”对应的选项。"], x=d[kind])
    return make(rng, stem, d[kind], distractors, "")


MCQ_PATTERNS = {
    "mcq_symptom": _forward("symptoms"),
    "mcq_drug": _forward("drugs"),
    "mcq_cause": _forward("causes"),
    "mcq_examination": _forward("examinations"),
    "mcq_complication": _forward("complications"),
    "mcq_department": _department,
    "mcq_disease_by_symptom": _disease_by_symptom,
    "mcq_disease_by_drug": _disease_by_drug,
}
