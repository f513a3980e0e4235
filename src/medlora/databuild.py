"""Build instruction records from the knowledge base, the way Huatuo (BenTsao) built its data from a knowledge graph.

`src/medlora/kb/ch*.yaml` lists diseases (schema in `kb/SCHEMA.md`). Every (disease, question pattern) pair gives
one record `{"instruction", "input": "", "output"}`: single facts, multi-fact answers, patient vignettes, reverse
lookups, five-option multiple choice, comparisons, department triage, true/false judgements and prevention advice.
Outputs are built only from KB facts. Each pair goes to one split by a seeded hash, so the (disease, pattern)
combinations of the test split never occur in train or valid. Training also gets drills that ask no medical
knowledge (TRAIN_ONLY_PATTERNS: the look-up step of a multiple-choice answer) and one drug → disease statement per
drug (`drug_uses`). Same seed → byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
from collections import Counter
from pathlib import Path

import yaml

from medlora.errors import DataError
from medlora.io import atomic_write_jsonl

KB_DIR = Path(__file__).parent / "kb"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader when libyaml is there (same result)

CHAPTERS = (
    "I 某些传染病和寄生虫病",
    "II 肿瘤",
    "III 血液及造血器官疾病和某些免疫疾患",
    "IV 内分泌、营养和代谢疾病",
    "V 精神和行为障碍",
    "VI 神经系统疾病",
    "VII 眼和附器疾病",
    "VIII 耳和乳突疾病",
    "IX 循环系统疾病",
    "X 呼吸系统疾病",
    "XI 消化系统疾病",
    "XII 皮肤和皮下组织疾病",
    "XIII 肌肉骨骼系统和结缔组织疾病",
    "XIV 泌尿生殖系统疾病",
    "XV 妊娠、分娩和产褥期",
    "XVI 起源于围生期的某些情况",
    "XVII 先天性畸形、变形和染色体异常",
    "XIX 损伤、中毒和外因的某些其他后果",
)
STRING_FIELDS = ("name", "icd10_chapter", "department")
REQUIRED_LISTS = ("causes", "symptoms", "examinations", "treatments")
OPTIONAL_LISTS = ("transmission", "drugs", "complications", "prevention", "high_risk_groups", "aliases")
KNOWN_KEYS = set(STRING_FIELDS) | set(REQUIRED_LISTS) | set(OPTIONAL_LISTS)

SPLITS = ("train", "valid", "test")
TEST_SHARE, VALID_SHARE, MCQ_TEST_SHARE, MIN_MCQ_TEST = 0.08, 0.04, 0.20, 60
MCQ_TRAIN_VARIANTS = 3  # each training MCQ pair also as 2 more variants (wording, distractors, answer letter)
LOOKUP_DRILLS = 2  # training-only records per disease that drill the MCQ answer's look-up step (option text -> letter)


# ----------------------------------------------------------------------------------------------- loading


def _kb_files(kb_dir: str | Path | None) -> list[Path]:
    path = Path(kb_dir) if kb_dir is not None else KB_DIR
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: knowledge-base folder not found")
    files = sorted(path.glob("ch*.yaml"), key=lambda p: p.name)
    if not files:
        raise DataError(f"{path}: no ch*.yaml knowledge-base files found")
    return files


def _is_string_list(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(item, str) and item.strip() for item in value))


def _validate(entry, index: int, fname: str) -> dict:
    if not isinstance(entry, dict):
        raise DataError(f"{fname}: disease #{index}: must be a mapping of fields, got {type(entry).__name__}")
    name = entry.get("name")
    label = f"disease '{name}'" if isinstance(name, str) and name.strip() else f"disease #{index}"
    where = f"{fname}: {label}"
    for key in entry:
        if key not in KNOWN_KEYS:
            raise DataError(f"{where}: field '{key}' is not a known field ({', '.join(sorted(KNOWN_KEYS))})")
    for key in STRING_FIELDS:
        if key not in entry:
            raise DataError(f"{where}: field '{key}' is required")
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise DataError(f"{where}: field '{key}' must be a non-empty string")
    if entry["icd10_chapter"].strip() not in CHAPTERS:
        raise DataError(f"{where}: field 'icd10_chapter' must be one of the chapter names in SCHEMA.md, "
                        f"got {entry['icd10_chapter']!r}")
    for key in REQUIRED_LISTS:
        if key not in entry:
            raise DataError(f"{where}: field '{key}' is required")
    for key in (*REQUIRED_LISTS, *OPTIONAL_LISTS):
        if key in entry and not _is_string_list(entry[key]):
            raise DataError(f"{where}: field '{key}' must be a non-empty list of strings")
    disease = {key: entry[key].strip() for key in STRING_FIELDS}
    for key in (*REQUIRED_LISTS, *OPTIONAL_LISTS):
        if key in entry:
            disease[key] = [item.strip() for item in entry[key]]
    return disease


def load_knowledge_base(kb_dir: str | Path | None = None) -> list[dict]:
    """Every disease of every `ch*.yaml` in `kb_dir` (files sorted by name), validated; raises DataError."""
    diseases: list[dict] = []
    seen: dict[str, str] = {}
    for path in _kb_files(kb_dir):
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"{path.name}: cannot read the file: {exc}".splitlines()[0]) from exc
        if not isinstance(data, list) or not data:
            raise DataError(f"{path.name}: must be a non-empty YAML list of diseases")
        for index, entry in enumerate(data, 1):
            disease = _validate(entry, index, path.name)
            name = disease["name"]
            if name in seen:
                raise DataError(f"{path.name}: disease '{name}': field 'name' duplicates a disease of {seen[name]}")
            seen[name] = path.name
            diseases.append(disease)
    return diseases


# ----------------------------------------------------------------------------------------------- helpers


def _join(items) -> str:
    return "、".join(items)


def _overlap(a: str, b: str) -> bool:
    """The same fact, or one phrase contained in the other (发热 / 高热不退)."""
    return a == b or (len(a) >= 2 and a in b) or (len(b) >= 2 and b in a)


def _any_overlap(items_a, items_b) -> bool:
    return any(a == b or (len(a) > 1 and a in b) or (len(b) > 1 and b in a) for a in items_a for b in items_b)


def _chapter_parts(chapter: str) -> tuple[str, str]:
    number, _, title = chapter.partition(" ")
    return number, title


class _Index:
    """Look-ups over the whole KB, for distractors, reverse lookups and comparisons."""

    def __init__(self, diseases: list[dict]):
        self.diseases = diseases
        self.names = [d["name"] for d in diseases]
        self.departments = sorted({d["department"] for d in diseases})
        self.chapter_departments: dict[str, set[str]] = {}
        for d in diseases:
            self.chapter_departments.setdefault(d["icd10_chapter"], set()).add(d["department"])
        alias_count = Counter(a for d in diseases for a in set(d.get("aliases", [])))
        self.unique_aliases = {a for a, n in alias_count.items() if n == 1 and a not in self.names}

        self._users: dict = {}
        self._items: dict[str, list[tuple[str, int]]] = {}

    def users(self, field: str, item: str) -> list[dict]:
        """Diseases whose `field` list mentions `item` (exactly or as a contained phrase)."""
        key = (field, item)
        if key not in self._users:
            if field not in self._items:
                self._items[field] = [(x, i) for i, d in enumerate(self.diseases) for x in d.get(field, [])]
            many = len(item) > 1
            hits = sorted({i for x, i in self._items[field]
                           if x == item or (many and item in x) or (len(x) > 1 and x in item)})
            self._users[key] = [self.diseases[i] for i in hits]
        return self._users[key]

    def unique(self, field: str) -> set[str]:
        """The `field` items that only one disease mentions."""
        key = ("unique", field)
        if key not in self._users:
            items = {x for d in self.diseases for x in d.get(field, [])}
            self._users[key] = {x for x in items if len(self.users(field, x)) == 1}
        return self._users[key]

    def specific_unique(self, d: dict, field: str) -> list[str]:
        """`d`'s causes or shown symptoms that are neither broad (see _GENERIC_*) nor mentioned by another disease."""
        key = ("specific", field, d["name"])
        if key not in self._users:
            items, generic = (_shown(d), _GENERIC_SYMPTOMS) if field == "symptoms" else (d[field], _GENERIC_CAUSES)
            unique = self.unique(field)
            self._users[key] = [x for x in _specific(items, generic) if x in unique]
        return self._users[key]

    def others(self, d: dict) -> list[dict]:
        """The other diseases, less those whose names contain each other (糖尿病 / 糖尿病视网膜病变)."""
        key = ("others", d["name"])
        if key not in self._users:
            self._users[key] = [o for o in self.diseases if o["name"] != d["name"]
                                and not _overlap(o["name"], d["name"])]
        return self._users[key]

    def partner(self, d: dict, rng: random.Random) -> dict | None:
        """Another disease to compare with: one of the same chapter when there is one."""
        pool = [o for o in self.others(d) if o["icd10_chapter"] == d["icd10_chapter"]] or self.others(d)
        return rng.choice(pool) if pool else None


