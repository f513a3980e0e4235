"""The medical vocabulary every layer shares, at the bottom of the house: it imports nothing of medlora's.

- text normalisation (what matching compares): NFKC (full-width → half-width), lower case, no whitespace or
  punctuation, traditional characters → simplified (OpenCC `t2s`);
- the attributes a knowledge-base entry has, and the words with which a question asks for each;
- multiple-choice options (`A. …`) and the question text of a record;
- one synonym table (a canonical wording → the other wordings people and sources use), read in both directions:
  `wordings(item)` for scoring an answer, `canonical(word)` for retrieval and for cleaning CMeKG's departments;
- the ICD-10 chapter names of the knowledge-base schema (`kb/SCHEMA.md`).

Retrieval (medlora.knowledge), data generation (medlora.databuild) and scoring (medlora.eval) import their
words from here, never from one another.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# --- text normalisation --------------------------------------------------------------------------------------


def _is_punct_or_space(char: str) -> bool:
    return char.isspace() or unicodedata.category(char)[0] in "PZ"


def char_tokens(text: str) -> list[str]:
    """One token per character after NFKC and lower-casing; whitespace and punctuation (Chinese and ASCII) dropped.
    (ROUGE's tokens: characters as written, traditional ones included.)"""
    return [c for c in unicodedata.normalize("NFKC", text or "").lower() if not _is_punct_or_space(c)]


@lru_cache(maxsize=1)
def _to_simplified():
    import opencc

    return opencc.OpenCC("t2s").convert


def simplified(text: str) -> str:
    """Traditional characters as simplified ones (OpenCC t2s, character by character and its phrase table);
    simplified text comes back as it was."""
    return _to_simplified()(text) if text and not text.isascii() else text


def normalise(text: str) -> str:
    """The text exact matching compares: NFKC (full-width → half-width), lower case, no whitespace or punctuation,
    simplified characters (高血壓 → 高血压)."""
    return simplified("".join(char_tokens(text)))


# --- attributes and the words that ask for them ------------------------------------------------------------------

# The attributes a question can ask for, with the knowledge base's key (department is a single string there).
ATTRIBUTES = {
    "symptoms": "症状", "causes": "病因", "drugs": "常用药物", "examinations": "检查", "treatments": "治疗",
    "department": "就诊科室", "complications": "并发症", "prevention": "预防", "high_risk_groups": "高危人群",
    "transmission": "传播途径",
}
# Shown when asked, besides ATTRIBUTES (not scored as facts): other names, and the ICD-10 chapter.
EXTRA_KEYS = {"aliases": "别称", "icd10_chapter": "ICD-10章节"}
LABELS = {**ATTRIBUTES, **EXTRA_KEYS}
DEFAULT_KEYS = ("department", "symptoms", "drugs")  # retrieved when a question asks for no attribute in particular

# The words an urgent order opens with (立即拨打120…): every emergency answer of the training data opens with 立即.
URGENT_OPENERS = ("立即", "立刻", "马上", "赶紧")

ASKS_FOR_NAME = re.compile(r"别称|别名|又称|又叫|俗称|还叫|简称|学名|全称|名称|名字")
# What a question says when it asks for one attribute. Checked in this order; "drugs" hides "treatments"
# (用什么药治疗 asks for drugs).
ASKS = {
    "department": r"哪个科|什么科|哪一科|哪些科|挂.{0,4}科|挂号|就诊科室",
    "drugs": r"药",
    "examinations": r"检查|化验|确诊|诊断",
    "symptoms": r"症状|表现|体征",
    "causes": r"病因|原因|病原|引起|导致|怎么得的|为什么会得",
    "complications": r"并发症|严重|要紧|危险|危害|后果",
    "prevention": r"预防|不得|避免|远离|防止",
    "transmission": r"传播|传染途径|怎么传染",
    "high_risk_groups": r"高危|易感|哪些人|什么人",
    "treatments": r"治疗|怎么治|如何治",
}
ASKS_EXTRA = {"aliases": ASKS_FOR_NAME.pattern + "|叫法", "icd10_chapter": r"ICD|哪一章|哪章|属于哪"}
ASKS_ALL = r"介绍|讲讲|怎么回事|是什么病"  # a question about the whole entry
# A question that asks which disease (or what a drug is for, where symptoms point).
ASKS_DISEASE = (r"哪[种类些一个]*(?:疾病|病)|什么(?:疾病|病)|治什么|用于什么|有什么用|用途|适应[证症]|针对什么|"
                r"提示什么|考虑什么|可能是什么|是什么原因|诊断是什么|怎么回事|是什么情况|症状.{0,3}怎么办|"
                r"哪个科|什么科|哪些科|哪一科|挂.{0,4}科|就诊")


def asked_attributes(question: str) -> list[str]:
    """Every attribute a question asks for, in ASKS order."""
    hits = [a for a, pattern in ASKS.items() if re.search(pattern, question)]
    if "drugs" in hits and "treatments" in hits:
        hits.remove("treatments")
    return hits


# --- multiple-choice options ------------------------------------------------------------------------------------

LETTERS = "ABCDE"
LETTER = rf"[{LETTERS}]"
OPEN = r"[(（\[【]"
CLOSE = r"[)）\]】]"
MARK = r"[.．、:：)）\]】]"  # what follows an option letter in "A. 肝硬化", "B、", "C）"
ALONE = r"(?![A-Za-z0-9])"  # an option letter stands alone: "B项" yes, "B12" or "Beta" no
_OPTION = re.compile(rf"(?:^|(?<=\s)|(?<={OPEN})|(?<=[)）。？?：:，,]))({LETTER})\s*{MARK}\s*(.+?)"
                     rf"(?=\s+{OPEN}?{LETTER}\s*{MARK}|\s*$|\s*\n)", re.M)


def parse_options(text: str) -> dict[str, str]:
    """Options listed as `A. …` (or `A、…`, `(A) …`), one a line or several on one line: {letter: text}."""
    text = unicodedata.normalize("NFKC", text or "")
    options = {}
    for letter, body in _OPTION.findall(text):
        options.setdefault(letter, body.strip())
    return options if len(options) >= 2 else {}


def question_text(row: dict) -> str:
    """A record's question: its instruction, and its input on the next line when it has one."""
    instruction, input = row.get("instruction") or "", row.get("input") or ""
    return f"{instruction}\n{input}" if input else instruction


def offered_letters(row: dict) -> str:
    """The option letters the question offers ('' for a question without options)."""
    return "".join(sorted(parse_options(question_text(row))))


# --- synonyms: one table, read both ways ------------------------------------------------------------------------

# canonical wording (the curated knowledge base's) → other wordings. Departments: the clinic names patients and
# CMeKG use; items: common names of drugs, examinations and symptoms. No single-character wording (it would be found
# inside any text).
SYNONYMS = {
    "心血管内科": ["心内科", "心血管科", "心脏内科"], "心血管外科": ["心外科", "心脏外科"],
    "呼吸内科": ["呼吸科"], "消化内科": ["消化科"], "神经内科": ["神经科"], "血液科": ["血液内科"],
    "耳鼻咽喉科": ["耳鼻喉科", "耳鼻喉", "耳鼻咽喉头颈外科", "耳鼻咽喉-头颈外科"], "风湿免疫科": ["风湿科"],
    "普通外科": ["普外科", "普外", "基本外科"],
    "感染科": ["传染科", "感染性疾病科", "传染病科", "感染和临床微生物科", "感染和微生物科"],
    "肾内科": ["肾脏内科"], "内分泌科": ["内分泌代谢科"], "肿瘤科": ["肿瘤内科"],
    "精神科": ["精神心理科", "心理科", "精神专科", "精神医学科"], "烧伤科": ["烧伤外科", "烧伤整形科"],
    "急诊科": ["急诊", "急诊室", "急症科"], "泌尿外科": ["泌尿科", "泌尿外科学"], "小儿外科": ["儿外科"],
    "神经外科": ["神经外科学"], "皮肤科": ["皮肤病科", "皮肤性病科"],
    "对乙酰氨基酚": ["扑热息痛"], "沙丁胺醇": ["舒喘灵"], "胸部X线": ["胸片", "X线胸片", "胸部X光"],
    "心电图": ["ECG"], "血常规": ["血细胞分析"],
    # symptoms as patients say them
    "发热": ["发烧"], "头痛": ["头疼"], "腹泻": ["拉肚子", "拉稀"], "腹痛": ["肚子疼", "肚子痛"],
    "心悸": ["心慌", "心跳快"], "呼吸困难": ["喘不上气", "喘不过气", "上不来气"], "乏力": ["没力气", "没劲"],
    "多饮": ["口渴", "老想喝水"], "多尿": ["尿多"], "胸痛": ["胸口疼", "胸口痛"], "瘙痒": ["发痒", "很痒"],
    "咽痛": ["嗓子疼", "喉咙痛", "嗓子痛", "喉咙疼"], "鼻塞": ["鼻子不通气", "鼻子堵"], "头晕": ["头昏"],
    "恶心": ["想吐", "反胃"], "视物模糊": ["看东西模糊", "看不清"], "耳鸣": ["耳朵嗡嗡响"],
    "便秘": ["大便干", "拉不出"], "失眠": ["睡不着"], "水肿": ["浮肿"], "黄疸": ["皮肤发黄", "眼睛发黄"],
}
_CANONICAL = {word: item for item, words in SYNONYMS.items() for word in words}


def wordings(item: str) -> list[str]:
    """An item and its other wordings (SYNONYMS read forward)."""
    return [item, *SYNONYMS.get(item, [])]


def canonical(word: str) -> str:
    """The canonical wording of `word` (SYNONYMS read backward); the word itself when it has none."""
    return _CANONICAL.get(word, word)


# --- the knowledge base's schema ---------------------------------------------------------------------------------

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
