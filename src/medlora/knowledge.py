"""The knowledge base as something to look facts up in: a disease by name or alias, the attribute a question asks
for, the facts a question needs, and which of a disease's facts a text names. The exam's fact-level scores
(medlora.evaluate) use it, and so will knowledge-tuning (docs/knowledge.md).

Sources (`KnowledgeIndex.load`): `kb` (the curated knowledge base), `cmekg` (needs the `cmekg` extra), `both`, or a
JSONL/YAML file of `{name, aliases, <attribute>: [items]}` records. Retrieval is deterministic and needs no model.

Matching is documented in docs/evaluation.md ("Fact-level scores"): texts are compared after NFKC, lower-casing and
dropping whitespace and punctuation; an item counts as named when it, a listed synonym, or (for an item that is
itself a knowledge-base disease) one of that disease's aliases occurs in the text, or when an item of 5 or more
characters matches with one character changed (rapidfuzz partial ratio ≥ 80).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from medlora.errors import DataError
from medlora.evaluate import normalise

FUZZY_CUTOFF = 80  # rapidfuzz partial_ratio for a name or alias of 5+ characters: one character changed

# The attributes a question can ask for, with the knowledge base's key (department is a single string there).
ATTRIBUTES = {
    "symptoms": "症状", "causes": "病因", "drugs": "常用药物", "examinations": "检查", "treatments": "治疗",
    "department": "就诊科室", "complications": "并发症", "prevention": "预防", "high_risk_groups": "高危人群",
    "transmission": "传播途径",
}

# What a question says when it asks for one attribute. Checked in this order; "drugs" hides "treatments"
# (用什么药治疗 asks for drugs).
_ASKS = {
    "department": r"哪个科|什么科|哪一科|哪些科|挂.{0,4}科|挂号|就诊科室",
    "drugs": r"药",
    "examinations": r"检查|化验|确诊",
    "symptoms": r"症状|表现|体征",
    "causes": r"病因|原因|病原|引起|导致|怎么得的|为什么会得",
    "complications": r"并发症",
    "prevention": r"预防",
    "transmission": r"传播|传染途径|怎么传染",
    "high_risk_groups": r"高危|易感|哪些人|什么人",
    "treatments": r"治疗|怎么治|如何治",
}

# Other common wordings of knowledge-base items (the KB writes one wording per item).
SYNONYMS = {
    "心血管内科": ["心内科"], "心血管外科": ["心外科"], "呼吸内科": ["呼吸科"], "消化内科": ["消化科"],
    "神经内科": ["神经科"], "耳鼻咽喉科": ["耳鼻喉科"], "风湿免疫科": ["风湿科"], "普通外科": ["普外科"],
    "感染科": ["传染科", "感染性疾病科"], "肾内科": ["肾脏内科"], "内分泌科": ["内分泌代谢科"],
    "精神科": ["精神心理科", "心理科"], "肿瘤科": ["肿瘤内科"],
    "对乙酰氨基酚": ["扑热息痛"], "沙丁胺醇": ["舒喘灵"], "胸部X线": ["胸片", "X线胸片", "胸部X光"],
    "心电图": ["ECG"], "血常规": ["血细胞分析"],
}


class KnowledgeIndex:
    """Diseases of the curated knowledge base (or any list of such dicts), by name and alias."""

    def __init__(self, diseases: list[dict]):
        self.diseases = {d["name"]: d for d in diseases}
        self._names = {}  # normalised name or alias -> disease name
        for d in diseases:
            for form in [d["name"], *d.get("aliases", [])]:
                self._names.setdefault(normalise(form), d["name"])
        self._by_length = sorted(self._names, key=len, reverse=True)
        self._fuzzy_forms = [f for f in self._by_length if len(f) >= 5]  # what `link(fuzzy=True)` may match
        self._vocab = {}  # attribute -> {normalised form: canonical item}, over all diseases
        for attribute in ATTRIBUTES:
            forms = {}
            for d in diseases:
                for item in self.items(d["name"], attribute):
                    for form in self.forms(item):
                        forms.setdefault(form, item)
            self._vocab[attribute] = forms

    @classmethod
    def builtin(cls, kb_dir: str | Path | None = None) -> "KnowledgeIndex":
        return _builtin(str(kb_dir) if kb_dir else None)

    def items(self, disease: str, attribute: str) -> list[str]:
        """The knowledge base's items for one attribute of one disease ([] when it has none)."""
        entry = self.diseases.get(disease) or {}
        value = entry.get(attribute)
        return [value] if isinstance(value, str) else list(value or [])

    def forms(self, item: str) -> list[str]:
        """An item's normalised wordings: itself, its synonyms, and the aliases of the disease it names."""
        forms = [item, *SYNONYMS.get(item, [])]
        entry = self.diseases.get(item)
        if entry:
            forms += entry.get("aliases", [])
        return [f for f in dict.fromkeys(normalise(f) for f in forms) if f]

    def link(self, text: str, fuzzy: bool = False) -> list[str]:
        """Diseases named in `text`, longest names first and without overlaps, in order of appearance. With `fuzzy`,
        a text that names none exactly links to the one name or alias of 5+ characters that it contains with one
        character changed (rapidfuzz partial_ratio ≥ FUZZY_CUTOFF; a tie links none)."""
        said, found, taken = normalise(text), [], []
        for form in self._by_length:
            start = said.find(form)
            while start >= 0:
                span = range(start, start + len(form))
                if not any(s in t for t in taken for s in (span.start, span.stop - 1)):
                    taken.append(span)
                    found.append((start, self._names[form]))
                start = said.find(form, start + 1)
        if not found and fuzzy:
            return self._fuzzy_link(said)
        return list(dict.fromkeys(name for _, name in sorted(found)))

    def _fuzzy_link(self, said: str) -> list[str]:
        from rapidfuzz import fuzz, process

        best = process.extract(said, self._fuzzy_forms, scorer=fuzz.partial_ratio, score_cutoff=FUZZY_CUTOFF,
                               limit=2)
        if not best or (len(best) == 2 and best[1][1] == best[0][1]
                        and self._names[best[1][0]] != self._names[best[0][0]]):
            return []
        return [self._names[best[0][0]]]

    def asked_attribute(self, question: str) -> str | None:
        """The one attribute a question asks for, or None when it asks for none or several."""
        hits = [a for a, pattern in _ASKS.items() if re.search(pattern, question)]
        if "drugs" in hits and "treatments" in hits:
            hits.remove("treatments")
        return hits[0] if len(hits) == 1 else None

    def names(self, text: str, item: str) -> bool:
        """Whether `text` names `item` (exactly, by synonym or alias, or with one character changed)."""
        said = normalise(text)
        forms = self.forms(item)
        if any(form in said for form in forms):
            return True
        from rapidfuzz import fuzz

        return any(len(form) >= 5 and fuzz.partial_ratio(form, said) >= 80 for form in forms)

    def terms(self, text: str, attribute: str) -> set[str]:
        """The knowledge-base items of `attribute` (over all diseases) that `text` names, by exact wording; a term
        inside a longer named term (沙美特罗 in 沙美特罗替卡松) is not counted twice."""
        said = normalise(text)
        found = [form for form in self._vocab.get(attribute, {}) if form in said]
        kept = [f for f in found if not any(f != g and f in g for g in found)]
        return {self._vocab[attribute][f] for f in kept}


    def retrieve(self, question: str, max_diseases: int = 2) -> "Retrieved":
        """The facts a question needs: the diseases it names (exactly, else with one character changed), and for
        each the attribute it asks for, or when it asks for none or several, the department, symptoms and drugs."""
        diseases = self.link(question, fuzzy=True)[:max_diseases]
        attribute = self.asked_attribute(question)
        keys = [attribute] if attribute else ["department", "symptoms", "drugs"]
        facts = [(d, key, self.items(d, key)) for d in diseases for key in keys if self.items(d, key)]
        return Retrieved(diseases, attribute, facts)

    @classmethod
    def load(cls, source: str) -> "KnowledgeIndex":
        """`kb`, `cmekg`, `both`, or a JSONL/YAML file of knowledge records."""
        if source in ("kb", "cmekg", "both"):
            from medlora.databuild import load_sources

            return cls(load_sources(source))
        return cls(read_knowledge_file(source))


