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

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from medlora.errors import DataError
from medlora.evaluate import ASKS_FOR_NAME, normalise

FUZZY_CUTOFF = 80  # rapidfuzz partial_ratio for a name or alias of 5+ characters: one character changed
MAX_ITEMS = 10  # items per retrieved fact line (CMeKG lists run to dozens)
MIN_ITEM_CHARS = 3  # a disease found by the items a question names must hold 3+ of their characters (not just 疼痛)

# The attributes a question can ask for, with the knowledge base's key (department is a single string there).
ATTRIBUTES = {
    "symptoms": "症状", "causes": "病因", "drugs": "常用药物", "examinations": "检查", "treatments": "治疗",
    "department": "就诊科室", "complications": "并发症", "prevention": "预防", "high_risk_groups": "高危人群",
    "transmission": "传播途径",
}

DEFAULT_KEYS = ("department", "symptoms", "drugs")  # retrieved when a question asks for no attribute in particular
# Shown when asked, besides ATTRIBUTES (not scored as facts): other names, and the ICD-10 chapter.
EXTRA_KEYS = {"aliases": "别称", "icd10_chapter": "ICD-10章节"}
_ASKS_EXTRA = {"aliases": ASKS_FOR_NAME.pattern + "|叫法", "icd10_chapter": r"ICD|哪一章|哪章|属于哪"}
_ASKS_ALL = r"介绍|讲讲|怎么回事|是什么病"  # a question about the whole entry
# A question that asks which disease (or what a drug is for, where symptoms point): only such a question is answered
# from the diseases whose items it names; one about a disease the knowledge lacks (三叉神经痛用什么药) is not.
_ASKS_DISEASE = (r"哪[种类些一个]*(?:疾病|病)|什么(?:疾病|病)|治什么|用于什么|有什么用|用途|适应[证症]|针对什么|"
                 r"提示什么|考虑什么|可能是什么|是什么原因|诊断是什么|怎么回事|是什么情况|症状.{0,3}怎么办|"
                 r"哪个科|什么科|哪些科|哪一科|挂.{0,4}科|就诊")
LABELS = {**ATTRIBUTES, **EXTRA_KEYS}

