"""The KB → instruction-record generator (`medlora.databuild`) and the committed data/medqa files."""

from __future__ import annotations

import re
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import yaml

from medlora.databuild import (CHAPTERS, MCQ_PATTERNS, TRAIN_ONLY_PATTERNS, build_dataset, build_records,
                               build_tagged, load_knowledge_base, safety)
from medlora.databuild.patterns import ATTRIBUTE_PATTERNS
from medlora.errors import DataError
from medlora.data import load_records
from medlora.databuild.phrasing import phrasing
from medlora.eval.judges import endorses_harm, is_safe, leaks
from medlora.eval.mcq import extract_choice, golden_choice
from medlora.knowledge import KnowledgeIndex
from medlora.vocab import parse_options

REPO = Path(__file__).resolve().parents[1]
KB = REPO / "src" / "medlora" / "kb"
DATA = REPO / "data" / "medqa"
MCQ_OUTPUT = re.compile(r"^答案: ([A-E])(?:。(.+))?$")  # the letter first, then the fact on the same line


@pytest.fixture(scope="module")
def diseases():
    return [{**d, "source": "kb"} for d in load_knowledge_base()]


@pytest.fixture(scope="module")
def tagged(diseases):
    return build_tagged(diseases, seed=42)


@pytest.fixture(scope="module")
def records(diseases):
    return build_records(diseases, seed=42)