@dataclass
class Retrieved:
    """What `KnowledgeIndex.retrieve` found: the linked diseases, the attribute asked, and (disease, attribute,
    items) facts."""

    diseases: list[str]
    attribute: str | None
    facts: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def text(self) -> str:
        """The facts as short lines (`支气管哮喘·常用药物：沙丁胺醇、孟鲁司特`), empty when nothing was found."""
        return "\n".join(f"{d}·{ATTRIBUTES[key]}：{'、'.join(items)}" for d, key, items in self.facts)


def read_knowledge_file(path: str | Path) -> list[dict]:
    """A user's knowledge: JSONL (one record a line) or YAML (a list) of `{name, aliases, <attribute>: [items]}`
    with attributes from ATTRIBUTES (`department` a string); one DataError line naming file, record and field."""
    import yaml

    from medlora.data import _read_jsonl

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such knowledge file (or give kb, cmekg or both)")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"{path}: not readable YAML ({str(exc).splitlines()[0][:120]})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a YAML knowledge file must be a list of records")
        rows = [(f"record {i}", row) for i, row in enumerate(data, 1)]
    else:
        rows = list(_read_jsonl(path))
    records, seen = [], set()
    for where, row in rows:
        record = _knowledge_record(row, f"{path}: {where}")
        if record["name"] in seen:
            raise DataError(f"{path}: {where}: field 'name' repeats {record['name']!r}")
        seen.add(record["name"])
        records.append(record)
    if not records:
        raise DataError(f"{path}: no knowledge records")
    return records


def _knowledge_record(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a knowledge record must be an object, got {type(row).__name__}")
    name = row.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: field 'name' must be a non-empty string")
    record = {"name": name.strip()}
    for key, value in row.items():
        if key == "name":
            continue
        if key != "aliases" and key not in ATTRIBUTES:
            raise DataError(f"{where}: field {key!r} is not one of aliases, {', '.join(ATTRIBUTES)}"[:300])
        if key == "department" and isinstance(value, str) and value.strip():
            record[key] = value.strip()
        elif isinstance(value, list) and value and all(isinstance(x, str) and x.strip() for x in value):
            record[key] = [x.strip() for x in value]
        else:
            raise DataError(f"{where}: field {key!r} must be a non-empty list of strings")
    return record


@lru_cache(maxsize=4)
def _builtin(kb_dir: str | None) -> KnowledgeIndex:
    from medlora.databuild import load_knowledge_base

    return KnowledgeIndex(load_knowledge_base(kb_dir))
