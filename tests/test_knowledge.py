"""medlora.knowledge: entity linking, attribute detection, retrieval, and users' own knowledge files."""

from __future__ import annotations

import json

import pytest

from medlora.errors import DataError
from medlora.knowledge import KnowledgeIndex, read_knowledge_file


@pytest.fixture(scope="module")
def index() -> KnowledgeIndex:
    return KnowledgeIndex.builtin()


def test_link_by_name_alias_and_longest_match(index):
    assert index.link("心梗挂什么科？") == ["急性心肌梗死"]  # alias
    assert index.link("2型糖尿病和1型糖尿病") == ["2型糖尿病", "1型糖尿病"]  # in order of appearance
    assert index.link("慢性阻塞性肺疾病急性加重") == ["慢性阻塞性肺疾病"]
    assert index.link("感冒了怎么办") == ["急性上呼吸道感染"]  # an everyday word (kb/usage.yaml)
    assert index.link("得了痔疮怎么办") == []


def test_fuzzy_link_takes_one_changed_character_only_when_asked(index):
    assert index.link("我得了支气管哮揣，吃什么药？") == []
    assert index.link("我得了支气管哮揣，吃什么药？", fuzzy=True) == ["支气管哮喘"]
    assert index.link("今天天气很好，适合散步。", fuzzy=True) == []


def test_retrieve_gives_the_asked_facts_deterministically(index):
    found = index.retrieve("哮喘急性发作时首选的缓解药物是什么？")
    assert found.diseases == ["支气管哮喘"] and found.attribute == "drugs"
    assert found.facts == [("支气管哮喘", "department", ["呼吸内科"]),  # the department always comes along
                           ("支气管哮喘", "drugs", index.items("支气管哮喘", "drugs"))]
    assert found.text().splitlines()[1].startswith("支气管哮喘·常用药物：") and "沙丁胺醇" in found.text()
    assert index.retrieve("哮喘急性发作时首选的缓解药物是什么？") == found
    summary = index.retrieve("甲亢要紧吗？")  # no attribute asked: department, symptoms, drugs
    assert [key for _, key, _ in summary.facts] == ["department", "complications"]  # 要紧: what it can lead to
    summary = index.retrieve("甲亢吃什么好？")
    assert [key for _, key, _ in summary.facts] == ["department", "symptoms", "drugs"]
    whole = index.retrieve("请介绍一下甲亢。")  # the whole entry
    assert {key for _, key, _ in whole.facts} >= {"department", "symptoms", "drugs", "examinations", "treatments"}
    assert index.retrieve("甲亢有什么别称？").facts[-1][1] == "aliases"
    assert index.retrieve("得了痔疮怎么办").text() == ""


def test_retrieve_finds_the_disease_from_the_items_a_question_names(index):
    found = index.retrieve("吡格列酮一般用来治疗哪些疾病？")  # no disease named: the one whose drugs hold it
    assert found.diseases == ["非酒精性脂肪性肝病"]
    assert ("非酒精性脂肪性肝病", "drugs", index.items("非酒精性脂肪性肝病", "drugs")) in found.facts
    assert index.retrieve("头疼是什么病？").diseases == []  # 2 characters of a common symptom: too little to go on
    # only a question that asks which disease is answered from items: one about a disease the knowledge base lacks
    # is left without an entry rather than given another disease's
    assert index.retrieve("我得了三叉神经痛，吡格列酮能吃吗？").diseases == []


def test_a_users_knowledge_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"name": "鼠咬热", "aliases": ["鼠咬病"], "symptoms": ["发热", "皮疹"], "department": "感染科"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    index = KnowledgeIndex.load(str(path))
    assert index.retrieve("鼠咬病有什么症状？").facts == [("鼠咬热", "department", ["感染科"]),
                                                        ("鼠咬热", "symptoms", ["发热", "皮疹"])]
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text("- name: 鼠咬热\n  drugs: [青霉素]\n", encoding="utf-8")
    assert read_knowledge_file(yaml_path) == [{"name": "鼠咬热", "drugs": ["青霉素"]}]


@pytest.mark.parametrize("line, message", [
    ('{"name": "甲病", "color": ["红"]}', "line 1: field 'color' is not one of"),
    ('{"name": "甲病", "drugs": "阿司匹林"}', "line 1: field 'drugs' must be a non-empty list of strings"),
    ('{"name": ""}', "line 1: field 'name' must be a non-empty string"),
    ('[1, 2]', "line 1: a knowledge record must be an object"),
    ('{"name": "甲病"', "line 1: invalid JSON"),
    # issue 38, item 12: text that trains and then fails the adapter's save, and words that link every question
    ('{"name": "甲病\\ud800"}', "line 1: field 'name': unpaired surrogate '\\ud800' at character 3"),
    ('{"name": "甲病", "symptoms": ["\\udc00热"]}', "line 1: field 'symptoms': unpaired surrogate"),
    ('{"name": "！？…"}', "line 1: field 'name': '！？…' is only punctuation and spaces, which would match every question"),
    ('{"name": "甲病", "aliases": ["乙病", " - "]}', "line 1: field 'aliases': '-' is only punctuation and spaces"),
])
def test_bad_knowledge_files_get_one_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_knowledge_file(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)
    assert "\n" not in str(error.value) and len(str(error.value)) <= 300


def test_the_curated_base_and_a_users_yaml_share_the_entry_text_check(tmp_path):
    """The one check of an entry's strings (kb.check_entry_text) runs for the curated YAML folder too, and for
    YAML's own escapes; an entry named by an unprintable name is named by its number."""
    from medlora.kb import load_knowledge_base

    entry = ("- name: 甲病\n  aliases: [\"。。\"]\n  icd10_chapter: \"X 呼吸系统疾病\"\n  department: 呼吸内科\n"
             "  causes: [病毒]\n  symptoms: [咳嗽]\n  examinations: [胸片]\n  treatments: [休息]\n")
    (tmp_path / "ch10_x.yaml").write_text(entry, encoding="utf-8")
    with pytest.raises(DataError, match=r"^ch10_x.yaml: disease '甲病': field 'aliases': '。。' is only punctuation"):
        load_knowledge_base(tmp_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text('- name: "甲\\ud800"\n  drugs: [青霉素]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"record 1: field 'name': unpaired surrogate"):
        read_knowledge_file(mine)