def _write_kb(folder: Path, name: str, entries: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump(entries, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _entry(name: str, **changes) -> dict:
    entry = {"name": name, "icd10_chapter": CHAPTERS[0], "department": "感染科", "causes": ["某种病毒"],
             "symptoms": ["发热", "咳嗽"], "examinations": ["血常规"], "treatments": ["对症治疗"]}
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


# ----------------------------------------------------------------------------------------------- the KB


def test_kb_is_large_and_valid(diseases):
    assert len(diseases) >= 150
    assert len({d["icd10_chapter"] for d in diseases}) >= 15
    names = [d["name"] for d in diseases]
    assert len(names) == len(set(names))
    for d in diseases:
        assert d["icd10_chapter"] in CHAPTERS
        for key in ("name", "icd10_chapter", "department"):
            assert isinstance(d[key], str) and d[key]
        for key in ("causes", "symptoms", "examinations", "treatments"):
            assert d[key] and all(isinstance(x, str) and x for x in d[key])


def test_missing_field_names_file_disease_and_field(tmp_path):
    _write_kb(tmp_path, "ch01_test.yaml", [_entry("甲病"), _entry("乙病", symptoms=None)])
    with pytest.raises(DataError) as err:
        load_knowledge_base(tmp_path)
    message = str(err.value)
    assert "ch01_test.yaml" in message and "乙病" in message and "'symptoms'" in message


def test_duplicate_name_across_files(tmp_path):
    _write_kb(tmp_path, "ch01_a.yaml", [_entry("甲病")])
    _write_kb(tmp_path, "ch02_b.yaml", [_entry("乙病"), _entry("甲病")])
    with pytest.raises(DataError) as err:
        load_knowledge_base(tmp_path)
    message = str(err.value)
    assert "ch02_b.yaml" in message and "甲病" in message and "'name'" in message


@pytest.mark.parametrize("changes, field", [
    ({"symptoms": []}, "symptoms"),
    ({"drugs": ["奥司他韦", ""]}, "drugs"),
    ({"department": 3}, "department"),
    ({"icd10_chapter": "XX 不存在的章"}, "icd10_chapter"),
    ({"severity": "高"}, "severity"),
])
def test_bad_fields_are_rejected(tmp_path, changes, field):
    _write_kb(tmp_path, "ch01_test.yaml", [_entry("甲病", **changes)])
    with pytest.raises(DataError, match=f"ch01_test.yaml: disease '甲病': field '{field}'"):
        load_knowledge_base(tmp_path)


# ----------------------------------------------------------------------------------------------- records


def test_same_seed_same_records_other_seed_differs(diseases, records):
    assert build_records(diseases, seed=42) == records
    assert build_records(diseases, seed=7) != records


def test_at_least_25_patterns(tagged):
    assert len({r["pattern"] for r in tagged}) >= 25


def test_records_have_exact_keys_and_text(records):
    for split, rows in records.items():
        assert rows, split
        for record in rows:
            assert list(record) == ["instruction", "input", "output", "source"]
            assert record["input"] == "" and record["source"] in ("kb", "safety")
            assert record["instruction"].strip() and record["output"].strip()


def test_splits_are_disjoint_on_disease_and_pattern(tagged):
    knowledge = [r for r in tagged if r["source"] != "safety"]
    pairs = {split: {(r["disease"], r["pattern"]) for r in knowledge if r["split"] == split}
             for split in ("train", "valid", "test")}
    assert not pairs["test"] & (pairs["train"] | pairs["valid"])
    assert not pairs["valid"] & pairs["train"]
    counts = Counter(r["split"] for r in tagged)
    assert counts["test"] >= 0.05 * len(tagged) and counts["valid"] > 0
    # the hand-written safety pairs and the unknown-disease names are split one by one
    held = {r["instruction"] for r in tagged if r["source"] == "safety" and r["split"] != "train"}
    trained = {r["instruction"] for r in tagged if r["source"] == "safety" and r["split"] == "train"}
    assert held and not held & trained


def _skeleton(r: dict) -> str:
    return r["instruction"].replace(r["disease"], "{name}") if r["disease"] else r["instruction"]


@pytest.mark.parametrize("pattern", list(ATTRIBUTE_PATTERNS))
def test_each_attribute_is_asked_in_many_wordings(tagged, pattern):
    records = [r for r in tagged if r["pattern"] == pattern]
    assert len({_skeleton(r) for r in records}) >= min(8, len(records) // 3), pattern
    assert len({r["output"].replace(r["disease"], "") [:6] for r in records}) >= 3  # several answer wordings


def test_free_text_answers_carry_no_other_answer_form(tagged):
    for r in tagged:
        if r["pattern"] not in MCQ_PATTERNS and r["pattern"] not in TRAIN_ONLY_PATTERNS:
            assert leaks({**r, "golden": r["output"]}) == [], r
            assert "选项" not in r["output"]


def test_drug_answers_send_the_user_to_a_doctor_or_pharmacist(tagged):
    for r in tagged:
        if r["pattern"] in ("drug", "reverse_drug", "drug_uses"):
            assert re.search("医生|药师|遵医嘱", r["output"]), r["output"]


@pytest.mark.parametrize("pattern, action", [("emergency", "urgent"), ("crisis", "crisis"), ("harm", "refuse_dose")])
def test_safety_answers_give_the_safe_action(tagged, pattern, action):
    records = [r for r in tagged if r["pattern"] == pattern]
    assert len({r["instruction"] for r in records}) >= 15
    for r in records:
        assert is_safe({**r, "kind": "emergency", "safe_action": action}), r["output"]
        if pattern == "emergency":
            assert r["output"].startswith("立即"), r["output"]


def test_a_step_the_question_proposes_is_refused_by_name_and_is_not_one_the_exam_proposes():
    """Emergency pairs whose question proposes a step of its own (`harmful`: the question's words for it) answer with
    the urgent action and never name the step outside a clause that warns against it (the exam's own rule); none of
    those steps is one the exam's `harmful` records propose, so the exam measures whether the class generalises."""
    proposed = [pair for pair in phrasing()["emergency"] if pair.get("harmful")]
    assert len(proposed) >= 20
    exam_steps = {term for record in load_records(REPO / "data" / "exam" / "exam.jsonl")
                  for term in record.get("harmful", "").split("、") if term}
    assert len(exam_steps) >= 9
    for pair in proposed:
        terms = pair["harmful"].split("、")
        assert all(term in pair["question"] for term in terms), pair["question"]
        assert pair["answer"].startswith("立即") and not endorses_harm(pair["answer"], pair["harmful"]), pair["answer"]
        assert not any(mine in theirs or theirs in mine for mine in terms for theirs in exam_steps), pair["harmful"]


def test_unknown_diseases_are_not_in_the_knowledge_base_and_held_out_by_name(diseases, tagged):
    index = KnowledgeIndex(diseases)
    unknown = [r for r in tagged if r["pattern"] == "unknown"]
    assert len(unknown) >= 100 and not any(index.link(r["instruction"]) for r in unknown)
    names = {split: {n for n in safety.unknown_names(diseases) for r in unknown
                     if r["split"] == split and n in r["instruction"]} for split in ("train", "test")}
    assert names["test"] and not names["test"] & names["train"]


def test_honest_answers_open_alike_and_unknown_questions_are_worded_as_known_ones(diseases, tagged):
    unknown = [r for r in tagged if r["pattern"] == "unknown"]
    for r in unknown:  # one opener: the register is one choice at the answer's first token
        assert any(r["output"].startswith(f"我没有关于{name}的可靠资料，") for name in safety.unknown_names(diseases)
                   if name in r["instruction"]), r["output"]
    table = safety.phrasing()

    def pattern(template: str) -> re.Pattern:
        return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)))

    own = [pattern(q) for q in table["unknown"]["questions"]]
    frames = [pattern(f) for f in table["frames"]]
    framed = sum(any(f.match(r["instruction"]) for f in frames) for r in unknown)
    as_known = sum(not any(o.fullmatch(r["instruction"]) for o in own) for r in unknown)
    assert framed >= len(unknown) / 5 and as_known >= len(unknown) / 2


def nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def test_mcq_answers_point_at_the_right_option(diseases, tagged):
    by_name = {d["name"]: d for d in diseases}
    mcqs = [r for r in tagged if r["pattern"] in MCQ_PATTERNS]
    assert sum(r["split"] == "test" for r in mcqs) >= 60
    layouts = Counter()
    for r in mcqs:
        options = parse_options(r["instruction"])
        assert len(options) in (4, 5) and len(set(options.values())) == len(options), r["instruction"]
        match = MCQ_OUTPUT.match(unicodedata.normalize("NFKC", r["output"]))  # as parse_options reads it
        assert match, r["output"]
        letter, why = match.groups()
        chosen = options[letter]
        # the letter, then the fact that names the chosen option and no other
        assert why and chosen in why and not any(o in why for o in options.values() if o not in chosen), r["output"]
        assert golden_choice(r["output"], r["instruction"]) == letter
        assert extract_choice(r["output"], r["instruction"]) == letter
        layouts[(len(options), "\n" in r["instruction"], "（ ）" in r["instruction"])] += 1
        d = {k: [nfkc(x) for x in v] if isinstance(v, list) else nfkc(v) for k, v in by_name[r["disease"]].items()}
        others = [v for v in options.values() if v != chosen]
        if r["pattern"] in ("mcq_disease_by_symptom", "mcq_disease_by_drug"):
            assert chosen == d["name"]
        elif r["pattern"] == "mcq_department":
            assert chosen == d["department"] and d["department"] not in others
        else:  # an item of the asked attribute; no distractor overlaps anything the KB says of the disease
            key = {"mcq_symptom": "symptoms", "mcq_drug": "drugs", "mcq_cause": "causes",
                   "mcq_examination": "examinations", "mcq_complication": "complications"}[r["pattern"]]
            assert chosen in d[key]
            facts = [x for k in ("symptoms", "causes", "drugs", "treatments", "examinations", "complications")
                     for x in d.get(k, [])]
            assert not any(o in f or f in o for o in others for f in facts), (r["instruction"], facts)
    # 4 and 5 options, inline and one a line, with and without a （ ） blank
    assert {n for n, _, _ in layouts} == {4, 5} and {lines for _, lines, _ in layouts} == {True, False}
    assert any(blank for _, _, blank in layouts)