def _shown(d: dict) -> list[str]:
    """Symptoms a patient can present with ("多数无明显症状" is not one)."""
    return [s for s in d["symptoms"] if "无明显症状" not in s and "无症状" not in s] or d["symptoms"]


# Broad factors and symptoms that many diseases share although the KB lists them for few: never used as a
# distractor cause, a "false" symptom, or (where avoidable) the cited symptom of a multiple-choice question.
_GENERIC_CAUSES = ("遗传", "环境", "免疫", "精神", "心理", "吸烟", "饮酒", "酗酒", "肥胖", "年龄", "老化", "衰老",
                   "高龄", "不良", "过度", "劳累", "压力", "家族", "体质", "感染", "营养", "药物", "生活", "饮食")
_GENERIC_SYMPTOMS = ("热", "乏力", "恶心", "呕吐", "头晕", "头痛", "食欲", "纳差", "消瘦", "体重", "疲劳", "疲倦",
                     "不适", "水肿", "咳", "腹泻", "腹痛", "瘙痒", "皮疹", "贫血", "呼吸困难", "气促", "气短", "心悸",
                     "意识", "休克", "疼痛", "精神", "睡眠", "失眠", "无力", "出汗", "多汗", "烦躁", "哭闹", "黄疸")


_GENERIC = {_GENERIC_CAUSES: re.compile("|".join(_GENERIC_CAUSES)),
            _GENERIC_SYMPTOMS: re.compile("|".join(_GENERIC_SYMPTOMS))}


