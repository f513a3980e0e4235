"""The KB → instruction-record generator (`medlora.databuild`) and the committed data/medqa files."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from medlora.databuild import (CHAPTERS, MCQ_PATTERNS, TRAIN_ONLY_PATTERNS, build_dataset, build_records,
                               build_tagged, load_knowledge_base)
from medlora.errors import DataError

REPO = Path(__file__).resolve().parents[1]
KB = REPO / "src" / "medlora" / "kb"
DATA = REPO / "data" / "medqa"
MCQ_OUTPUT = re.compile(r"^解析: \S[^\n]*\n答案: ([A-E])$")


@pytest.fixture(scope="module")
def diseases():
    return load_knowledge_base()


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
            assert list(record) == ["instruction", "input", "output"]
            assert record["input"] == ""
            assert record["instruction"].strip() and record["output"].strip()


def test_splits_are_disjoint_on_disease_and_pattern(tagged):
    pairs = {split: {(r["disease"], r["pattern"]) for r in tagged if r["split"] == split}
             for split in ("train", "valid", "test")}
    assert not pairs["test"] & (pairs["train"] | pairs["valid"])
    assert not pairs["valid"] & pairs["train"]
    counts = Counter(r["split"] for r in tagged)
    assert counts["test"] >= 0.05 * len(tagged) and counts["valid"] > 0


def restated(options: dict[str, str]) -> str:
    """The option list an MCQ answer restates: each text with its letter after it."""
    return "、".join(f"{text}({x})" for x, text in options.items())


def test_mcq_answers_point_at_the_right_option(diseases, tagged):
    by_name = {d["name"]: d for d in diseases}
    mcqs = [r for r in tagged if r["pattern"] in MCQ_PATTERNS]
    assert sum(r["split"] == "test" for r in mcqs) >= 60
    for r in mcqs:
        match = MCQ_OUTPUT.match(r["output"])
        assert match, r["output"]
        lines = r["instruction"].split("\n")
        options = dict(line.split(". ", 1) for line in lines[1:])
        assert list(options) == list("ABCDE") and len(set(options.values())) == 5
        letter = match.group(1)
        # the options restated (letter after text), the fact naming the option in its exact words, then its letter
        listed, why, step = r["output"].split("\n")[0].removeprefix("解析: ").rsplit("。", 3)[:3]
        assert listed == "选项: " + restated(options)
        assert options[letter] in why and step == f"{options[letter]}是选项{letter}"
        chosen, d = options[letter], by_name[r["disease"]]
        if r["pattern"] in ("mcq_symptom", "mcq_drug"):
            assert chosen == d["name"]
        elif r["pattern"] == "mcq_department":
            assert chosen == d["department"]
            assert list(options.values()).count(d["department"]) == 1
        elif r["pattern"] == "mcq_cause":
            assert chosen in d["causes"]
            assert sum(v in d["causes"] for v in options.values()) == 1
        if r["pattern"] == "mcq_symptom":  # no distractor lists a cited symptom
            cited = re.search(r"(?:出现|包括|以)(.+?)(?:，|？|为典型)", lines[0]).group(1).split("、")
            for v in options.values():
                if v != d["name"]:
                    assert not set(cited) & set(by_name[v]["symptoms"]), (r["instruction"], v)


def test_training_mcqs_come_in_variants_with_spread_answer_letters(tagged):
    train = [r for r in tagged if r["split"] == "train" and r["pattern"] in MCQ_PATTERNS]
    per_pair = Counter((r["disease"], r["pattern"]) for r in train)
    assert sum(per_pair.values()) >= 2.5 * len(per_pair)  # most pairs have their 3 variants
    assert len({r["instruction"] for r in train}) == len(train)
    letters = Counter(MCQ_OUTPUT.match(r["output"]).group(1) for r in train)
    assert all(0.14 < letters[x] / len(train) < 0.26 for x in "ABCDE"), letters
    held_out = [r for r in tagged if r["split"] != "train" and r["pattern"] in MCQ_PATTERNS]
    assert Counter((r["disease"], r["pattern"]) for r in held_out).most_common(1)[0][1] == 1


def test_lookup_drills_are_training_only_and_point_at_the_named_option(tagged):
    drills = [r for r in tagged if r["pattern"] in TRAIN_ONLY_PATTERNS]
    assert len(drills) >= 250 and {r["split"] for r in drills} == {"train"}
    letters = Counter()
    for r in drills:
        named = re.search(r"“(.+)”", r["instruction"]).group(1)
        options = dict(line.split(". ", 1) for line in r["instruction"].split("\n")[1:])
        letter = MCQ_OUTPUT.match(r["output"]).group(1)
        assert list(options.values()).count(named) == 1 and options[letter] == named
        assert r["output"] == f"解析: 选项: {restated(options)}。{named}是选项{letter}。\n答案: {letter}"
        letters[letter] += 1
    assert len(letters) == 5


def test_every_drug_gets_a_training_statement_unless_a_held_out_pair_asks_about_it(diseases, tagged):
    drug_of = re.compile(r"^(.+?)常用于治疗")
    uses = {drug_of.match(r["output"]).group(1): r for r in tagged if r["pattern"] == "drug_uses"}
    assert {r["split"] for r in uses.values()} == {"train"}
    asked = {drug_of.match(r["output"]).group(1) for r in tagged
             if r["pattern"] == "reverse_drug" and r["split"] != "train"}
    assert asked and not asked & set(uses)  # held-out reverse_drug pairs stay unseen
    drugs = {x for d in diseases for x in d.get("drugs", [])}
    assert set(uses) | asked == drugs and len(uses) == len(drugs - asked)
    for d in diseases:
        for drug in set(d.get("drugs", [])) - asked:
            assert d["name"] in uses[drug]["output"], (drug, d["name"])


def test_outputs_end_with_a_full_stop(tagged):
    for r in tagged:
        if r["pattern"] not in MCQ_PATTERNS | set(TRAIN_ONLY_PATTERNS):
            assert r["output"].endswith("。"), r


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
