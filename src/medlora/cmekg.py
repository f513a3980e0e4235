"""CMeKG (the `pycmekg` package's Chinese medical knowledge graph) as diseases in the curated KB schema.

The package ships `pyCMeKG/model/cmekg.pkl`: a pickle of `{entity: {relation: [value, ...]}}` with 27,403
entities (diseases, symptoms, drugs, herbs, examinations) and 469 relations. The package's `__init__` runs
`pickle.load` on it, so it is never imported here: `find_pickle` finds the file with `importlib.util.find_spec`
and `safe_load` reads it with an unpickler that refuses every global (only dicts, lists, str, numbers and None
can come out of it).

`load_diseases` maps the relations of each disease onto the attribute keys of `kb/SCHEMA.md` (RELATIONS),
cleans each list (clean_text → split → length → not-an-item → wrong role → restates the disease → dedupe →
rank and cap, one small function each) and keeps a disease only if it has a department and enough facts
(`CleaningRules`). `merge` puts the curated KB first: a CMeKG disease whose name or an alias clashes with a
curated one is dropped whole.
`python -m medlora.cmekg` prints the counts after cleaning. Nothing is cached on disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

from medlora.vocab import CHAPTERS
from medlora.errors import ConfigError, DataError

EXTRA_HINT = "CMeKG needs the optional extra: pip install 'medlora[cmekg]' (the pycmekg package)"
SOURCE = "cmekg"

# CMeKG relation -> our attribute. Dict order is the order a disease's values are read in (it breaks ranking ties).
RELATIONS: dict[str, str] = {
    "别称": "aliases",                 # Chinese other names (3,359 entities; most are herbs, ~1,570 diseases)
    "又称": "aliases",                 # "also called" (121 diseases)
    "同义词": "aliases",               # mostly English abbreviations (AIDS, ACS); only items with Chinese kept
    "ICD10": "icd10",                  # ICD-10 code, e.g. C16.9 (2,877 entities); some hold ICD-O morphology codes
    "就诊科室": "department",          # the clinic to visit (5,738 entities); first usable value wins
    "所属科室": "department",          # "内科 — 神经内科" (7 entities); read only if 就诊科室 gave nothing
    "常见病因": "causes",              # the main cause list (4,596 entities), often sentence fragments
    "病因": "causes",                  # BMJ-style cause list (923 entities)
    "主要病因": "causes",              # 5 entities
    "临床症状及体征": "symptoms",      # BMJ-style symptoms and signs (428 entities), cleaner than 常见症状
    "常见症状": "symptoms",            # the main symptom list (5,895 entities, 15 a disease, many misfiled items)
    "主要症状": "symptoms",            # 3 entities
    "实验室检查": "examinations",      # lab tests (204 entities)
    "影像学检查": "examinations",      # imaging (226 entities)
    "辅助检查": "examinations",        # other tests (143 entities)
    "组织学检查": "examinations",      # biopsy, puncture (88 entities)
    "内窥镜检查": "examinations",      # endoscopy (60 entities)
    "检查": "examinations",            # the main list (2,341 entities), a third of it headings (实验室检查)
    "其他检查": "examinations",        # 2 entities
    "治疗": "treatments",              # the main list (1,642 entities), mostly method names (手术治疗, 病因治疗)
    "辅助治疗": "treatments",          # supportive measures (180 entities)
    "手术治疗": "treatments",          # operations (124 entities)
    "放射治疗": "treatments",          # radiotherapy (30 entities)
    "化疗": "treatments",              # chemotherapy regimens (25 entities)
    "药物治疗": "drugs",               # generic drug names or classes (283 entities), physician-written
    "相关药物": "drugs",               # marketed products (983 entities, up to 2,639 each): reduced to generic names
    "并发症": "complications",         # 1,188 entities
    "预防": "prevention",              # 92 entities
    "多发群体": "high_risk_groups",    # who gets it most (2,657 entities): 儿童, 中年女性, 20~40岁男性
    "发病人群": "high_risk_groups",    # 1 entity
    "传播途径": "transmission",        # 247 entities ("无" dropped as too short)
}
# Left out on purpose: 相关症状 / 相关疾病 (they belong to examination entities), 高危因素 (risk factors such as
# 吸烟 or 高血压, not groups), 英文名称 / 英文别名 (not Chinese), 中医病名 (mixes TCM names with symptoms),
# 治疗方案 (clinical-pathway admission criteria), 筛查 (mixes tests with target groups), 诊断依据_* (free text).
LIST_KEYS = ("aliases", "causes", "transmission", "symptoms", "examinations", "treatments", "drugs",
             "complications", "prevention", "high_risk_groups")
CORE_KEYS = ("symptoms", "causes", "drugs", "examinations", "treatments")  # what `min_attributes` counts
OUTPUT_KEYS = ("name", "aliases", "icd10_chapter", "department", "causes", "symptoms", "examinations",
               "treatments", "drugs", "complications", "prevention", "high_risk_groups", "transmission")

# ICD-10 (WHO 2019) chapters: first and last three-character code, and the chapter's number, which names one of
# databuild.CHAPTERS (kb/SCHEMA.md). XVIII (R: symptoms and signs), XX (V-Y: external causes), XXI (Z) and
# XXII (U) are not in the schema and map to "".
ICD10_CHAPTERS = (
    ("A00", "B99", "I"), ("C00", "D48", "II"), ("D50", "D89", "III"), ("E00", "E90", "IV"), ("F00", "F99", "V"),
    ("G00", "G99", "VI"), ("H00", "H59", "VII"), ("H60", "H95", "VIII"), ("I00", "I99", "IX"),
    ("J00", "J99", "X"), ("K00", "K93", "XI"), ("L00", "L99", "XII"), ("M00", "M99", "XIII"),
    ("N00", "N99", "XIV"), ("O00", "O99", "XV"), ("P00", "P96", "XVI"), ("Q00", "Q99", "XVII"),
    ("S00", "T98", "XIX"),
)
_CHAPTER_NAMES = {chapter.split()[0]: chapter for chapter in CHAPTERS}
_ICD10 = re.compile(r"([A-Z])(\d\d)(?!\d)(?:\.\d+)?")  # not "M80001/1", an ICD-O morphology code

# CMeKG department names -> the spelling the curated KB uses, so one clinic is not two MCQ options.
DEPARTMENT_SYNONYMS = {
    "耳鼻喉科": "耳鼻咽喉科", "耳鼻喉": "耳鼻咽喉科", "耳鼻咽喉头颈外科": "耳鼻咽喉科", "耳鼻咽喉-头颈外科": "耳鼻咽喉科",
    "心内科": "心血管内科", "心血管科": "心血管内科", "心脏内科": "心血管内科",
    "心外科": "心血管外科", "心脏外科": "心血管外科",
    "呼吸科": "呼吸内科", "消化科": "消化内科", "血液内科": "血液科", "神经科": "神经内科",
    "普外科": "普通外科", "普外": "普通外科", "基本外科": "普通外科",
    "传染科": "感染科", "传染病科": "感染科", "感染和临床微生物科": "感染科", "感染和微生物科": "感染科",
    "精神心理科": "精神科", "精神专科": "精神科", "精神医学科": "精神科",
    "烧伤外科": "烧伤科", "烧伤整形科": "烧伤科",
    "急诊室": "急诊科", "急诊": "急诊科", "急症科": "急诊科",
    "泌尿科": "泌尿外科", "泌尿外科学": "泌尿外科", "儿外科": "小儿外科", "神经外科学": "神经外科",
    "皮肤病科": "皮肤科", "皮肤性病科": "皮肤科",
}

# A name ending in one of these names a disease or an injury, never a symptom: 肺炎, 糖尿病, 外伤, 病毒感染.
# Left out on purpose: 症 (瘙痒症, 血小板减少症), 中毒 (酸中毒) and 畸形 are fair symptoms or signs.
DISEASE_SUFFIXES = ("病", "炎", "癌", "瘤", "综合征", "综合症", "感染", "伤", "骨折", "脱位", "梗死", "梗塞",
                    "衰竭", "结核")

# Which relations show a string in which role (for "used mostly as something else").
ROLES = {
    "symptom": ("常见症状", "临床症状及体征", "相关症状", "主要症状"),
    "cause": ("常见病因", "病因", "主要病因"),
    "group": ("多发群体", "发病人群"),
    "site": ("常见发病部位", "发病部位", "转移部位"),
}

# Values that are a heading, a placeholder or a non-answer in CMeKG rather than a fact about a disease.
NOT_ITEMS = {
    "examinations": frozenset({"检查", "实验室检查", "影像学检查", "辅助检查", "组织学检查", "内窥镜检查",
                               "其他检查", "特殊检查", "常规检查", "一般检查", "其他辅助检查", "基础检查",
                               "实验室和其他检查", "相关检查"}),
    "treatments": frozenset({"治疗", "治疗原则", "用药原则", "一般治疗", "其他治疗", "西医治疗", "中医治疗",
                             "治疗方案", "治疗方法", "防治原则", "注意事项"}),
    "causes": frozenset({"病因不明", "病因不清", "原因不明", "病因未明", "不明", "不详", "未知", "病因"}),
    "drugs": frozenset({"安慰剂"}),  # trial arms in the BMJ-derived lists
}

# Dosage forms stripped from product names (longest first), so 阿昔洛韦片 and 阿昔洛韦胶囊 both become 阿昔洛韦.
_DOSAGE_FORMS = tuple(sorted((
    "片", "缓释片", "控释片", "肠溶片", "分散片", "咀嚼片", "泡腾片", "口腔崩解片", "含片", "薄膜衣片", "糖衣片",
    "胶囊", "缓释胶囊", "肠溶胶囊", "软胶囊", "硬胶囊", "胶丸", "肠溶胶丸", "颗粒", "颗粒剂", "泡腾颗粒", "散",
    "注射液", "氯化钠注射液", "葡萄糖注射液", "输液", "口服液", "口服溶液", "溶液", "混悬液", "干混悬剂",
    "混悬注射液", "糖浆", "滴剂", "滴眼液", "滴耳液", "滴鼻液", "眼膏", "软膏", "乳膏", "凝胶", "气雾剂",
    "喷雾剂", "吸入剂", "吸入粉雾剂", "栓", "贴", "贴剂", "丸", "滴丸", "酊", "搽剂", "洗剂", "粉", "粉针剂",
    "鼻喷雾剂", "鼻喷剂", "滴鼻剂", "滴眼剂", "眼用凝胶", "阴道栓", "阴道片", "阴道泡腾片", "乳剂", "膏", "合剂",
    "冲剂", "水丸", "蜜丸", "大蜜丸", "小蜜丸", "水蜜丸", "浓缩丸", "口服乳",
), key=len, reverse=True))
_DRUG_PREFIXES = ("注射用", "小儿")
# Salt and ester parts of a generic name (盐酸二甲双胍 → 二甲双胍, 甲泼尼龙琥珀酸钠 → 甲泼尼龙).
_SALT_PREFIXES = tuple(sorted(("盐酸", "硫酸", "硫酸氢", "磷酸", "乳酸", "甲磺酸", "马来酸", "枸橼酸", "酒石酸",
                                "富马酸", "琥珀酸", "醋酸", "氢溴酸", "苯磺酸", "门冬氨酸", "硬脂酸", "丙酸",
                                "二丙酸", "苯甲酸", "葡萄糖酸", "甲硫酸"), key=len, reverse=True))
_SALT_SUFFIXES = ("琥珀酸钠", "磷酸钠", "磷酸酯", "磷酸酯钠", "钠盐", "钾盐")
_CAUSE_HEADS = ("由于", "主要由", "多由", "多为", "由", "因")
_CAUSE_TAILS = ("引起的", "引起", "所致", "导致", "而致", "造成", "等")
# A "drug" ending like this is a treatment (抗生素治疗, 静脉输液), not a drug name.
_TREATMENT_TAILS = ("治疗", "疗法", "方案", "输液")
_PAREN_TAIL = re.compile(r"\([^()]*\)$")
_DASHES = re.compile(r"[\u2010-\u2015\u2212\ufe58\ufe63\uff0d]")
_SPLIT = re.compile(r"[、，,；;]")
_CJK = re.compile(r"[\u3400-\u9fff]")
_SPACE_NEAR_CJK = re.compile(r"\s+(?=[\u3400-\u9fff])|(?<=[\u3400-\u9fff])\s+")
_FRAGMENT_START = ("或", "及", "与", "而", "且", "并")
_FILLER_HEADS = ("甚至", "可有", "常有", "伴有", "可出现", "可并发", "并发")  # 甚至发热 → 发热


@dataclass
class CleaningRules:
    """Which CMeKG diseases `load_diseases` keeps and how long their lists may be."""

    require_icd10: bool = True
    """Keep only diseases with an ICD-10 code (2,877 entities have one; without: ~5,700 with a department)."""
    min_attributes: int = 2
    """Keep a disease only if it has a department and at least this many of CORE_KEYS after cleaning."""
    max_items: int = 6
    """Longest list kept per attribute (the curated KB keeps 2-6)."""
    min_chars: int = 2
    """Shortest item kept (characters after normalising)."""
    max_chars: int = 15
    """Longest item kept (characters after normalising): longer ones are sentences, not facts."""

    def __post_init__(self):
        if self.max_items < 1 or self.min_attributes < 0 or not 1 <= self.min_chars <= self.max_chars:
            raise ConfigError(f"invalid CMeKG cleaning rules: {self}")


# ----------------------------------------------------------------------------------------------- loading


def find_pickle() -> Path:
    """Where pycmekg's `cmekg.pkl` is, found without importing the package (its __init__ would unpickle it)."""
    try:
        spec = importlib.util.find_spec("pyCMeKG")  # a top-level name: finds, does not import
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(EXTRA_HINT)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "model" / "cmekg.pkl"
        if path.is_file():
            return path
    raise ConfigError(f"{EXTRA_HINT}; pyCMeKG is installed but has no model/cmekg.pkl")


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Refuses every global, so no class can be built and no function called: only plain containers load."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def safe_load(path: str | Path) -> dict:
    """The graph `{entity: {relation: [values]}}` of a CMeKG pickle, read without running any code."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            graph = _NoGlobalsUnpickler(handle).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as exc:
        raise DataError(f"{path.name}: cannot read the CMeKG pickle: {exc}".splitlines()[0]) from exc
    if not isinstance(graph, dict) or not all(isinstance(v, dict) for v in graph.values()):
        raise DataError(f"{path.name}: a CMeKG pickle must hold a dict of entity -> {{relation: [values]}}")
    return graph


# ----------------------------------------------------------------------------------------------- cleaning rules


def clean_text(text: str) -> str:
    """NFKC (full-width letters, digits and brackets to half-width), one dash '-', no stray whitespace.

    Whitespace next to a Chinese character goes (胸部 CT == 胸部CT); other runs become one space."""
    text = _DASHES.sub("-", unicodedata.normalize("NFKC", text))
    return " ".join(_SPACE_NEAR_CJK.sub("", text).split())


def split_items(value: str) -> list[str]:
    """One raw value as items: split at 、，；, drop a trailing 等 (乏力等 → 乏力) and a leading filler (甚至发热
    → 发热), and drop fragments of a cut sentence that start with a conjunction (或头鸣)."""
    items = []
    for part in _SPLIT.split(clean_text(value)):
        part = part.strip().removesuffix("等等").removesuffix("等").strip()
        for head in _FILLER_HEADS:
            if part.startswith(head) and len(part) > len(head) + 1:
                part = part[len(head):]
        if part and not part.startswith(_FRAGMENT_START):
            items.append(part)
    return items


def strip_cause_wording(item: str) -> str:
    """A cause without the sentence around it: 由肺炎支原体感染引起 → 肺炎支原体感染, 遗传等所致 → 遗传."""
    before = None
    while before != item:
        before = item
        for head in _CAUSE_HEADS:
            if item.startswith(head) and len(item) > len(head) + 1:
                item = item[len(head):]
        for tail in _CAUSE_TAILS:
            if item.endswith(tail) and len(item) > len(tail) + 1:
                item = item[: -len(tail)]
    return item


def within_length(item: str, rules: CleaningRules) -> bool:
    """Not too short (a lone character) and not too long (a sentence): the schema wants short phrases."""
    return rules.min_chars <= len(item) <= rules.max_chars


def looks_like_disease(name: str) -> bool:
    """The name of a disease or an injury by its ending (DISEASE_SUFFIXES): 肺炎, 糖尿病, 病毒感染, 外伤."""
    return name.endswith(DISEASE_SUFFIXES)


def restates(item: str, name: str) -> bool:
    """The item is the disease itself or a variant of it (哮喘 for 支气管哮喘, 出血性水痘 for 水痘)."""
    return item in name or name in item


def has_chinese(text: str) -> bool:
    """At least one Chinese character (aliases: 'Graves病' stays, 'AIDS' goes)."""
    return bool(_CJK.search(text))


def dedupe(items) -> list[str]:
    """Items in their first order, each once."""
    return list(dict.fromkeys(items))


def rank_and_cap(items: list[str], support: Counter, frequency: Counter, cap: int) -> list[str]:
    """The `cap` best items: most support first (how many of this disease's raw values gave the item: listed
    under two relations, or by five products of one drug), then the terms most diseases use (CMeKG's lists are
    alphabetical, and widely shared terms are its cleanest), then first seen."""
    order = {item: i for i, item in enumerate(items)}
    return sorted(order, key=lambda x: (-support[x], -frequency[x], order[x]))[:cap]


def icd10_code(values) -> str:
    """The first ICD-10 code among `values` as letter + two digits (+ decimals), or "" (ICD-O codes skipped)."""
    for value in values:
        match = _ICD10.match(clean_text(value).upper())
        if match:
            return match.group(0)
    return ""


def icd10_chapter(code: str) -> str:
    """The kb/SCHEMA.md chapter name of an ICD-10 code, or "" for a chapter the schema does not list."""
    head = code[:3].upper()
    for first, last, number in ICD10_CHAPTERS:
        if first <= head <= last:
            return _CHAPTER_NAMES.get(number, "")
    return ""


def clean_department(values) -> str:
    """The first value naming a clinic (ends in 科; 小儿 and 初产妇 do not), in the curated KB's spelling
    (DEPARTMENT_SYNONYMS); "" if none does."""
    for value in values:
        for part in _SPLIT.split(clean_text(value)):
            part = part.rsplit("-", 1)[-1].strip().removesuffix("等")  # 内科 — 神经内科 → 神经内科
            part = DEPARTMENT_SYNONYMS.get(part, part)
            if 2 <= len(part) <= 10 and part.endswith("科"):
                return part
    return ""


def strip_dosage_form(product: str) -> str:
    """A product name without its dosage form: 注射用阿昔洛韦 / 阿昔洛韦缓释片 / 阿昔洛韦片(II) → 阿昔洛韦.
    Returns the name unchanged when it carries no dosage form."""
    name = _PAREN_TAIL.sub("", product).strip()
    for prefix in _DRUG_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix) + 1:
            name = name[len(prefix):]
    for form in _DOSAGE_FORMS:
        if name.endswith(form) and len(name) > len(form) + 1:
            return name[: -len(form)]
    return name


def strip_salt(name: str) -> str:
    """A generic name without its salt or ester: 盐酸二甲双胍 → 二甲双胍, 克林霉素磷酸酯 → 克林霉素; kept whole
    when less than two characters would be left (硫酸镁)."""
    for prefix in _SALT_PREFIXES:
        if name.startswith(prefix) and len(name) >= len(prefix) + 2:
            name = name[len(prefix):]
            break
    for suffix in _SALT_SUFFIXES:
        if name.endswith(suffix) and len(name) >= len(suffix) + 2:
            return name[: -len(suffix)]
    return name


# ----------------------------------------------------------------------------------------------- the graph


def entity_type(relations: dict) -> str:
    """What an entity is, from which relations it has: drug, herb, exam, symptom (ICD-10 chapter R), disease
    (another ICD-10 code or a clinic to visit), or other."""
    if "就诊科室" not in relations and "ICD10" not in relations:
        if relations.keys() & {"适应症", "成份", "通用名", "商品名", "OTC类型", "药品类型", "功能主治"}:
            return "drug"
        if relations.keys() & {"主治", "功效", "性味", "入药部位", "界"}:
            return "herb"
        if relations.keys() & {"相关症状", "所属分类"}:
            return "exam"
    code = icd10_code(relations.get("ICD10", []))
    if code.startswith("R"):
        return "symptom"
    if code or "就诊科室" in relations:
        return "disease"
    return "other"


class Graph:
    """The look-ups the cleaning rules need over the whole graph (names normalised): entity types, how often
    a string is used in each role (ROLES), how many entities list an item per attribute, and drug names."""

    def __init__(self, raw: dict):
        self.entities: dict[str, dict] = {}
        for name, relations in raw.items():
            if isinstance(name, str) and isinstance(relations, dict):
                self.entities.setdefault(clean_text(name), relations)
        self.types = {name: entity_type(relations) for name, relations in self.entities.items()}
        # brand or product entity -> its generic product (伊康宁 -> 厄贝沙坦胶囊); bare trade names
        self.generic_of = {name: clean_text(_strings(r.get("通用名"))[0]) for name, r in self.entities.items()
                           if self.types[name] == "drug" and _strings(r.get("通用名"))}
        self.trade_names = {clean_text(x) for r in self.entities.values() for x in _strings(r.get("商品名"))}
        self.roles: dict[str, Counter] = {}
        self.frequency: dict[str, Counter] = {key: Counter() for key in LIST_KEYS}
        for relations in self.entities.values():
            self._count(relations)

    def _count(self, relations: dict):
        for role, names in ROLES.items():
            for relation in names:
                for value in _strings(relations.get(relation)):
                    for item in split_items(value):
                        self.roles.setdefault(item, Counter())[role] += 1
        seen: dict[str, set] = {}
        for relation, key in RELATIONS.items():
            if key in self.frequency:
                for value in _strings(relations.get(relation)):
                    seen.setdefault(key, set()).update(raw_items(key, relation, value, self))
        for key, items in seen.items():
            self.frequency[key].update(items)

    def type_of(self, name: str) -> str | None:
        return self.types.get(name)

    def is_disease_name(self, name: str) -> bool:
        """An entity the graph treats as a disease (see entity_type) whose name reads as one."""
        return self.types.get(name) == "disease" and looks_like_disease(name)

    def mostly_other_role(self, item: str) -> bool:
        """The graph lists `item` more often as a cause, a population group or a body site than as a symptom
        (儿童, 吸烟, 创伤 and 骨骼 all turn up in symptom lists)."""
        roles = self.roles.get(item)
        return bool(roles) and max(roles["cause"], roles["group"], roles["site"]) > roles["symptom"]


def _strings(values) -> list[str]:
    return [v for v in values if isinstance(v, str)] if isinstance(values, list) else []


def raw_items(key: str, relation: str, value: str, graph: Graph) -> list[str]:
    """One raw value of `relation` as the items of `key`, before any item is dropped."""
    if key == "drugs":
        return drug_names(value, graph, from_products=relation == "相关药物")
    if key == "causes":
        return [strip_cause_wording(x) for x in split_items(value)]
    return split_items(value)


def wrong_role(key: str, item: str, graph: Graph) -> bool:
    """An item that is another kind of thing than `key` holds, judged by the entity types the graph implies:
    - symptoms: not a disease or injury name (肺炎, 糖尿病, 外伤, 病毒感染) unless the graph codes it as a
      symptom (ICD-10 R), not a drug, herb or examination, and not used mostly as a cause, group or site;
    - prevention, high_risk_groups, examinations, treatments: not a disease entity (糖尿病 under 预防);
    - drugs: not a disease, symptom or examination entity, not a disease name, not a treatment (抗生素治疗,
      静脉输液)."""
    kind = graph.type_of(item)
    if key == "symptoms":
        return (kind in ("drug", "herb", "exam") or (looks_like_disease(item) and kind != "symptom")
                or graph.mostly_other_role(item))
    if key in ("prevention", "high_risk_groups", "examinations", "treatments"):
        return graph.is_disease_name(item)
    if key == "drugs":
        return (kind in ("disease", "symptom", "exam") or (kind is None and looks_like_disease(item))
                or item.endswith(_TREATMENT_TAILS))
    return False


def drug_names(value: str, graph: Graph, from_products: bool) -> list[str]:
    """Generic names for one drug value, without salt (strip_salt). A product (相关药物) goes through its
    generic product if it is a brand entity (甲强龙 → 注射用甲泼尼龙琥珀酸钠) and loses its dosage form; a
    product name with no dosage form is a trade name or an approval number and is dropped."""
    names = []
    for item in split_items(value):
        if from_products:
            item = product_generic(item, graph)
            if not item:
                continue
        names.append(strip_salt(item))
    return names


def product_generic(product: str, graph: Graph) -> str:
    """The generic name behind a product or brand name, "" for a bare trade name. A patent medicine named
    after a disease keeps its dosage form (通窍鼻炎颗粒, not the disease-like 通窍鼻炎)."""
    product = graph.generic_of.get(product, product)
    generic = strip_dosage_form(product)
    if generic == product or generic in graph.trade_names:
        return ""
    return product if looks_like_disease(generic) else generic


# ----------------------------------------------------------------------------------------------- diseases


def _facts(relations: dict, graph: Graph, rules: CleaningRules, name: str) -> dict[str, list[str]]:
    """Every list attribute of one entity, cleaned and capped."""
    raw: dict[str, list[str]] = {}
    for relation, key in RELATIONS.items():
        if key in LIST_KEYS:
            for value in _strings(relations.get(relation)):
                raw.setdefault(key, []).extend(raw_items(key, relation, value, graph))
    facts = {}
    for key, items in raw.items():
        kept = [x for x in items if within_length(x, rules) and x != name
                and x not in NOT_ITEMS.get(key, ()) and not wrong_role(key, x, graph)]
        if key in ("symptoms", "causes"):
            kept = [x for x in kept if not restates(x, name)]
        if key == "aliases":  # Chinese, and not the name of another entity of the graph
            kept = [x for x in kept if has_chinese(x) and graph.type_of(x) is None]
        if key == "transmission" and set(_strings(relations.get("传染性"))) & {"无", "无传染性"}:
            kept = []  # the graph also says the disease is not communicable
        if kept:
            facts[key] = rank_and_cap(dedupe(kept), Counter(kept), graph.frequency[key], rules.max_items)
    return facts


def _disease(name: str, relations: dict, graph: Graph, rules: CleaningRules) -> dict | None:
    code = icd10_code(_strings(relations.get("ICD10")))
    if rules.require_icd10 and not code:
        return None
    department = clean_department(_strings(relations.get("就诊科室")) + _strings(relations.get("所属科室")))
    if not department:
        return None
    facts = _facts(relations, graph, rules, name)
    if sum(key in facts for key in CORE_KEYS) < rules.min_attributes:
        return None
    entry = {"name": name, "icd10_chapter": icd10_chapter(code) if code else "", "department": department}
    entry.update(facts)
    entry = {key: entry[key] for key in OUTPUT_KEYS if key in entry}
    entry["source"] = SOURCE
    return entry


def _rules(overrides: dict) -> CleaningRules:
    known = {f.name for f in fields(CleaningRules)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown CMeKG cleaning rule(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return CleaningRules(**overrides)


def _graph(path: str | Path | None) -> Graph:
    return Graph(safe_load(path if path is not None else find_pickle()))


def load_diseases(path: str | Path | None = None, **rules) -> list[dict]:
    """CMeKG's diseases as curated-KB dicts (+ "source": "cmekg"), cleaned by `CleaningRules(**rules)`, in
    graph order. `path` defaults to the installed pycmekg pickle."""
    return _diseases(_graph(path), _rules(rules))


def _diseases(graph: Graph, rules: CleaningRules) -> list[dict]:
    diseases = []
    for name, relations in graph.entities.items():
        if graph.types[name] in ("disease", "symptom"):
            entry = _disease(name, relations, graph, rules)
            if entry is not None:
                diseases.append(entry)
    names = {d["name"] for d in diseases}
    shared = {a for a, n in Counter(a for d in diseases for a in d.get("aliases", [])).items() if n > 1}
    for entry in diseases:  # an alias that names another disease, or that two diseases claim, is no alias
        if "aliases" in entry:
            entry["aliases"] = [a for a in entry["aliases"] if a not in names and a not in shared]
            if not entry["aliases"]:
                del entry["aliases"]
    return diseases


def drug_indications(path: str | Path | None = None, max_items: int = 6) -> dict[str, list[str]]:
    """Generic drug name → the diseases its products are indicated for (适应症), ranked like attribute lists.
    Only indications the graph types as diseases count (not 感染, 疼痛, 敏感 or 双盲)."""
    return _indications(_graph(path), _rules({"max_items": max_items}))


def _indications(graph: Graph, rules: CleaningRules) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, relations in graph.entities.items():
        if graph.types[name] != "drug" or not _strings(relations.get("适应症")):
            continue
        generic = strip_salt(product_generic(name, graph))
        if not within_length(generic, rules):
            continue  # a bare trade name with no generic product behind it, or a long one
        for value in _strings(relations["适应症"]):
            found.setdefault(generic, []).extend(
                x for x in split_items(value) if within_length(x, rules) and graph.types.get(x) == "disease")
    frequency = Counter(x for items in found.values() for x in set(items))
    return {drug: rank_and_cap(dedupe(items), Counter(items), frequency, rules.max_items)
            for drug, items in sorted(found.items()) if items}


def merge(curated: list[dict], cmekg: list[dict]) -> list[dict]:
    """The curated diseases ("source": "kb") then the CMeKG ones whose name and aliases clash with no curated
    name or alias: on a clash the curated entry wins whole and the CMeKG entry is dropped."""
    taken = {clean_text(x) for d in curated for x in (d["name"], *d.get("aliases", []))}
    merged = [{**d, "source": "kb"} for d in curated]
    for entry in cmekg:
        if not {clean_text(x) for x in (entry["name"], *entry.get("aliases", []))} & taken:
            merged.append(entry)
    return merged


# ----------------------------------------------------------------------------------------------- summary


def relation_counts(path: str | Path | None = None, **rules) -> dict[str, dict[str, int]]:
    """Per attribute, after cleaning: how many kept diseases have it and how many items they hold."""
    return _counts(_diseases(_graph(path), _rules(rules)))


def _counts(diseases: list[dict]) -> dict[str, dict[str, int]]:
    counts = {}
    for key in ("department", *LIST_KEYS):
        having = [d[key] for d in diseases if key in d]
        items = len(having) if key == "department" else sum(len(v) for v in having)
        counts[key] = {"diseases": len(having), "items": items}
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlora.cmekg", description=__doc__.splitlines()[0])
    parser.add_argument("--pickle", default=None, help="cmekg.pkl (default: the installed pycmekg's)")
    parser.add_argument("--all", action="store_true", help="also diseases without an ICD-10 code")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    graph = _graph(args.pickle)
    rules = CleaningRules(require_icd10=not args.all)
    diseases = _diseases(graph, rules)
    indications = _indications(graph, rules)
    seconds = time.perf_counter() - start
    print(f"CMeKG: {len(graph.entities)} entities, {len({r for v in graph.entities.values() for r in v})} "
          f"relations; {len(diseases)} diseases kept ({seconds:.1f}s)")
    print(f"{'attribute':<18}{'diseases':>9}{'items':>8}")
    for key, count in _counts(diseases).items():
        print(f"{key:<18}{count['diseases']:>9}{count['items']:>8}")
    chapters = Counter(d["icd10_chapter"] or "(none)" for d in diseases)
    print("chapters: " + ", ".join(f"{c.split()[0]} {n}" for c, n in sorted(chapters.items())))
    print(f"drugs with indications: {len(indications)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