def _specific(items, generic) -> list[str]:
    pattern = _GENERIC[generic]
    return [x for x in items if not pattern.search(x)]


def _pick(rng: random.Random, phrasings: list[str], **values) -> str:
    return rng.choice(phrasings).format(**values)


def _mcq(rng: random.Random, question: str, correct: str, distractors: list[str], why: str) -> tuple[str, str]:
    options = list(distractors[:4])
    options.insert(rng.randrange(5), correct)
    return f"{question}\n{_option_lines(options)}", _mcq_answer(why, options, correct)


def _option_lines(options: list[str]) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip("ABCDE", options))


def _mcq_answer(why: str, options: list[str], chosen: str) -> str:
    """First the options restated with each letter after its text (`选项: 妇科(A)、儿科(B)…。`), then the fact, which
    names the chosen option in its exact words, then that option's letter (`儿科是选项B。`), then `答案: B`. Each step
    is one small skill: copy (the restated list), recall (the fact), copy (the option text out of the fact), look-up
    and copy again. Restating puts the letter *after* its text, so the look-up is a forward copy (find the text, copy
    what follows); with the options only as `B. 儿科` the letter comes before the text, and a 270M model at 0.4 epoch
    picked a neighbouring or favourite letter for about half of its answers. Earlier forms asked for the letter straight
    after the reason (a favourite letter) or for a 是/否 on each option (where the 是 usually falls)."""
    letter = "ABCDE"[options.index(chosen)]
    listed = "、".join(f"{text}({x})" for x, text in zip("ABCDE", options))
    return f"解析: 选项: {listed}。{why}{chosen}是选项{letter}。\n答案: {letter}"


def _distinct(rng: random.Random, pool: list[str], k: int, avoid: list[str]) -> list[str] | None:
    """`k` phrases from `pool` (shuffled), none overlapping each other or `avoid`; None when too few."""
    pool = sorted(set(pool))
    rng.shuffle(pool)
    chosen: list[str] = []
    for item in pool:
        if not _any_overlap([item], avoid) and not _any_overlap([item], chosen):
            chosen.append(item)
            if len(chosen) == k:
                return chosen
    return None


# Age and sex for patient vignettes, from obvious keywords of the high-risk groups.
def _person_from_group(group: str, rng: random.Random) -> str | None:
    if "新生儿" in group or "早产儿" in group:
        return f"患儿{rng.choice('男女')}，出生{rng.randint(2, 20)}天"
    if "婴幼儿" in group or "婴儿" in group:
        return f"患儿{rng.choice('男女')}，{rng.randint(1, 2)}岁"
    if "儿童" in group or "小儿" in group or "学龄" in group:
        return f"患儿{rng.choice('男女')}，{rng.randint(4, 10)}岁"
    if "青少年" in group:
        return f"患者{rng.choice('男女')}，{rng.randint(13, 17)}岁"
    if "孕妇" in group or "妊娠" in group or "孕期" in group:
        return f"患者女，{rng.randint(24, 34)}岁，妊娠期"
    if "中老年" in group:
        ages = (50, 65)
    elif "老年" in group or "老人" in group:
        ages = (65, 80)
    elif "育龄" in group or "年轻" in group or "青年" in group:
        ages = (22, 36)
    elif "绝经" in group:
        ages = (52, 65)
    else:
        ages = None
    sex = "女" if ("女性" in group or "妇女" in group or "绝经" in group) else "男" if "男性" in group else None
    if ages is None and sex is None:
        return None
    sex = sex or rng.choice("男女")
    ages = ages or (30, 50)
    return f"患者{sex}，{rng.randint(*ages)}岁"


def _person(d: dict, rng: random.Random) -> str:
    number, _ = _chapter_parts(d["icd10_chapter"])
    if number == "XVI" or "新生儿" in d["name"]:
        return f"患儿{rng.choice('男女')}，出生{rng.randint(2, 20)}天"
    if number == "XV":
        if "产后" in d["name"] or "产褥" in d["name"]:
            return f"患者女，{rng.randint(24, 36)}岁，产后{rng.randint(2, 20)}天"
        return f"患者女，{rng.randint(24, 36)}岁，妊娠期"
    if "小儿" in d["name"] or "儿童" in d["name"]:
        return f"患儿{rng.choice('男女')}，{rng.randint(4, 10)}岁"
    for group in d.get("high_risk_groups", []):
        person = _person_from_group(group, rng)
        if person:
            return person
    return f"患者{rng.choice('男女')}，{rng.randint(25, 55)}岁"


