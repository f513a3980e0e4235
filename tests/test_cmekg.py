"""CMeKG as a disease source (`medlora.cmekg`): the safe loader, each cleaning rule, the schema and the merge.

Everything but the last test runs on tiny hand-made graphs; the last one reads the installed pycmekg pickle and
is skipped when the package is not there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import pickle
import sys
from collections import Counter
from pathlib import Path

import pytest

from medlora import cmekg
from medlora.databuild import CHAPTERS
from medlora.errors import ConfigError, DataError


class _Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo hacked > {self.marker}",))


class _Plain:
    """A harmless class instance: still a global, so still refused."""

    def __init__(self):
        self.x = 1


# A tiny graph in CMeKG's shape: diseases, a symptom-coded entity, a drug product, a brand, an exam.
TINY = {
    "糖尿病": {"ICD10": ["E14.9"], "就诊科室": ["内分泌科"], "常见症状": ["多尿", "多饮", "外伤", "儿童"],
            "常见病因": ["遗传因素", "由胰岛素抵抗引起"], "药物治疗": ["二甲双胍", "抗生素治疗"],
            "相关药物": ["盐酸二甲双胍片", "格华止", "S20140002"], "别称": ["消渴", "DM"]},
    "流行性感冒": {"ICD10": ["J11.1"], "就诊科室": ["耳鼻喉科；内科"], "常见症状": ["发热", "咳嗽、乏力等", "肺炎"],
              "常见病因": ["流感病毒"], "检查": ["实验室检查", "血常规"], "预防": ["接种疫苗", "糖尿病"],
              "传播途径": ["飞沫", "无"], "传染性": ["有"], "别称": ["流感"], "多发群体": ["儿童"]},
    "肺炎": {"ICD10": ["J18.9"], "就诊科室": ["呼吸科"], "常见症状": ["发热", "咳嗽"], "常见病因": ["细菌"],
           "多发群体": ["儿童", "老年人"]},
    "眩晕": {"ICD10": ["R42"], "就诊科室": ["耳鼻咽喉科"], "常见症状": ["恶心", "呕吐"], "常见病因": ["耳石症"]},
    "腹泻": {"ICD10": ["K52.9"], "就诊科室": ["消化科"], "常见症状": ["腹痛", "脱水"], "常见病因": ["感染"]},
    "无科室病": {"ICD10": ["A09"], "常见症状": ["发热", "腹泻"], "常见病因": ["细菌"]},
    "无编码病": {"就诊科室": ["内科"], "常见症状": ["发热", "腹痛"], "常见病因": ["病毒"]},
    "盐酸二甲双胍片": {"适应症": ["糖尿病", "疼痛", "双盲"], "成份": ["二甲双胍"]},
    "格华止": {"适应症": ["糖尿病"], "通用名": ["盐酸二甲双胍片"]},
    "血常规检查": {"相关症状": ["发热"], "所属分类": ["血"]},
    "消渴": {"功效": ["清热"], "主治": ["口渴"]},
}


@pytest.fixture
def tiny_pickle(tmp_path) -> Path:
    path = tmp_path / "cmekg.pkl"
    path.write_bytes(pickle.dumps(TINY))
    return path


@pytest.fixture
def graph() -> cmekg.Graph:
    return cmekg.Graph(TINY)


# ----------------------------------------------------------------------------------------------- loading


def test_safe_load_refuses_a_code_running_pickle(tmp_path):
    marker = tmp_path / "hacked.txt"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"糖尿病": {"x": [_Exploit(marker)]}}))
    with pytest.raises(DataError) as err:
        cmekg.safe_load(path)
    message = str(err.value)
    assert "evil.pkl" in message and "\n" not in message
    assert not marker.exists()


def test_safe_load_refuses_any_class_instance(tmp_path):
    path = tmp_path / "obj.pkl"
    path.write_bytes(pickle.dumps([_Plain()]))
    with pytest.raises(DataError, match="obj.pkl"):
        cmekg.safe_load(path)


@pytest.mark.parametrize("payload", [b"not a pickle", pickle.dumps([1, 2]), pickle.dumps({"a": [1]}), b""])
def test_safe_load_rejects_what_is_not_a_graph(tmp_path, payload):
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="bad.pkl"):
        cmekg.safe_load(path)


def test_safe_load_reads_plain_containers(tiny_pickle):
    assert cmekg.safe_load(tiny_pickle) == TINY


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError) as err:
        cmekg.find_pickle()
    assert str(err.value) == "CMeKG needs the optional extra: pip install 'medlora[cmekg]' (the pycmekg package)"


def test_find_pickle_does_not_import_the_package(monkeypatch, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "cmekg.pkl").write_bytes(pickle.dumps({}))
    spec = importlib.machinery.ModuleSpec("pyCMeKG", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    monkeypatch.delitem(sys.modules, "pyCMeKG", raising=False)
    assert cmekg.find_pickle() == tmp_path / "model" / "cmekg.pkl"
    assert "pyCMeKG" not in sys.modules


# ----------------------------------------------------------------------------------------------- cleaning rules


def test_normalise_full_width_dashes_and_spaces():
    assert cmekg.clean_text("  ＣＴ　检查 ") == "CT检查"
    assert cmekg.clean_text("粪—口传播") == "粪-口传播"
    assert cmekg.clean_text("Ｘ线－胸片–正位‐侧位") == "X线-胸片-正位-侧位"
    assert cmekg.clean_text("初发性睡眠障碍［失眠症］") == "初发性睡眠障碍[失眠症]"
    assert cmekg.clean_text("胸部 CT") == "胸部CT"
    assert cmekg.clean_text("Xpert  MTB/RIF") == "Xpert MTB/RIF"


def test_split_items_lists_etc_fillers_and_fragments():
    assert cmekg.split_items("恶心、呕吐") == ["恶心", "呕吐"]
    assert cmekg.split_items("乏力等") == ["乏力"]
    assert cmekg.split_items("甚至发热") == ["发热"]
    assert cmekg.split_items("或头鸣") == []
    assert cmekg.split_items("咳嗽；咳痰，胸痛") == ["咳嗽", "咳痰", "胸痛"]


def test_length_rule_drops_single_characters_and_sentences():
    rules = cmekg.CleaningRules()
    assert not cmekg.within_length("痛", rules)
    assert cmekg.within_length("咳嗽", rules)
    assert cmekg.within_length("一" * 15, rules)
    assert not cmekg.within_length("常感臀沟内似夹着异物样的难受及不愉快感", rules)


def test_cause_wording_and_restating_the_disease():
    assert cmekg.strip_cause_wording("由肺炎支原体感染引起") == "肺炎支原体感染"
    assert cmekg.strip_cause_wording("遗传等所致") == "遗传"
    assert cmekg.strip_cause_wording("吸烟") == "吸烟"
    assert cmekg.restates("哮喘", "支气管哮喘") and cmekg.restates("出血性水痘", "水痘")
    assert not cmekg.restates("喘息", "支气管哮喘")


def test_dedupe_keeps_first_order():
    assert cmekg.dedupe(["发热", "咳嗽", "发热", "乏力", "咳嗽"]) == ["发热", "咳嗽", "乏力"]


def test_rank_and_cap_prefers_support_then_common_terms_then_order():
    items = ["罕见词", "发热", "咳嗽", "乏力"]
    support = Counter({"罕见词": 1, "发热": 1, "咳嗽": 2, "乏力": 1})
    frequency = Counter({"罕见词": 1, "发热": 900, "咳嗽": 500, "乏力": 900})
    assert cmekg.rank_and_cap(items, support, frequency, cap=3) == ["咳嗽", "发热", "乏力"]


def test_entity_types_from_relations(graph):
    assert graph.type_of("糖尿病") == "disease"
    assert graph.type_of("眩晕") == "symptom"  # ICD-10 chapter R
    assert graph.type_of("无编码病") == "disease"  # a clinic to visit
    assert graph.type_of("盐酸二甲双胍片") == "drug" and graph.type_of("格华止") == "drug"
    assert graph.type_of("血常规检查") == "exam"
    assert graph.type_of("消渴") == "herb"
    assert graph.type_of("外伤") is None


def test_wrong_role_drops_diseases_and_misfiled_items(graph):
    assert cmekg.wrong_role("prevention", "糖尿病", graph)  # a disease is no prevention
    assert not cmekg.wrong_role("prevention", "接种疫苗", graph)
    assert cmekg.wrong_role("symptoms", "外伤", graph)  # an injury is no symptom
    assert cmekg.wrong_role("symptoms", "肺炎", graph)
    assert cmekg.wrong_role("symptoms", "儿童", graph)  # used as a population group
    assert not cmekg.wrong_role("symptoms", "腹泻", graph)  # a coded entity, but named like a symptom
    assert not cmekg.wrong_role("symptoms", "眩晕", graph)
    assert cmekg.wrong_role("drugs", "抗生素治疗", graph)  # a treatment
    assert cmekg.wrong_role("drugs", "肺炎", graph)
    assert not cmekg.wrong_role("drugs", "二甲双胍", graph)
    assert not cmekg.wrong_role("causes", "糖尿病", graph)  # diseases may cause diseases


def test_icd10_codes_and_chapters():
    assert cmekg.icd10_code(["M80001/1", "C16.9"]) == "C16.9"  # ICD-O morphology code skipped
    assert cmekg.icd10_code(["K76.6伴（K70—K71↑）"]) == "K76.6"
    assert cmekg.icd10_code(["CM—3：38.8501"]) == ""
    expected = {"A09": "I", "B99": "I", "C16.9": "II", "D48": "II", "D50.0": "III", "E14.9": "IV", "H59.9": "VII",
                "H60": "VIII", "I10": "IX", "O42": "XV", "S42.4": "XIX", "T98": "XIX"}
    for code, number in expected.items():
        chapter = cmekg.icd10_chapter(code)
        assert chapter in CHAPTERS and chapter.split()[0] == number, code
    for code in ("R42", "Z00", "U07", "V01"):
        assert cmekg.icd10_chapter(code) == ""


def test_department_takes_the_first_clinic_in_kb_spelling():
    assert cmekg.clean_department(["小儿", "耳鼻喉科"]) == "耳鼻咽喉科"
    assert cmekg.clean_department(["骨科；肿瘤科"]) == "骨科"
    assert cmekg.clean_department(["内科 — 神经内科"]) == "神经内科"
    assert cmekg.clean_department(["初产妇"]) == ""


def test_drug_names_become_generic(graph):
    assert cmekg.strip_dosage_form("注射用阿昔洛韦") == "阿昔洛韦"
    assert cmekg.strip_dosage_form("阿昔洛韦缓释片(II)") == "阿昔洛韦"
    assert cmekg.strip_dosage_form("格华止") == "格华止"
    assert cmekg.strip_salt("盐酸二甲双胍") == "二甲双胍"
    assert cmekg.strip_salt("硫酸镁") == "硫酸镁"
    assert cmekg.drug_names("盐酸二甲双胍片", graph, from_products=True) == ["二甲双胍"]
    assert cmekg.drug_names("格华止", graph, from_products=True) == ["二甲双胍"]  # brand → its generic product
    assert cmekg.drug_names("S20140002", graph, from_products=True) == []  # no dosage form: not a drug name
    assert cmekg.drug_names("二甲双胍", graph, from_products=False) == ["二甲双胍"]


# ----------------------------------------------------------------------------------------------- diseases


def test_load_diseases_schema_and_rules(tiny_pickle):
    diseases = {d["name"]: d for d in cmekg.load_diseases(tiny_pickle)}
    # no clinic, no ICD-10 code, and only one core attribute each keep these out
    assert set(diseases) == {"糖尿病", "流行性感冒", "肺炎", "眩晕", "腹泻"}
    d = diseases["糖尿病"]
    assert d["source"] == "cmekg"
    assert d["icd10_chapter"] == "IV 内分泌、营养和代谢疾病" and d["department"] == "内分泌科"
    assert d["symptoms"] == ["多尿", "多饮"]  # 外伤 (an injury) and 儿童 (a group) dropped
    assert d["causes"] == ["遗传因素", "胰岛素抵抗"]
    assert d["drugs"] == ["二甲双胍"]  # from 药物治疗, 盐酸二甲双胍片 and the brand 格华止; not 抗生素治疗
    assert "aliases" not in d  # 消渴 is another entity (a herb), DM is not Chinese
    assert list(d) == [k for k in cmekg.OUTPUT_KEYS if k in d] + ["source"]
    flu = diseases["流行性感冒"]
    assert flu["department"] == "耳鼻咽喉科" and flu["aliases"] == ["流感"]
    assert flu["symptoms"][:2] == ["发热", "咳嗽"] and "肺炎" not in flu["symptoms"]
    assert flu["examinations"] == ["血常规"] and flu["prevention"] == ["接种疫苗"]
    assert flu["transmission"] == ["飞沫"] and flu["high_risk_groups"] == ["儿童"]
    assert diseases["眩晕"]["icd10_chapter"] == ""  # chapter XVIII is not in the schema
    assert "treatments" not in flu  # missing lists are left out


def test_load_diseases_rule_switches(tiny_pickle):
    names = {d["name"] for d in cmekg.load_diseases(tiny_pickle, require_icd10=False)}
    assert "无编码病" in names and "无科室病" not in names
    assert [d["name"] for d in cmekg.load_diseases(tiny_pickle, min_attributes=3)] == ["糖尿病", "流行性感冒"]
    capped = {d["name"]: d for d in cmekg.load_diseases(tiny_pickle, max_items=1)}
    assert capped["流行性感冒"]["symptoms"] == ["发热"]
    with pytest.raises(ConfigError, match="unknown CMeKG cleaning rule"):
        cmekg.load_diseases(tiny_pickle, max_itmes=3)
    with pytest.raises(ConfigError):
        cmekg.load_diseases(tiny_pickle, max_items=0)


def test_cap_and_length_hold_on_long_lists(tmp_path):
    many = [f"症状{i:02d}" for i in range(20)] + ["痛", "一个远远超过十五个字的非常冗长的症状描述句子"]
    path = tmp_path / "long.pkl"
    path.write_bytes(pickle.dumps({"某病": {"ICD10": ["K30"], "就诊科室": ["消化内科"], "常见症状": many,
                                            "常见病因": ["饮食不当"]}}))
    (entry,) = cmekg.load_diseases(path)
    assert entry["symptoms"] == many[:6]


def test_merge_curated_wins_whole():
    curated = [{"name": "流行性感冒", "aliases": ["流感"], "department": "感染科"},
               {"name": "肺结核", "department": "感染科"}]
    ours = [{"name": "流感", "department": "呼吸内科", "source": "cmekg"},  # its name is a curated alias
            {"name": "肺痨", "aliases": ["肺结核"], "source": "cmekg"},  # its alias is a curated name
            {"name": "眩晕", "aliases": ["流感"], "source": "cmekg"},  # alias against alias
            {"name": "水痘", "aliases": ["水花"], "source": "cmekg"}]
    merged = cmekg.merge(curated, ours)
    assert [d["name"] for d in merged] == ["流行性感冒", "肺结核", "水痘"]
    assert merged[0] == {**curated[0], "source": "kb"} and "source" not in curated[0]
    assert merged[2]["source"] == "cmekg"


def test_drug_indications_keep_only_diseases(tiny_pickle):
    assert cmekg.drug_indications(tiny_pickle) == {"二甲双胍": ["糖尿病"]}  # not 疼痛 or 双盲


def test_relation_counts_and_cli(tiny_pickle, capsys):
    counts = cmekg.relation_counts(tiny_pickle)
    assert counts["department"] == {"diseases": 5, "items": 5}
    assert counts["drugs"] == {"diseases": 1, "items": 1}
    assert counts["prevention"] == {"diseases": 1, "items": 1}
    assert cmekg.main(["--pickle", str(tiny_pickle)]) == 0
    out = capsys.readouterr().out
    assert "5 diseases kept" in out and "drugs with indications: 1" in out


# ----------------------------------------------------------------------------------------------- the real graph


@pytest.mark.skipif(importlib.util.find_spec("pyCMeKG") is None, reason="pycmekg is not installed")
def test_real_graph_loads_sane_entries():
    graph = cmekg.Graph(cmekg.safe_load(cmekg.find_pickle()))
    diseases = cmekg._diseases(graph, cmekg.CleaningRules())
    assert len(graph.entities) > 27_000 and 1_500 < len(diseases) < 3_500
    assert len({d["name"] for d in diseases}) == len(diseases)
    for d in diseases:
        assert d["icd10_chapter"] in CHAPTERS or d["icd10_chapter"] == ""
        assert d["department"].endswith("科") and d["source"] == "cmekg"
        for key in cmekg.LIST_KEYS:
            if key in d:
                assert 1 <= len(d[key]) <= 6 and all(2 <= len(x) <= 15 for x in d[key]), (d["name"], key)
    by_name = {d["name"]: d for d in diseases}
    diabetes = by_name["糖尿病"]
    assert diabetes["icd10_chapter"].startswith("IV ") and diabetes["department"] == "内分泌科"
    assert "二甲双胍" in diabetes["drugs"]
    flu = by_name["流行性感冒"]
    assert flu["aliases"] == ["流感"] and "发热" in flu["symptoms"] and "肺炎" not in flu["symptoms"]
    indications = cmekg._indications(graph, cmekg.CleaningRules())
    assert len(indications) > 1_000 and "水痘" in indications["阿昔洛韦"]


@pytest.mark.slow  # a whole data build with CMeKG (~11 s): make test-slow
@pytest.mark.skipif(importlib.util.find_spec("pyCMeKG") is None, reason="pycmekg is not installed")
def test_a_build_with_cmekg_tags_sources_and_carries_no_other_answer_form():
    from medlora.databuild import build_tagged, load_sources
    from medlora.eval.judges import leaks

    both = load_sources("both")
    curated = [d for d in both if d["source"] == "kb"]
    assert len(curated) == 151 and len(both) > 2000  # the curated entries first, all kept
    tagged = build_tagged(curated + [d for d in both if d["source"] == "cmekg"][:60])
    assert {r["source"] for r in tagged} == {"kb", "cmekg", "safety"}
    indications = [r for r in tagged if r["pattern"] == "drug_indications"]
    assert indications and {r["split"] for r in indications} == {"train"}
    for r in tagged:
        if not r["pattern"].startswith("mcq") and r["pattern"] != "lookup":
            assert leaks({**r, "golden": r["output"]}) == [], r
