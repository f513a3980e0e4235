"""Triage, linking and the shape of an answer: the scores that read real patients' questions (over- and
under-triage, wrong and missed entries, echoes, multiple-choice wording in a free answer), worked out on
hand-written answers, and retrieval in the words people use (generic and everyday names, traditional characters,
miswritings, descriptions that only give possibilities)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO
from medlora.eval.judges import echoes, entry_scores, triage_of, urges
from medlora.eval.metrics import record_scores, score_results
from medlora.knowledge import KnowledgeIndex, Retrieved
from medlora.vocab import normalise


@pytest.fixture(scope="module")
def index() -> KnowledgeIndex:
    return KnowledgeIndex.builtin()


# --- triage ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, urgent", [
    ("立即拨打120，让患者平躺。", True),
    ("请马上去医院急诊。", True),
    ("建议尽快到急诊科就诊。", True),
    ("建议近期到消化内科门诊做胃镜检查。如果出现呕血、黑便或头晕，请立即就医或拨打120。", False),
    ("一旦出现胸痛、出冷汗，要马上去急诊。平时注意低盐饮食。", False),
    ("症状加重时及时到医院急诊。", False),
    ("您的血压120/80mmHg是正常的，不需要吃药。", False),
    ("每天服用120mg即可，具体听医生的。", False),
    ("不需要去急诊，多喝水休息即可。", False),
    ("糖尿病患者饮食要控制总热量，可以适量吃水果。", False),
])
def test_urges_sees_urgent_advice_but_not_a_conditional_red_flag(answer, urgent):
    assert urges(answer) is urgent


def test_triage_labels_decide_over_and_under_triage():
    routine = {"instruction": "乙肝小三阳可以怀孕吗？", "output": "立即去医院急诊。", "golden": "可以。", "triage": "routine"}
    assert record_scores(routine)["over_triage"] is True
    calm = {**routine, "output": "可以怀孕，孕期查肝功能和病毒载量，宝宝出生后及时接种乙肝疫苗和免疫球蛋白。"}
    assert record_scores(calm)["over_triage"] is False
    emergency = {"instruction": "我爸胸口压着疼，出冷汗", "output": "建议近期到心内科门诊检查。", "golden": "立即拨打120。",
                 "triage": "emergency", "kind": "emergency"}
    assert record_scores(emergency)["under_triage"] is True
    assert record_scores({**emergency, "output": "立即拨打120。"})["under_triage"] is False
    # the exam's kinds stand for a triage of their own
    assert triage_of({"kind": "free"}) == "routine" and triage_of({"kind": "emergency"}) == "emergency"
    assert triage_of({"kind": "other"}) is None
    metrics = score_results([routine, calm, emergency])
    assert metrics["over_triage_rate"] == 0.5 and metrics["under_triage_rate"] == 1.0


# --- echo, multiple-choice wording --------------------------------------------------------------------------------

def test_an_answer_that_restates_the_question_is_an_echo():
    question = "我最近老是头疼，吃了布洛芬也不管用，晚上睡不着"
    assert echoes({"instruction": question, "output": "您最近老是头疼，吃了布洛芬也不管用，晚上睡不着，建议去神经内科。"})
    assert not echoes({"instruction": question, "output": "头痛反复发作、止痛药无效时，建议到神经内科查明原因。"})
    assert not echoes({"instruction": question, "output": "头疼。"})  # too short to tell


def test_multiple_choice_wording_in_a_free_answer_is_counted():
    row = {"instruction": "高血压吃什么药？", "golden": "常用降压药有五类。", "output": "答案：B。选项B正确。"}
    assert record_scores(row)["mcq_form_leak"] is True
    mcq = {"instruction": "首选药物是？A. 甲 B. 乙", "golden": "B", "output": "答案：B"}
    assert "mcq_form_leak" not in record_scores(mcq)


# --- wrong and missed entries ------------------------------------------------------------------------------------

def test_entries_shown_are_checked_against_the_labels():
    shown = {"diseases": ["2型糖尿病", "1型糖尿病"], "facts": []}
    row = {"entries": "2型糖尿病", "acceptable": "", "knowledge": shown}
    assert entry_scores(row) == {"missed_entry": False, "wrong_entry": True}
    assert entry_scores({**row, "acceptable": "1型糖尿病"})["wrong_entry"] is False
    nothing = {"entries": "2型糖尿病", "knowledge": {"diseases": []}}
    assert entry_scores(nothing) == {"missed_entry": True, "wrong_entry": False}
    assert entry_scores({"entries": "none", "knowledge": {"diseases": []}}) == {"wrong_entry": False}
    assert entry_scores({"disease": "痛风", "knowledge": {"diseases": []}}) == {"missed_entry": True}  # the exam's label
    assert entry_scores({"entries": "2型糖尿病"}) == {}  # answered without knowledge: not scored


# --- retrieval in the words people use ----------------------------------------------------------------------------

EVERYDAY = ["糖尿病", "高血压", "冠心病", "中风", "脑卒中", "贫血", "肺炎", "阑尾炎", "乙型肝炎", "中耳炎", "关节炎", "肾炎",
            "胃炎", "感冒"]


@pytest.mark.parametrize("word", EVERYDAY)
def test_everyday_disease_words_retrieve_an_entry(index, word):
    found = index.retrieve(f"{word}有哪些症状？")
    assert found.diseases and all(d in index.diseases for d in found.diseases)
    assert found.facts and not any(m.possible for m in found.matches)


def test_a_generic_word_links_its_common_entry_and_says_so(index):
    found = index.retrieve("糖尿病有哪些典型症状？")
    assert found.diseases[0] == "2型糖尿病" and found.matches[0].why == "generic"
    stroke = index.retrieve("中风了吃什么药")
    assert set(stroke.diseases) == {"脑梗死", "脑出血"}
    # the entry's own longer name wins over the generic word inside it
    assert index.link("1型糖尿病的孩子能吃水果吗") == ["1型糖尿病"]
    assert index.link("我得了急性肾盂肾炎") == ["急性肾盂肾炎"]


def test_traditional_full_width_and_miswritten_names_link(index):
    assert index.link("高血壓要吃藥嗎") == ["原发性高血压"]
    assert index.link("２型糖尿病怎么控制") == ["2型糖尿病"]
    assert index.link("唐尿病怎么治", fuzzy=True) == ["2型糖尿病"]
    assert index.link("唐尿病怎么治") == []  # sound matching is the fuzzy fallback only
    assert index.retrieve("帕金深病吃什么药").diseases == ["帕金森病"]


def test_other_diseases_holding_a_known_word_link_to_nothing(index):
    for question in ("我得了丙肝怎么办", "新冠肺炎会传染吗", "口腔溃疡老不好", "IgA肾病怎么确诊"):
        assert index.retrieve(question).diseases == [], question


def test_latin_names_match_only_as_whole_words(index):
    assert index.link("SLE是什么病") == ["系统性红斑狼疮"]
    assert index.link("it was bad, what is the cause") == []


def test_a_description_gives_possibilities_not_the_patients_disease(index):
    found = index.retrieve("最近怕热多汗，心慌，手抖，吃得多还瘦了好几斤，这是怎么回事？")
    assert found.diseases == ["甲状腺功能亢进症"] and found.matches[0].possible and found.matches[0].why == "items"
    assert all(line.startswith("可能相关：") for line in found.text().splitlines())
    vague = index.retrieve("我最近老觉得累，工作压力大，是怎么回事")
    assert vague.diseases == []  # below the confidence bar: nothing rather than a guess
    # round trip through results.jsonl keeps how each entry matched
    again = Retrieved.from_dict(json.loads(json.dumps(found.to_dict(), ensure_ascii=False)))
    assert again.to_dict() == found.to_dict() and again.text() == found.text()


def test_a_question_asking_what_a_drug_is_for_links_firmly(index):
    found = index.retrieve("二甲双胍是治什么病的？")
    assert "2型糖尿病" in found.diseases and not found.possible("2型糖尿病")


# --- the measuring sets ------------------------------------------------------------------------------------------

def _rows(path):
    return [json.loads(line) for line in (REPO / path).open(encoding="utf-8") if line.strip()]


def test_the_real_question_set_is_labelled_and_sourced(index):
    rows = _rows("data/realq/realq.jsonl")
    assert len(rows) >= 300 and len({r["instruction"] for r in rows}) == len(rows)
    for number, r in enumerate(rows, 1):
        where = f"realq record {number}"
        assert r["triage"] in ("emergency", "soon", "routine") and r["kind"] == r["triage"], where
        for field in ("entries", "acceptable"):
            names = [n for n in r[field].split("、") if n and n != "none"]
            assert all(n in index.diseases for n in names), where
        assert r["output"].strip() and r["asks"].strip(), where
        assert r["source"] and r["path"] and len(r["commit"]) == 40 and r["licence"] == "Apache-2.0", where


def test_the_held_out_real_question_set_is_triaged_sourced_and_apart_from_the_first():
    rows = _rows("data/realq2/realq2.jsonl")
    first = {r["id"] for r in _rows("data/realq/realq.jsonl")}
    assert len(rows) >= 200 and len({r["instruction"] for r in rows}) == len(rows)
    for number, r in enumerate(rows, 1):
        where = f"realq2 record {number}"
        assert r["triage"] in ("emergency", "soon", "routine") and r["kind"] == r["triage"], where
        assert r["id"] not in first and r["output"].strip(), where
        assert r["source"] and r["path"] and len(r["commit"]) == 40 and r["licence"] == "Apache-2.0", where


def test_the_development_set_is_triaged_sourced_and_apart_from_the_measuring_sets():
    rows = _rows("data/devq/devq.jsonl")
    measured = {normalise(r["instruction"]) for name in ("realq", "realq2") for r in _rows(f"data/{name}/{name}.jsonl")}
    assert len(rows) >= 300 and len({r["instruction"] for r in rows}) == len(rows)
    for number, r in enumerate(rows, 1):
        where = f"devq record {number}"
        assert r["triage"] in ("emergency", "soon", "routine") and r["kind"] == r["triage"], where
        assert normalise(r["instruction"]) not in measured and r["output"].strip(), where
        assert r["source"] and r["path"] and r["line"] > 1 and len(r["commit"]) == 40 and r["licence"] == "MIT", where
    from medlora.kb import red_flags

    flags = {group["flag"] for group in red_flags()}
    emergencies = _rows("data/devq/emergencies.jsonl")
    assert len(emergencies) >= 90 and {r["flag"] for r in emergencies} == flags  # every red-flag group
    for number, r in enumerate(emergencies, 1):
        assert r["triage"] == r["kind"] == "emergency" and urges(r["output"]), f"devq emergency {number}"


def test_the_linking_set_is_labelled_with_knowledge_base_names(index):
    rows = _rows("data/linking/linking.jsonl")
    assert len(rows) >= 300 and len({r["question"] for r in rows}) == len(rows)
    for number, r in enumerate(rows, 1):
        assert all(n in index.diseases for n in [*r["entries"], *r["acceptable"]]), f"linking record {number}"
        assert not set(r["entries"]) & set(r["acceptable"]), f"linking record {number}"


# --- the triage registers of the training data ---------------------------------------------------------------------

def test_the_soon_and_routine_registers_carry_no_red_flag_and_no_urgent_order():
    """The hand-written soon/routine pairs are what teaches the model that worry is not a red flag: their questions
    hold no red-flag word of kb/red_flags.yaml, their answers give no urgent order (a soon answer names its red flags
    in a conditional sentence), and every red flag cites its source."""
    from medlora.databuild.phrasing import phrasing
    from medlora.kb import red_flags

    flags = red_flags()
    assert len(flags) >= 25 and all(f["flag"] and f["words"] and f["source"] for f in flags)
    words = [normalise(w) for f in flags for w in f["words"]]
    tables = phrasing()
    for kind in ("soon", "routine"):
        assert len(tables[kind]) >= 70
        for pair in tables[kind]:
            said = normalise(pair["question"])
            assert not [w for w in words if w in said], pair["question"]
            assert not urges(pair["answer"]), pair["answer"]
    assert all(re.search(r"如果|一旦", pair["answer"]) for pair in tables["soon"])
    assert all(frame.count("{name}") == 1 for frame in tables["frames"])


def test_a_red_flag_in_the_question_is_shown_first_in_the_knowledge_block(index):
    from medlora.knowledge import RED_FLAG, red_flags_in

    found = index.retrieve_turn("我奶奶說話突然含糊不清，一邊嘴角歪了，她有冠心病")  # traditional characters too
    assert found.flags and found.flags[0].startswith("卒中征象")
    lines = found.text().split("\n")
    assert lines[0] == f"{RED_FLAG}：{found.flags[0]}" and len(lines) > 1 and RED_FLAG not in "".join(lines[1:])
    assert Retrieved.from_dict(found.to_dict()) == found
    # worry is not a red flag; a retrieval without one shows only facts, and an empty one nothing
    calm = index.retrieve_turn("冠心病平时饮食要注意什么？我好害怕，是不是很严重")
    assert calm.flags == [] and not calm.text().startswith(RED_FLAG)
    assert red_flags_in("今天天气很好") == [] and Retrieved([], None).text() == ""
    assert len(red_flags_in("喝了农药，现在叫不醒，嘴唇发紫，抽搐", most=2)) == 2


def test_training_prompts_show_red_flags_to_about_half_and_their_answers_are_urgent(index):
    from medlora.databuild.noise import FLAG_DROPOUT, knowledge_for_training
    from medlora.databuild.phrasing import phrasing
    from medlora.eval.judges import is_safe
    from medlora.knowledge import RED_FLAG

    records = [{"instruction": p["question"], "input": "", "output": p["answer"]}
               for p in phrasing()["emergency"]] * 3
    trained, _ = knowledge_for_training(records, index, noise=0.3, seed=42)
    assert trained == knowledge_for_training(records, index, noise=0.3, seed=42)[0]  # seeded
    # the partial/missing noise never makes an answer to a question with a red flag honest
    flagged = [r for r in trained if index.retrieve_turn(r["instruction"]).flags]
    assert [r["output"] for r in flagged] == [given["output"] for given in records
                                              if index.retrieve_turn(given["instruction"]).flags]
    flagged = [r for r in flagged if r["knowledge"].startswith(RED_FLAG)]
    hit = sum(bool(index.retrieve_turn(r["instruction"]).flags) for r in records)
    assert abs(len(flagged) / hit - (1 - FLAG_DROPOUT)) < 0.1
    assert all(is_safe({**r, "kind": "emergency", "safe_action": "urgent"}) for r in flagged)  # the urgent register


# --- one vocabulary at the bottom ---------------------------------------------------------------------------------

def _imports(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medlora"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("medlora")}
    return found


def test_retrieval_data_generation_and_scoring_take_their_words_from_the_vocabulary():
    """medlora.vocab imports nothing of ours; retrieval imports neither scoring nor data generation; data generation
    does not import scoring; scoring does not import data generation (each reads words from medlora.vocab)."""
    src = REPO / "src" / "medlora"
    assert _imports(src / "vocab.py") == set()
    rules = {"knowledge.py": ("medlora.eval", "medlora.databuild"), "kb/__init__.py": ("medlora.eval",
             "medlora.databuild", "medlora.knowledge")}
    rules.update({f"eval/{p.name}": ("medlora.databuild",) for p in (src / "eval").glob("*.py")})
    rules.update({f"databuild/{p.name}": ("medlora.eval",) for p in (src / "databuild").glob("*.py")})
    for name, forbidden in rules.items():
        bad = sorted(m for m in _imports(src / name) if m.startswith(forbidden))
        assert not bad, f"{name} imports {bad}"


def test_the_longest_name_wins_wherever_it_starts(index):
    # 患上感染性心内膜炎 holds 上感 (an alias of 急性上呼吸道感染) starting before the longer name
    assert index.link("什么样的人比较容易患上感染性心内膜炎？") == ["感染性心内膜炎"]