# ----------------------------------------------------------------------------------------------- patterns
# Each pattern: (index, disease, rng) -> (instruction, output), or None where the KB lacks the facts it needs.

# Single facts: field -> (question phrasings, answer phrasings); {d} disease, {x} the joined list.
_SINGLE = {
    "cause": ("causes",
              ["{d}的病因是什么？", "{d}是由什么引起的？", "引起{d}的常见原因有哪些？", "为什么会得{d}？"],
              ["{d}的常见病因包括{x}。", "{d}主要由{x}等因素引起。"]),
    "symptom": ("symptoms",
                ["{d}有哪些症状？", "{d}的典型表现是什么？", "得了{d}会有什么症状？", "{d}的常见临床表现有哪些？"],
                ["{d}的常见症状有{x}。", "{d}患者常出现{x}等表现。"]),
    "examination": ("examinations",
                    ["{d}需要做哪些检查？", "诊断{d}常用哪些检查？", "怀疑{d}时应做什么检查？"],
                    ["诊断{d}常用的检查有{x}。", "怀疑{d}时，可做{x}等检查。"]),
    "treatment": ("treatments",
                  ["{d}怎么治疗？", "{d}有哪些治疗方法？", "得了{d}该如何治疗？"],
                  ["{d}的治疗方法包括{x}。", "{d}可采用{x}等方法治疗。"]),
    "drug": ("drugs",
             ["{d}常用什么药物？", "治疗{d}常用哪些药？", "{d}一般用什么药治疗？"],
             ["{d}的常用药物有{x}，应在医生指导下使用。", "治疗{d}常用{x}等药物，需遵医嘱使用。"]),
    "complication": ("complications",
                     ["{d}会引起哪些并发症？", "{d}有哪些并发症？", "{d}如果不及时治疗可能导致什么后果？"],
                     ["{d}可能引起的并发症有{x}。", "{d}可并发{x}等。"]),
    "prevention": ("prevention",
                   ["如何预防{d}？", "{d}应该怎样预防？", "预防{d}有哪些措施？"],
                   ["预防{d}的措施包括{x}。", "预防{d}可以做到：{x}。"]),
    "high_risk": ("high_risk_groups",
                  ["哪些人容易得{d}？", "{d}的高危人群有哪些？", "{d}好发于哪些人群？"],
                  ["{d}的高危人群包括{x}。", "{x}较易患{d}。"]),
    "transmission": ("transmission",
                     ["{d}是怎么传播的？", "{d}的传播途径有哪些？", "{d}会通过什么途径传染？"],
                     ["{d}的传播途径主要有{x}。", "{d}主要经{x}等途径传播。"]),
}


def _single(pattern: str):
    field, questions, answers = _SINGLE[pattern]

    def build(ix: _Index, d: dict, rng: random.Random):
        if field not in d:
            return None
        return (_pick(rng, questions, d=d["name"]), _pick(rng, answers, d=d["name"], x=_join(d[field])))

    return build


def _department(ix, d, rng):
    q = _pick(rng, ["{d}应该挂哪个科？", "得了{d}去哪个科室就诊？", "{d}由哪个科室诊治？"], d=d["name"])
    return q, _pick(rng, ["{d}一般到{k}就诊。", "{d}通常由{k}诊治。"], d=d["name"], k=d["department"])


def _chapter(ix, d, rng):
    number, title = _chapter_parts(d["icd10_chapter"])
    q = _pick(rng, ["{d}在ICD-10中属于哪一类疾病？", "按ICD-10分类，{d}归入哪一章？"], d=d["name"])
    return q, f"{d['name']}属于ICD-10第{number}章“{title}”。"


def _symptom_exam(ix, d, rng):
    q = _pick(rng, ["{d}有哪些症状？需要做什么检查？", "{d}的常见症状和检查项目分别是什么？",
                    "请说明{d}的主要症状和应做的检查。"], d=d["name"])
    return q, f"{d['name']}的常见症状有{_join(d['symptoms'])}。常用的检查包括{_join(d['examinations'])}。"


def _cause_prevention(ix, d, rng):
    if "prevention" not in d:
        return None
    q = _pick(rng, ["{d}的病因是什么？应如何预防？", "{d}是怎么引起的，怎样预防？", "请介绍{d}的病因和预防措施。"],
              d=d["name"])
    return q, f"{d['name']}的常见病因包括{_join(d['causes'])}。预防措施有{_join(d['prevention'])}。"


def _treatment_drug(ix, d, rng):
    if "drugs" not in d:
        return None
    q = _pick(rng, ["{d}怎么治疗？常用哪些药物？", "请介绍{d}的治疗方法和常用药物。", "{d}的治疗和用药是怎样的？"],
              d=d["name"])
    return q, (f"{d['name']}的治疗方法包括{_join(d['treatments'])}。常用药物有{_join(d['drugs'])}，"
               f"应在医生指导下使用。")