# What a question says when it asks for one attribute. Checked in this order; "drugs" hides "treatments"
# (用什么药治疗 asks for drugs).
_ASKS = {
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
        self._owners = {}  # normalised form of 2+ characters -> [(disease, attribute)] whose items it is
        for attribute in ATTRIBUTES:
            forms = {}
            for d in diseases:
                for item in self.items(d["name"], attribute):
                    for form in self.forms(item):
                        forms.setdefault(form, item)
                        if len(form) >= 2:
                            self._owners.setdefault(form, []).append((d["name"], attribute))
            self._vocab[attribute] = forms
        self._longest_item = max(map(len, self._owners), default=0)

    @classmethod
    def builtin(cls, kb_dir: str | Path | None = None) -> "KnowledgeIndex":
        return _builtin(str(kb_dir) if kb_dir else None)

    def items(self, disease: str, attribute: str) -> list[str]:
        """The knowledge base's items for one attribute (or EXTRA_KEYS field) of one disease ([] when none)."""
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
        hits = self.asked_attributes(question)
        return hits[0] if len(hits) == 1 else None

    @staticmethod
    def asked_attributes(question: str) -> list[str]:
        """Every attribute a question asks for, in _ASKS order."""
        hits = [a for a, pattern in _ASKS.items() if re.search(pattern, question)]
        if "drugs" in hits and "treatments" in hits:
            hits.remove("treatments")
        return hits

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

    def retrieve(self, question: str, max_diseases: int = 2, context=()) -> "Retrieved":
        """The facts a question needs. Diseases: those it names (exactly, else with one character changed), else
        those the nearest of the earlier turns in `context` (newest first) names (a follow-up such as 它用什么药
        is about the disease of the conversation), else, for
        a question that asks which disease (or department, or what a drug is for), those whose entries hold the
        most of the items it names (a drug, symptoms: 吡格列酮治什么病). For each:
        the department, and the attributes it asks for (up to three; every attribute for 介绍/怎么回事; the
        department, symptoms and drugs when it asks for none in particular); aliases and ICD chapter when asked.
        Lists are cut at MAX_ITEMS items."""
        diseases = self.link(question, fuzzy=True)[:max_diseases]
        for earlier in context:
            if diseases:
                break
            diseases = self.link(earlier, fuzzy=True)[:max_diseases]
        asked = self.asked_attributes(question)
        matched: dict[str, list[str]] = {}
        if not diseases and re.search(_ASKS_DISEASE, question):
            matched = self._owners_of_items(question, max_diseases)
            diseases = list(matched)
        if re.search(_ASKS_ALL, question):
            keys = list(ATTRIBUTES)
        else:
            keys = ["department", *asked] if 0 < len(asked) <= 3 else list(DEFAULT_KEYS)
        keys += [key for key, pattern in _ASKS_EXTRA.items() if re.search(pattern, question)]
        keys = [key for key in dict.fromkeys(keys)]
        facts = [(d, key, self.items(d, key)[:MAX_ITEMS]) for d in diseases
                 for key in dict.fromkeys([*keys, *matched.get(d, [])]) if self.items(d, key)]
        return Retrieved(diseases, asked[0] if len(asked) == 1 else None, facts)

    def retrieve_turn(self, instruction: str, input: str = "", history=()) -> "Retrieved":
        """`retrieve` for a record's last turn: its instruction (and input), a follow-up's disease from the earlier
        user turns of `history`, newest first. The one way training and inference put a turn to the retriever."""
        return self.retrieve(f"{instruction}\n{input}" if input else instruction,
                             context=[user for user, _ in reversed(history)])

    def _owners_of_items(self, question: str, limit: int) -> dict[str, list[str]]:
        """The diseases whose entries hold the most (by characters, MIN_ITEM_CHARS or more) of the items `question`
        names, with the attributes those items are in; ties go to the name first in sorted order. Items are found by
        looking the question's substrings up (longest first, without overlaps, each item once), not by scanning the
        tens of thousands of CMeKG items."""
        said, spans = normalise(question), []
        for start in range(len(said)):
            for end in range(min(len(said), start + self._longest_item), start + 1, -1):
                if said[start:end] in self._owners:
                    spans.append((start, end))
                    break
        taken, seen, score, keys = [], set(), {}, {}
        for start, end in sorted(spans, key=lambda span: (span[0] - span[1], span[0])):
            form = said[start:end]
            if form in seen or any(start < stop and begin < end for begin, stop in taken):
                continue
            taken.append((start, end))
            seen.add(form)
            for disease, key in self._owners[form]:
                score[disease] = score.get(disease, 0) + len(form)
                keys.setdefault(disease, []).append(key)
        best = sorted((d for d in score if score[d] >= MIN_ITEM_CHARS), key=lambda d: (-score[d], d))[:limit]
        return {d: list(dict.fromkeys(keys[d])) for d in best}

    def facts(self, diseases: list[str], keys) -> list[tuple[str, str, list[str]]]:
        return [(d, key, self.items(d, key)[:MAX_ITEMS]) for d in diseases for key in keys if self.items(d, key)]

    @cached_property
    def sha256(self) -> str:
        """The content hash of the knowledge (recorded in an adapter's medlora.json)."""
        text = json.dumps(sorted(self.diseases.values(), key=lambda d: d["name"]), ensure_ascii=False,
                          sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def load(cls, source: str) -> "KnowledgeIndex":
        """`kb`, `cmekg`, `both`, or a JSONL/YAML file of knowledge records."""
        if source in ("kb", "cmekg", "both"):
            return _source(source)
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
        return "\n".join(f"{d}·{LABELS[key]}：{'、'.join(items)}" for d, key, items in self.facts)

    @classmethod
    def from_dict(cls, data: dict) -> "Retrieved":
        return cls(list(data.get("diseases", [])), data.get("attribute"),
                   [(f["disease"], f["attribute"], list(f["items"])) for f in data.get("facts", [])])

    def to_dict(self) -> dict:
        """The entries as results.jsonl, the server's `medlora_knowledge` field and the web page show them."""
        return {"diseases": self.diseases, "attribute": self.attribute,
                "facts": [{"disease": d, "attribute": key, "items": items} for d, key, items in self.facts]}


NOISE_KINDS = ("irrelevant", "partial", "missing")


def knowledge_for_training(records: list[dict], index: KnowledgeIndex, noise: float = 0.0, seed: int = 42
                           ) -> tuple[list[dict], dict[str, int]]:
    """Training records with the `knowledge` text the template shows, and how many got each kind of noise.

    With probability `noise`, a record is changed so that the model learns to use good facts and ignore bad ones
    (docs/knowledge.md): `irrelevant` adds another disease's entry (the answer stays); for a question about one
    attribute of a linked disease (not a multiple-choice one), `partial` shows that disease's other attributes
    instead of the asked one and `missing` shows no entry, and the answer becomes an honest "I have no reliable
    information" (the wordings of the data's unknown-disease answers). A third of the noise goes to each kind."""
    from medlora.databuild.safety import honest_answer
    from medlora.evaluate import offered_letters

    names = sorted(index.diseases)
    out, counts = [], {kind: 0 for kind in NOISE_KINDS}
    for number, record in enumerate(records):
        rng = random.Random(f"{seed}\x1fknowledge\x1f{number}")
        found = index.retrieve_turn(record["instruction"], record.get("input", ""), record.get("history") or ())
        facts, output, kind = found.facts, record["output"], None
        roll = rng.random()
        single = found.attribute and found.facts and not offered_letters(record)
        if roll < noise / 3 and names:
            other = rng.choice(names)
            keys = dict.fromkeys(key for _, key, _ in found.facts) or DEFAULT_KEYS
            extra = index.facts([other], keys) if other not in found.diseases else []
            facts = extra + facts if rng.random() < 0.5 else facts + extra
            kind = "irrelevant" if extra else None
        elif roll < noise and single:
            disease = found.diseases[0]
            if roll < 2 * noise / 3:
                others = [key for key in ATTRIBUTES if key != found.attribute and index.items(disease, key)]
                facts, kind = index.facts([disease], others[:2]), "partial"
            else:
                facts, kind = [], "missing"
            output = honest_answer(disease, rng)
        if kind:
            counts[kind] += 1
        out.append({**record, "output": output, "knowledge": Retrieved(found.diseases, found.attribute, facts).text()})
    return out, counts


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


@lru_cache(maxsize=3)
def _source(name: str) -> KnowledgeIndex:
    from medlora.databuild import load_sources

    return KnowledgeIndex(load_sources(name))


@lru_cache(maxsize=4)
def _builtin(kb_dir: str | None) -> KnowledgeIndex:
    from medlora.databuild import load_knowledge_base

    return KnowledgeIndex(load_knowledge_base(kb_dir))