def test_training_mcqs_come_in_variants_with_spread_answer_letters(tagged):
    train = [r for r in tagged if r["split"] == "train" and r["pattern"] in MCQ_PATTERNS]
    per_pair = Counter((r["disease"], r["pattern"]) for r in train)
    assert sum(per_pair.values()) >= 1.8 * len(per_pair)  # most pairs have their 2 variants
    assert len({r["instruction"] for r in train}) == len(train)
    letters = Counter(MCQ_OUTPUT.match(r["output"]).group(1) for r in train)
    assert all(0.14 < letters[x] / len(train) < 0.30 for x in "ABCD") and 0.05 < letters["E"] / len(train) < 0.2
    held_out = [r for r in tagged if r["split"] != "train" and r["pattern"] in MCQ_PATTERNS]
    assert Counter((r["disease"], r["pattern"]) for r in held_out).most_common(1)[0][1] == 1


def test_lookup_drills_are_training_only_and_point_at_the_named_option(tagged):
    drills = [r for r in tagged if r["pattern"] in TRAIN_ONLY_PATTERNS]
    assert len(drills) >= 140 and {r["split"] for r in drills} == {"train"}
    for r in drills:
        named = re.search(r"“(.+)”", r["instruction"]).group(1)
        options = parse_options(r["instruction"])
        letter = MCQ_OUTPUT.match(r["output"]).group(1)
        assert list(options.values()).count(named) == 1 and options[letter] == named
        assert r["output"] == f"答案: {letter}"


def test_every_drug_gets_a_training_statement_unless_a_held_out_pair_asks_about_it(diseases, tagged):
    drugs = {x for d in diseases for x in d.get("drugs", [])}

    def asked(r):  # the longest drug name in the question
        return max((x for x in drugs if x in r["instruction"]), key=len)

    uses = {asked(r): r for r in tagged if r["pattern"] == "drug_uses"}
    assert {r["split"] for r in uses.values()} == {"train"}
    held = {asked(r) for r in tagged if r["pattern"] == "reverse_drug" and r["split"] != "train"}
    assert held and not held & set(uses)  # held-out reverse_drug pairs stay unseen
    assert set(uses) | held == drugs and len(uses) == len(drugs - held)
    for drug, r in uses.items():  # names diseases that use the drug, and only those
        named = [d for d in diseases if d["name"] in r["output"]
                 and not any(d["name"] in o["name"] and o["name"] in r["output"] for o in diseases if o is not d)]
        assert named and all(any(drug in x or x in drug for x in d.get("drugs", [])) for d in named), r["output"]


def test_outputs_end_with_a_full_stop(tagged):
    for r in tagged:
        if r["pattern"] not in MCQ_PATTERNS and r["pattern"] not in TRAIN_ONLY_PATTERNS:
            assert r["output"].endswith(("。", "！")), r


# ----------------------------------------------------------------------------------------------- files


def test_committed_files_equal_a_fresh_build(tmp_path):
    counts = build_dataset(tmp_path, seed=42)
    for split, n in counts.items():
        data = (tmp_path / f"{split}.jsonl").read_bytes()
        assert len(data.decode("utf-8").splitlines()) == n
        assert (DATA / f"{split}.jsonl").read_bytes() == data, f"data/medqa/{split}.jsonl is stale"


def test_build_dataset_from_a_small_kb(tmp_path):
    kb = tmp_path / "kb"
    for i, chapter in enumerate(CHAPTERS[:6]):
        _write_kb(kb, f"ch{i:02d}.yaml", [_entry(f"病{i}", icd10_chapter=chapter, department=f"第{i}科",
                                                 causes=[f"病因{i}"], symptoms=[f"症状{i}甲", f"症状{i}乙"])])
    shutil.copy(KB / "SCHEMA.md", kb / "SCHEMA.md")
    counts = build_dataset(tmp_path / "a", seed=1, kb_path=kb)  # the CLI's keyword
    assert sum(counts.values()) > 0 and set(counts) == {"train", "valid", "test"}
    assert build_dataset(tmp_path / "b", seed=1, kb_dir=kb) == counts
    for split in counts:
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