def _diagnosis(ix, d, rng):
    q = _pick(rng, ["{d}的诊断思路是什么？", "怎样诊断{d}？", "临床上如何判断是否患了{d}？"], d=d["name"])
    return q, (f"诊断{d['name']}时，先看是否有{_join(d['symptoms'])}等典型表现，"
               f"再通过{_join(d['examinations'])}等检查明确诊断。")


def _overview(ix, d, rng):
    _, title = _chapter_parts(d["icd10_chapter"])
    q = _pick(rng, ["请全面介绍一下{d}。", "{d}是一种什么病？", "请简要介绍{d}的病因、症状和治疗。",
                    "我想了解{d}，能介绍一下吗？"], d=d["name"])
    return q, (f"{d['name']}属于{title}，一般到{d['department']}就诊。常见病因有{_join(d['causes'])}。"
               f"典型症状包括{_join(d['symptoms'])}。治疗方法有{_join(d['treatments'])}。")


def _vignette(ix, d, rng):
    symptoms = _shown(d)
    picked = [symptoms[i] for i in sorted(rng.sample(range(len(symptoms)), min(3, len(symptoms))))]
    q = _pick(rng, ["{p}，出现{s}，可能是什么病？应做哪些检查？", "{p}，主诉{s}。最可能的诊断是什么？需要做哪些检查？",
                    "{p}，近期出现{s}，考虑什么疾病？建议做什么检查？"], p=_person(d, rng), s=_join(picked))
    exams = _join(d["examinations"][:3])
    return q, _pick(rng, ["可能是{d}。建议做{e}。", "考虑{d}的可能。建议做{e}等检查以明确诊断。"], d=d["name"], e=exams)


def _reverse_drug_item(ix, d) -> str | None:
    """The drug a `reverse_drug` record of `d` asks about: the one fewest other diseases use."""
    if "drugs" not in d:
        return None
    return min(d["drugs"], key=lambda x: (len(ix.users("drugs", x)), d["drugs"].index(x)))


def _reverse_drug(ix, d, rng):
    drug = _reverse_drug_item(ix, d)
    if drug is None:
        return None
    others = [o["name"] for o in ix.users("drugs", drug) if o["name"] != d["name"]]
    q = _pick(rng, ["哪种疾病常用药物{x}治疗？", "{x}常用于治疗什么疾病？", "药物{x}主要用来治疗哪种病？"], x=drug)
    if not others:
        return q, f"{drug}常用于治疗{d['name']}。"
    return q, f"{drug}常用于治疗{_join([d['name'], *others[:3]])}等疾病。"


def _reverse_cause(ix, d, rng):
    causes = sorted(d["causes"], key=lambda x: (len(ix.users("causes", x)), d["causes"].index(x)))
    cause = causes[0]
    others = [o["name"] for o in ix.users("causes", cause) if o["name"] != d["name"]]
    if len(others) > 2:
        return None
    q = _pick(rng, ["{x}可能导致哪种疾病？", "哪种疾病与{x}有关？", "{x}是哪种疾病的常见病因？"], x=cause)
    if not others:
        return q, f"{cause}是{d['name']}的常见病因之一。"
    return q, f"{cause}是{_join([d['name'], *others])}等疾病的常见病因。"


def _alias(ix, d, rng):
    aliases = [a for a in d.get("aliases", []) if a in ix.unique_aliases]
    if not aliases:
        return None
    alias = rng.choice(aliases)
    if rng.random() < 0.34:
        q = _pick(rng, ["{d}还有什么别称？", "{d}又叫什么？"], d=d["name"])
        return q, f"{d['name']}又称{_join(aliases)}。"
    q = _pick(rng, ["{a}是什么病？", "{a}指的是哪种疾病？"], a=alias)
    return q, f"{alias}是{d['name']}的别称。"


def _mcq_symptom(ix, d, rng):
    shown = _specific(_shown(d), _GENERIC_SYMPTOMS)
    if len(shown) < 2:
        shown = _shown(d)
    cited = [shown[i] for i in sorted(rng.sample(range(len(shown)), min(2, len(shown))))]
    pool = [o["name"] for o in ix.others(d)
            if o["department"] != d["department"] and not _any_overlap(cited, o["symptoms"])]
    distractors = _distinct(rng, pool, 4, [d["name"]])
    if distractors is None:
        return None
    q = _pick(rng, ["患者出现{s}，最可能患的是下列哪种疾病？", "下列哪种疾病的常见症状包括{s}？",
                    "以{s}为典型表现的疾病是下列哪一项？"], s=_join(cited))
    return _mcq(rng, q, d["name"], distractors, f"{_join(cited)}是{d['name']}的常见症状。")


def _mcq_drug(ix, d, rng):
    if "drugs" not in d:
        return None
    drug = rng.choice(d["drugs"])
    pool = [o["name"] for o in ix.others(d) if o["department"] != d["department"]
            and not _any_overlap([drug], o.get("drugs", [])) and not any(drug in t for t in o["treatments"])]
    distractors = _distinct(rng, pool, 4, [d["name"]])
    if distractors is None:
        return None
    q = _pick(rng, ["药物{x}常用于治疗下列哪种疾病？", "下列哪种疾病常用{x}治疗？", "{x}可用于治疗下列哪种疾病？"], x=drug)
    return _mcq(rng, q, d["name"], distractors, f"{drug}是治疗{d['name']}的常用药物。")


def _mcq_department(ix, d, rng):
    dept = d["department"]

    def fits(k: str) -> bool:
        return not _overlap(k, dept) and k[:2] != dept[:2]

    same_chapter = ix.chapter_departments.get(d["icd10_chapter"], set())
    pool = [k for k in ix.departments if fits(k) and k not in same_chapter]
    distractors = _distinct(rng, pool, 4, [dept])
    if distractors is None:
        distractors = _distinct(rng, [k for k in ix.departments if fits(k)], 4, [dept])
    if distractors is None:
        return None
    q = _pick(rng, ["{d}患者应首选哪个科室就诊？", "{d}通常由下列哪个科室诊治？", "得了{d}应该挂下列哪个科？"],
              d=d["name"])
    return _mcq(rng, q, dept, distractors, f"{d['name']}一般在{dept}就诊。")


def _mcq_cause(ix, d, rng):
    correct = rng.choice(d["causes"])
    avoid = [*d["causes"], d["name"], *d["symptoms"], *d.get("complications", []), *ix.names]
    prefixes = {c[:2] for c in d["causes"]}
    pool = [c for o in ix.others(d)
            if o["icd10_chapter"] != d["icd10_chapter"] and o["department"] != d["department"]
            for c in ix.specific_unique(o, "causes") if c[:2] not in prefixes]
    distractors = _distinct(rng, pool, 4, avoid)
    if distractors is None:
        return None
    q = _pick(rng, ["下列哪项是{d}的常见病因？", "{d}主要与下列哪种因素有关？", "关于{d}的病因，下列哪项正确？"],
              d=d["name"])
    return _mcq(rng, q, correct, distractors, f"{d['name']}的常见病因之一是{correct}。")


def _lookup(ix, d, rng):
    """Training-only drill of the MCQ answer's look-up step: which letter holds a given option text. Options are
    this disease's name or department among others of the same kind; no medical knowledge is asked."""
    kind = rng.choice(["name", "department"])
    pool = [o["name"] for o in ix.others(d)] if kind == "name" else [k for k in ix.departments if k != d["department"]]
    distractors = _distinct(rng, pool, 4, [d[kind]])
    if distractors is None:
        return None
    distractors.insert(rng.randrange(5), d[kind])
    q = _pick(rng, ["下列选项中，哪一项是“{x}”？", "“{x}”是下列哪个选项？", "请找出“{x}”对应的选项。"], x=d[kind])
    return f"{q}\n{_option_lines(distractors)}", _mcq_answer("", distractors, d[kind])


def _compare_cause(ix, d, rng):
    other = ix.partner(d, rng)
    if other is None:
        return None
    a, b = d["name"], other["name"]
    q = _pick(rng, ["{a}和{b}的病因是否一致？", "{a}与{b}的病因相同吗？", "比较{a}和{b}的病因，二者一样吗？"], a=a, b=b)
    ca, cb = d["causes"], other["causes"]
    common = [c for c in ca if c in cb]
    if set(ca) == set(cb):
        return q, f"一致，{a}和{b}的病因都是{_join(ca)}。"
    if not common:
        return q, f"不一致，{a}的病因是{_join(ca)}，而{b}的病因是{_join(cb)}。"
    return q, f"不完全一致，二者都可由{_join(common)}引起；{a}的病因是{_join(ca)}，而{b}的病因是{_join(cb)}。"


def _compare_symptom(ix, d, rng):
    other = ix.partner(d, rng)
    if other is None:
        return None
    a, b = d["name"], other["name"]
    q = _pick(rng, ["{a}和{b}的症状有什么不同？", "如何从症状上区分{a}和{b}？", "{a}与{b}的临床表现有何区别？"], a=a, b=b)
    answer = f"{a}主要表现为{_join(d['symptoms'])}，而{b}主要表现为{_join(other['symptoms'])}。"
    common = [s for s in d["symptoms"] if s in other["symptoms"]]
    if common:
        answer += f"两者都可出现{_join(common)}。"
    return q, answer


def _triage(ix, d, rng):
    symptoms = _shown(d)
    pairs = [(symptoms[i], symptoms[j]) for i in range(len(symptoms)) for j in range(i + 1, len(symptoms))]
    rng.shuffle(pairs)
    for x, y in pairs:
        elsewhere = [o for o in ix.diseases if o["department"] != d["department"]
                     and _any_overlap([x], o["symptoms"]) and _any_overlap([y], o["symptoms"])]
        if not elsewhere:
            q = _pick(rng, ["出现{x}和{y}应该去哪个科室就诊？", "最近{x}，还伴有{y}，该挂哪个科？",
                            "{x}伴{y}，应该看什么科？"], x=x, y=y)
            return q, f"建议到{d['department']}就诊，需考虑{d['name']}等疾病的可能。"
    return None


_JUDGE = ["{x}是{d}的常见症状吗？", "{d}会出现{x}吗？", "判断：{x}是{d}的典型表现之一，对吗？"]


def _judge_true(ix, d, rng):
    x = rng.choice(_shown(d))
    return _pick(rng, _JUDGE, x=x, d=d["name"]), f"是的，{x}是{d['name']}的常见症状之一。"


def _judge_false(ix, d, rng):
    avoid = [*d["symptoms"], *d.get("complications", []), d["name"]]
    pool = [s for o in ix.others(d) if o["icd10_chapter"] != d["icd10_chapter"]
            for s in ix.specific_unique(o, "symptoms")]
    picked = _distinct(rng, pool, 1, avoid)
    if picked is None:
        return None
    return _pick(rng, _JUDGE, x=picked[0], d=d["name"]), f"不是。{d['name']}的常见症状是{_join(d['symptoms'])}。"


def _prevention_advice(ix, d, rng):
    if "prevention" not in d:
        return None
    advice = f"建议{_join(d['prevention'])}。如出现{_join(_shown(d)[:2])}等症状，应及时到{d['department']}就诊。"
    if "high_risk_groups" in d:
        group = rng.choice(d["high_risk_groups"])
        q = _pick(rng, ["作为{g}，日常生活中应如何预防{d}？", "{g}怎样降低患{d}的风险？"], g=group, d=d["name"])
        return q, f"{group}是{d['name']}的高危人群，{advice}"
    q = _pick(rng, ["日常生活中怎样做才能远离{d}？", "有什么建议可以帮助预防{d}吗？"], d=d["name"])
    return q, f"预防{d['name']}，{advice}"


PATTERNS = {
    **{name: _single(name) for name in _SINGLE},
    "department": _department,
    "chapter": _chapter,
    "symptom_exam": _symptom_exam,
    "cause_prevention": _cause_prevention,
    "treatment_drug": _treatment_drug,
    "diagnosis": _diagnosis,
    "overview": _overview,
    "vignette": _vignette,
    "reverse_drug": _reverse_drug,
    "reverse_cause": _reverse_cause,
    "alias": _alias,
    "mcq_symptom": _mcq_symptom,
    "mcq_drug": _mcq_drug,
    "mcq_department": _mcq_department,
    "mcq_cause": _mcq_cause,
    "compare_cause": _compare_cause,
    "compare_symptom": _compare_symptom,
    "triage": _triage,
    "judge_true": _judge_true,
    "judge_false": _judge_false,
    "prevention_advice": _prevention_advice,
}
MCQ_PATTERNS = frozenset(p for p in PATTERNS if p.startswith("mcq_"))
TRAIN_ONLY_PATTERNS = {"lookup": _lookup}  # drills, not knowledge: never in valid or test


# ----------------------------------------------------------------------------------------------- building


def _unit(seed: int, *parts: str) -> float:
    """A uniform number in [0, 1) from a SHA-256 of the seed and `parts` (stable across runs and machines)."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _assign_splits(tagged: list[dict], seed: int) -> None:
    """Set `split` on each record: one split per (disease, pattern) pair; MCQ pairs get a larger test share."""
    for record in tagged:
        record["_u"] = _unit(seed, "split", record["disease"], record["pattern"])
    mcq = sorted(r["_u"] for r in tagged if r["pattern"] in MCQ_PATTERNS)
    mcq_test = MCQ_TEST_SHARE
    if len(mcq) >= MIN_MCQ_TEST and sum(u < mcq_test for u in mcq) < MIN_MCQ_TEST:
        mcq_test = mcq[MIN_MCQ_TEST - 1] + 1e-12  # guarantee at least MIN_MCQ_TEST MCQs in test
    for record in tagged:
        test_share = mcq_test if record["pattern"] in MCQ_PATTERNS else TEST_SHARE
        u = record.pop("_u")
        record["split"] = "test" if u < test_share else "valid" if u < test_share + VALID_SHARE else "train"


def build_tagged(diseases: list[dict], seed: int = 42) -> list[dict]:
    """Every record with its tags: {"disease", "pattern", "split", "instruction", "input", "output"}.

    Order: diseases as given, patterns as in PATTERNS. Each record's wording comes from its own seeded RNG, so a
    record does not change when other diseases are added (except for distractors and comparison partners).
    """
    ix = _Index(diseases)
    tagged = []
    for disease in diseases:
        for pattern, build in PATTERNS.items():
            rng = random.Random(f"{seed}\x1f{disease['name']}\x1f{pattern}")
            made = build(ix, disease, rng)
            if made is None:
                continue
            instruction, output = made
            tagged.append({"disease": disease["name"], "pattern": pattern, "instruction": instruction,
                           "input": "", "output": output})
    _assign_splits(tagged, seed)
    return (tagged + _mcq_variants(ix, diseases, tagged, seed) + _drills(ix, diseases, seed)
            + _drug_uses(ix, diseases, tagged, seed))


def _drills(ix, diseases: list[dict], seed: int) -> list[dict]:
    """LOOKUP_DRILLS records of each TRAIN_ONLY_PATTERNS pattern per disease, all in the training split."""
    drills = []
    for disease in diseases:
        for pattern, build in TRAIN_ONLY_PATTERNS.items():
            for k in range(LOOKUP_DRILLS):
                made = build(ix, disease, random.Random(f"{seed}\x1f{disease['name']}\x1f{pattern}\x1f{k}"))
                if made is not None:
                    drills.append({"disease": disease["name"], "pattern": pattern, "instruction": made[0],
                                   "input": "", "output": made[1], "split": "train"})
    return drills


def _drug_uses(ix, diseases: list[dict], tagged: list[dict], seed: int) -> list[dict]:
    """Training-only statements, one per drug of the KB: which diseases it treats (drug → disease, the direction
    that `drug`, `treatment_drug` and `overview` never state: a small model that learns "D常用药物有X" does not
    thereby answer "X常用于治疗哪种病"). A drug asked about by a valid or test `reverse_drug` record gets none, so
    those held-out pairs stay unseen."""
    by_name = {d["name"]: d for d in diseases}
    held_out = {_reverse_drug_item(ix, by_name[r["disease"]]) for r in tagged
                if r["pattern"] == "reverse_drug" and r["split"] != "train"}
    records = []
    for drug in sorted({x for d in diseases for x in d.get("drugs", [])} - held_out):
        users = [o["name"] for o in ix.users("drugs", drug)]
        rng = random.Random(f"{seed}\x1fdrug_uses\x1f{drug}")
        q = _pick(rng, ["{x}可以治疗哪些疾病？", "药物{x}有什么用途？", "{x}适用于哪些疾病？"], x=drug)
        several = "等疾病" if len(users) > 1 else ""
        records.append({"disease": users[0], "pattern": "drug_uses", "instruction": q, "input": "",
                        "output": f"{drug}常用于治疗{_join(users)}{several}。", "split": "train"})
    return records


def _mcq_variants(ix, diseases: list[dict], tagged: list[dict], seed: int) -> list[dict]:
    """More training MCQs from the training (disease, pattern) pairs only, so test pairs stay unseen: the same
    question with other wording, distractors and answer letter teaches the choice rather than a letter."""
    by_name = {d["name"]: d for d in diseases}
    seen = {r["instruction"] for r in tagged}
    extra = []
    for record in tagged:
        if record["split"] != "train" or record["pattern"] not in MCQ_PATTERNS:
            continue
        for k in range(1, MCQ_TRAIN_VARIANTS):
            rng = random.Random(f"{seed}\x1f{record['disease']}\x1f{record['pattern']}\x1f{k}")
            made = PATTERNS[record["pattern"]](ix, by_name[record["disease"]], rng)
            if made is not None and made[0] not in seen:
                seen.add(made[0])
                extra.append({**record, "instruction": made[0], "output": made[1]})
    return extra


def build_records(diseases: list[dict], seed: int = 42) -> dict[str, list[dict]]:
    """{"train", "valid", "test"} → records with exactly the keys instruction, input, output (seeded order)."""
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for record in build_tagged(diseases, seed):
        splits[record["split"]].append({key: record[key] for key in ("instruction", "input", "output")})
    for name, records in splits.items():
        random.Random(f"{seed}\x1fshuffle\x1f{name}").shuffle(records)
    return splits


def build_dataset(out_dir: str | Path, seed: int = 42, kb_dir: str | Path | None = None,
                  kb_path: str | Path | None = None) -> dict[str, int]:
    """Write train.jsonl, valid.jsonl and test.jsonl into `out_dir` (atomically); returns the record counts.

    `kb_path` is an alias of `kb_dir` (a folder of ch*.yaml files, or one such file).
    """
    if kb_dir is not None and kb_path is not None and Path(kb_dir) != Path(kb_path):
        raise DataError(f"give the knowledge base once: kb_dir={kb_dir} and kb_path={kb_path} differ")
    splits = build_records(load_knowledge_base(kb_dir if kb_dir is not None else kb_path), seed=seed)
    out = Path(out_dir)
    for name in SPLITS:
        atomic_write_jsonl(out / f"{name}.jsonl", splits[name])
    return {name: len(splits[name]) for name in SPLITS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build train/valid/test instruction records from the KB.")
    parser.add_argument("--out", default="data/medqa", help="output folder (default: data/medqa)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (same seed, same files)")
    parser.add_argument("--kb", default=None, help="knowledge-base folder or file (default: the built-in one)")
    args = parser.parse_args(argv)
    counts = build_dataset(args.out, seed=args.seed, kb_dir=args.kb)
    print(", ".join(f"{name}: {n} records" for name, n in counts.items()) + f" in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
